import * as tf from '@tensorflow/tfjs-core';
import { ROW_WORKGROUP, runProgram, type WebGPUProgram } from './program.ts';

/**
 * The host Sampler's logit_bias and penalties (src/engine/sampling.ts, steps 0–2) as sparse edits of logits [rows,
 * vocab], in one dispatch, one workgroup per row. Entries offsets[r] .. offsets[r + 1] − 1 are row r's (distinct ids);
 * entry e's values are [bias, repetition, minus]. As a plain loop in float32:
 *
 *   out[r, :] = x[r, :]
 *   for e in offsets[r] ..< offsets[r + 1]:
 *     v = x[r, ids[e]] + bias_e
 *     if repetition_e != 1: v = v > 0 ? v / repetition_e : v · repetition_e
 *     out[r, ids[e]] = v − minus_e
 *
 * The workgroup copies its row, then (after a storage barrier) rewrites the edited ids.
 */
export class LogitEditsProgram implements WebGPUProgram {
  readonly variableNames = ['x', 'offsets', 'ids', 'values'];
  readonly outputShape: number[];
  readonly shaderKey = 'loraServeLogitEdits';
  readonly dispatchLayout = { x: [0, 1] };
  readonly dispatch: [number, number, number];
  readonly workgroupSize: [number, number, number] = [ROW_WORKGROUP, 1, 1];

  constructor(rows: number, vocab: number) {
    this.outputShape = [rows, vocab];
    this.dispatch = [rows, 1, 1];
  }

  getUserCode(): string {
    return `
      fn main(index : i32) {
        let row = index / ${ROW_WORKGROUP};
        let tid = i32(localId.x);
        let vocab = uniforms.xShape[1];
        let base = row * vocab; // x[row, 0]
        for (var v = tid; v < vocab; v = v + ${ROW_WORKGROUP}) { result[base + v] = x[base + v]; }
        storageBarrier();
        for (var e = offsets[row] + tid; e < offsets[row + 1]; e = e + ${ROW_WORKGROUP}) {
          let id = ids[e];
          var v = x[base + id] + values[3 * e];
          let rep = values[3 * e + 1];
          if (rep != 1.0) {
            if (v > 0.0) { v = v / rep; } else { v = v * rep; }
          }
          result[base + id] = v - values[3 * e + 2];
        }
      }
    `;
  }
}

/**
 * Logits [rows, vocab] with each row's edits applied (LogitEditsProgram): `offsets` int32 [rows + 1], `ids` int32 [≥ E]
 * and `values` float32 [≥ 3·E] for E = offsets[rows] entries (what follows is ignored), on the webgpu backend.
 */
export function logitEditsGpu(logits: tf.Tensor2D, offsets: tf.Tensor1D, ids: tf.Tensor1D, values: tf.Tensor1D): tf.Tensor2D {
  const [rows, vocab] = logits.shape;
  if (offsets.shape[0] !== rows + 1 || offsets.dtype !== 'int32') throw new Error(`logitEdits: offsets [${offsets.shape}] is not int32 [${rows + 1}]`);
  if (ids.dtype !== 'int32' || values.dtype !== 'float32' || values.shape[0] < 3 * ids.shape[0]) {
    throw new Error(`logitEdits: ids [${ids.shape}] ${ids.dtype} and values [${values.shape}] ${values.dtype} do not match`);
  }
  return runProgram<tf.Tensor2D>(new LogitEditsProgram(rows, vocab), [logits, offsets, ids, values]);
}
