import * as tf from '@tensorflow/tfjs-core';
import { ROW_WORKGROUP, WORKGROUP_REDUCE, runProgram, type WebGPUProgram } from './program.ts';

/** Ids travel as float32 in the kernels' outputs: exact up to 2^24. */
const MAX_SHORTLIST_VOCAB = 2 ** 24;

/** Ids of a row one workgroup of the first stage ranks. */
export const SHORTLIST_CHUNK = 2048;

/**
 * WGSL shared by both stages: value keys that order a float's bits as the floats (NaN as −∞, −0 as 0, ±∞ without float
 * tests), and `selectBest`, S rounds of a workgroup argmax over a candidate list, each round taking the best
 * (key descending, id ascending) of the candidates ranked after the previous round's. The caller defines
 * `candidateCount()`, `candidateId(n)` (−1: none) and `candidateKey(n)`, and gets the winners in `winIds`/`winKeys`.
 */
function selection(S: number): string {
  const W = ROW_WORKGROUP;
  return `
    var<workgroup> keys : array<u32, ${W}>;
    var<workgroup> ids : array<i32, ${W}>;
    var<workgroup> winIds : array<i32, ${S}>;
    var<workgroup> winKeys : array<u32, ${S}>;

    // A float from its bits at run time (a constant expression may not be ±∞ or NaN).
    fn fromBits(b : u32) -> f32 { var bits = b; return bitcast<f32>(bits); }
    // The value's order as an unsigned integer: a < b as floats iff orderKey(a) < orderKey(b), equal floats equal keys.
    fn orderKey(raw : u32) -> u32 {
      var bits = raw;
      if ((bits & 0x7f800000u) == 0x7f800000u && (bits & 0x007fffffu) != 0u) { bits = 0xff800000u; } // NaN → −∞
      if (bits == 0x80000000u) { bits = 0u; } // −0 → 0
      if ((bits & 0x80000000u) != 0u) { return ~bits; }
      return bits | 0x80000000u;
    }
    // The float of a key (the inverse of orderKey).
    fn keyValue(key : u32) -> f32 {
      if ((key & 0x80000000u) != 0u) { return fromBits(key & 0x7fffffffu); }
      return fromBits(~key);
    }

    fn selectBest() {
      let tid = i32(localId.x);
      var prevKey = 0u;
      var prevId = -1;
      var first = true; // round 0: every candidate; then those ranked after the previous round's winner
      for (var j = 0; j < ${S}; j = j + 1) {
        var bestKey = 0u;
        var bestId = -1;
        for (var n = tid; n < candidateCount(); n = n + ${W}) {
          let id = candidateId(n);
          let k = candidateKey(n);
          let after = first || k < prevKey || (k == prevKey && id > prevId);
          if (id >= 0 && after && (bestId < 0 || k > bestKey || (k == bestKey && id < bestId))) { bestKey = k; bestId = id; }
        }
        keys[tid] = bestKey;
        ids[tid] = bestId;
        workgroupBarrier();
        for (var size = ${W / 2}; size > 0; size = size / 2) {
          if (tid < size) {
            let o = tid + size;
            let oid = ids[o];
            let mine = ids[tid];
            if (oid >= 0 && (mine < 0 || keys[o] > keys[tid] || (keys[o] == keys[tid] && oid < mine))) {
              keys[tid] = keys[o];
              ids[tid] = oid;
            }
          }
          workgroupBarrier();
        }
        let foundKey = keys[0];
        let found = ids[0];
        workgroupBarrier(); // every thread has read the round's winner before the next round writes
        if (tid == 0) {
          winIds[j] = found; // −1 when no candidate is left
          winKeys[j] = foundKey;
        }
        if (found >= 0) {
          prevKey = foundKey;
          prevId = found;
        }
        first = false;
      }
      workgroupBarrier();
    }
  `;
}

