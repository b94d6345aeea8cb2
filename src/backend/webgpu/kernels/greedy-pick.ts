import * as tf from '@tensorflow/tfjs-core';
import { ROW_WORKGROUP, WORKGROUP_REDUCE, runProgram, type WebGPUProgram } from './program.ts';

/** Ids travel as float32 in the kernel's output: exact up to 2^24. */
const MAX_PICK_VOCAB = 2 ** 24;

/** The output's id when the row has no finite logit (every one −∞ or NaN); as src/engine/executor.ts PickedToken. */
export const PICK_NO_FINITE = -1;
/** The output's id when the row has a +∞ logit. */
export const PICK_INFINITE = -2;

/**
 * Greedy next-token choice in one dispatch, one workgroup per row, as the host Sampler's greedy path
 * (src/engine/sampling.ts) with NaN read as −∞. As a plain loop over each row of logits [rows, vocab]:
 *
 *   best = −1; for (v = 0; v < vocab; v++) if (finite(x[v]) && (best < 0 || x[v] > x[best])) best = v; // ties: lowest id
 *   logZ = x[best] + log(Σ_{finite x[v]} exp(x[v] − x[best]))
 *   out[row] = [best, x[best] − logZ]     // [PICK_INFINITE, ·] if some x[v] = +∞; [PICK_NO_FINITE, ·] if best < 0
 *
 * Each thread scans a strided share of the row, the workgroup reduces (value, id) pairs to the lowest id among
 * the largest values, then sums exp(x − max) in float32 (the host sums in float64: the logprobs agree to float32
 * rounding). Output [rows, 2] float32: the id (exact, vocab < 2^24) and its logprob.
 */
export class GreedyPickProgram implements WebGPUProgram {
  readonly variableNames = ['x'];
  readonly outputShape: number[];
  readonly shaderKey = 'loraServeGreedyPick';
  readonly dispatchLayout = { x: [0, 1] };
  readonly dispatch: [number, number, number];
  readonly workgroupSize: [number, number, number] = [ROW_WORKGROUP, 1, 1];

  constructor(rows: number) {
    this.outputShape = [rows, 2];
    this.dispatch = [rows, 1, 1];
  }

  getUserCode(): string {
    return `
      ${WORKGROUP_REDUCE}
      var<workgroup> bestValue : array<f32, ${ROW_WORKGROUP}>;
      var<workgroup> bestId : array<i32, ${ROW_WORKGROUP}>;
      var<workgroup> infinite : array<i32, ${ROW_WORKGROUP}>;

      // Whether bits are ±∞ or NaN (tested on the bits: shader compilers may assume values are finite).
      fn nonFinite(bits : u32) -> bool { return (bits & 0x7f800000u) == 0x7f800000u; }

      fn main(index : i32) {
        let row = index / ${ROW_WORKGROUP};
        let tid = i32(localId.x);
        let vocab = uniforms.xShape[1];
        let base = row * vocab; // x[row, 0]

        // This thread's best (lowest id among its largest finite values) and whether it saw +∞.
        var value = 0.0;
        var id = -1;
        var inf = 0;
        for (var v = tid; v < vocab; v = v + ${ROW_WORKGROUP}) {
          let bits = bitcast<u32>(x[base + v]); // x[row, v]
          if (nonFinite(bits)) {
            if (bits == 0x7f800000u) { inf = 1; }
            continue;
          }
          let xv = bitcast<f32>(bits);
          if (id < 0 || xv > value) { value = xv; id = v; }
        }
        bestValue[tid] = value;
        bestId[tid] = id;
        infinite[tid] = inf;
        workgroupBarrier();
        for (var size = ${ROW_WORKGROUP / 2}; size > 0; size = size / 2) {
          if (tid < size) {
            let o = tid + size;
            let oid = bestId[o];
            let mine = bestId[tid];
            if (oid >= 0 && (mine < 0 || bestValue[o] > bestValue[tid] || (bestValue[o] == bestValue[tid] && oid < mine))) {
              bestValue[tid] = bestValue[o];
              bestId[tid] = oid;
            }
            infinite[tid] = max(infinite[tid], infinite[o]);
          }
          workgroupBarrier();
        }
        let top = bestValue[0];
        let best = bestId[0];
        let anyInf = infinite[0];

        var sum = 0.0;
        for (var v = tid; v < vocab; v = v + ${ROW_WORKGROUP}) {
          let bits = bitcast<u32>(x[base + v]); // x[row, v]
          if (!nonFinite(bits)) { sum = sum + exp(bitcast<f32>(bits) - top); }
        }
        let total = reduceSum(sum);
        if (tid == 0) {
          var outId = best;
          if (anyInf != 0) { outId = ${PICK_INFINITE}; }
          result[row * 2] = f32(outId); // out[row, 0]
          result[row * 2 + 1] = -log(total); // out[row, 1] = (x[best] − top) − log Σ exp(x − top)
        }
      }
    `;
  }
}

/** Per row of logits [rows, vocab]: [id, logprob] of its greedy choice (GreedyPickProgram), [rows, 2], on the webgpu backend. */
export function greedyPickGpu(logits: tf.Tensor2D): tf.Tensor2D {
  const [rows, vocab] = logits.shape;
  if (vocab >= MAX_PICK_VOCAB) throw new Error(`greedyPick: a vocabulary of ${vocab} ids does not fit float32 ids`);
  return runProgram(new GreedyPickProgram(rows), [logits]);
}
