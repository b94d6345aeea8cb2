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

/** The parts of tfjs-backend-webgpu's WebGPUBackend (4.22) used here. */
interface ProgramRunner {
  /** Runs a program into `output` when given (its buffer is written in place), else into a new tensor. */
  runWebGPUProgram(program: WebGPUProgram, inputs: tf.TensorInfo[], dtype: tf.DataType, uniforms?: Uniforms, output?: tf.TensorInfo): tf.TensorInfo;
  /** A new tensor's data with neither values nor buffer: the buffer is made (contents undefined) by its first write. */
  makeTensorInfo(shape: number[], dtype: tf.DataType): tf.TensorInfo;
  /** How many tensors share a tensor's data (reshapes and clones share it). */
  refCount(dataId: object): number;
  /** `values`: a copy of the data on the host, kept by tfjs after a read. */
  tensorMap: { get(dataId: object): { values: unknown } };
}

function webgpuBackend(what: string): ProgramRunner {
  const backend = tf.backend() as unknown as Partial<ProgramRunner>;
  if (typeof backend.runWebGPUProgram !== 'function') throw new Error(`${what} runs on the webgpu backend only (active: ${tf.getBackend()})`);
  return backend as ProgramRunner;
}

/** Threads of the kernels that give one workgroup to each output row. */
export const ROW_WORKGROUP = 64;

/** Whether the active backend is tfjs-backend-webgpu, which runs the fused kernels of this folder. */
export function fusedKernels(): boolean {
  return tf.getBackend() === 'webgpu';
}

/** Runs a program on the webgpu backend: one dispatch; the result is tracked like any tensor (tidy, dispose). */
export function runProgram<T extends tf.Tensor>(program: WebGPUProgram, inputs: readonly tf.Tensor[], uniforms?: Uniforms, dtype: tf.DataType = 'float32'): T {
  const info = webgpuBackend(program.constructor.name).runWebGPUProgram(program, [...inputs], dtype, uniforms);
  return tf.engine().makeTensorFromTensorInfo(info) as T;
}

/**
 * Runs a program whose output is the existing float32 tensor `output`, written in place (one dispatch), in order with
 * the backend's other queued work. Outside tfjs's immutable tensors: `output` must be the only tensor on its data (a
 * reshape or clone of it would change too), which is checked. Values a read cached on the host are dropped.
 */
export function runProgramInPlace(program: WebGPUProgram, inputs: readonly tf.Tensor[], output: tf.Tensor, uniforms?: Uniforms): void {
  const backend = webgpuBackend(program.constructor.name);
  if (output.dtype !== 'float32' || output.isDisposed) throw new Error(`${program.constructor.name}: the output is not a live float32 tensor`);
  const sharing = backend.refCount(output.dataId);
  if (sharing !== 1) throw new Error(`${program.constructor.name}: the output's data is shared by ${sharing} tensors, so it cannot be written in place`);
  backend.runWebGPUProgram(program, [...inputs], 'float32', uniforms, { dataId: output.dataId, shape: output.shape, dtype: 'float32' });
  backend.tensorMap.get(output.dataId).values = null;
}

/** A new float32 tensor on the webgpu backend whose contents are undefined until written (runProgramInPlace). */
export function uninitialized<T extends tf.Tensor>(shape: number[]): T {
  return tf.engine().makeTensorFromTensorInfo(webgpuBackend('uninitialized').makeTensorInfo(shape, 'float32')) as T;
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
