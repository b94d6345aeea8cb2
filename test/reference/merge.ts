/**
 * Ground truth for per-request adapter merging, written as plain loops in float64 from LoRAX's
 * `server/lorax_server/utils/merges/strategies.py` + `utils.py` and PEFT's `utils/merge_utils.py`. Test code
 * only: it shares nothing with src/.
 *
 *   linear:      Σ_i w_i·t_i
 *   ties:        p_i = magnitude_prune(t_i, density);  disjoint_merge(w·p, majority_sign(p))
 *   dare_linear: p_i = random_prune(t_i, density)/density;  Σ_i w_i·p_i
 *   dare_ties:   p_i = random_prune(t_i, density)/density;  disjoint_merge(w·p, majority_sign(p))
 *   adapter:     for every module, A and B are merged separately over the sources that have it; the merged
 *                adapter's scale is the first source's lora_alpha / r (or / sqrt(r) with use_rslora).
 *
 * Choices where the originals leave it open (the server documents the same ones): magnitude pruning keeps the
 * k = floor(density·n) largest |t| with ties going to the lower index; the random keep mask of a tensor is drawn
 * from xoshiro128** seeded through splitmix64 by the low 53 bits (little-endian) of
 * sha256("<seed>/<module path>/<A|B>/<source index>"), one draw u = next/2^32 per element, kept when u < density.
 */
import { createHash } from 'node:crypto';

export type RefStrategy = 'linear' | 'ties' | 'dare_linear' | 'dare_ties';
export type RefSignMethod = 'total' | 'frequency';

export interface RefMergeParams {
  strategy: RefStrategy;
  density: number;
  signMethod: RefSignMethod;
  seed: number;
}

// ------------------------------------------------------------------------------------------------
// The PRNG, from its definitions (Vigna: splitmix64.c, xoshiro128starstar.c)

const M64 = (1n << 64n) - 1n;

/** splitmix64: returns [next state, output]. */
function splitmix64(x: bigint): [bigint, bigint] {
  const state = (x + 0x9e3779b97f4a7c15n) & M64;
  let z = state;
  z = ((z ^ (z >> 30n)) * 0xbf58476d1ce4e5b9n) & M64;
  z = ((z ^ (z >> 27n)) * 0x94d049bb133111ebn) & M64;
  return [state, z ^ (z >> 31n)];
}

/** xoshiro128**, its 4 words from two splitmix64 outputs (low word first); yields uint32s. */
export function refXoshiro(seed: bigint): () => number {
  let [st, a] = splitmix64(seed & M64);
  let b: bigint;
  [st, b] = splitmix64(st);
  const s = [Number(a & 0xffffffffn), Number(a >> 32n), Number(b & 0xffffffffn), Number(b >> 32n)];
  if (!s.some((w) => w !== 0)) s[0] = 1; // the all-zero state is a fixed point
  const rotl = (x: number, k: number) => ((x << k) | (x >>> (32 - k))) >>> 0;
  const mul = (x: number, m: number) => Number((BigInt(x) * BigInt(m)) & 0xffffffffn); // mod 2^32
  return () => {
    const result = mul(rotl(mul(s[1]!, 5), 7), 9);
    const t = (s[1]! << 9) >>> 0;
    s[2] = (s[2]! ^ s[0]!) >>> 0;
    s[3] = (s[3]! ^ s[1]!) >>> 0;
    s[1] = (s[1]! ^ s[2]!) >>> 0;
    s[0] = (s[0]! ^ s[3]!) >>> 0;
    s[2] = (s[2]! ^ t) >>> 0;
    s[3] = rotl(s[3]!, 11);
    return result;
  };
}

/** The keep-mask stream of one task tensor. */
export function refStream(seed: number, modulePath: string, side: 'A' | 'B', source: number): () => number {
  const digest = createHash('sha256').update(`${seed}/${modulePath}/${side}/${source}`).digest();
  let low = 0n;
  for (let i = 7; i >= 0; i--) low = (low << 8n) | BigInt(digest[i]!);
  return refXoshiro(low & ((1n << 53n) - 1n));
}

// ------------------------------------------------------------------------------------------------
// utils.py

/** magnitude_based_pruning: mask the top-k |t| (k = int(density·n)), lower index first among equals. */
export function refMagnitudePrune(t: ArrayLike<number>, density: number): Float64Array {
  const n = t.length;
  const out = new Float64Array(n);
  if (density >= 1) {
    for (let e = 0; e < n; e++) out[e] = t[e]!;
    return out;
  }
  const k = Math.trunc(density * n);
  const taken = new Uint8Array(n);
  for (let j = 0; j < k; j++) {
    let best = -1;
    for (let e = 0; e < n; e++) {
      if (taken[e]) continue;
      if (best < 0 || Math.abs(t[e]!) > Math.abs(t[best]!)) best = e;
    }
    taken[best] = 1;
  }
  for (let e = 0; e < n; e++) out[e] = taken[e] ? t[e]! : 0;
  return out;
}

