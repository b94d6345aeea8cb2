/**
 * Next-token selection on host logits: penalties, warpers, greedy or seeded sampling.
 *
 * Order (TGI `HeterogeneousNextTokenChooser`, HF generation):
 *   0. the row's constraint mask (`allowed`: every other id → −∞) and `logit_bias` (OpenAI: added to the
 *      raw logit of its id)
 *   1. repetition penalty (HF: over every distinct id in `history`, logit > 0 → logit / p, else logit * p)
 *   2. frequency / presence penalties (OpenAI: logit -= freq · count + presence · [count > 0]);
 *      counts cover the whole history by default, as TGI's frequency penalty covers the whole
 *      input; `sample(..., penaltyFrom = promptLength)` counts generated tokens only (OpenAI/vLLM)
 *   3. temperature (logit / T)
 *   4. top_k → top_p → typical_p (each renormalises over the survivors of the previous one)
 *   5. sample from the survivors (in id order), or argmax for greedy (ties → lowest id); without any of step 4 the
 *      draw walks the ranking (logit desc, id asc), where a device's shortlist of the best logits begins
 *
 * `logprob` of the chosen id (and of the `top` alternatives) is log_softmax over the logits
 * after steps 0–3 (so under a constraint it is renormalised over the allowed ids), before truncation, so it does not depend on top_k/top_p/typical_p; greedy
 * without penalties gives log_softmax(raw logits). (TGI reports the log-softmax after truncation.)
 *
 * All arithmetic is in float64, softmax subtracts the max first. Sampling consumes exactly one
 * PRNG float per token (greedy none), so a seed and a logits sequence fix the output.
 */
import { fail } from '../errors.ts';
import { SHORTLIST_SIZE, type LogitEdits, type PickedToken, type Shortlist } from './executor.ts';

export interface SamplingParams {
  doSample: boolean;
  /** > 0; 1 = none. */
  temperature: number;
  /** 0 = off. */
  topK: number;
  /** 1 = off. */
  topP: number;
  /** 1 = off. */
  typicalP: number;
  /** 1 = off. */
  repetitionPenalty: number;
  /** 0 = off. */
  frequencyPenalty: number;
  /** 0 = off. */
  presencePenalty: number;
  seed: number;
  /** 0 = none. */
  topNTokens: number;
  /** OpenAI `logit_bias`: [token id, bias] pairs, each bias added to that id's logit before anything else; [] = none. */
  logitBias: readonly (readonly [number, number])[];
}

export const DEFAULT_SAMPLING: SamplingParams = Object.freeze({
  doSample: false,
  temperature: 1,
  topK: 0,
  topP: 1,
  typicalP: 1,
  repetitionPenalty: 1,
  frequencyPenalty: 0,
  presencePenalty: 0,
  seed: 0,
  topNTokens: 0,
  logitBias: Object.freeze([]),
});

export interface SampledToken {
  id: number;
  logprob: number;
  top?: { id: number; logprob: number }[];
}

/**
 * Whether sample() reduces to the greedy choice of the logits after logit_bias and penalties (Sampler.edits): argmax
 * (ties → lowest id) with logprob log_softmax(edited logits)[id], no random number drawn. Then an executor may pick
 * the token on the device (DecodeItem.pick, with its edits); a constraint mask, which the caller knows of, rules that
 * out too.
 */
export function pickableOnDevice(p: SamplingParams): boolean {
  return !p.doSample && p.temperature === 1 && p.topNTokens === 0 && fitsTheDevice(p);
}

/**
 * At most SHORTLIST_SIZE top-n alternatives (a shortlist holds them), and a bias and penalties the device's float32
 * edits hold (a repetition penalty near 0 or ∞ would overflow there).
 */
function fitsTheDevice(p: SamplingParams): boolean {
  const fits = (v: number, lo: number) => Math.abs(v) <= 1e6 && (v === 0 || Math.abs(v) >= lo);
  return p.topNTokens <= SHORTLIST_SIZE && fits(p.repetitionPenalty, 1e-6) && fits(p.frequencyPenalty, 0) && fits(p.presencePenalty, 0)
    && p.logitBias.every(([, b]) => fits(b, 0));
}

/**
 * Whether sample() draws among at most SHORTLIST_SIZE top-k candidates, or takes the greedy choice with alternatives or
 * a temperature (not pickable), and needs nothing else of the row but its normaliser and at most SHORTLIST_SIZE top-n
 * alternatives (a constraint mask, which the caller knows of, rules it out): then an executor may return the Shortlist
 * of the row's edited logits (DecodeItem.shortlist, DecodeItem.edits) instead of its logits.
 */
export function shortlistOnDevice(p: SamplingParams): boolean {
  const drawn = p.doSample && p.topK >= 1 && p.topK <= SHORTLIST_SIZE;
  return (drawn || (!p.doSample && !pickableOnDevice(p))) && fitsTheDevice(p);
}

