import * as tf from '@tensorflow/tfjs-core';
import { ROW_WORKGROUP, WORKGROUP_REDUCE, runProgram, type WebGPUProgram } from './program.ts';

/**
 * RMSNorm in one dispatch, one workgroup per row:
 * `tf.mul(tf.mul(x, tf.rsqrt(tf.add(tf.mean(tf.square(x), -1, true), eps))), w)`.
 * x: [rows, cols]; w: [cols].
 */
export class RmsNormProgram implements WebGPUProgram {
  readonly variableNames = ['x', 'w'];
  readonly outputShape: number[];
  readonly shaderKey = 'loraServeRmsNorm';
  readonly dispatchLayout = { x: [0, 1] };
  readonly dispatch: [number, number, number];
  readonly workgroupSize: [number, number, number] = [ROW_WORKGROUP, 1, 1];
  readonly uniforms = 'eps : f32,';

  constructor(rows: number, cols: number) {
    this.outputShape = [rows, cols];
    this.dispatch = [rows, 1, 1];
  }

  getUserCode(): string {
    return `
      ${WORKGROUP_REDUCE}
      fn main(index : i32) {
        let row = index / ${ROW_WORKGROUP};
        let tid = i32(localId.x);
        let cols = uniforms.outShape[1];
        let rows = uniforms.outShape[0];
        let base = min(row, rows - 1) * cols; // x[row, 0]
        var sum = 0.0;
        for (var c = tid; c < cols; c = c + ${ROW_WORKGROUP}) {
          let v = x[base + c]; // x[row, c]
          sum = sum + v * v;
        }
        let inv = inverseSqrt(reduceSum(sum) / f32(cols) + uniforms.eps);
        if (row >= rows) { return; }
        for (var c = tid; c < cols; c = c + ${ROW_WORKGROUP}) {
          result[base + c] = x[base + c] * inv * w[c]; // out[row, c] = x[row, c] · inv · w[c]
        }
      }
    `;
  }
}

/** RMSNorm of each row of x [rows, cols] with weight w [cols], on the webgpu backend. */
export function rmsNormGpu(x: tf.Tensor2D, w: tf.Tensor1D, eps: number): tf.Tensor2D {
  const [rows, cols] = x.shape;
  return runProgram(new RmsNormProgram(rows, cols), [x, w], [{ type: 'float32', data: [eps] }]);
}
