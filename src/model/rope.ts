/**
 * Rotary-embedding variants of config.json's `rope_scaling`, as transformers' `modeling_rope_utils.py` defines
 * them: the inverse frequency of each of the headDim/2 rotated pairs, and the factor cos and sin are multiplied by
 * (`attention_scaling`). Everything is float64; transformers computes the same formulas in float32.
 *
 * - default:  inv_freq_i = θ^(−2i/d)
 * - linear:   inv_freq_i / factor
 * - dynamic:  NTK scaling grows θ once a forward's sequence length passes max_position_embeddings; the server never
 *             runs a position ≥ max_position_embeddings, where dynamic is exactly the default rotation.
 * - llama3:   per-frequency: wavelengths above original/low_freq_factor are divided by factor, below
 *             original/high_freq_factor kept, in between blended linearly in original/wavelength.
 * - yarn:     a ramp over the pairs between NTK-by-parts correction dims (beta_fast, beta_slow) blends θ^(−2i/d) and
 *             θ^(−2i/d)/factor; attention factor from `attention_factor`, or mscale/mscale_all_dim, or 0.1·ln(factor)+1.
 * - longrope: inv_freq_i = θ^(−2i/d) / ext_i with ext = short_factor, or long_factor for a step whose sequence length
 *             (largest position + 1) exceeds original_max_position_embeddings; attention factor from
 *             `attention_factor` or √(1 + ln(factor)/ln(original)).
 */
import { fail } from '../errors.ts';
import { flag, num, type Json } from './config-fields.ts';

export const ROPE_TYPES = ['default', 'linear', 'dynamic', 'llama3', 'yarn', 'longrope'] as const;
export type RopeType = (typeof ROPE_TYPES)[number];

export interface RopeSpec {
  readonly type: RopeType;
  readonly theta: number;
  /** Inverse frequencies, headDim/2 of them (longrope: the short factors'). */
  readonly invFreq: readonly number[];
  /** cos and sin are multiplied by it (yarn, longrope; 1 otherwise). */
  readonly attentionFactor: number;
  /**
   * longrope only. A sequence's forward step whose largest position p has p + 1 > `after` rotates all its tokens
   * with these frequencies; keys already cached keep the rotation they were computed with.
   */
  readonly long: { readonly invFreq: readonly number[]; readonly after: number } | null;
}

const ROPE = 'rope_scaling.';
const field = (key: string): string => ROPE + key;
const positive = (rs: Json, key: string): number => num(rs, key, undefined, ROPE);

/** transformers reads beta_fast, beta_slow, mscale with `or`: null, absent and 0 all mean the default. */
function orDefault(rs: Json, key: string, fallback: number): number {
  const v = rs[key];
  if (v == null || v === 0) return fallback;
  if (typeof v !== 'number' || !Number.isFinite(v)) throw fail('CONFIG_INVALID', `config.json: "${field(key)}" must be a number`);
  return v;
}

function factorList(rs: Json, key: string, half: number): number[] {
  const v = rs[key];
  if (!Array.isArray(v) || v.length !== half || !v.every((x) => typeof x === 'number' && Number.isFinite(x) && x > 0)) {
    throw fail('CONFIG_INVALID', `config.json: "${field(key)}" must be a list of ${half} positive numbers`);
  }
  return v as number[];
}

/** θ^(−2i/d) for i < d/2. */
function defaultInvFreq(theta: number, headDim: number): number[] {
  return Array.from({ length: headDim / 2 }, (_, i) => 1 / Math.pow(theta, (2 * i) / headDim));
}

function llama3(inv: number[], rs: Json): number[] {
  const factor = positive(rs, 'factor');
  const low = positive(rs, 'low_freq_factor');
  const high = positive(rs, 'high_freq_factor');
  const old = positive(rs, 'original_max_position_embeddings');
  if (high <= low) throw fail('CONFIG_INVALID', `config.json: "${field('high_freq_factor')}" must exceed "${field('low_freq_factor')}"`);
  return inv.map((f) => {
    const wavelen = (2 * Math.PI) / f;
    if (wavelen < old / high) return f;
    if (wavelen > old / low) return f / factor;
    const smooth = (old / wavelen - low) / (high - low);
    return ((1 - smooth) * f) / factor + smooth * f;
  });
}

function yarn(theta: number, headDim: number, maxPositions: number, rs: Json): { invFreq: number[]; attentionFactor: number } {
  const factor = positive(rs, 'factor');
  const original = rs.original_max_position_embeddings == null ? maxPositions : positive(rs, 'original_max_position_embeddings');
  const mscale = orDefault(rs, 'mscale', 0);
  const mscaleAllDim = orDefault(rs, 'mscale_all_dim', 0);
  const getMscale = (scale: number, m: number): number => (scale <= 1 ? 1 : 0.1 * m * Math.log(scale) + 1);
  const attentionFactor = rs.attention_factor != null ? positive(rs, 'attention_factor')
    : mscale && mscaleAllDim ? getMscale(factor, mscale) / getMscale(factor, mscaleAllDim) : getMscale(factor, 1);
  const betaFast = orDefault(rs, 'beta_fast', 32);
  const betaSlow = orDefault(rs, 'beta_slow', 1);
  const truncate = flag(rs, 'truncate', true, ROPE);
  // The pair index at which a frequency completes `rotations` turns over the original context.
  const correctionDim = (rotations: number): number =>
    (headDim * Math.log(original / (rotations * 2 * Math.PI))) / (2 * Math.log(theta));
  let low = correctionDim(betaFast);
  let high = correctionDim(betaSlow);
  if (truncate) {
    low = Math.floor(low);
    high = Math.ceil(high);
  }
  low = Math.max(low, 0);
  high = Math.min(high, headDim - 1);
  if (low === high) high += 0.001;
  const invFreq = defaultInvFreq(theta, headDim).map((f, i) => {
    const extrapolation = 1 - Math.min(1, Math.max(0, (i - low) / (high - low)));
    return (f / factor) * (1 - extrapolation) + f * extrapolation;
  });
  return { invFreq, attentionFactor };
}

