import * as tf from '@tensorflow/tfjs-core';
import { ROW_WORKGROUP, WORKGROUP_REDUCE, runProgram, type WebGPUProgram } from './program.ts';

/** Ids travel as float32 in the kernel's output: exact up to 2^24. */
const MAX_SHORTLIST_VOCAB = 2 ** 24;

/**
 * A row's shortlist for top-k sampling in one dispatch, one workgroup per row: its S (`candidates`) largest logits, best
 * first, ordered as the host Sampler's selectTop orders them (value descending, then id ascending; NaN read as −∞,
 * −0 as 0), and
 * the log-normaliser of the row at the row's temperature. As a plain loop over each row x of logits [rows, vocab], with
 * x[v] NaN replaced by −∞ and T = 1 / invTemp[row]:
 *
 *   order = ids sorted by (x[v] descending, v ascending)
 *   out[row, j] = order[j] (or −1 when vocab ≤ j), out[row, S + j] = x[order[j]] (−∞ for none), for j < S
 *   out[row, 2S] = log Σ_v exp(x[v] / T)    (over every id; −∞ terms add nothing; NaN when some x[v] = +∞)
 *
 * Each of S rounds finds, among the ids ranked after the previous round's, the best one: each thread scans a strided
 * share of the row for its best, the workgroup reduces the (key, id) pairs, keys being the values' bits mapped to
 * unsigned integers in the same order (so ±∞ compare without float tests). Output [rows, 2S + 1] float32.
 */
export class ShortlistProgram implements WebGPUProgram {
  readonly variableNames = ['x', 'invTemp'];
  readonly outputShape: number[];
  readonly shaderKey: string;
  readonly dispatchLayout = { x: [0, 1] };
  readonly dispatch: [number, number, number];
  readonly workgroupSize: [number, number, number] = [ROW_WORKGROUP, 1, 1];

  constructor(rows: number, private readonly candidates: number) {
    this.outputShape = [rows, 2 * candidates + 1];
    this.dispatch = [rows, 1, 1];
    this.shaderKey = `loraServeShortlist_${candidates}`;
  }

  getUserCode(): string {
    const W = ROW_WORKGROUP;
    const S = this.candidates;
    return `
      ${WORKGROUP_REDUCE}
      var<workgroup> keys : array<u32, ${W}>;
      var<workgroup> ids : array<i32, ${W}>;
      // A float from its bits at run time (a constant expression may not be ±∞ or NaN).
      fn fromBits(b : u32) -> f32 { var bits = b; return bitcast<f32>(bits); }

      // The value's order as an unsigned integer (NaN as −∞, −0 as 0): a < b as floats iff orderKey(a) < orderKey(b),
      // and equal floats have equal keys.
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

      fn main(index : i32) {
        let row = index / ${W};
        let tid = i32(localId.x);
        let vocab = uniforms.xShape[1];
        let base = row * vocab; // x[row, 0]
        let outBase = row * ${2 * S + 1}; // out[row, 0]
        var prevKey = 0u;
        var prevId = -1;
        var first = true; // round 0: every id is a candidate; then those ranked after the previous round's
        var topKey = 0u; // round 0's: the largest value
        for (var j = 0; j < ${S}; j = j + 1) {
          var bestKey = 0u;
          var bestId = -1;
          for (var v = tid; v < vocab; v = v + ${W}) {
            let k = orderKey(bitcast<u32>(x[base + v])); // x[row, v]
            let after = first || k < prevKey || (k == prevKey && v > prevId);
            if (after && (bestId < 0 || k > bestKey)) { bestKey = k; bestId = v; } // ids ascend: ties keep the first
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
            result[outBase + j] = f32(found); // out[row, j]: −1 when the row has no more ids
            result[outBase + ${S} + j] = select(keyValue(foundKey), fromBits(0xff800000u), found < 0); // out[row, S + j]
          }
          if (j == 0) { topKey = foundKey; }
          if (found >= 0) {
            prevKey = foundKey;
            prevId = found;
          }
          first = false;
        }

        // log Σ exp(x / T), shifted by the largest finite term.
        let inv = invTemp[row];
        let topBits = bitcast<u32>(keyValue(topKey));
        let topFinite = (topBits & 0x7f800000u) != 0x7f800000u;
        let infinite = topBits == 0x7f800000u;
        let top = select(0.0, bitcast<f32>(topBits) * inv, topFinite);
        var sum = 0.0;
        for (var v = tid; v < vocab; v = v + ${W}) {
          let bits = bitcast<u32>(x[base + v]); // x[row, v]
          if ((bits & 0x7f800000u) != 0x7f800000u) { sum = sum + exp(bitcast<f32>(bits) * inv - top); }
        }
        let total = reduceSum(sum);
        if (tid == 0) {
          var logZ = top + log(total);
          if (!topFinite) { logZ = fromBits(0xff800000u); }
          if (infinite) { logZ = fromBits(0x7fc00000u); } // NaN: the host fails such a row
          result[outBase + ${2 * S}] = logZ; // out[row, 2S]
        }
      }
    `;
  }
}

/**
 * Per row of logits [rows, vocab]: its shortlist of `size` (ShortlistProgram) at the row's inverse temperature
 * (invTemp, float32 [rows]), [rows, 2·size + 1], on the webgpu backend.
 */
export function shortlistGpu(logits: tf.Tensor2D, invTemp: tf.Tensor1D, size: number): tf.Tensor2D {
  const [rows, vocab] = logits.shape;
  if (vocab >= MAX_SHORTLIST_VOCAB) throw new Error(`shortlist: a vocabulary of ${vocab} ids does not fit float32 ids`);
  if (invTemp.shape[0] !== rows || invTemp.dtype !== 'float32') throw new Error(`shortlist: invTemp [${invTemp.shape}] is not float32 [${rows}]`);
  return runProgram(new ShortlistProgram(rows, size), [logits, invTemp]);
}
