/** TGI / LoRAX generation: POST /generate, POST /generate_stream, and POST / (either, by `stream`). */
import type { FastifyInstance, FastifyReply } from 'fastify';
import type { GenerationResult, TokenInfo, TopToken } from '../../engine/types.ts';
import { fail, type ErrorCode } from '../../errors.ts';
import type { AppDeps } from '../app.ts';
import { ADAPTER_SOURCE_KINDS, type AdapterSource, type AdapterSourceKind } from '../../engine/types.ts';
import { ADAPTER_FILE_ERRORS, HUB_ERRORS } from './adapters.ts';
import { refuseUnsupported, TGI_PARAMETERS } from '../fields.ts';
import { tgiConstraint } from '../grammar.ts';
import { fitLengths, mergedAdapters, tgiSampling } from '../params.ts';
import { mergeId } from '../../lora/merged-adapter.ts';
import type { MergeSpec } from '../../lora/types.ts';
import { GenerateRequest, GenerateResponse, GenerateStreamEvent, type GenerateRequestBody } from '../schemas.ts';
import { choiceRequests, finiteLogprob, generateAll, RESULT_HEADERS, publicErrorBody, resolveAdapter, resultHeaders, streamGeneration, type EngineRequest } from './common.ts';

/** What a generation can fail with, besides request validation (shared with the OpenAI routes). */
export const GENERATION_ERRORS: readonly ErrorCode[] = [
  'UNSUPPORTED_PARAMETER', 'INPUT_TOO_LONG', 'ADAPTER_INVALID_ID', 'ADAPTER_NOT_FOUND', ...ADAPTER_FILE_ERRORS, 'ADAPTER_FETCH_FAILED',
  'ADAPTER_FETCH_TIMEOUT', 'ADAPTER_TOO_LARGE', ...HUB_ERRORS, 'OVERLOADED', 'SHUTTING_DOWN', 'TIMEOUT', 'GENERATION', 'DEVICE_ERROR',
  'WORKER_DIED',
];

/** The adapter a request runs on: `adapter_id`, or the merge `parameters.merged_adapters` asks for (not both, as LoRAX). */
function requestAdapter(deps: AppDeps, id: string | null, params: NonNullable<GenerateRequestBody['parameters']>): { adapterId: string | null; merge?: MergeSpec } {
  const m = params.merged_adapters ?? null;
  if (m === null) return { adapterId: resolveAdapter(deps, id) };
  if (id !== null) {
    throw fail('MERGE_INVALID', 'give at most one of `adapter_id` and `parameters.merged_adapters`', { param: 'parameters.merged_adapters' });
  }
  const spec = mergedAdapters(m, params.seed, (x) => resolveAdapter(deps, x) === null);
  return typeof spec === 'string' ? { adapterId: spec } : { adapterId: mergeId(spec), merge: spec };
}

/** What the TGI/LoRAX routes can fail with: a generation's errors, a merge's (parameters.merged_adapters) and a grammar's. */
const TGI_ERRORS: readonly ErrorCode[] = [...GENERATION_ERRORS, 'MERGE_INVALID', 'MERGE_INCOMPATIBLE', 'GRAMMAR_INVALID', 'GRAMMAR_UNSUPPORTED'];

/** `parameters.adapter_source` and `api_token` as the engine's AdapterSource; undefined when neither is given. */
function adapterSource(params: NonNullable<GenerateRequestBody['parameters']>): AdapterSource | undefined {
  const kind = params.adapter_source ?? undefined;
  const token = params.api_token ?? undefined;
  // LoRAX's other sources, s3 and pbase, are refused.
  if (kind !== undefined && !(ADAPTER_SOURCE_KINDS as readonly string[]).includes(kind)) {
    throw fail('UNSUPPORTED_PARAMETER', `\`parameters.adapter_source\`: ${JSON.stringify(kind)} is not supported; accepted: "local" or "hub"`, { param: 'parameters.adapter_source' });
  }
  if (kind === undefined && token === undefined) return undefined;
  return { ...(kind !== undefined ? { kind: kind as AdapterSourceKind } : {}), ...(token !== undefined ? { token } : {}) };
}