function longrope(cfg: Json, rs: Json, theta: number, headDim: number, maxPositions: number): RopeSpec {
  const half = headDim / 2;
  const short = factorList(rs, 'short_factor', half);
  const long = factorList(rs, 'long_factor', half);
  // Phi-3 puts original_max_position_embeddings at the top level; transformers then takes the factor as
  // max_position_embeddings / original (4.x) where 5.x prefers rope_scaling.factor: both must agree to be served.
  const topLevel = cfg.original_max_position_embeddings != null;
  if (!topLevel && rs.original_max_position_embeddings != null) {
    throw fail('CONFIG_UNSUPPORTED', `config.json: "${field('original_max_position_embeddings')}" without a top-level "original_max_position_embeddings" (transformers 4.x ignores it, 5.x uses it)`);
  }
  const original = topLevel ? num(cfg, 'original_max_position_embeddings') : maxPositions;
  let factor = maxPositions / original;
  if (rs.factor != null) {
    const given = positive(rs, 'factor');
    if (topLevel && given !== factor) {
      throw fail('CONFIG_UNSUPPORTED', `config.json: "${field('factor')}" ${given} differs from max_position_embeddings / original_max_position_embeddings = ${factor} (transformers versions disagree on which applies)`);
    }
    factor = given;
  }
  const attentionFactor = rs.attention_factor != null ? positive(rs, 'attention_factor')
    : factor <= 1 ? 1 : Math.sqrt(1 + Math.log(factor) / Math.log(original));
  const base = defaultInvFreq(theta, headDim);
  return {
    type: 'longrope', theta, attentionFactor,
    invFreq: base.map((f, i) => f / short[i]!),
    long: { invFreq: base.map((f, i) => f / long[i]!), after: original },
  };
}

/** The rotary embedding of a rotary-family config.json (headDim even, maxPositions = max_position_embeddings). */
export function ropeSpec(cfg: Json, theta: number, headDim: number, maxPositions: number): RopeSpec {
  if (cfg.partial_rotary_factor != null && cfg.partial_rotary_factor !== 1) {
    throw fail('CONFIG_UNSUPPORTED', `config.json: "partial_rotary_factor" ${JSON.stringify(cfg.partial_rotary_factor)} is not supported (every dimension of a head is rotated)`);
  }
  const plain = (type: RopeType, invFreq: number[]): RopeSpec => ({ type, theta, invFreq, attentionFactor: 1, long: null });
  if (cfg.rope_scaling == null) return plain('default', defaultInvFreq(theta, headDim));
  if (typeof cfg.rope_scaling !== 'object' || Array.isArray(cfg.rope_scaling)) {
    throw fail('CONFIG_INVALID', 'config.json: "rope_scaling" must be an object or null');
  }
  const rs = cfg.rope_scaling as Json;
  // Llama's and Qwen2's configs copy the legacy `type` over `rope_type`, the rotary module of the others reads
  // `rope_type` first: two different names are refused.
  if (rs.type != null && rs.rope_type != null && rs.type !== rs.rope_type) {
    throw fail('CONFIG_UNSUPPORTED', `config.json: "rope_scaling.type" ${JSON.stringify(rs.type)} and "rope_scaling.rope_type" ${JSON.stringify(rs.rope_type)} differ`);
  }
  const type = rs.rope_type ?? rs.type;
  switch (type) {
    case 'default':
    case 'dynamic':
      if (type === 'dynamic') positive(rs, 'factor');
      return plain(type, defaultInvFreq(theta, headDim));
    case 'linear': {
      const factor = positive(rs, 'factor');
      return plain('linear', defaultInvFreq(theta, headDim).map((f) => f / factor));
    }
    case 'llama3':
      return plain('llama3', llama3(defaultInvFreq(theta, headDim), rs));
    case 'yarn':
      return { type: 'yarn', theta, ...yarn(theta, headDim, maxPositions, rs), long: null };
    case 'longrope':
      return longrope(cfg, rs, theta, headDim, maxPositions);
    default:
      throw fail(type == null ? 'CONFIG_INVALID' : 'CONFIG_UNSUPPORTED',
        `config.json: "rope_scaling.rope_type" ${JSON.stringify(type ?? null)} is not supported (${ROPE_TYPES.join(', ')})`);
  }
}
