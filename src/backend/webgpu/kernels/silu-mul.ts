import * as tf from '@tensorflow/tfjs-core';
import { flatDispatch, runProgram, type WebGPUProgram } from './program.ts';

const WORKGROUP = 64;

/**
 * The SiLU-gated MLP's activation in one dispatch: `tf.mul(tf.mul(gate, tf.sigmoid(gate)), up)`.
 * gate, up: [N, I].
 */
export class SiluMulProgram implements WebGPUProgram {
  readonly variableNames = ['gate', 'up'];
  readonly outputShape: number[];
  readonly shaderKey = 'loraServeSiluMul';
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
        let g = gate[index]; // gate[n, i]
        result[index] = g * (1.0 / (1.0 + exp(-g))) * up[index];
      }
    `;
  }
}

/** silu(gate) · up, elementwise, on the webgpu backend. */
export function siluMulGpu(gate: tf.Tensor2D, up: tf.Tensor2D): tf.Tensor2D {
  const [rows, cols] = gate.shape;
  if (up.shape[0] !== rows || up.shape[1] !== cols) throw new Error(`siluMul: gate [${gate.shape}] and up [${up.shape}] differ`);
  return runProgram(new SiluMulProgram(rows, cols), [gate, up]);
}