/**
 * Whether sample() draws a token with top_p alone or none of top_k, top_p and typical_p (plain sampling), and at most
 * SHORTLIST_SIZE top-n alternatives (a constraint mask, which the caller knows of, rules it out too): then the Shortlist of the row's
 * edited logits decides the token whenever the nucleus, or the plain draw (which walks the ranking), lies within it
 * (Sampler.sampleShortlist), and the row's logits are read only when it does not (ShortlistRequest.fallback).
 */
export function nucleusOnDevice(p: SamplingParams): boolean {
  return p.doSample && p.topK === 0 && p.typicalP >= 1 && fitsTheDevice(p);
}

/**
 * How far the float32 normaliser of a Shortlist may be from the float64 sum over the whole row, relative to it: a
 * nucleus whose crossing lies this close to top_p is decided on the row's logits. The kernel's rounding (float32 exp
 * and a tree sum over at most a few 100k terms, and logNorm's own rounding, under 1e-6 × log V) is about 1e-6.
 */
export const SHORTLIST_SUM_TOLERANCE = 1e-4;

/** A token picked on the device (executor.ts PickedToken) as sample() returns it; fails as sample() does on a row without a finite logit or with +inf. */
export function pickedToken(p: PickedToken): SampledToken {
  if (p.id === -1) throw fail('GENERATION', 'every logit is -inf or NaN');
  if (p.id === -2) throw fail('GENERATION', 'the logits contain +inf');
  return { id: p.id, logprob: p.logprob };
}

// ---------------------------------------------------------------------------------------------
// PRNG: xoshiro128** (Blackman & Vigna), state seeded by splitmix64 of the 64-bit seed.

const MASK64 = (1n << 64n) - 1n;

function splitmix64(state: bigint): [bigint, bigint] {
  const next = (state + 0x9e3779b97f4a7c15n) & MASK64;
  let z = next;
  z = ((z ^ (z >> 30n)) * 0xbf58476d1ce4e5b9n) & MASK64;
  z = ((z ^ (z >> 27n)) * 0x94d049bb133111ebn) & MASK64;
  return [next, z ^ (z >> 31n)];
}

export class Xoshiro128 {
  private s0: number;
  private s1: number;
  private s2: number;
  private s3: number;

  constructor(seed: number) {
    let st = BigInt(seed) & MASK64;
    let a: bigint, b: bigint;
    [st, a] = splitmix64(st);
    [st, b] = splitmix64(st);
    this.s0 = Number(a & 0xffffffffn) | 0;
    this.s1 = Number(a >> 32n) | 0;
    this.s2 = Number(b & 0xffffffffn) | 0;
    this.s3 = Number(b >> 32n) | 0;
    if ((this.s0 | this.s1 | this.s2 | this.s3) === 0) this.s0 = 1; // the all-zero state is a fixed point
  }

  /** Uniform 32-bit unsigned integer. */
  nextUint32(): number {
    const result = Math.imul(rotl(Math.imul(this.s1, 5), 7), 9) >>> 0;
    const t = this.s1 << 9;
    this.s2 ^= this.s0;
    this.s3 ^= this.s1;
    this.s1 ^= this.s2;
    this.s0 ^= this.s3;
    this.s2 ^= t;
    this.s3 = rotl(this.s3, 11);
    return result;
  }

  /** Uniform in [0, 1) with 53 random bits. */
  nextFloat(): number {
    const hi = this.nextUint32() >>> 5; // 27 bits
    const lo = this.nextUint32() >>> 6; // 26 bits
    return (hi * 67108864 + lo) / 9007199254740992;
  }
}

function rotl(x: number, k: number): number {
  return (x << k) | (x >>> (32 - k));
}

// ---------------------------------------------------------------------------------------------

/** a ranks above b: larger value, then lower id. */
function better(x: Float64Array, a: number, b: number): boolean {
  const xa = x[a]!, xb = x[b]!;
  return xa > xb || (xa === xb && a < b);
}

/** The k best ids of x[0..n), best first. Partial selection with a size-k min-heap: O(n log k), no full sort. */
function selectTop(x: Float64Array, k: number, n: number): Int32Array {
  const heap = new Int32Array(k);
  let size = 0;
  const siftDown = (i: number): void => {
    for (;;) {
      const l = 2 * i + 1, r = l + 1;
      let m = i;
      if (l < size && better(x, heap[m]!, heap[l]!)) m = l;
      if (r < size && better(x, heap[m]!, heap[r]!)) m = r;
      if (m === i) return;
      const t = heap[i]!; heap[i] = heap[m]!; heap[m] = t;
      i = m;
    }
  };
  for (let id = 0; id < n; id++) {
    if (size < k) {
      // sift up: heap[0] is the worst kept
      let i = size++;
      heap[i] = id;
      while (i > 0) {
        const p = (i - 1) >> 1;
        if (!better(x, heap[p]!, heap[i]!)) break;
        const t = heap[i]!; heap[i] = heap[p]!; heap[p] = t;
        i = p;
      }
    } else if (better(x, id, heap[0]!)) {
      heap[0] = id;
      siftDown(0);
    }
  }
  const out = heap.slice(0, size);
  out.sort((a, b) => (better(x, a, b) ? -1 : better(x, b, a) ? 1 : 0));
  return out;
}

