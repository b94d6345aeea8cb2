import * as tf from '@tensorflow/tfjs-core';
import { flatDispatch, runProgram, type WebGPUProgram } from './program.ts';

const WORKGROUP = 64;

/**
 * GPT-2's gelu_new in one dispatch: `tf.mul(tf.mul(x, 0.5), tf.add(tf.tanh(inner), 1))` with
 * `inner = tf.mul(tf.add(x, tf.mul(tf.pow(x, 3), 0.044715)), √(2/π))`. x: [N, I].
 * tanh(z) is computed as sign(z)·(1 − e^(−2|z|))/(1 + e^(−2|z|)), as tfjs-backend-webgpu's Tanh does (WGSL's tanh
 * overflows to NaN for large |z| on some drivers).
 */
export class GeluNewProgram implements WebGPUProgram {
  readonly variableNames = ['x'];
  readonly outputShape: number[];
  readonly shaderKey = 'loraServeGeluNew';
  readonly dispatchLayout = { x: [0, 1] };
  readonly dispatch: [number, number, number];
  readonly workgroupSize: [number, number, number] = [WORKGROUP, 1, 1];
  readonly size = true;

  constructor(rows: number, cols: number) {
    this.outputShape = [rows, cols];
    this.dispatch = flatDispatch(rows * cols, WORKGROUP);
  }

  getUserCode(): string {
    return `
      fn main(index : i32) {
        if (index >= uniforms.size) { return; }
        let v = x[index]; // x[n, i]
        let z = (v + v * v * v * 0.044715) * ${Math.sqrt(2 / Math.PI)};
        let e = exp(-2.0 * abs(z));
        let th = sign(z) * (1.0 - e) / (1.0 + e);
        result[index] = v * 0.5 * (th + 1.0);
      }
    `;
  }
}

/** gelu_new(x), elementwise, on the webgpu backend. */
export function geluNewGpu(x: tf.Tensor2D): tf.Tensor2D {
  const [rows, cols] = x.shape;
  return runProgram(new GeluNewProgram(rows, cols), [x]);
}
