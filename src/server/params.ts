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
import { validateAdapterId } from '../lora/ids.ts';
import { MAJORITY_SIGN_METHODS, MERGE_STRATEGIES, type MajoritySignMethod, type MergeStrategy } from '../lora/merge.ts';
import { DEFAULT_MERGE_SEED } from '../lora/merged-adapter.ts';
import type { MergeSpec } from '../lora/types.ts';
import {
  MAX_MERGED_ADAPTERS, MAX_TOP_N_TOKENS, type ChatCompletionRequestBody, type CompletionRequestBody, type GenerateRequestBody, type MergedAdaptersBody,
} from './schemas.ts';

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
    logitBias: [],
  };
}

const badMerge = (field: string, msg: string) =>
  fail('MERGE_INVALID', `\`parameters.merged_adapters.${field}\` ${msg}`, { param: `parameters.merged_adapters.${field}` });

/**
 * LoRAX `merged_adapters` → a MergeSpec, or the one adapter id when it names one (LoRAX serves a single id as
 * that adapter, unmerged). Values are checked as LoRAX's client and router do, with MERGE_INVALID (400): 1 to
 * MAX_MERGED_ADAPTERS ids, none of them the base model (`isBase`); weights absent or [] (all 1, LoRAX's
 * default) or one finite number per id; a known strategy (default linear) and sign method (default total);
 * density in [0, 1], and given when the strategy prunes (ties, dare_*: LoRAX's router would default it to 0,
 * which prunes everything). DARE's masks are seeded with the request's `seed`, else DEFAULT_MERGE_SEED.
 */
export function mergedAdapters(m: MergedAdaptersBody, seed: number | null | undefined, isBase: (id: string) => boolean): MergeSpec | string {
  const { ids } = m;
  if (ids.length === 0 || ids.length > MAX_MERGED_ADAPTERS) throw badMerge('ids', `must name 1 to ${MAX_MERGED_ADAPTERS} adapters (got ${ids.length})`);
  ids.forEach((id, i) => {
    if (isBase(id)) throw badMerge(`ids.${i}`, 'is the base model, which cannot be merged');
    validateAdapterId(id);
  });
  const weights = m.weights?.length ? m.weights : ids.map(() => 1);
  if (weights.length !== ids.length) throw badMerge('weights', `must have one weight per id (${ids.length}), got ${weights.length}`);
  const w = weights.findIndex((x) => !Number.isFinite(x));
  if (w >= 0) throw badMerge(`weights.${w}`, 'must be a finite number');
  const strategy = (m.merge_strategy ?? 'linear') as MergeStrategy;
  if (!MERGE_STRATEGIES.includes(strategy)) throw badMerge('merge_strategy', `must be one of ${MERGE_STRATEGIES.join(', ')} (got ${JSON.stringify(m.merge_strategy)})`);
  const majoritySignMethod = (m.majority_sign_method ?? 'total') as MajoritySignMethod;
  if (!MAJORITY_SIGN_METHODS.includes(majoritySignMethod)) {
    throw badMerge('majority_sign_method', `must be one of ${MAJORITY_SIGN_METHODS.join(', ')} (got ${JSON.stringify(m.majority_sign_method)})`);
  }
  const density = m.density ?? null;
  if (density === null && strategy !== 'linear') throw badMerge('density', `is required by ${strategy} (the fraction of each tensor kept, in [0, 1])`);
  if (density !== null && !(density >= 0 && density <= 1)) throw badMerge('density', `must be >= 0.0 and <= 1.0 (got ${density})`);
  if (ids.length === 1) return ids[0]!;
  return { ids, weights, strategy, density: density ?? 1, majoritySignMethod, seed: seed ?? DEFAULT_MERGE_SEED };
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

/** The largest |bias| of `logit_bias` (OpenAI's range). */
export const MAX_LOGIT_BIAS = 100;

/**
 * OpenAI `logit_bias` (token id as a string → bias) → [id, bias] pairs, in the body's order. Each key must be
 * a decimal token id below `vocabSize`, each bias a number in [-100, 100]; otherwise LOGIT_BIAS_INVALID naming
 * the key. ±100 in practice bans or forces the token (OpenAI's words).
 */
export function logitBias(b: Readonly<Record<string, number>> | null | undefined, vocabSize: number): [number, number][] {
  if (!b) return [];
  return Object.entries(b).map(([key, bias]) => {
    const param = `logit_bias.${key}`;
    const id = /^(0|[1-9]\d{0,9})$/.test(key) ? Number(key) : NaN;
    if (!(id < vocabSize)) throw fail('LOGIT_BIAS_INVALID', `\`${param}\`: the key must be a token id below the vocabulary size ${vocabSize}`, { param });
    if (!(typeof bias === 'number' && Math.abs(bias) <= MAX_LOGIT_BIAS)) {
      throw fail('LOGIT_BIAS_INVALID', `\`${param}\`: the bias must be a number in [-${MAX_LOGIT_BIAS}, ${MAX_LOGIT_BIAS}]`, { param });
    }
    return [id, bias];
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