/** A shortlist's finite entries as a small row (Sampler.shortlistView). */
interface ShortlistView {
  readonly x: Float64Array;
  readonly ids: Int32Array;
  readonly order: Int32Array;
  readonly complete: boolean;
}

/** Sampler.edits' running state: the entries of the distinct ids seen, and how much of the history they cover. */
interface EditState {
  /** What the history was counted for: prompt length, penaltyFrom and vocabulary. */
  readonly prompt: number;
  readonly penaltyFrom: number;
  readonly vocab: number;
  /** History tokens counted. */
  consumed: number;
  readonly index: Map<number, number>;
  size: number;
  ids: Int32Array;
  bias: Float32Array;
  repetition: Float32Array;
  minus: Float32Array;
  /** Per entry: occurrences in history[penaltyFrom:]. */
  counts: Int32Array;
}

/** Bins of the mass-threshold search; keys this far above the smallest share the overflow bin (e^-50 ≈ 2e-22). */
const BINS = 2048;
const KEY_SPAN = 50;

export class Sampler {
  readonly params: SamplingParams;
  private readonly rng: Xoshiro128;
  /** A random number drawn for the next token before its draw (peekDraw). */
  private pendingDraw: number | null = null;
  /** Processed logits (penalties + temperature), reused between calls. */
  private work = new Float64Array(0);
  private counts = new Uint32Array(0);
  private touched = new Int32Array(0);
  private keys = new Float64Array(0);
  private weights = new Float64Array(0);
  private ids = new Int32Array(0);
  /** nucleus's bin of each id, reused between calls. */
  private bins = new Uint16Array(0);
  private readonly binBuf = new Float64Array(BINS + 1);
  /** The row sampleShortlist fills, reused between calls. */
  private shortRow = new Float32Array(0);
  /** What edits() counted of the history so far. */
  private editState: EditState | null = null;
  /** shortlistView's arrays, reused between calls. */
  private view = { keys: new Float64Array(0), ids: new Int32Array(0), x: new Float64Array(0), at: new Int32Array(0) };
  /** The last shortlist shortlistView was asked for, and its view (in `view`'s arrays). */
  private viewOf: { s: Shortlist; vocab: number; view: ShortlistView | 'row' } | null = null;

  constructor(params: SamplingParams) {
    this.params = { ...params };
    this.rng = new Xoshiro128(params.seed);
  }

  /** The token's random number: one drawn ahead (peekDraw) if any, else a new one. */
  private nextDraw(): number {
    const u = this.pendingDraw ?? this.rng.nextFloat();
    this.pendingDraw = null;
    return u;
  }

  /** The next token's random number, drawn now and kept for it (a shortlist that cannot decide leaves it to the row). */
  private peekDraw(): number {
    this.pendingDraw ??= this.rng.nextFloat();
    return this.pendingDraw;
  }

  /**
   * Choose the next token.
   * @param logits next-position logits, length V
   * @param history all ids so far (prompt + generated) for the penalties
   * @param penaltyFrom frequency/presence penalties count `history[penaltyFrom:]` only; 0 (the
   *   default) counts the whole history like TGI's frequency penalty, the prompt length gives
   *   OpenAI/vLLM's "generated tokens only". The repetition penalty always covers the whole history (HF).
   * @param allowed when given, only ids with allowed[id] === 1 can be chosen (a constraint's mask; ids past its end are not allowed)
   * @param edited the logits already carry logit_bias and the penalties (a device's edits: DecodeItem.edits); pass no history then
   */
  sample(logits: Float32Array, history: readonly number[], penaltyFrom = 0, allowed?: Uint8Array, edited = false): SampledToken {
    const p = this.params;
    const V = logits.length;
    if (V === 0) throw fail('GENERATION', 'empty logits');
    if (this.work.length !== V) {
      this.work = new Float64Array(V);
      this.counts = new Uint32Array(V);
    }
    const x = this.work;
    for (let i = 0; i < V; i++) {
      const v = logits[i]!;
      x[i] = v !== v ? -Infinity : v; // NaN → never chosen
    }
    if (!edited) for (const [id, bias] of p.logitBias) if (id < V) x[id]! += bias;
    if (allowed) for (let i = 0; i < V; i++) if (allowed[i] !== 1) x[i] = -Infinity;
    this.applyPenalties(x, history, penaltyFrom);
    if (p.temperature !== 1) {
      const inv = 1 / p.temperature;
      for (let i = 0; i < V; i++) x[i]! *= inv;
    }

    // log-softmax normaliser over the processed logits
    let max = -Infinity;
    let argmax = 0;
    for (let i = 0; i < V; i++) if (x[i]! > max) { max = x[i]!; argmax = i; }
    if (max === -Infinity) throw fail('GENERATION', 'every logit is -inf or NaN');
    if (max === Infinity) throw fail('GENERATION', 'the logits contain +inf');
    // exp(x − max), kept for the draw when sampling
    const w = this.weightBuf(V);
    let sum = 0;
    for (let i = 0; i < V; i++) {
      const e = Math.exp(x[i]! - max);
      w[i] = e;
      sum += e;
    }
    const logZ = max + Math.log(sum);

    let id = p.doSample ? this.draw(x, max, sum, w) : argmax;
    if (x[id] === -Infinity) id = argmax; // a rounding fallback of draw() never picks a masked id
    const out: SampledToken = { id, logprob: x[id]! - logZ };
    if (p.topNTokens > 0) {
      out.top = Array.from(selectTop(x, Math.min(p.topNTokens, V), V), (t) => ({ id: t, logprob: x[t]! - logZ }));
    }
    return out;
  }

