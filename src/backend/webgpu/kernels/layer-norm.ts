import * as tf from '@tensorflow/tfjs-core';
import { ROW_WORKGROUP, WORKGROUP_REDUCE, runProgram, type WebGPUProgram } from './program.ts';

/**
 * LayerNorm in one dispatch, one workgroup per row: with `{ mean, variance } = tf.moments(x, -1, true)`,
 * `tf.add(tf.mul(tf.mul(tf.sub(x, mean), tf.rsqrt(tf.add(variance, eps))), w), b)`.
 * x: [rows, cols]; w, b: [cols].
 */
export class LayerNormProgram implements WebGPUProgram {
  readonly variableNames = ['x', 'w', 'b'];
  readonly outputShape: number[];
  readonly shaderKey = 'loraServeLayerNorm';
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
          sum = sum + x[base + c]; // x[row, c]
        }
        let mean = reduceSum(sum) / f32(cols);
        var sq = 0.0;
        for (var c = tid; c < cols; c = c + ${ROW_WORKGROUP}) {
          let d = x[base + c] - mean;
          sq = sq + d * d;
        }
        let inv = inverseSqrt(reduceSum(sq) / f32(cols) + uniforms.eps);
        if (row >= rows) { return; }
        for (var c = tid; c < cols; c = c + ${ROW_WORKGROUP}) {
          result[base + c] = (x[base + c] - mean) * inv * w[c] + b[c]; // out[row, c]
        }
      }
    `;
  }
}

/** LayerNorm of each row of x [rows, cols] with weight w and bias b [cols], on the webgpu backend. */
export function layerNormGpu(x: tf.Tensor2D, w: tf.Tensor1D, b: tf.Tensor1D, eps: number): tf.Tensor2D {
  const [rows, cols] = x.shape;
  return runProgram(new LayerNormProgram(rows, cols), [x, w, b], [{ type: 'float32', data: [eps] }]);
}
