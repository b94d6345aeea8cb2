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
const PUBLIC_5XX = new Set<ErrorCode>(['NOT_READY', 'SHUTTING_DOWN', 'TIMEOUT', 'ADAPTER_FETCH_FAILED', 'ADAPTER_FETCH_TIMEOUT']);

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
 * Hands the request to the engine with an AbortSignal that fires when the client goes away
 * before the response is complete, so the engine frees the sequence. Throws synchronously when
 * the engine rejects at once (OVERLOADED, SHUTTING_DOWN, ...).
 */
export function submit(deps: AppDeps, reply: FastifyReply, req: EngineRequest, sink: GenerationSink): void {
  const controller = new AbortController();
  reply.raw.once('close', () => {
    if (!reply.raw.writableFinished) controller.abort();
  });
  const timeoutMs = deps.options.requestTimeoutMs;
  const outcome: Outcome = { adapter: req.adapterId };
  OUTCOMES.set(reply.request, outcome);
  deps.engine.generate({ ...req, signal: controller.signal, ...(timeoutMs ? { timeoutMs } : {}) }, {
    onToken: (token, text) => sink.onToken(token, text),
    onDone(result) {
      outcome.result = result;
      sink.onDone(result);
    },
    onError(err) {
      outcome.error = err;
      sink.onError(err);
    },
  });
}

/** One generation to completion. */
export function generateOnce(deps: AppDeps, reply: FastifyReply, req: EngineRequest): Promise<GenerationResult> {
  return new Promise((resolve, reject) => {
    submit(deps, reply, req, { onToken() {}, onDone: resolve, onError: reject });
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
  'x-generated-tokens': 'Generated tokens (not on streams)',
};

/** TGI's timing headers (milliseconds) and the adapter that served the request. */
export function resultHeaders(reply: FastifyReply, r: GenerationResult): void {
  const ms = (s: number) => String(Math.round(s * 1000));
  if (r.adapterId !== null) reply.header('x-adapter-id', r.adapterId);
  reply
    .header('x-total-time', String(Math.round(reply.elapsedTime)))
    .header('x-queue-time', ms(r.queueTimeS))
    .header('x-inference-time', ms(r.inferenceTimeS))
    .header('x-time-per-token', ms(r.generatedTokens > 0 ? r.inferenceTimeS / r.generatedTokens : 0))
    .header('x-prompt-tokens', String(r.promptTokens))
    .header('x-generated-tokens', String(r.generatedTokens));
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
  /** `result` is set on the last token. `token` is null only when the engine finished without a token left to attach the result to. */
  token(token: TokenInfo | null, text: string, result: GenerationResult | null): void;
  error(err: ServeError): void;
}

export interface SseOptions {
  /** OpenAI: `data: ` (with a space) and a final `data: [DONE]`; TGI: `data:` and no terminator. */
  readonly openai: boolean;
}

/** `send(payload)` writes one `data:` event. */
export type SendEvent = (payload: unknown) => void;

/**
 * Bounds how long a stream's client may read nothing. `accepted(false)` (a write the stream had to buffer, or the
 * stream's end, until the response is handed to the socket) starts a timer of `ms`; the buffer draining, or the
 * response finishing or closing, stops it. When it fires, the connection
 * is destroyed: `submit` sees the response close unfinished and cancels the generation, so a client that stops
 * reading holds neither a batch slot nor its unread events for longer than `ms`. `ms` 0: no bound.
 */
export function stallBound(body: PassThrough, reply: FastifyReply, ms: number): (accepted: boolean) => void {
  if (ms <= 0) return () => {};
  const res = reply.raw;
  let timer: NodeJS.Timeout | null = null;
  const stop = () => {
    if (timer) clearTimeout(timer);
    timer = null;
  };
  body.on('drain', stop);
  res.once('finish', stop);
  res.once('close', stop);
  return (accepted) => {
    if (accepted || timer || res.destroyed) return;
    timer = setTimeout(() => {
      reply.log.warn(`stream cancelled: the client read nothing for ${ms} ms (--stream-stall-timeout)`);
      res.destroy();
    }, ms);
  };
}

/**
 * Streams one generation as server-sent events. Nothing is written before the engine's first
 * event, so a rejection before it (overload, unknown adapter, failed adapter load) is answered
 * as a normal JSON error with its status by the caller's error handler.
 *
 * Each token is passed on one tick late: the engine emits the final token and `onDone` in the
 * same tick, so the handler sees the last token together with the result (TGI's last event
 * carries `generated_text` and `details`; OpenAI's last delta must drop the stop sequence).
 */
export async function streamGeneration(
  deps: AppDeps,
  reply: FastifyReply,
  req: EngineRequest,
  opts: SseOptions,
  makeHandler: (send: SendEvent) => StreamHandler,
): Promise<FastifyReply> {
  const body = new PassThrough();
  const accepted = stallBound(body, reply, deps.options.streamStallMs ?? 0);
  const write = (s: string) => {
    if (!body.destroyed && !body.writableEnded) accepted(body.write(s));
  };
  const handler = makeHandler((payload) => write(`data:${opts.openai ? ' ' : ''}${JSON.stringify(payload)}\n\n`));
  const end = () => {
    if (opts.openai) write('data: [DONE]\n\n');
    if (!body.writableEnded) body.end();
    // The last events, too, must reach the client within the bound.
    accepted(false);
  };

  let pending: { token: TokenInfo; text: string } | null = null;
  let timer: NodeJS.Immediate | null = null;
  const flush = () => {
    if (timer) clearImmediate(timer);
    timer = null;
    if (pending) handler.token(pending.token, pending.text, null);
    pending = null;
  };

  await new Promise<void>((resolve, reject) => {
    let started = false;
    const start = () => {
      if (!started) resolve();
      started = true;
    };
    submit(deps, reply, req, {
      onToken(token, text) {
        flush();
        pending = { token, text };
        timer = setImmediate(flush);
        start();
      },
      onDone(result) {
        if (timer) clearImmediate(timer);
        const last = pending;
        pending = timer = null;
        handler.token(last?.token ?? null, last?.text ?? '', result);
        end();
        start();
      },
      onError(err) {
        if (!started) {
          started = true;
          reject(err);
          return;
        }
        flush();
        handler.error(err);
        end();
      },
    });
  });
  if (req.adapterId !== null) reply.header('x-adapter-id', req.adapterId);
  return reply
    .header('content-type', 'text/event-stream; charset=utf-8')
    .header('cache-control', 'no-cache')
    .header('x-accel-buffering', 'no')
    .send(body);
}