  /**
   * sample() of a row of `vocab` logits of which only its shortlist is known (shortlistOnDevice or nucleusOnDevice
   * params), in O(SHORTLIST_SIZE): the same token, or null when the shortlist does not decide it (a nucleus reaching
   * past the shortlist, or whose crossing lies within SHORTLIST_SUM_TOLERANCE of top_p), and then no random number is
   * drawn: the caller samples the row's logits instead. top_k ≤ SHORTLIST_SIZE keeps only shortlisted ids, and so does
   * a nucleus within the shortlist; the draw reads only them. The logprob comes from the shortlist's normaliser,
   * relative to its largest logit so that a low temperature does not magnify the normaliser's float32 rounding (and
   * the best token's logprob is never above 0).
   */
  sampleShortlist(s: Shortlist, vocab: number): SampledToken | null {
    const token = this.shortlistToken(s, vocab);
    const n = Math.min(this.params.topNTokens, s.ids.length);
    if (!token || n === 0) return token;
    // top-n alternatives: the shortlist's best ids as selectTop ranks the whole row (tempered logit desc, id asc: the
    // shortlist's order unless tempering made distinct logits equal)
    const inv = 1 / this.params.temperature;
    const temper = this.params.temperature !== 1;
    const at = Array.from({ length: s.ids.length }, (_, j) => j).filter((j) => s.ids[j]! >= 0);
    const x = (j: number) => (temper ? s.logits[j]! * inv : s.logits[j]!);
    at.sort((a, b) => (x(a) > x(b) ? -1 : x(a) < x(b) ? 1 : s.ids[a]! - s.ids[b]!));
    return { ...token, top: at.slice(0, n).map((j) => ({ id: s.ids[j]!, logprob: this.shortlistLogprob(s, s.logits[j]!) })) };
  }

  /**
   * The logprob of a logit of the shortlist's row: its tempered distance from the largest logit, less the normaliser
   * (relative to that logit, so that a low temperature does not magnify the normaliser's float32 rounding).
   */
  private shortlistLogprob(s: Shortlist, logit: number): number {
    return (logit - s.logits[0]!) * (1 / this.params.temperature) - s.logNorm;
  }

  /** sampleShortlist's token, without alternatives. */
  private shortlistToken(s: Shortlist, vocab: number): SampledToken | null {
    const view = this.shortlistView(s, vocab);
    if (view === 'row') return this.rowDecides(s, vocab) ? this.sampleShortlistRow(s, vocab) : null;
    const { x, ids, order, complete } = view;
    const p = this.params;
    const max = x[order[0]!]!;
    let k: number;
    if (!p.doSample) {
      k = order[0]!; // the greedy choice: the largest logit, the lowest id among equals
    } else if (p.topK > 0) {
      k = this.drawAmong(x, max, this.topKSurvivors(x, max, order.subarray(0, Math.min(p.topK, order.length))), true);
    } else if (p.topP < 1) {
      const c = this.rankEnd(x, max, order, complete, s.logNorm, p.topP);
      if (c < 0) return complete ? this.sampleShortlistRow(s, vocab) : null;
      k = this.drawAmong(x, max, order.slice(0, c + 1).sort(), true);
    } else {
      // plain sampling: the draw walks the ranking, which the shortlist begins
      const c = this.rankEnd(x, max, order, complete, s.logNorm, this.peekDraw());
      if (c < 0) return complete ? this.sampleShortlistRow(s, vocab) : null; // the row takes the random number drawn
      this.nextDraw();
      k = order[c]!;
    }
    return { id: ids[k]!, logprob: this.shortlistLogprob(s, s.logits[order.indexOf(k)]!) };
  }

  /**
   * Whether sampleShortlist answers from `s` alone, or throws. It draws no random number to tell, but for plain
   * sampling, whose random number it draws ahead and keeps for the token (the row's draw takes it if need be).
   */
  shortlistDecides(s: Shortlist, vocab: number): boolean {
    let view: ReturnType<Sampler['shortlistView']>;
    try {
      view = this.shortlistView(s, vocab);
    } catch {
      return true; // sampleShortlist throws the same
    }
    if (view === 'row') return this.rowDecides(s, vocab);
    if (!this.params.doSample || this.params.topK > 0 || view.complete) return true;
    const fraction = this.params.topP < 1 ? this.params.topP : this.peekDraw();
    return this.rankEnd(view.x, view.x[view.order[0]!]!, view.order, false, s.logNorm, fraction) >= 0;
  }

