import * as tf from '@tensorflow/tfjs-core';
import { flatDispatch, runProgramInPlace, type WebGPUProgram } from './program.ts';

const WORKGROUP = 64;

/**
 * The host Sampler's logit_bias and penalties (src/engine/sampling.ts, steps 0–2) as sparse edits of logits [rows,
 * vocab], written in place, one invocation per entry. Entry e edits logits[rows[e], ids[e]] (rows[e] < 0: padding;
 * a row's ids are distinct); its values are [bias, repetition, minus]. As a plain loop in float32:
 *
 *   for e: if rows[e] ≥ 0 and x = logits[rows[e], ids[e]] is finite:
 *     v = x + bias_e
 *     if repetition_e != 1: v = v > 0 ? v / repetition_e : v · repetition_e
 *     logits[rows[e], ids[e]] = v − minus_e
 *
 * A NaN or ±∞ logit is left as it is (tested on its bits: shader compilers may assume values are finite): the host
 * turns NaN into −∞ before the bias, and −∞ or +∞ stay so through every edit, which the pick and the shortlist read as
 * the host does.
 */
export class LogitEditsProgram implements WebGPUProgram {
  readonly variableNames = ['rows', 'ids', 'values'];
  readonly outputShape: number[];
  readonly shaderKey = 'loraServeLogitEdits';
  readonly dispatchLayout = { x: [0, 1] };
  readonly dispatch: [number, number, number];
  readonly workgroupSize: [number, number, number] = [WORKGROUP, 1, 1];
  readonly uniforms = 'entries : i32, vocab : i32,';

  constructor(rows: number, vocab: number, entries: number) {
    this.outputShape = [rows, vocab];
    this.dispatch = flatDispatch(entries, WORKGROUP);
  }

  getUserCode(): string {
    return `
      fn main(index : i32) {
        if (index >= uniforms.entries) { return; }
        let row = rows[index];
        if (row < 0) { return; }
        let at = row * uniforms.vocab + ids[index]; // logits[row, id]
        let bits = bitcast<u32>(result[at]);
        if ((bits & 0x7f800000u) == 0x7f800000u) { return; } // NaN or ±∞: as it is
        var v = bitcast<f32>(bits) + values[3 * index];
        let rep = values[3 * index + 1];
        if (rep != 1.0) {
          if (v > 0.0) { v = v / rep; } else { v = v * rep; }
        }
        result[at] = v - values[3 * index + 2];
      }
    `;
  }
}

/**
 * Applies edits to `logits` [rows, vocab] in place (LogitEditsProgram): `rows` and `ids` int32 [E], `values` float32
 * [3·E], on the webgpu backend. `logits` must be the only tensor on its data (runProgramInPlace checks).
 */
export function logitEditsInPlace(logits: tf.Tensor2D, rows: tf.Tensor1D, ids: tf.Tensor1D, values: tf.Tensor1D): void {
  const [R, vocab] = logits.shape;
  const E = ids.shape[0];
  if (rows.dtype !== 'int32' || ids.dtype !== 'int32' || rows.shape[0] !== E || values.dtype !== 'float32' || values.shape[0] !== 3 * E) {
    throw new Error(`logitEdits: rows [${rows.shape}] ${rows.dtype}, ids [${ids.shape}] ${ids.dtype} and values [${values.shape}] ${values.dtype} do not match`);
  }
  if (E === 0) return;
  runProgramInPlace(new LogitEditsProgram(R, vocab, E), [rows, ids, values], logits, [{ type: 'int32', data: [E] }, { type: 'int32', data: [vocab] }]);
}
