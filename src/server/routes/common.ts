/**
 * What the generation routes share: adapter id resolution, submitting to the engine with an
 * AbortSignal tied to the client connection, and SSE responses.
 */
import { PassThrough } from 'node:stream';
import type { FastifyReply, FastifyRequest } from 'fastify';
import type { GenerateRequest, GenerationResult, GenerationSink, TokenInfo } from '../../engine/types.ts';
import { ERRORS, errorBody, fail, type ErrorCode, type ServeError } from '../../errors.ts';
import { validateAdapterId } from '../../lora/ids.ts';
import type { AppDeps } from '../app.ts';

/** 5xx codes whose messages are written for clients; other 5xx errors (startup-time, internal) may name files or backends. */
const PUBLIC_5XX = new Set<ErrorCode>(['NOT_READY', 'SHUTTING_DOWN', 'TIMEOUT', 'ADAPTER_FETCH_FAILED', 'ADAPTER_FETCH_TIMEOUT', 'WORKER_DIED']);

/** The catalogue's `{error, error_type, code}`, with a generic message for internal 5xx errors (the log has the detail). */
export function publicErrorBody(err: ServeError): ReturnType<typeof errorBody> {
  const out = errorBody(err);
  if (out.status >= 500 && !PUBLIC_5XX.has(err.code)) out.body.error = 'internal server error';
  return out;
}

/** The same error in OpenAI's shape; `param` is the request field at fault, when the error names one. */
export function openAIErrorBody(err: ServeError) {
  const body = publicErrorBody(err).body;
  const param = err.details?.param;
  return { error: { message: body.error, type: body.error_type, param: typeof param === 'string' ? param : null, code: body.code } };
}

/**
 * The status an error is answered with: the catalogue's, except that OpenAI routes answer request
 * validation errors (422 in the catalogue, as TGI does) with 400, as OpenAI and vLLM do.
 */
export function responseStatus(code: ErrorCode, openai: boolean): number {
  const e = ERRORS[code];
  return openai && e.status === 422 && e.type === 'validation' ? 400 : e.status;
}

/** Refuses token ids the tokenizer cannot decode (`param`: the request field holding them). */
export function checkTokenIds(deps: AppDeps, ids: readonly number[], param: string): void {
  const i = ids.findIndex((id) => id >= deps.tokenizer.vocabSize);
  if (i >= 0) throw fail('VALIDATION', `\`${param}.${i}\`: token id ${ids[i]} is not below the vocabulary size ${deps.tokenizer.vocabSize}`, { param: `${param}.${i}` });
}

/** null (the base model) for absent, "" or the base model's own id; else a validated adapter id. */
export function resolveAdapter(deps: AppDeps, id: string | null | undefined): string | null {
  if (id === undefined || id === null || id === '' || id === deps.info.modelId) return null;
  return validateAdapterId(id);
}

export type EngineRequest = Omit<GenerateRequest, 'signal' | 'timeoutMs'>;

/** How a generation request ended, for its log line: the result, or the error (a stream's may come after its 200). */
interface Outcome {
  readonly adapter: string | null;
  result?: GenerationResult;
  error?: ServeError;
}
const OUTCOMES = new WeakMap<FastifyRequest, Outcome>();

/**
 * The fields of a request's log line: method, route, status, milliseconds, and for a generation
 * the adapter (`base` for the base model), tokens in and out, queue and generation seconds, finish
 * reason, or the code of the error that ended a stream.
 */
export function requestSummary(request: FastifyRequest, reply: FastifyReply): Record<string, unknown> {
  const o = OUTCOMES.get(request);
  const r = o?.result;
  return {
    method: request.method,
    url: request.url,
    status: reply.statusCode,
    ms: Math.round(reply.elapsedTime),
    ...(o ? { adapter: o.adapter ?? 'base' } : {}),
    ...(r ? {
      prompt_tokens: r.promptTokens, generated_tokens: r.generatedTokens,
      queue_s: +r.queueTimeS.toFixed(4), generation_s: +r.inferenceTimeS.toFixed(4), finish_reason: r.finishReason,
    } : {}),
    ...(o?.error ? { error: o.error.code } : {}),
  };
}

/**
 * Hands the requests (one per choice) to the engine with one AbortSignal that fires when the
 * client goes away before the response is complete, so the engine frees every sequence. Throws
 * synchronously when the engine rejects one at once (OVERLOADED, SHUTTING_DOWN, ...), after
 * cancelling those already submitted. `sinks[i]` receives request i's events. Returns a function
 * that cancels them all (a choice that failed ends the others).
 */