  /**
   * Whether the row rebuilt from the shortlist (−∞ past it) samples as the whole row does: with top_k, or when the
   * shortlist holds every finite logit (a vocabulary within it, or −∞ past its end); not for top_p alone otherwise,
   * which weighs the whole row.
   */
  private rowDecides(s: Shortlist, vocab: number): boolean {
    const last = s.ids.length - 1;
    return !this.params.doSample || this.params.topK > 0 || vocab <= SHORTLIST_SIZE || (last >= 0 && (s.ids[last]! < 0 || !(s.logits[last]! > -Infinity)));
  }

  /**
   * The shortlist's finite entries as a small row: ids ascending (`ids`), their tempered logits (`x`, the host's
   * float64 values), and their indices best first (`order`: the shortlist's order, which is the host's ranking as
   * long as tempering keeps distinct logits distinct); `complete` when every finite logit of the row is in it.
   * 'row': decide on a row of `vocab` rebuilt from it (a vocabulary within the shortlist, or tempered logits that
   * tie or overflow). Throws as sample() does on a row with a +∞ logit or none finite.
   */
  private shortlistView(s: Shortlist, vocab: number): ShortlistView | 'row' {
    // shortlistDecides and sampleShortlist ask for the same shortlist's view, one after the other
    if (this.viewOf?.s === s && this.viewOf.vocab === vocab) return this.viewOf.view;
    const view = this.makeShortlistView(s, vocab);
    this.viewOf = { s, vocab, view };
    return view;
  }

  private makeShortlistView(s: Shortlist, vocab: number): ShortlistView | 'row' {
    if (Number.isNaN(s.logNorm)) throw fail('GENERATION', 'the logits contain +inf');
    const n0 = s.ids.length;
    if (vocab <= SHORTLIST_SIZE || n0 > 128) return 'row';
    let n = 0;
    while (n < n0 && s.ids[n]! >= 0 && s.logits[n]! > -Infinity) n++;
    if (n === 0) throw fail('GENERATION', 'every logit is -inf or NaN');
    const inv = 1 / this.params.temperature;
    const temper = this.params.temperature !== 1;
    if (this.view.keys.length < n) this.view = { keys: new Float64Array(n), ids: new Int32Array(n), x: new Float64Array(n), at: new Int32Array(n) };
    // Sort (id, position) pairs packed in one number: ids are below 2^31 and positions below 2^7 (SHORTLIST_SIZE).
    const keys = this.view.keys.subarray(0, n);
    for (let j = 0; j < n; j++) keys[j] = s.ids[j]! * 128 + j;
    keys.sort();
    const ids = this.view.ids.subarray(0, n);
    const x = this.view.x.subarray(0, n);
    const at = this.view.at.subarray(0, n); // shortlist position → index in ids
    for (let k = 0; k < n; k++) {
      const j = keys[k]! % 128;
      ids[k] = (keys[k]! - j) / 128;
      x[k] = temper ? s.logits[j]! * inv : s.logits[j]!;
      at[j] = k;
    }
    for (let j = 1; j < n; j++) {
      // tempering made two distinct logits equal (or overflowed): the host would rank them by id instead
      if (s.logits[j]! < s.logits[j - 1]! && !(x[at[j]!]! < x[at[j - 1]!]!)) return 'row';
    }
    if (x[at[0]!] === Infinity) return 'row';
    return { x, ids, order: at, complete: n < n0 };
  }

  /** sample() on the row rebuilt from the shortlist (−∞ elsewhere): O(vocab). */
  private sampleShortlistRow(s: Shortlist, vocab: number): SampledToken {
    if (this.shortRow.length !== vocab) this.shortRow = new Float32Array(vocab);
    const row = this.shortRow.fill(-Infinity);
    s.ids.forEach((id, j) => {
      if (id >= 0) row[id] = s.logits[j]!;
    });
    const { id } = this.sample(row, [], 0, undefined, true);
    return { id, logprob: this.shortlistLogprob(s, row[id]!) };
  }

