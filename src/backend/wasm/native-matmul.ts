/**
 * Native matmul for the wasm backend. TensorFlow.js's wasm kernels use 128-bit SIMD without fused multiply-add;
 * src/backend/wasm/addon/matmul.cc runs the same products with AVX2/FMA register-blocked kernels directly on the
 * tensors in the wasm heap (bench case `kernels` compares them; docs/architecture.md quotes the figures). It is built
 * by `npm ci` (node-gyp, the install script) and used when it built and the CPU has AVX2 and FMA; otherwise the wasm
 * kernels run, unchanged.
 *
 * It replaces the wasm backend's BatchMatMul kernel for float32 products without transposeA whose batch dimensions
 * are equal or 1 on one side (every matmul the model makes); anything else goes to the original kernel.
 *
 * Weights can be stored packed (PackedWeight): 16-column panels, each contiguous, which the kernels read in address
 * order (a column panel of a row-major [K, N] matrix takes 16 floats from each of K rows 4·N bytes apart: cache-set
 * conflicts and more streams than the prefetchers follow). The results are the same bit for bit in both layouts (each
 * output element is the same chain of fused multiply-adds).
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
/** dataIds of the tensors held by PackedWeights: the kernel below refuses them anywhere but as a product's b operand. */
const packedIds = new WeakSet<object>();

/** Whether a tensor's data is in the packed panel layout: only this module's BatchMatMul reads it correctly. */
const isPacked = (t: tf.TensorInfo): boolean => packedIds.has(t.dataId);

/**
 * A weight W [K, N] stored in the packed panel layout (see the top of this file). It is not a tf.Tensor: its values
 * are permuted, so any TensorFlow.js op but this module's matmul would read them wrongly, and the type system keeps
 * it out of every other op. It owns its tensor.
 */
export class PackedWeight {
  readonly #tensor: tf.Tensor2D;
  readonly shape: [number, number];

  private constructor(t: tf.Tensor2D) {
    this.#tensor = t;
    this.shape = [t.shape[0], t.shape[1]];
    packedIds.add(t.dataId);
  }

  /** Packs W (disposing it). Only when the native matmul is installed on the wasm backend and N is a multiple of 16. */
  static pack(W: tf.Tensor2D): PackedWeight {
    const native = nativeAddon();
    const [K, N] = W.shape;
    if (!native || !packable(W)) throw new Error(`native matmul: cannot pack a ${W.dtype} [${K}, ${N}] weight here`);
    const backend = tf.backend() as unknown as WasmBackend;
    const out = backend.makeOutput([K, N], 'float32');
    native.pack(backend.wasm.HEAPU8, heapOffset(backend, W), heapOffset(backend, out), K, N);
    W.dispose();
    return new PackedWeight(tf.engine().makeTensorFromTensorInfo(out) as tf.Tensor2D);
  }

  get size(): number {
    return this.#tensor.size;
  }

  get isDisposed(): boolean {
    return this.#tensor.isDisposed;
  }

  /** x·W, x [M, K] → [M, N]. */
  matmul(x: tf.Tensor2D): tf.Tensor2D {
    return tf.matMul(x, this.#tensor);
  }

  /**
   * W + delta as a new PackedWeight (delta [K, N], row-major, is not disposed). Packing is a permutation, so the sum
   * of two packed arrays is the packed sum: W' = W + s·Aᵀ·Bᵀ stays packed (merged LoRA weights).
   */
  plus(delta: tf.Tensor2D): PackedWeight {
    const d = PackedWeight.pack(delta.clone());
    try {
      return new PackedWeight(tf.add(this.#tensor, d.#tensor));
    } finally {
      d.dispose();
    }
  }

  /** Keeps the tensor out of the enclosing tf.tidy scopes (as tf.keep). */
  keep(): this {
    tf.keep(this.#tensor);
    return this;
  }

  dispose(): void {
    this.#tensor.dispose();
  }

  /** The kernel operand, for code that calls the BatchMatMul kernel directly (bench/ kernels). */
  static kernelInput(w: PackedWeight): tf.TensorInfo {
    return w.#tensor;
  }
}

/**
 * W stored for x·W products: a PackedWeight when the native matmul is installed in this thread and N is a multiple of
 * 16 (W is then disposed), else W itself.
 */
export function packWeight(W: tf.Tensor2D): tf.Tensor2D | PackedWeight {
  return packable(W) ? PackedWeight.pack(W) : W;
}

/** The native matmul is installed in this thread (wasm) and reads W packed: float32, N a multiple of 16. */
function packable(W: tf.Tensor2D): boolean {
  const [K, N] = W.shape;
  return installed && nativeAddon() !== null && tf.getBackend() === 'wasm' && W.dtype === 'float32' && N % 16 === 0 && K * N > 0;
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