/**
 * Stage 1 of a row's shortlist: one workgroup per SHORTLIST_CHUNK ids of a row ranks them, writing its S best
 * (value descending, id ascending; NaN as −∞, −0 as 0), its largest value m and s = Σ exp((x − m)·inv) over its finite
 * values (the term of m counted as exactly 1: no ∞·0 when inv = ∞), 0 with no finite value, NaN when m = +∞.
 * Out [rows, chunks, 2S + 2]: S ids (float32; −1 for none), S values (−∞ for none), m, s.
 */
export class ShortlistChunksProgram implements WebGPUProgram {
  readonly variableNames = ['x', 'invTemp'];
  readonly outputShape: number[];
  readonly shaderKey: string;
  readonly dispatchLayout = { x: [0, 1, 2] };
  readonly dispatch: [number, number, number];
  readonly workgroupSize: [number, number, number] = [ROW_WORKGROUP, 1, 1];

  constructor(rows: number, vocab: number, private readonly candidates: number) {
    const chunks = Math.ceil(vocab / SHORTLIST_CHUNK);
    this.outputShape = [rows, chunks, 2 * candidates + 2];
    this.dispatch = [rows * chunks, 1, 1];
    this.shaderKey = `loraServeShortlistChunks_${candidates}`;
  }

  getUserCode(): string {
    const S = this.candidates;
    const W = ROW_WORKGROUP;
    return `
      ${WORKGROUP_REDUCE}
      ${selection(S)}
      var<private> chunkBase : i32; // x[row, chunk·CHUNK]
      var<private> chunkLength : i32;
      var<private> chunkFirst : i32; // the chunk's first id
      fn candidateCount() -> i32 { return chunkLength; }
      fn candidateId(n : i32) -> i32 { return chunkFirst + n; }
      fn candidateKey(n : i32) -> u32 { return orderKey(bitcast<u32>(x[chunkBase + n])); }

      fn main(index : i32) {
        let tid = i32(localId.x);
        let vocab = uniforms.xShape[1];
        let chunks = uniforms.outShape[1];
        let wg = index / ${W};
        let row = wg / chunks;
        let chunk = wg % chunks;
        chunkFirst = chunk * ${SHORTLIST_CHUNK};
        chunkBase = row * vocab + chunkFirst;
        chunkLength = min(${SHORTLIST_CHUNK}, vocab - chunkFirst);
        selectBest();
        let out = wg * ${2 * S + 2}; // out[row, chunk, 0]
        for (var j = tid; j < ${S}; j = j + ${W}) {
          result[out + j] = f32(winIds[j]);
          result[out + ${S} + j] = select(keyValue(winKeys[j]), fromBits(0xff800000u), winIds[j] < 0);
        }
        let m = select(keyValue(winKeys[0]), fromBits(0xff800000u), winIds[0] < 0);
        let mBits = bitcast<u32>(m);
        let mFinite = (mBits & 0x7f800000u) != 0x7f800000u;
        let inv = invTemp[row];
        var sum = 0.0;
        for (var n = tid; n < chunkLength; n = n + ${W}) {
          let bits = bitcast<u32>(x[chunkBase + n]);
          if (mFinite && (bits & 0x7f800000u) != 0x7f800000u) {
            let v = bitcast<f32>(bits);
            sum = sum + select(exp((v - m) * inv), 1.0, v == m);
          }
        }
        let total = reduceSum(sum);
        if (tid == 0) {
          result[out + ${2 * S}] = m;
          result[out + ${2 * S + 1}] = select(total, fromBits(0x7fc00000u), mBits == 0x7f800000u); // NaN when m = +∞
        }
      }
    `;
  }
}

/**
 * Stage 2: one workgroup per row merges its chunks' candidates into the row's S best (the same order, ids global) and
 * the shifted normaliser L = log Σ_c s_c·exp((m_c − M)·inv), M the row's largest value (m_c = M counted as exactly 1),
 * i.e. log Σ_v exp((x_v − M)·inv) over the row; −∞ with no finite value, NaN when a value is +∞.
 * Out [rows, 2S + 1]: S ids, S values, L.
 */
export class ShortlistMergeProgram implements WebGPUProgram {
  readonly variableNames = ['partial', 'invTemp'];
  readonly outputShape: number[];
  readonly shaderKey: string;
  readonly dispatchLayout = { x: [0, 1] };
  readonly dispatch: [number, number, number];
  readonly workgroupSize: [number, number, number] = [ROW_WORKGROUP, 1, 1];