  /**
   * Steps 0–2 of sample() (logit_bias, the repetition penalty, the frequency and presence penalties) for the history
   * `prompt` + `generated` as edits of a row of `vocab` logits (executor.ts LogitEdits), or undefined when there are
   * none. Ids outside the vocabulary are left out, as sample() leaves them. Incremental: a call whose history extends
   * the previous call's (same prompt length, penaltyFrom and vocab, more tokens) only counts the new tokens.
   */
  edits(prompt: readonly number[], generated: readonly number[], penaltyFrom: number, vocab: number): LogitEdits | undefined {
    const p = this.params;
    const rep = p.repetitionPenalty !== 1;
    const freq = p.frequencyPenalty !== 0 || p.presencePenalty !== 0;
    if (!rep && !freq && p.logitBias.length === 0) return undefined;
    const n = prompt.length + generated.length;
    let st = this.editState;
    if (!st || st.prompt !== prompt.length || st.penaltyFrom !== penaltyFrom || st.vocab !== vocab || st.consumed > n) {
      st = this.editState = { prompt: prompt.length, penaltyFrom, vocab, consumed: 0, index: new Map(), size: 0, ids: new Int32Array(16), bias: new Float32Array(16), repetition: new Float32Array(16), minus: new Float32Array(16), counts: new Int32Array(16) };
      for (const [id, bias] of p.logitBias) if (id >= 0 && id < vocab) st.bias[this.editEntry(st, id)]! += bias;
    }
    for (let j = st.consumed; j < n; j++) {
      const id = j < prompt.length ? prompt[j]! : generated[j - prompt.length]!;
      if (id < 0 || id >= vocab) continue;
      const k = this.editEntry(st, id);
      if (rep) st.repetition[k] = p.repetitionPenalty;
      if (freq && j >= penaltyFrom) st.minus[k] = p.frequencyPenalty * ++st.counts[k]! + p.presencePenalty;
    }
    st.consumed = n;
    return { ids: st.ids.slice(0, st.size), bias: st.bias.slice(0, st.size), repetition: st.repetition.slice(0, st.size), minus: st.minus.slice(0, st.size) };
  }

  /** The index of `id`'s entry in the edit state, added (no bias, repetition 1, nothing subtracted) if new. */
  private editEntry(st: EditState, id: number): number {
    const k = st.index.get(id);
    if (k !== undefined) return k;
    if (st.size === st.ids.length) {
      const grow = <T extends Int32Array | Float32Array>(a: T): T => {
        const b = new (a.constructor as new (n: number) => T)(2 * a.length);
        b.set(a);
        return b;
      };
      st.ids = grow(st.ids); st.bias = grow(st.bias); st.repetition = grow(st.repetition); st.minus = grow(st.minus); st.counts = grow(st.counts);
    }
    const at = st.size++;
    st.index.set(id, at);
    st.ids[at] = id;
    st.bias[at] = 0;
    st.repetition[at] = 1;
    st.minus[at] = 0;
    st.counts[at] = 0;
    return at;
  }

  /**
   * The first position in `order` (best first) whose cumulative mass reaches `fraction` × the row's mass, as sample()
   * finds it over the whole row (top_p's last kept token; plain sampling's token, `fraction` its random number); −1
   * when the shortlist cannot tell. The row's mass is the shortlist's own when it holds every finite logit (`complete`;
   * summed in id order, as sample() does), else exp(logNorm), known to SHORTLIST_SUM_TOLERANCE: a crossing closer
   * than that to the target, or none, cannot be told.
   */
  private rankEnd(x: Float64Array, max: number, order: Int32Array, complete: boolean, logNorm: number, fraction: number): number {
    let sum = 0;
    if (complete) for (let k = 0; k < x.length; k++) sum += Math.exp(x[k]! - max);
    else sum = Math.exp(logNorm);
    const tol = complete ? 1e-12 : SHORTLIST_SUM_TOLERANCE;
    const target = fraction * sum;
    let cum = 0;
    for (let j = 0; j < order.length; j++) {
      cum += Math.exp(x[order[j]!]! - max);
      // The mass before j is below the lowest the target can be: j is the crossing if cum is above the highest.
      if (cum >= target * (1 - tol)) return cum >= target * (1 + tol) ? j : -1;
    }
    return -1;
  }

  private applyPenalties(x: Float64Array, history: readonly number[], penaltyFrom: number): void {
    const p = this.params;
    const rep = p.repetitionPenalty !== 1;
    const freq = p.frequencyPenalty !== 0 || p.presencePenalty !== 0;
    if (!rep && !freq) return;
    const V = x.length;
    const counts = this.counts;
    if (this.touched.length < history.length) this.touched = new Int32Array(history.length);
    const touched = this.touched;
    // Count ids per range: the repetition penalty needs distinct ids of the whole history, the
    // frequency/presence penalties need counts of history[penaltyFrom:]. Counts are reset after use.
    let nTouched = 0;
    if (rep) {
      for (const id of history) {
        if (id >= 0 && id < V && counts[id] === 0) { counts[id] = 1; touched[nTouched++] = id; }
      }
      for (let j = 0; j < nTouched; j++) {
        const id = touched[j]!;
        const v = x[id]!;
        x[id] = v > 0 ? v / p.repetitionPenalty : v * p.repetitionPenalty;
        counts[id] = 0;
      }
      nTouched = 0;
    }
    if (freq) {
      for (let j = Math.max(0, penaltyFrom); j < history.length; j++) {
        const id = history[j]!;
        if (id < 0 || id >= V) continue;
        if (counts[id] === 0) touched[nTouched++] = id;
        counts[id]!++;
      }
      for (let j = 0; j < nTouched; j++) {
        const id = touched[j]!;
        x[id]! -= p.frequencyPenalty * counts[id]! + p.presencePenalty;
        counts[id] = 0;
      }
    }
  }