export function submit(deps: AppDeps, reply: FastifyReply, reqs: readonly EngineRequest[], sinks: readonly GenerationSink[]): () => void {
  const controller = new AbortController();
  reply.raw.once('close', () => {
    if (!reply.raw.writableFinished) controller.abort();
  });
  const timeoutMs = deps.options.requestTimeoutMs;
  const outcome: Outcome = { adapter: reqs[0]!.adapterId };
  OUTCOMES.set(reply.request, outcome);
  // Set when a submission is refused: the choices cancelled because of it report nothing (the caller gets the refusal).
  let refused = false;
  try {
    reqs.forEach((req, i) => {
      const sink = sinks[i]!;
      deps.engine.generate({ ...req, signal: controller.signal, ...(timeoutMs ? { timeoutMs } : {}) }, {
        onToken: (token, text) => sink.onToken(token, text),
        onDone(result) {
          if (i === 0) outcome.result = result;
          sink.onDone(result);
        },
        onError(err) {
          if (refused) return;
          outcome.error ??= err;
          sink.onError(err);
        },
      });
    });
  } catch (err) {
    refused = true;
    controller.abort();
    throw err;
  }
  return () => controller.abort();
}

/**
 * `count` copies of a request, one per choice (OpenAI `n`, `best_of`; TGI `best_of`). Choice i
 * samples with `choiceSeed(seed, i)`; they share one prefill (GenerateRequest.prefixGroup), and only
 * choice 0 computes prompt logprobs (they are the same for all).
 */
export function choiceRequests(req: EngineRequest, count: number): EngineRequest[] {
  const prefixGroup = count > 1 ? {} : undefined;
  return Array.from({ length: count }, (_, i) => ({
    ...req, sampling: { ...req.sampling, seed: choiceSeed(req.sampling.seed, i) }, decoderInputDetails: i === 0 && req.decoderInputDetails,
    ...(prefixGroup ? { prefixGroup } : {}),
  }));
}

/**
 * The seed choice i of a request samples with: the request's seed for choice 0, `(seed mod 2^53 + i) mod 2^53`
 * for the others (exact in float64, distinct for each i), so a seeded request with several choices is reproducible.
 */
export function choiceSeed(seed: number, i: number): number {
  return i === 0 ? seed : ((seed % 2 ** 53) + i) % 2 ** 53;
}

/** Generations to completion, one per request (in that order); the first error rejects and cancels the rest. */
export function generateAll(deps: AppDeps, reply: FastifyReply, reqs: readonly EngineRequest[]): Promise<GenerationResult[]> {
  return new Promise((resolve, reject) => {
    const results: GenerationResult[] = [];
    let left = reqs.length;
    let failed = false;
    let cancel = () => {};
    const sinks = reqs.map((_, i): GenerationSink => ({
      onToken() {},
      onDone(r) {
        results[i] = r;
        if (--left === 0 && !failed) resolve(results);
      },
      onError(err) {
        if (failed) return;
        failed = true;
        reject(err);
        cancel();
      },
    }));
    cancel = submit(deps, reply, reqs, sinks);
  });
}

/** The headers `resultHeaders` sets, for the OpenAPI document. */
export const RESULT_HEADERS: Readonly<Record<string, string>> = {
  'x-adapter-id': 'The adapter that served the request (absent for the base model)',
  'x-total-time': 'Milliseconds from receiving the request to the response (not on streams)',
  'x-queue-time': 'Milliseconds queued before the first step (not on streams)',
  'x-inference-time': 'Milliseconds from the first step to the last token (not on streams)',
  'x-time-per-token': 'Inference milliseconds per generated token (not on streams)',
  'x-prompt-tokens': 'Prompt tokens (not on streams)',
  'x-generated-tokens': 'Generated tokens, of every choice (not on streams)',
};

/**
 * TGI's timing headers (milliseconds) and the adapter that served the request. With several choices: the
 * first choice's times, the prompt once, the generated tokens of every choice.
 */
export function resultHeaders(reply: FastifyReply, results: readonly GenerationResult[]): void {
  const ms = (s: number) => String(Math.round(s * 1000));
  const r = results[0]!;
  const generated = results.reduce((n, x) => n + x.generatedTokens, 0);
  if (r.adapterId !== null) reply.header('x-adapter-id', r.adapterId);
  reply
    .header('x-total-time', String(Math.round(reply.elapsedTime)))
    .header('x-queue-time', ms(r.queueTimeS))
    .header('x-inference-time', ms(r.inferenceTimeS))
    .header('x-time-per-token', ms(r.generatedTokens > 0 ? r.inferenceTimeS / r.generatedTokens : 0))
    .header('x-prompt-tokens', String(r.promptTokens))
    .header('x-generated-tokens', String(generated));
}