interface Prepared {
  readonly req: EngineRequest;
  /** Sequences to generate (`best_of`). */
  readonly bestOf: number;
  readonly body: GenerateRequestBody;
  readonly params: NonNullable<GenerateRequestBody['parameters']>;
}

function prepare(deps: AppDeps, body: GenerateRequestBody, stream: boolean): Prepared {
  const params = body.parameters ?? {};
  const top = body.adapter_id ?? null;
  const inner = params.adapter_id ?? null;
  if (top !== null && inner !== null && top !== inner) {
    throw fail('VALIDATION', `conflicting adapter ids: "${top}" at the top level and "${inner}" in parameters; give one`);
  }
  refuseUnsupported(params, TGI_PARAMETERS, 'parameters.');
  if (body.stream !== undefined && body.stream !== null && body.stream !== stream) {
    throw fail('UNSUPPORTED_PARAMETER', `\`stream\`: ${stream ? '/generate_stream always streams' : '/generate does not stream (use /generate_stream)'}; accepted: ${stream}`, { param: 'stream' });
  }
  const ignoreEos = params.ignore_eos ?? params.ignore_eos_token ?? false;
  if (ignoreEos !== (params.ignore_eos_token ?? ignoreEos)) {
    throw fail('VALIDATION', '`ignore_eos` and `ignore_eos_token` (its LoRAX name) disagree; give one', { param: 'parameters.ignore_eos_token' });
  }
  if (stream && params.decoder_input_details) {
    throw fail('VALIDATION', '`decoder_input_details` == true is not supported when streaming tokens');
  }
  const { adapterId, merge } = requestAdapter(deps, top ?? inner, params);
  const source = adapterSource(params);
  const sampling = tgiSampling(params);
  const bestOf = params.best_of ?? 1;
  // TGI's rules (router validation.rs): several sequences are only worth it when sampling, each with its own seed.
  if (bestOf > 1) {
    if (stream) throw fail('VALIDATION', '`best_of` != 1 is not supported when streaming tokens', { param: 'parameters.best_of' });
    if (!sampling.doSample) throw fail('VALIDATION', 'you must use sampling when `best_of` is > 1', { param: 'parameters.best_of' });
    if (params.seed !== undefined && params.seed !== null) throw fail('VALIDATION', '`seed` must not be set when `best_of` > 1', { param: 'parameters.seed' });
  }
  const constraint = tgiConstraint(deps.tokenizer, params);
  const { inputIds, maxNewTokens } = fitLengths(deps.options, deps.tokenizer.encode(body.inputs), {
    maxNew: params.max_new_tokens, defaultMaxNew: deps.options.maxNewTokensDefault, truncate: params.truncate,
  });
  return {
    body, params, bestOf,
    req: {
      inputIds, adapterId, ...(merge ? { merge } : {}), ...(source ? { adapterSource: source } : {}),
      sampling, ...(constraint ? { constraint } : {}), maxNewTokens, stop: params.stop ?? [], decoderInputDetails: params.decoder_input_details ?? false, ignoreEos,
    },
  };
}

const tokenJson = (t: TopToken) => ({ id: t.id, text: t.text, logprob: finiteLogprob(t.logprob), special: t.special });

function generatedText(p: Prepared, r: GenerationResult): string {
  return (p.params.return_full_text ? p.body.inputs : '') + r.text;
}

/** One sequence's details (TGI's `details` and each of its `best_of_sequences`). */
function sequenceDetails(p: Prepared, r: GenerationResult) {
  return {
    finish_reason: r.finishReason,
    generated_tokens: r.generatedTokens,
    seed: r.seed,
    prefill: r.prefill.map((t) => ({ id: t.id, text: t.text, logprob: t.logprob === null ? null : finiteLogprob(t.logprob) })),
    tokens: r.tokens.map(tokenJson),
    ...(p.req.sampling.topNTokens > 0 ? { top_tokens: r.tokens.map((t) => (t.top ?? []).map(tokenJson)) } : {}),
  };
}

