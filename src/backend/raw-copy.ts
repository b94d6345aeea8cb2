/**
 * Row and column selection on KV cache tensors [B, H, C, D].
 *
 * TensorFlow.js's generic Gather and Slice kernels on the wasm backend copy element by element, so a sequence
 * leaving a batch would cost more than a decode step. On the wasm and cpu backends these two operations are done here
 * as plain memory copies of contiguous runs (exact: values are moved, never computed); other backends use tf.gather /
 * tf.slice.
 */
import * as tf from '@tensorflow/tfjs-core';

interface WasmBackendLike {
  wasm: { HEAPF32: Float32Array };
  getMemoryOffset(dataId: object): number;
  makeOutput(shape: number[], dtype: 'float32'): tf.TensorInfo;
}

interface CpuBackendLike {
  data: { get(dataId: object): { values: Float32Array } };
}

/** Runs `copy(src, dst)` between an existing tensor's memory and a new tensor's, on backends that expose it. */
function withRawMemory(t: tf.Tensor, shape: number[], copy: (src: Float32Array, srcBase: number, dst: Float32Array, dstBase: number) => void): tf.Tensor | null {
  if (t.dtype !== 'float32') return null;
  const name = tf.getBackend();
  if (name === 'wasm') {
    const backend = tf.backend() as unknown as WasmBackendLike;
    const info = backend.makeOutput(shape, 'float32'); // may grow the heap: read HEAPF32 afterwards
    const heap = backend.wasm.HEAPF32;
    copy(heap, backend.getMemoryOffset(t.dataId) / 4, heap, backend.getMemoryOffset(info.dataId) / 4);
    return tf.engine().makeTensorFromTensorInfo(info);
  }
  if (name === 'cpu') {
    const backend = tf.backend() as unknown as CpuBackendLike;
    const out = new Float32Array(shape.reduce((a, b) => a * b, 1));
    copy(backend.data.get(t.dataId).values, 0, out, 0);
    return tf.tensor(out, shape);
  }
  return null;
}

/** t[rows] along axis 0. */
export function gatherRows(t: tf.Tensor4D, rows: readonly number[]): tf.Tensor4D {
  const [, H, C, D] = t.shape;
  const row = H * C * D;
  const out = withRawMemory(t, [rows.length, H, C, D], (src, s, dst, d) => {
    rows.forEach((r, i) => {
      if (dst === src) dst.copyWithin(d + i * row, s + r * row, s + (r + 1) * row);
      else dst.set(src.subarray(s + r * row, s + (r + 1) * row), d + i * row);
    });
  });
  return (out as tf.Tensor4D | null) ?? tf.tidy(() => tf.gather(t, tf.tensor1d(rows as number[], 'int32'), 0));
}

/** t[:, :, from:, :]. */
export function dropLeadingCols(t: tf.Tensor4D, from: number): tf.Tensor4D {
  const [B, H, C, D] = t.shape;
  const keep = (C - from) * D;
  const out = withRawMemory(t, [B, H, C - from, D], (src, s, dst, d) => {
    for (let bh = 0; bh < B * H; bh++) {
      const a = s + bh * C * D + from * D;
      if (dst === src) dst.copyWithin(d + bh * keep, a, a + keep);
      else dst.set(src.subarray(a, a + keep), d + bh * keep);
    }
  });
  return (out as tf.Tensor4D | null) ?? tf.slice(t, [0, 0, from, 0], [-1, -1, -1, -1]);
}