/** random_pruning with rescale: t·bernoulli(density)/density. */
export function refRandomPrune(t: ArrayLike<number>, density: number, next: () => number): Float64Array {
  const n = t.length;
  const out = new Float64Array(n);
  for (let e = 0; e < n; e++) {
    if (density >= 1) out[e] = t[e]!;
    else out[e] = next() / 2 ** 32 < density ? t[e]! / density : 0;
  }
  return out;
}

/** calculate_majority_sign_mask: mask[i][e] = sign(t_i[e]) == (Σ >= 0 ? 1 : -1). */
export function refMajorityMask(ts: readonly ArrayLike<number>[], method: RefSignMethod): boolean[][] {
  const n = ts[0]!.length;
  const mask = ts.map(() => new Array<boolean>(n).fill(false));
  for (let e = 0; e < n; e++) {
    let s = 0;
    for (const t of ts) s += method === 'total' ? Math.sign(t[e]!) * Math.abs(t[e]!) : Math.sign(t[e]!);
    const majority = s >= 0 ? 1 : -1;
    ts.forEach((t, i) => (mask[i]![e] = Math.sign(t[e]!) === majority));
  }
  return mask;
}

/** disjoint_merge: Σ_i (w_i·t_i)·mask_i / clamp(Σ_i mask_i, min=1). */
export function refDisjointMerge(weighted: readonly ArrayLike<number>[], mask: boolean[][]): Float64Array {
  const n = weighted[0]!.length;
  const out = new Float64Array(n);
  for (let e = 0; e < n; e++) {
    let sum = 0;
    let count = 0;
    weighted.forEach((t, i) => {
      if (mask[i]![e]) {
        sum += t[e]!;
        count++;
      }
    });
    out[e] = sum / Math.max(count, 1);
  }
  return out;
}

// ------------------------------------------------------------------------------------------------
// strategies.py

function applyWeights(ts: readonly ArrayLike<number>[], w: readonly number[]): Float64Array[] {
  return ts.map((t, i) => Float64Array.from(t, (x) => x * w[i]!));
}

function sum(ts: readonly ArrayLike<number>[]): Float64Array {
  const out = new Float64Array(ts[0]!.length);
  for (const t of ts) for (let e = 0; e < out.length; e++) out[e] += t[e]!;
  return out;
}

/** One merged task tensor; streams[i] is source i's keep-mask stream (DARE only). */
export function refMergeTensors(ts: readonly ArrayLike<number>[], w: readonly number[], p: RefMergeParams, streams: (i: number) => () => number): Float64Array {
  switch (p.strategy) {
    case 'linear':
      return sum(applyWeights(ts, w));
    case 'ties': {
      const pruned = ts.map((t) => refMagnitudePrune(t, p.density));
      return refDisjointMerge(applyWeights(pruned, w), refMajorityMask(pruned, p.signMethod));
    }
    case 'dare_linear':
      return sum(applyWeights(ts.map((t, i) => refRandomPrune(t, p.density, streams(i))), w));
    case 'dare_ties': {
      const pruned = ts.map((t, i) => refRandomPrune(t, p.density, streams(i)));
      return refDisjointMerge(applyWeights(pruned, w), refMajorityMask(pruned, p.signMethod));
    }
  }
}

/** A source adapter: its config (lora_alpha, r, use_rslora) and per module path its A [r, in] and B [out, r]. */
export interface RefSource {
  config: { r: number; lora_alpha: number; use_rslora?: boolean };
  modules: ReadonlyMap<string, { A: ArrayLike<number>; B: ArrayLike<number> }>;
}

/** merge_adapters: per module over the sources that have it, A and B separately; the first source's scale. */
export function refMergeAdapters(sources: readonly RefSource[], weights: readonly number[], p: RefMergeParams): {
  modules: Map<string, { A: Float64Array; B: Float64Array }>;
  scale: number;
} {
  const paths = [...new Set(sources.flatMap((s) => [...s.modules.keys()]))];
  const modules = new Map<string, { A: Float64Array; B: Float64Array }>();
  for (const path of paths) {
    const idx = sources.map((s, i) => (s.modules.has(path) ? i : -1)).filter((i) => i >= 0);
    const w = idx.map((i) => weights[i]!);
    const side = (x: 'A' | 'B') => refMergeTensors(idx.map((i) => sources[i]!.modules.get(path)![x]), w, p, (k) => refStream(p.seed, path, x, idx[k]!));
    modules.set(path, { A: side('A'), B: side('B') });
  }
  const c = sources[0]!.config;
  return { modules, scale: c.use_rslora ? c.lora_alpha / Math.sqrt(c.r) : c.lora_alpha / c.r };
}
