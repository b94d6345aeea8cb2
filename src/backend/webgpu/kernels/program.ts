/**
 * What the fused WebGPU kernels share: the shape of a tfjs-backend-webgpu program (its `WebGPUProgram` interface,
 * restated here so that the model code does not load the webgpu package on other backends), and running one.
 *
 * tfjs writes each shader's bindings and entry point: the output buffer `result`, one read-only storage buffer per
 * name in `variableNames` (`array<f32>` or `array<i32>` by the tensor's dtype), and a `uniforms` struct with every
 * buffer's shape (`uniforms.xShape`, `uniforms.outShape`) and the program's own fields. With a flat dispatch layout
 * the user code defines `fn main(index : i32)`, `index` being the invocation's global index.
 */
import * as tf from '@tensorflow/tfjs-core';

export interface WebGPUProgram {
  outputShape: number[];
  shaderKey: string;
  dispatchLayout: { x: number[] };
  dispatch: [number, number, number];
  variableNames: string[];
  uniforms?: string;
  /** Adds a `size` uniform: the number of output elements. */
  size?: boolean;
  workgroupSize: [number, number, number];
  getUserCode(): string;
}

/** A program's own uniform values, in the order of its `uniforms` fields. */
export type Uniforms = { type: 'float32' | 'int32'; data: number[] }[];

interface ProgramRunner {
  runWebGPUProgram(program: WebGPUProgram, inputs: tf.TensorInfo[], dtype: tf.DataType, uniforms?: Uniforms): tf.TensorInfo;
}

/** Threads of the kernels that give one workgroup to each output row. */
export const ROW_WORKGROUP = 64;

/** Whether the active backend is tfjs-backend-webgpu, which runs the fused kernels of this folder. */
export function fusedKernels(): boolean {
  return tf.getBackend() === 'webgpu';
}

/** Runs a program on the webgpu backend: one dispatch; the result is tracked like any tensor (tidy, dispose). */
export function runProgram<T extends tf.Tensor>(program: WebGPUProgram, inputs: readonly tf.Tensor[], uniforms?: Uniforms, dtype: tf.DataType = 'float32'): T {
  const backend = tf.backend() as unknown as Partial<ProgramRunner>;
  if (typeof backend.runWebGPUProgram !== 'function') throw new Error(`${program.constructor.name} runs on the webgpu backend only (active: ${tf.getBackend()})`);
  const info = backend.runWebGPUProgram(program, [...inputs], dtype, uniforms);
  return tf.engine().makeTensorFromTensorInfo(info) as T;
}

/** The dispatch of a flat layout with one invocation per output element. */
export function flatDispatch(elements: number, workgroup: number): [number, number, number] {
  return [Math.ceil(elements / workgroup), 1, 1];
}

/**
 * WGSL: the workgroup-shared buffer `red` and `reduceSum(v)`/`reduceMax(v)`, which every invocation of a
 * ROW_WORKGROUP-wide workgroup calls (in uniform control flow) and which return the workgroup's sum/max of `v`.
 */
export const WORKGROUP_REDUCE = `
  var<workgroup> red : array<f32, ${ROW_WORKGROUP}>;
  fn reduceSum(v : f32) -> f32 {
    let tid = localId.x;
    red[tid] = v;
    workgroupBarrier();
    for (var size = ${ROW_WORKGROUP / 2}u; size > 0u; size = size / 2u) {
      if (tid < size) { red[tid] = red[tid] + red[tid + size]; }
      workgroupBarrier();
    }
    let total = red[0];
    workgroupBarrier();
    return total;
  }
  fn reduceMax(v : f32) -> f32 {
    let tid = localId.x;
    red[tid] = v;
    workgroupBarrier();
    for (var size = ${ROW_WORKGROUP / 2}u; size > 0u; size = size / 2u) {
      if (tid < size) { red[tid] = max(red[tid], red[tid + size]); }
      workgroupBarrier();
    }
    let top = red[0];
    workgroupBarrier();
    return top;
  }
`;
