/**
 * Request fields → what the engine takes, once for every route: TGI/LoRAX `parameters` and OpenAI
 * bodies become a typed `SamplingParams`; the prompt is truncated and a default max-new-tokens is
 * fitted to the context. The length limits themselves are the engine's (`checkLengths`); a route
 * passes its field names (`GenerateRequest.fields`) for the engine's messages.
 */
import { randomBytes } from 'node:crypto';
import type { SamplingParams } from '../engine/sampling.ts';
import type { LengthLimits } from '../engine/types.ts';
import { fail } from '../errors.ts';
import { MAX_TOP_N_TOKENS, type ChatCompletionRequestBody, type CompletionRequestBody, type GenerateRequestBody } from './schemas.ts';

type TgiParameters = NonNullable<GenerateRequestBody['parameters']>;

/** The sampling fields as TGI/LoRAX name them; `null` counts as absent (JSON clients send it). */
type TgiSampling = Pick<TgiParameters, 'do_sample' | 'temperature' | 'top_k' | 'top_p' | 'typical_p' | 'repetition_penalty'
  | 'frequency_penalty' | 'presence_penalty' | 'seed' | 'top_n_tokens'>;

function num(name: string, v: unknown): number | undefined {
  if (v === undefined || v === null) return undefined;
  if (typeof v !== 'number' || !Number.isFinite(v)) throw fail('VALIDATION', `\`${name}\` must be a finite number`);
  return v;
}

/** A random seed in [0, 2^53), reported back to the client. */
function randomSeed(): number {
  const b = randomBytes(8);
  return (b.readUInt32LE(0) & 0x1fffff) * 2 ** 32 + b.readUInt32LE(4);
}

/**
 * TGI/LoRAX sampling parameters → `SamplingParams`.
 *
 * Sampling is on when `do_sample` is true or any warper is active: temperature ≠ 1, top_k > 0,
 * top_p < 1, typical_p < 1 — TGI's server rule (`NextTokenChooser`: `sampling = do_sample or
 * has_warpers`), so an explicit `temperature: 1` alone stays greedy. Ranges follow TGI's
 * router validation.rs, except that top_p = 1, typical_p = 1 and top_k = 0 are accepted as
 * "off" (TGI rejects them; OpenAI-style clients send them). Without a seed, a random one.
 */
export function tgiSampling(p: TgiSampling): SamplingParams {
  if (p.do_sample !== undefined && p.do_sample !== null && typeof p.do_sample !== 'boolean') {
    throw fail('VALIDATION', '`do_sample` must be a boolean');
  }
  const temperature = num('temperature', p.temperature) ?? 1;
  if (temperature <= 0) throw fail('VALIDATION', '`temperature` must be strictly positive');
  const topK = num('top_k', p.top_k) ?? 0;
  if (!Number.isInteger(topK) || topK < 0) throw fail('VALIDATION', '`top_k` must be a non-negative integer');
  const topP = num('top_p', p.top_p) ?? 1;
  if (topP <= 0 || topP > 1) throw fail('VALIDATION', '`top_p` must be > 0.0 and <= 1.0');
  const typicalP = num('typical_p', p.typical_p) ?? 1;
  if (typicalP <= 0 || typicalP > 1) throw fail('VALIDATION', '`typical_p` must be > 0.0 and <= 1.0');
  const repetitionPenalty = num('repetition_penalty', p.repetition_penalty) ?? 1;
  if (repetitionPenalty <= 0) throw fail('VALIDATION', '`repetition_penalty` must be strictly positive');
  const frequencyPenalty = num('frequency_penalty', p.frequency_penalty) ?? 0;
  if (frequencyPenalty < -2 || frequencyPenalty > 2) throw fail('VALIDATION', '`frequency_penalty` must be >= -2.0 and <= 2.0');
  const presencePenalty = num('presence_penalty', p.presence_penalty) ?? 0;
  if (presencePenalty < -2 || presencePenalty > 2) throw fail('VALIDATION', '`presence_penalty` must be >= -2.0 and <= 2.0');
  const topNTokens = num('top_n_tokens', p.top_n_tokens) ?? 0;
  if (!Number.isInteger(topNTokens) || topNTokens < 0) throw fail('VALIDATION', '`top_n_tokens` must be a non-negative integer');
  if (topNTokens > MAX_TOP_N_TOKENS) throw fail('VALIDATION', `\`top_n_tokens\` must be <= ${MAX_TOP_N_TOKENS}`);
  const givenSeed = num('seed', p.seed);
  if (givenSeed !== undefined && (!Number.isInteger(givenSeed) || givenSeed < 0 || givenSeed >= 2 ** 64)) {
    throw fail('VALIDATION', '`seed` must be an integer in [0, 2^64)');
  }
  const hasWarpers = temperature !== 1 || topK > 0 || topP < 1 || typicalP < 1;
  return {
    doSample: (p.do_sample ?? false) || hasWarpers,
    temperature, topK, topP, typicalP, repetitionPenalty, frequencyPenalty, presencePenalty,
    seed: givenSeed ?? randomSeed(),
    topNTokens,
  };
}

/** The sampling fields /v1/completions and /v1/chat/completions share. */
type OpenAISampling = Pick<CompletionRequestBody & ChatCompletionRequestBody, 'temperature' | 'top_p' | 'top_k' | 'repetition_penalty'
  | 'frequency_penalty' | 'presence_penalty' | 'seed'>;

/**
 * OpenAI sampling fields → `SamplingParams`, by TGI's rules above with OpenAI's defaults:
 * `temperature: 0` is greedy (the warpers are then ignored), anything else samples.
 * `topN` is the number of alternatives asked for (`logprobs`, `top_logprobs`). (`n` other than 1
 * is refused before: src/server/fields.ts.)
 */
export function openAISampling(b: OpenAISampling, topN: number): SamplingParams {
  const greedy = b.temperature === 0;
  return tgiSampling({
    do_sample: !greedy,
    temperature: greedy ? null : b.temperature,
    top_p: greedy ? null : b.top_p,
    top_k: greedy ? null : b.top_k,
    repetition_penalty: b.repetition_penalty,
    frequency_penalty: b.frequency_penalty,
    presence_penalty: b.presence_penalty,
    seed: b.seed,
    top_n_tokens: topN,
  });
}

/**
 * Applies `truncate` (keep the last N tokens) and chooses max-new-tokens: the one given, else
 * `defaultMaxNew` shortened to what fits in `maxTotalTokens` (at least 1). Whether the result
 * fits is the engine's check (`checkLengths`).
 */
export function fitLengths(
  limits: LengthLimits,
  ids: readonly number[],
  opts: { maxNew: number | null | undefined; defaultMaxNew: number; truncate?: number | null },
): { inputIds: readonly number[]; maxNewTokens: number } {
  let inputIds = ids;
  if (opts.truncate) {
    if (opts.truncate > limits.maxInputLength) {
      throw fail('VALIDATION', `\`truncate\` must be <= ${limits.maxInputLength} (max input length). Given: ${opts.truncate}`);
    }
    if (inputIds.length > opts.truncate) inputIds = inputIds.slice(-opts.truncate);
  }
  if (opts.maxNew !== undefined && opts.maxNew !== null) return { inputIds, maxNewTokens: opts.maxNew };
  return { inputIds, maxNewTokens: Math.max(1, Math.min(opts.defaultMaxNew, limits.maxTotalTokens - inputIds.length)) };
}
