/**
 * The math of LoRAX's per-request adapter merging (predibase/lorax `server/lorax_server/utils/merges/`, itself
 * PEFT's `utils/merge_utils.py`), as small synchronous functions over the task tensors of one module: the
 * lora_A (or lora_B) of each source adapter, all of one shape, flattened row-major. Host side only, before upload.
 *
 * Strategies (n sources, weights w_i, task tensors t_i, every loop over the elements e of one tensor):
 * - `linear`:      out[e] = Σ_i w_i·t_i[e]
 * - `ties`:        p_i = magnitudePrune(t_i, density); out = disjointMerge(p, w, majoritySign(p, method))
 * - `dare_linear`: p_i = randomPrune(t_i, density, rescale); out[e] = Σ_i w_i·p_i[e]
 * - `dare_ties`:   p_i = randomPrune(t_i, density, rescale); out = disjointMerge(p, w, majoritySign(p, method))
 *
 * The sign is elected on the pruned tensors before the weights are applied, as in LoRAX and PEFT.
 * Sums run in float64 and each result is rounded to float32 once.
 *
 * Where this differs from the originals, on purpose:
 * - Magnitude pruning keeps the k = ⌊density·n⌋ largest |t[e]|; among equal magnitudes at the threshold the
 *   lower indices are kept (torch.topk leaves that order unspecified).
 * - Random pruning (DARE) draws its keep mask from a seeded PRNG (`dareStream`), so a request and its seed
 *   always give the same merged adapter; torch.bernoulli uses the global torch generator. It rescales the kept
 *   values by 1/density as PEFT does and as DARE is defined: LoRAX's copy computes `torch.div(pruned, density)`
 *   and discards the result, so LoRAX's DARE does not rescale.
 */
import { createHash } from 'node:crypto';
import { Xoshiro128 } from '../engine/sampling.ts';

export type MergeStrategy = 'linear' | 'ties' | 'dare_linear' | 'dare_ties';
export type MajoritySignMethod = 'total' | 'frequency';
export const MERGE_STRATEGIES: readonly MergeStrategy[] = ['linear', 'ties', 'dare_linear', 'dare_ties'];
export const MAJORITY_SIGN_METHODS: readonly MajoritySignMethod[] = ['total', 'frequency'];

/** The parameters of the task-tensor math (what the request's `merged_adapters` sets besides ids and weights). */
export interface MergeMath {
  readonly strategy: MergeStrategy;
  /** Fraction of each task tensor kept by ties and DARE, in [0, 1]; 1 or more keeps everything (no pruning). */
  readonly density: number;
  readonly majoritySignMethod: MajoritySignMethod;
}

/** A stream of uniform 32-bit unsigned integers. */
export type Uint32Stream = () => number;

const TWO_POW_32 = 4294967296;

/**
 * TIES' trim step: keeps the k = ⌊density·n⌋ elements of largest magnitude, zeroes the rest. As a loop:
 *   order = indices 0..n-1 sorted by |t[e]| descending, then e ascending
 *   out[e] = t[e] if e is among the first k of order, else 0
 * density >= 1 returns a copy of t (PEFT's `prune` does not prune then).
 */
export function magnitudePrune(t: Float32Array, density: number): Float32Array {
  if (density >= 1) return t.slice();
  const n = t.length;
  const k = Math.floor(density * n);
  const out = new Float32Array(n);
  if (k <= 0) return out;
  // The k-th largest magnitude is the threshold: everything above it is kept, then equal ones from the left.
  const mags = new Float32Array(n);
  for (let e = 0; e < n; e++) mags[e] = Math.abs(t[e]!);
  const threshold = selectNth(mags, n - k);
  let above = 0;
  for (let e = 0; e < n; e++) if (Math.abs(t[e]!) > threshold) above++;
  let ties = k - above;
  for (let e = 0; e < n; e++) {
    const m = Math.abs(t[e]!);
    if (m > threshold) out[e] = t[e]!;
    else if (m === threshold && ties > 0) {
      out[e] = t[e]!;
      ties--;
    }
  }
  return out;
}

/**
 * The value that would be at index `nth` if `a` were sorted ascending (quickselect, average O(n); `a` is
 * reordered).
 */
function selectNth(a: Float32Array, nth: number): number {
  let lo = 0;
  let hi = a.length - 1;
  while (lo < hi) {
    // Median of three as the pivot, then Hoare's partition.
    const mid = (lo + hi) >>> 1;
    const x = a[lo]!, y = a[mid]!, z = a[hi]!;
    const pivot = x < y ? (y < z ? y : x < z ? z : x) : (x < z ? x : y < z ? z : y);
    let i = lo;
    let j = hi;
    while (i <= j) {
      while (a[i]! < pivot) i++;
      while (a[j]! > pivot) j--;
      if (i <= j) {
        const tmp = a[i]!;
        a[i] = a[j]!;
        a[j] = tmp;
        i++;
        j--;
      }
    }
    if (nth <= j) hi = j;
    else if (nth >= i) lo = i;
    else return a[nth]!;
  }
  return a[nth]!;
}