  constructor(rows: number, private readonly candidates: number) {
    this.outputShape = [rows, 2 * candidates + 1];
    this.dispatch = [rows, 1, 1];
    this.shaderKey = `loraServeShortlistMerge_${candidates}`;
  }

  getUserCode(): string {
    const S = this.candidates;
    const P = 2 * S + 2;
    const W = ROW_WORKGROUP;
    return `
      ${WORKGROUP_REDUCE}
      ${selection(S)}
      var<private> rowBase : i32; // partial[row, 0, 0]
      var<private> chunks : i32;
      fn candidateCount() -> i32 { return chunks * ${S}; }
      fn candidateId(n : i32) -> i32 { return i32(partial[rowBase + (n / ${S}) * ${P} + n % ${S}]); }
      fn candidateKey(n : i32) -> u32 { return orderKey(bitcast<u32>(partial[rowBase + (n / ${S}) * ${P} + ${S} + n % ${S}])); }

      fn main(index : i32) {
        let tid = i32(localId.x);
        let row = index / ${W};
        chunks = uniforms.partialShape[1];
        rowBase = row * chunks * ${P};
        selectBest();
        let out = row * ${2 * S + 1}; // out[row, 0]
        for (var j = tid; j < ${S}; j = j + ${W}) {
          result[out + j] = f32(winIds[j]);
          result[out + ${S} + j] = select(keyValue(winKeys[j]), fromBits(0xff800000u), winIds[j] < 0);
        }
        let M = select(keyValue(winKeys[0]), fromBits(0xff800000u), winIds[0] < 0);
        let inv = invTemp[row];
        var sum = 0.0;
        var hasInf = 0.0;
        for (var c = tid; c < chunks; c = c + ${W}) {
          let m = partial[rowBase + c * ${P} + ${2 * S}];
          let s = partial[rowBase + c * ${P} + ${2 * S + 1}];
          let sBits = bitcast<u32>(s);
          if ((sBits & 0x7f800000u) == 0x7f800000u) { hasInf = 1.0; } // a chunk with +∞
          else if (s > 0.0) { sum = sum + s * select(exp((m - M) * inv), 1.0, m == M); }
        }
        let total = reduceSum(sum);
        let anyInf = reduceMax(hasInf);
        if (tid == 0) {
          var L = log(total); // −∞ when no value is finite
          if (anyInf > 0.0) { L = fromBits(0x7fc00000u); }
          result[out + ${2 * S}] = L;
        }
      }
    `;
  }
}

/**
 * Per row of logits [rows, vocab]: its `candidates` best ids and logits and its normaliser shifted by its largest logit
 * M, L = log Σ_v exp((x_v − M)·invTemp[row]), as [rows, 2·candidates + 1] (ids as float32, −1 past the vocabulary;
 * values; L), in two dispatches (ShortlistChunksProgram, ShortlistMergeProgram) on the webgpu backend. As a plain loop:
 * order = ids by (x descending, id ascending), NaN as −∞ and −0 as 0; L is −∞ when no logit is finite and NaN when one
 * is +∞.
 */
export function shortlistGpu(logits: tf.Tensor2D, invTemp: tf.Tensor1D, candidates: number): tf.Tensor2D {
  const [rows, vocab] = logits.shape;
  if (vocab >= MAX_SHORTLIST_VOCAB) throw new Error(`shortlist: a vocabulary of ${vocab} ids does not fit float32 ids`);
  if (invTemp.shape[0] !== rows || invTemp.dtype !== 'float32') throw new Error(`shortlist: invTemp [${invTemp.shape}] is not float32 [${rows}]`);
  return tf.tidy(() => {
    const partial = runProgram<tf.Tensor3D>(new ShortlistChunksProgram(rows, vocab, candidates), [logits, invTemp]);
    return runProgram<tf.Tensor2D>(new ShortlistMergeProgram(rows, candidates), [partial, invTemp]);
  });
}