  /**
   * Apply top_k → top_p → typical_p and draw from the survivors. `max`/`sum` describe all of x; `w` holds
   * exp(x − max) (overwritten by typical_p).
   */
  private draw(x: Float64Array, max: number, sum: number, w: Float64Array): number {
    const p = this.params;
    const V = x.length;
    const topK = p.topK > 0 && p.topK < V;
    if (!topK && p.topP >= 1 && p.typicalP >= 1) {
      // Plain softmax sampling over the whole vocabulary, the draw walking the ranking (as a shortlist can decide it:
      // sampleShortlist), without sorting it.
      const crossing = this.rankCrossing(x, max, w, this.nextDraw() * sum);
      if (crossing) return crossing.c;
      let last = 0; // rounding: the last id of the ranking with weight
      for (let i = 0; i < V; i++) if (w[i]! > 0 && (x[i]! < x[last]! || w[last] === 0 || (x[i] === x[last] && i > last))) last = i;
      return last;
    }

    let survivors: Int32Array;
    if (topK) {
      survivors = this.topKSurvivors(x, max, selectTop(x, p.topK, V));
    } else if (p.topP < 1) {
      survivors = this.nucleus(x, max, w, p.topP * sum);
    } else {
      survivors = this.typical(x, null); // typical_p alone
    }
    return this.drawAmong(x, max, survivors, topK || p.topP < 1);
  }

  /**
   * top_p over the whole vocabulary, without sorting it: every id ranked at or above the first (ranking: x desc, id
   * asc) whose inclusive cumulative weight `w` reaches `target`, or every id when none does (rounding), ascending.
   * Ids are binned by how far below `max` they are (ids more than KEY_SPAN below, or −∞, share an overflow bin), the
   * bins' weights summed in one pass, and only the bin where the mass crosses is sorted.
   */
  private nucleus(x: Float64Array, max: number, w: Float64Array, target: number): Int32Array {
    const V = x.length;
    const ids = this.idBuf(V);
    const crossing = this.rankCrossing(x, max, w, target);
    if (!crossing) return ids.map((_, i) => i); // the mass never reaches the target (target ≈ all of it): every id
    const { c, b } = crossing;
    const binOf = this.bins;
    const xc = x[c]!;
    let n = 0;
    for (let i = 0; i < V; i++) if (binOf[i]! < b || (binOf[i] === b && (x[i]! > xc || (x[i] === xc && i <= c)))) ids[n++] = i;
    return ids.slice(0, n);
  }

  /**
   * The first id in the ranking (x descending, then id ascending) whose inclusive cumulative weight `w` reaches
   * `target`, and its bin (this.bins holds every id's: how far below `max` it is, KEY_SPAN/BINS wide, ids more than
   * KEY_SPAN below or −∞ in an overflow bin); null when none does (rounding, target ≈ all of the weight). One pass over
   * the ids, and a sort of the bin where the mass crosses.
   */
  private rankCrossing(x: Float64Array, max: number, w: Float64Array, target: number): { c: number; b: number } | null {
    const V = x.length;
    const scale = BINS / KEY_SPAN;
    const binOf = this.binIds(V);
    const mass = this.binBuf.fill(0);
    for (let i = 0; i < V; i++) {
      const d = (max - x[i]!) * scale; // ∞ for −∞
      const b = d < BINS ? Math.floor(d) : BINS;
      binOf[i] = b;
      mass[b]! += w[i]!;
    }
    let cum = 0;
    let b = 0;
    for (; b <= BINS; b++) {
      if (cum + mass[b]! >= target) break;
      cum += mass[b]!;
    }
    if (b > BINS) return null;
    const members: number[] = [];
    for (let i = 0; i < V; i++) if (binOf[i] === b) members.push(i);
    members.sort((a, c) => x[c]! - x[a]! || a - c);
    let c = members[members.length - 1]!; // rounding between the bin's sum and its members'
    for (const i of members) {
      cum += w[i]!;
      if (cum >= target) {
        c = i;
        break;
      }
    }
    return { c, b };
  }

  /** top_k's candidates `cand` (best first) after top_p, ascending. */
  private topKSurvivors(x: Float64Array, max: number, cand: Int32Array): Int32Array {
    const p = this.params;
    if (p.topP < 1) {
      let total = 0;
      for (let j = 0; j < cand.length; j++) total += Math.exp(x[cand[j]!]! - max);
      // A token survives when the mass strictly before it is < top_p (HF: remove where
      // cumsum_ascending <= 1 - top_p), i.e. keep up to the token that crosses top_p.
      let cum = 0;
      let keep = 0;
      while (keep < cand.length && cum < p.topP * total) cum += Math.exp(x[cand[keep++]!]! - max);
      cand = cand.subarray(0, Math.max(1, keep));
    }
    return cand.slice().sort();
  }

