import * as tf from '@tensorflow/tfjs-core';
import { flatDispatch, runProgram, type WebGPUProgram } from './program.ts';

const WORKGROUP = 64;

/**
 * Rotary embedding of every head of x in one dispatch, reading the tables directly (HF's rotate_half convention):
 * with `cos = tf.reshape(tf.gather(cosTable, rows), [N, 1, hd])` (sin alike) and `x3 = tf.reshape(x, [N, H, hd])`,
 * `tf.reshape(tf.add(tf.mul(x3, cos), tf.mul(rotateHalf(x3), sin)), [N, H·hd])`, rotateHalf([x1, x2]) = [−x2, x1].
 * x: [N, H·hd]; cosTable, sinTable: [tableRows, hd]; rows: int32 [N], the table row of each token.
 */
export class RopeProgram implements WebGPUProgram {
  readonly variableNames = ['x', 'cosTable', 'sinTable', 'rows'];
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
        let hd = uniforms.cosTableShape[1];
        let half = hd / 2;
        let n = index / uniforms.outShape[1];
        let i = index % hd; // x[n, h, i]
        let first = i < half;
        let partner = select(index - half, index + half, first); // x[n, h, i ± half]
        let rotated = select(x[partner], -x[partner], first);
        let t = rows[n] * hd + i; // cosTable[rows[n], i]
        result[index] = x[index] * cosTable[t] + rotated * sinTable[t];
      }
    `;
  }
}

/** RoPE on x [N, H·hd] (H heads of hd) at table rows `rows` [N], on the webgpu backend: [N, H·hd]. */
export function ropeGpu(x: tf.Tensor2D, cosTable: tf.Tensor2D, sinTable: tf.Tensor2D, rows: tf.Tensor1D): tf.Tensor2D {
  const [N, width] = x.shape;
  if (width % cosTable.shape[1] !== 0) throw new Error(`rope: width ${width} is not a multiple of head_dim ${cosTable.shape[1]}`);
  return runProgram(new RopeProgram(N, width), [x, cosTable, sinTable, rows]);
}