/** -inf (a masked token) is not JSON; report it as vLLM does. */
export function finiteLogprob(x: number): number {
  return Number.isFinite(x) ? x : -9999;
}

/** Removes the stop sequence the engine kept at the end of the text (OpenAI excludes it, TGI keeps it). */
export function withoutStop(text: string, r: GenerationResult, stops: readonly string[]): string {
  if (r.finishReason !== 'stop_sequence') return text;
  const longest = stops.filter((s) => s.length > 0 && text.endsWith(s)).sort((a, b) => b.length - a.length)[0];
  return longest === undefined ? text : text.slice(0, -longest.length);
}

/** Receives stream events with the last token and the result together. */
export interface StreamHandler {
  /**
   * A token of choice `index`; `result` is set on the choice's last one. `token` is null only when the engine
   * finished without a token left to attach the result to.
   */
  token(index: number, token: TokenInfo | null, text: string, result: GenerationResult | null): void;
  /** Every choice has finished (before the stream ends): their results, by index. */
  done?(results: readonly GenerationResult[]): void;
  error(err: ServeError): void;
}

export interface SseOptions {
  /** OpenAI: `data: ` (with a space) and a final `data: [DONE]`; TGI: `data:` and no terminator. */
  readonly openai: boolean;
}

/** `send(payload)` writes one `data:` event. */
export type SendEvent = (payload: unknown) => void;

/**
 * Streams generations (one per choice, interleaved as their tokens come) as server-sent events.
 * Nothing is written before the engine's first event, so a rejection before it (overload, unknown
 * adapter, failed adapter load) is answered as a normal JSON error with its status by the caller's
 * error handler. An error after it ends the stream with an error event and cancels the other choices.
 *
 * Each token is passed on one tick late: the engine emits the final token and `onDone` in the
 * same tick, so the handler sees the last token together with the result (TGI's last event
 * carries `generated_text` and `details`; OpenAI's last delta must drop the stop sequence).
 */
export async function streamGeneration(
  deps: AppDeps,
  reply: FastifyReply,
  reqs: readonly EngineRequest[],
  opts: SseOptions,
  makeHandler: (send: SendEvent) => StreamHandler,
): Promise<FastifyReply> {
  const body = new PassThrough();
  const write = (s: string) => {
    if (!body.destroyed && !body.writableEnded) body.write(s);
  };
  const handler = makeHandler((payload) => write(`data:${opts.openai ? ' ' : ''}${JSON.stringify(payload)}\n\n`));
  const end = () => {
    if (opts.openai) write('data: [DONE]\n\n');
    if (!body.writableEnded) body.end();
  };

  /** Per choice: the token held back one tick. */
  const pending: ({ token: TokenInfo; text: string; timer: NodeJS.Immediate } | null)[] = reqs.map(() => null);
  const flush = (i: number) => {
    const p = pending[i];
    if (!p) return;
    clearImmediate(p.timer);
    pending[i] = null;
    handler.token(i, p.token, p.text, null);
  };
  const results: GenerationResult[] = [];
  let left = reqs.length;

  await new Promise<void>((resolve, reject) => {
    let started = false;
    let over = false;
    let cancel = () => {};
    const start = () => {
      if (!started) resolve();
      started = true;
    };
    cancel = submit(deps, reply, reqs, reqs.map((_, i): GenerationSink => ({
      onToken(token, text) {
        if (over) return;
        flush(i);
        pending[i] = { token, text, timer: setImmediate(() => flush(i)) };
        start();
      },
      onDone(result) {
        if (over) return;
        const last = pending[i];
        if (last) clearImmediate(last.timer);
        pending[i] = null;
        handler.token(i, last?.token ?? null, last?.text ?? '', result);
        results[i] = result;
        if (--left === 0) {
          handler.done?.(results);
          end();
        }
        start();
      },
      onError(err) {
        if (over) return;
        over = true;
        cancel();
        if (!started) {
          started = true;
          reject(err);
          return;
        }
        pending.forEach((_, j) => flush(j));
        handler.error(err);
        end();
      },
    })));
  });
  const adapterId = reqs[0]!.adapterId;
  if (adapterId !== null) reply.header('x-adapter-id', adapterId);
  return reply
    .header('content-type', 'text/event-stream; charset=utf-8')
    .header('cache-control', 'no-cache')
    .header('x-accel-buffering', 'no')
    .send(body);
}