/**
 * TGI's best_of rule (router infer.rs): the sequence with the highest mean logprob of its generated tokens
 * (ties: the earlier one).
 */
function bestSequence(results: readonly GenerationResult[]): number {
  const mean = (r: GenerationResult) => r.tokens.reduce((s, t) => s + t.logprob, 0) / Math.max(1, r.tokens.length);
  let best = 0;
  results.forEach((r, i) => {
    if (mean(r) > mean(results[best]!)) best = i;
  });
  return best;
}

/** /generate's answer: the whole text (of the best sequence, with best_of), with details when asked for. */
async function generateJson(deps: AppDeps, body: GenerateRequestBody, reply: FastifyReply) {
  const p = prepare(deps, body, false);
  const results = await generateAll(deps, reply, choiceRequests(p.req, p.bestOf));
  resultHeaders(reply, results);
  const best = bestSequence(results);
  const r = results[best]!;
  const others = results.filter((_, i) => i !== best);
  return {
    generated_text: generatedText(p, r),
    ...(p.params.details ? {
      details: {
        ...sequenceDetails(p, r),
        prompt_tokens: r.promptTokens,
        ...(p.bestOf > 1 ? { best_of_sequences: others.map((o) => ({ generated_text: generatedText(p, o), ...sequenceDetails(p, o) })) } : {}),
      },
    } : {}),
  };
}

/** /generate_stream's answer: one event per token, the last with the text and details. */
function generateEvents(deps: AppDeps, body: GenerateRequestBody, reply: FastifyReply): Promise<FastifyReply> {
  const p = prepare(deps, body, true);
  return streamGeneration(deps, reply, [p.req], { openai: false }, (send) => {
    let index = 0;
    let lastToken: TokenInfo | null = null;
    return {
      token(_choice, token, _text, result) {
        // Finished without a token left to attach the result to: repeat the last one with no text.
        const t = token ?? { ...(lastToken ?? { id: 0, logprob: 0, special: true }), text: '', top: undefined };
        lastToken = t;
        send({
          index: ++index,
          token: tokenJson(t),
          ...(t.top?.length ? { top_tokens: t.top.map(tokenJson) } : {}),
          generated_text: result ? generatedText(p, result) : null,
          // TGI sends these details only when asked for; they are always here (clients ignore extra fields).
          details: result
            ? { finish_reason: result.finishReason, generated_tokens: result.generatedTokens, seed: result.seed, input_length: result.promptTokens }
            : null,
        });
      },
      error(err) {
        send(publicErrorBody(err).body);
      },
    };
  });
}

export function generateRoutes(app: FastifyInstance, deps: AppDeps): void {
  app.post<{ Body: GenerateRequestBody }>('/generate', {
    schema: { summary: 'Generate text (TGI/LoRAX)', body: GenerateRequest, response: { 200: GenerateResponse } },
    config: { doc: { tag: 'TGI', errors: TGI_ERRORS, headers: RESULT_HEADERS } },
  }, async (request, reply) => generateJson(deps, request.body, reply));

  app.post<{ Body: GenerateRequestBody }>('/generate_stream', {
    schema: { summary: 'Generate text as server-sent events (TGI/LoRAX)', body: GenerateRequest },
    config: { doc: { tag: 'TGI', errors: TGI_ERRORS, headers: RESULT_HEADERS, stream: GenerateStreamEvent } },
  }, async (request, reply) => generateEvents(deps, request.body, reply));

  // TGI's compatibility route, where huggingface_hub's InferenceClient and LoRAX's client post: `stream` chooses.
  app.post<{ Body: GenerateRequestBody }>('/', {
    schema: { summary: 'Generate text: as /generate, or as /generate_stream with "stream": true (TGI/LoRAX)', body: GenerateRequest, response: { 200: GenerateResponse } },
    config: { doc: { tag: 'TGI', errors: TGI_ERRORS, headers: RESULT_HEADERS, stream: GenerateStreamEvent } },
  }, async (request, reply) => (request.body.stream ? generateEvents(deps, request.body, reply) : generateJson(deps, request.body, reply)));
}
