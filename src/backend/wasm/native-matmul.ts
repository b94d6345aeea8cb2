/**
 * Native matmul for the wasm backend. TensorFlow.js's wasm kernels use 128-bit SIMD without fused multiply-add
 * (about 30–35 GFLOP/s per core here); src/backend/wasm/addon/matmul.cc runs the same products with AVX2/FMA register-blocked
 * kernels directly on the tensors in the wasm heap (bench case `kernels`: about 1.5× at 16 rows, 2.6× at 512; at one
 * row both are bound by reading the weights). It is built by `npm ci` (node-gyp, the install script) and used when it
 * built and the CPU has AVX2 and FMA; otherwise the wasm kernels run, unchanged.
 *
 * It replaces the wasm backend's BatchMatMul kernel for float32 products without transposeA whose batch dimensions
 * are equal or 1 on one side (every matmul the model makes); anything else goes to the original kernel.
 *
 * Weights can be stored packed (packWeight): 16-column panels, each contiguous, which the kernels read in address
 * order (a column panel of a row-major [K, N] matrix takes 16 floats from each of K rows 4·N bytes apart: cache-set
 * conflicts and more streams than the prefetchers follow). Bench case `kernels` measures both layouts; the results
 * are the same bit for bit (each output element is the same chain of fused multiply-adds).
 */
import * as tf from '@tensorflow/tfjs-core';
import { nativeAddon } from './addon/addon.ts';

/** The subset of the wasm backend this kernel touches. */
interface WasmBackend {
  readonly wasm: { readonly HEAPU8: Uint8Array };
  readonly dataIdMap: { get(dataId: object): { memoryOffset: number } };
  makeOutput(shape: number[], dtype: 'float32'): tf.TensorInfo;
}

let installed = false;

/** Byte offset of a tensor's data in the wasm heap. */
const heapOffset = (backend: WasmBackend, t: tf.TensorInfo): number => backend.dataIdMap.get(t.dataId).memoryOffset;
/** dataIds of tensors whose data is in the packed panel layout (packWeight, markPacked). */
const packedIds = new WeakSet<object>();

/** Whether a tensor's data is in the packed panel layout: only this module's BatchMatMul reads it correctly. */
export const isPacked = (t: tf.TensorInfo): boolean => packedIds.has(t.dataId);

/** Marks a tensor computed elementwise from packed ones of its shape (W + a packed delta) as packed too. */
export function markPacked(t: tf.Tensor): void {
  packedIds.add(t.dataId);
}

/**
 * W [K, N] packed (see the top of this file), as a new tensor, with W disposed; W itself when the native matmul is not
 * installed in this thread, N is not a multiple of 16, or W is packed already. A packed tensor may only be the b
 * operand of an untransposed tf.matMul (the model's linear() does that), or be added elementwise to another packed
 * tensor of its shape (mergeWeights); the BatchMatMul kernel refuses anything else.
 */
export function packWeight(W: tf.Tensor2D): tf.Tensor2D {
  const native = nativeAddon();
  const [K, N] = W.shape;
  if (!installed || !native || tf.getBackend() !== 'wasm' || W.dtype !== 'float32' || N % 16 !== 0 || K * N === 0 || isPacked(W)) return W;
  const backend = tf.backend() as unknown as WasmBackend;
  const out = backend.makeOutput([K, N], 'float32');
  native.pack(backend.wasm.HEAPU8, heapOffset(backend, W), heapOffset(backend, out), K, N);
  packedIds.add(out.dataId);
  W.dispose();
  return tf.engine().makeTensorFromTensorInfo(out) as tf.Tensor2D;
}

/**
 * Routes the wasm backend's BatchMatMul through the addon. Returns false (and changes nothing) when the addon is
 * unavailable or the backend is not wasm. Idempotent.
 */
export function installNativeMatmul(): boolean {
  if (installed) return true;
  const native = nativeAddon();
  if (!native || tf.getBackend() !== 'wasm') return false;
  const original = tf.getKernel(tf.BatchMatMul, 'wasm');
  if (!original) return false;
  const fallback = original.kernelFunc;
  const kernelFunc: tf.KernelFunc = (args) => {
    const { a, b } = args.inputs as { a: tf.TensorInfo; b: tf.TensorInfo };
    const { transposeA, transposeB } = args.attrs as { transposeA: boolean; transposeB: boolean };
    const plan = planOf(a, b, transposeA, transposeB);
    const packedB = isPacked(b);
    if (isPacked(a) || (packedB && (!plan || transposeB || plan.N % 16 !== 0))) {
      throw new Error('native matmul: a packed weight can only be the b operand of an untransposed product');
    }
    if (!plan) return fallback(args);
    const backend = args.backend as unknown as WasmBackend;
    const out = backend.makeOutput(plan.outShape, 'float32');
    if (plan.batch > 0 && plan.M > 0 && plan.N > 0) {
      native.matmul(backend.wasm.HEAPU8, heapOffset(backend, a), heapOffset(backend, b), heapOffset(backend, out), plan.batch, plan.M, plan.K, plan.N,
        plan.aStride, plan.bStride, transposeB, packedB);
    }
    return out;
  };
  tf.unregisterKernel(tf.BatchMatMul, 'wasm');
  tf.registerKernel({ ...original, kernelFunc });
  installed = true;
  return true;
}

interface Plan {
  readonly outShape: number[];
  readonly batch: number;
  readonly M: number;
  readonly K: number;
  readonly N: number;
  readonly aStride: number;
  readonly bStride: number;
}

const size = (dims: readonly number[]) => dims.reduce((n, d) => n * d, 1);

/** The native call for a product, or null when the original kernel should run it. */
export function planOf(a: tf.TensorInfo, b: tf.TensorInfo, transposeA: boolean, transposeB: boolean): Plan | null {
  if (a.dtype !== 'float32' || b.dtype !== 'float32' || transposeA || a.shape.length < 2 || b.shape.length < 2) return null;
  const M = a.shape[a.shape.length - 2]!;
  const K = a.shape[a.shape.length - 1]!;
  const N = transposeB ? b.shape[b.shape.length - 2]! : b.shape[b.shape.length - 1]!;
  const Kb = transposeB ? b.shape[b.shape.length - 1]! : b.shape[b.shape.length - 2]!;
  if (K !== Kb) return null; // the original kernel reports the mismatch
  const outerA = a.shape.slice(0, -2);
  const outerB = b.shape.slice(0, -2);
  const batchA = size(outerA);
  const batchB = size(outerB);
  let outer: number[];
  if (batchA === batchB && outerA.length === outerB.length && outerA.every((d, i) => d === outerB[i])) outer = outerA;
  else if (batchB === 1 && outerB.length <= outerA.length) outer = outerA;
  else if (batchA === 1 && outerA.length <= outerB.length) outer = outerB;
  else return null;
  return {
    outShape: [...outer, M, N], batch: size(outer), M, K, N,
    aStride: batchA === 1 ? 0 : M * K, bStride: batchB === 1 ? 0 : K * N,
  };
}