  /** typical_p over `survivors` (ascending) when `truncated` (after top_k or top_p), then the draw among them in id order. */
  private drawAmong(x: Float64Array, max: number, survivors: Int32Array, truncated: boolean): number {
    if (this.params.typicalP < 1 && truncated && survivors.length > 1) survivors = this.typical(x, survivors);
    // Draw among the survivors in id order (max is the global max, so nothing overflows).
    let mass = 0;
    for (let j = 0; j < survivors.length; j++) mass += Math.exp(x[survivors[j]!]! - max);
    let u = this.nextDraw() * mass;
    for (let j = 0; j < survivors.length; j++) {
      u -= Math.exp(x[survivors[j]!]! - max);
      if (u < 0) return survivors[j]!;
    }
    return survivors[survivors.length - 1]!;
  }

  /**
   * HF TypicalLogitsWarper over `ids` (ascending; all of x when null), renormalised over them:
   * rank by |−log p − H| ascending, find the token where the cumulative mass reaches
   * typical_p, keep every token whose score is <= its score (ties kept). Returns the kept ids, ascending.
   */
  private typical(x: Float64Array, ids: Int32Array | null): Int32Array {
    const V = x.length;
    const n = ids ? ids.length : V;
    const at = (j: number): number => (ids ? ids[j]! : j);
    let m = -Infinity;
    for (let j = 0; j < n; j++) m = Math.max(m, x[at(j)]!);
    let total = 0;
    for (let j = 0; j < n; j++) total += Math.exp(x[at(j)]! - m);
    const logZ = m + Math.log(total);
    const key = this.keyBuf(V);
    const w = this.weightBuf(V);
    let entropy = 0;
    for (let j = 0; j < n; j++) {
      const i = at(j);
      const lp = x[i]! - logZ;
      w[i] = Math.exp(lp);
      key[i] = -lp; // −log p for now
      if (w[i]! > 0) entropy -= lp * w[i]!;
    }
    for (let j = 0; j < n; j++) key[at(j)] = Math.abs(key[at(j)]! - entropy);
    const kc = key[this.crossing(ids, n, key, w, this.params.typicalP)]!;
    const out = this.idBuf(V);
    let kept = 0;
    for (let j = 0; j < n; j++) {
      const i = at(j);
      if (key[i]! <= kc) out[kept++] = i;
    }
    return out.slice(0, kept);
  }

  /**
   * The crossing element of `ids` (all of 0..n-1 when null) ordered by (key asc, id asc): the
   * first whose inclusive cumulative weight reaches `target`, or the last element if none does.
   * Keys are bucketed into bins (keys more than KEY_SPAN above the smallest, or non-finite, share
   * an overflow bin), bin masses are summed, and only the bin where the mass crosses is sorted:
   * O(n) plus a small sort instead of sorting the vocabulary.
   */
  private crossing(ids: Int32Array | null, n: number, key: Float64Array, w: Float64Array, target: number): number {
    const at = (j: number): number => (ids ? ids[j]! : j);
    let kmin = Infinity;
    let kmax = -Infinity;
    for (let j = 0; j < n; j++) {
      const k = key[at(j)]!;
      if (k < kmin) kmin = k;
      if (k > kmax && k !== Infinity) kmax = k;
    }
    const hi = Math.min(kmax, kmin + KEY_SPAN);
    const scale = hi > kmin ? BINS / (hi - kmin) : 0;
    const bin = (k: number): number => (k <= hi ? Math.min(BINS - 1, Math.floor((k - kmin) * scale)) : BINS);
    const mass = this.binBuf.fill(0);
    for (let j = 0; j < n; j++) {
      const i = at(j);
      mass[bin(key[i]!)]! += w[i]!;
    }
    let cum = 0;
    let b = 0;
    for (; b <= BINS; b++) {
      if (cum + mass[b]! >= target) break;
      cum += mass[b]!;
    }
    if (b > BINS) {
      // The mass never reaches target (target ≈ total, rounding): the last element in the order.
      let last = at(0);
      for (let j = 1; j < n; j++) {
        const i = at(j);
        if (key[i]! > key[last]! || (key[i] === key[last] && i > last)) last = i;
      }
      return last;
    }
    const members: number[] = [];
    for (let j = 0; j < n; j++) {
      const i = at(j);
      if (bin(key[i]!) === b) members.push(i);
    }
    members.sort((a, c) => key[a]! - key[c]! || a - c);
    for (const i of members) {
      cum += w[i]!;
      if (cum >= target) return i;
    }
    return members[members.length - 1]!; // rounding between the bin sum and the element sum
  }

  private keyBuf(V: number): Float64Array {
    if (this.keys.length !== V) this.keys = new Float64Array(V);
    return this.keys;
  }

  private weightBuf(V: number): Float64Array {
    if (this.weights.length !== V) this.weights = new Float64Array(V);
    return this.weights;
  }

  private binIds(V: number): Uint16Array {
    if (this.bins.length !== V) this.bins = new Uint16Array(V);
    return this.bins;
  }

  private idBuf(V: number): Int32Array {
    if (this.ids.length !== V) this.ids = new Int32Array(V);
    return this.ids;
  }
}
