import * as tf from '@tensorflow/tfjs-core';
import { flatDispatch, runProgram, type WebGPUProgram } from './program.ts';

const WORKGROUP = 64;

/**
 * Rotary embedding of every head of x in one dispatch, reading the table directly (HF's rotate_half convention):
 * with `cos = tf.reshape(tf.gather(cosTable, rows), [N, 1, hd])` (sin alike) and `x3 = tf.reshape(x, [N, H, hd])`,
 * `tf.reshape(tf.add(tf.mul(x3, cos), tf.mul(rotateHalf(x3), sin)), [N, H·hd])`, rotateHalf([x1, x2]) = [−x2, x1].
 * x: [N, H·hd]; table: [tableRows, 2·hd], each row cos | sin (ropeGpuTable in src/model/layers.ts: one buffer
 * binding for both, as WebGPU allows only 8 storage buffers per kernel); rows: int32 [N], the table row of each token.
 */
export class RopeProgram implements WebGPUProgram {
  readonly variableNames = ['x', 'table', 'rows'];
  readonly outputShape: number[];
  readonly shaderKey = 'loraServeRope';
  readonly dispatchLayout = { x: [0, 1] };
  readonly dispatch: [number, number, number];
  readonly workgroupSize: [number, number, number] = [WORKGROUP, 1, 1];
  readonly size = true;

  constructor(tokens: number, width: number) {
    this.outputShape = [tokens, width];
    this.dispatch = flatDispatch(tokens * width, WORKGROUP);
  }

  getUserCode(): string {
    return `
      fn main(index : i32) {
        if (index >= uniforms.size) { return; }
        let hd = uniforms.tableShape[1] / 2;
        let half = hd / 2;
        let n = index / uniforms.outShape[1];
        let i = index % hd; // x[n, h, i]
        let first = i < half;
        let partner = select(index - half, index + half, first); // x[n, h, i ± half]
        let rotated = select(x[partner], -x[partner], first);
        let t = rows[n] * 2 * hd + i; // table[rows[n], i]: cos; table[rows[n], hd + i]: sin
        result[index] = x[index] * table[t] + rotated * table[t + hd];
      }
    `;
  }
}

/** RoPE on x [N, H·hd] (H heads of hd) at rows `rows` [N] of the cos | sin table [tableRows, 2·hd], on webgpu. */
export function ropeGpu(x: tf.Tensor2D, table: tf.Tensor2D, rows: tf.Tensor1D): tf.Tensor2D {
  const [N, width] = x.shape;
  const hd = table.shape[1] / 2;
  if (width % hd !== 0) throw new Error(`rope: width ${width} is not a multiple of head_dim ${hd}`);
  return runProgram(new RopeProgram(N, width), [x, table, rows]);
}