/**
 * DARE's drop step: keeps each element with probability `density` (u < density for the next uniform
 * u = next()/2^32 of `next`, one draw per element in index order) and, with `rescale`, divides what it keeps by
 * density:
 *   out[e] = (next()/2^32 < density) ? (rescale ? t[e]/density : t[e]) : 0
 * density >= 1 returns a copy of t and draws nothing.
 */
export function randomPrune(t: Float32Array, density: number, next: Uint32Stream, rescale: boolean): Float32Array {
  if (density >= 1) return t.slice();
  const out = new Float32Array(t.length);
  for (let e = 0; e < t.length; e++) {
    if (next() / TWO_POW_32 < density) out[e] = rescale ? t[e]! / density : t[e]!;
  }
  return out;
}

/**
 * TIES' elect step, per element: the sign of the total (Σ_i t_i[e]) or of the vote count (Σ_i sign(t_i[e])),
 * +1 when that is >= 0, else -1:
 *   s = method === 'total' ? Σ_i t_i[e] : Σ_i sign(t_i[e]);   majority[e] = s >= 0 ? 1 : -1
 */
export function majoritySign(tensors: readonly Float32Array[], method: MajoritySignMethod): Int8Array {
  const n = tensors[0]!.length;
  const out = new Int8Array(n);
  for (let e = 0; e < n; e++) {
    let s = 0;
    for (const t of tensors) s += method === 'total' ? t[e]! : Math.sign(t[e]!);
    out[e] = s >= 0 ? 1 : -1;
  }
  return out;
}

/**
 * TIES' disjoint mean: per element, the mean of the weighted values whose (unweighted) sign agrees with the
 * majority; zeros never agree (sign 0), and an element no source agrees on is 0:
 *   agree_i = sign(t_i[e]) === majority[e]
 *   out[e] = Σ_{i: agree_i} w_i·t_i[e] / max(1, #{i: agree_i})
 */
export function disjointMerge(tensors: readonly Float32Array[], weights: readonly number[], majority: Int8Array): Float32Array {
  const n = majority.length;
  const out = new Float32Array(n);
  for (let e = 0; e < n; e++) {
    let sum = 0;
    let count = 0;
    for (let i = 0; i < tensors.length; i++) {
      const x = tensors[i]![e]!;
      if (Math.sign(x) === majority[e]) {
        sum += weights[i]! * x;
        count++;
      }
    }
    out[e] = sum / Math.max(1, count);
  }
  return out;
}

/** Task arithmetic: out[e] = Σ_i w_i·t_i[e]. */
export function weightedSum(tensors: readonly Float32Array[], weights: readonly number[]): Float32Array {
  const n = tensors[0]!.length;
  const out = new Float32Array(n);
  for (let e = 0; e < n; e++) {
    let sum = 0;
    for (let i = 0; i < tensors.length; i++) sum += weights[i]! * tensors[i]![e]!;
    out[e] = sum;
  }
  return out;
}

/**
 * One merged task tensor by `m.strategy` (the module comment's formulas). `stream(i)` gives source i's DARE
 * random stream (called once per source, only by the DARE strategies). Every tensor has the same length.
 */
export function mergeTaskTensors(
  tensors: readonly Float32Array[], weights: readonly number[], m: MergeMath, stream: (i: number) => Uint32Stream,
): Float32Array {
  if (tensors.length === 0 || tensors.length !== weights.length) throw new Error('mergeTaskTensors: one weight per tensor, at least one tensor');
  const n = tensors[0]!.length;
  if (tensors.some((t) => t.length !== n)) throw new Error('mergeTaskTensors: tensors of different sizes');
  switch (m.strategy) {
    case 'linear':
      return weightedSum(tensors, weights);
    case 'dare_linear':
      return weightedSum(tensors.map((t, i) => randomPrune(t, m.density, stream(i), true)), weights);
    case 'ties':
    case 'dare_ties': {
      const pruned = m.strategy === 'ties'
        ? tensors.map((t) => magnitudePrune(t, m.density))
        : tensors.map((t, i) => randomPrune(t, m.density, stream(i), true));
      return disjointMerge(pruned, weights, majoritySign(pruned, m.majoritySignMethod));
    }
  }
}

/**
 * The DARE random stream of one task tensor: xoshiro128** (the sampler's PRNG, seeded through splitmix64) seeded
 * with the first 53 bits, little-endian, of sha256(`<seed>/<module path>/<A|B>/<source index>`). Each tensor has
 * its own stream, so its mask depends only on the seed and which tensor it is.
 */
export function dareStream(seed: number, modulePath: string, side: 'A' | 'B', source: number): Uint32Stream {
  const digest = createHash('sha256').update(`${seed}/${modulePath}/${side}/${source}`).digest();
  const seed53 = Number(digest.readBigUInt64LE(0) & ((1n << 53n) - 1n));
  const rng = new Xoshiro128(seed53);
  return () => rng.nextUint32();
}
