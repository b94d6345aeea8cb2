import * as tf from '@tensorflow/tfjs-core';
import { flatDispatch, runProgramInPlace, type WebGPUProgram } from './program.ts';

const WORKGROUP = 64;

/**
 * Writes a step's keys and values into a layer's packed KV cache in place, in one dispatch: the cache is
 * [B, kvH, capacity, 2·hd], column j of row b and KV head h holding that position's key then its value. As a plain loop,
 * for b < B, h < kvH, t < T, d < hd: `cache[b, h, at + t, d] = k[b·T + t, h·hd + d]` and
 * `cache[b, h, at + t, hd + d] = v[b·T + t, h·hd + d]`; every other element of the cache is left as it was. k, v: the
 * step's token rows as the projections give them, [B·T, kvH·hd] (no transpose to heads first); at + T ≤ capacity, `at` read from the KV
 * state (int32, state[0]; src/exec/kv.ts), not a uniform, so that a recorded step can replay the dispatch as it is.
 * One invocation per element written.
 */
export class KVAppendProgram implements WebGPUProgram {
  readonly variableNames = ['k', 'v', 'state'];
  readonly outputShape: number[];
  readonly shaderKey = 'loraServeKVAppend';
  readonly dispatchLayout = { x: [0, 1, 2, 3] };
  readonly dispatch: [number, number, number];
  readonly workgroupSize: [number, number, number] = [WORKGROUP, 1, 1];

  constructor(cacheShape: readonly number[], written: number) {
    this.outputShape = [...cacheShape];
    this.dispatch = flatDispatch(written, WORKGROUP);
  }

  getUserCode(): string {
    return `
      fn main(index : i32) {
        let B = uniforms.outShape[0];
        let kvH = uniforms.outShape[1];
        let width = uniforms.outShape[3];
        let hd = width / 2;
        let T = uniforms.kShape[0] / B;
        if (index >= B * kvH * T * width) { return; }
        let e = index % width; // < hd: a key's element, else a value's
        let bht = index / width; // (b, h, t)
        let t = bht % T;
        let bh = bht / T;
        let b = bh / kvH;
        let h = bh % kvH;
        let src = (b * T + t) * kvH * hd + h * hd + e % hd; // k[b·T + t, h·hd + e % hd], v alike
        let dst = (bh * uniforms.outShape[2] + state[0] + t) * width + e; // cache[b, h, at + t, e]
        result[dst] = select(v[src], k[src], e < hd);
      }
    `;
  }
}

/**
 * Writes k, v [B·T, kvH·hd] (rows (b, t)) into columns at .. at+T−1 of the packed cache [B, kvH, capacity, 2·hd] (see
 * KVAppendProgram), in place, on the webgpu backend; `at` is state[0] of the int32 KV state, whose value the caller
 * passes as `at` for the bounds check. The cache must be the only tensor on its buffer (not a reshape or clone of
 * another), since every tensor sharing it would change.
 */
export function kvAppendGpu(cache: tf.Tensor4D, k: tf.Tensor2D, v: tf.Tensor2D, state: tf.Tensor1D, at: number): void {
  const [B, kvH, capacity, width] = cache.shape;
  const T = k.shape[0] / B;
  if (!tf.util.arraysEqual(k.shape, v.shape) || !Number.isInteger(T) || T < 1 || k.shape[1] !== kvH * width / 2) {
    throw new Error(`kvAppend: k [${k.shape}] and v [${v.shape}] do not fit the cache [${cache.shape}]`);
  }
  if (!Number.isInteger(at) || at < 0 || at + T > capacity) throw new Error(`kvAppend: columns ${at}..${at + T - 1} are outside the cache's ${capacity}`);
  if (state.dtype !== 'int32' || state.shape[0] < 1) throw new Error(`kvAppend: the KV state [${state.shape}] is not int32`);
  runProgramInPlace(new KVAppendProgram(cache.shape, B * kvH * T * width), [k, v, state], cache);
}

/**
 * Copies `len` columns of one row of a packed KV cache into another row of another packed cache, in place, in one
 * dispatch: as a plain loop, for h < kvH, t < len, e < 2·hd: `dst[dstRow, h, dstCol + t, e] = src[srcRow, h, srcCol + t, e]`;
 * every other element of dst is left as it was. Both caches are [rows, kvH, capacity, 2·hd] (their rows and capacities
 * may differ). It moves a prefilled sequence into a free row of the running batch (src/exec/kv.ts's place), between
 * steps, so the uniforms may change from call to call. One invocation per element written.
 */
export class KVCopyRowProgram implements WebGPUProgram {
  readonly variableNames = ['src'];
  readonly outputShape: number[];
  readonly shaderKey = 'loraServeKVCopyRow';
  readonly dispatchLayout = { x: [0, 1, 2, 3] };
  readonly dispatch: [number, number, number];
  readonly workgroupSize: [number, number, number] = [WORKGROUP, 1, 1];
  readonly uniforms = 'srcRow : i32, srcCol : i32, dstRow : i32, dstCol : i32, len : i32,';

  constructor(dstShape: readonly number[], written: number) {
    this.outputShape = [...dstShape];
    this.dispatch = flatDispatch(written, WORKGROUP);
  }

  getUserCode(): string {
    return `
      fn main(index : i32) {
        let kvH = uniforms.outShape[1];
        let width = uniforms.outShape[3];
        let len = uniforms.len;
        if (index >= kvH * len * width) { return; }
        let e = index % width;
        let t = (index / width) % len;
        let h = index / (width * len);
        let srcAt = ((uniforms.srcRow * kvH + h) * uniforms.srcShape[2] + uniforms.srcCol + t) * width + e; // src[srcRow, h, srcCol + t, e]
        result[((uniforms.dstRow * kvH + h) * uniforms.outShape[2] + uniforms.dstCol + t) * width + e] = src[srcAt];
      }
    `;
  }
}

/**
 * Copies columns srcCol .. srcCol+len−1 of row srcRow of the packed cache `src` into columns dstCol .. of row dstRow of
 * the packed cache `dst` [rows, kvH, capacity, 2·hd], in place (see KVCopyRowProgram), on the webgpu backend. `dst`
 * must be the only tensor on its buffer.
 */
export function kvCopyRowGpu(dst: tf.Tensor4D, dstRow: number, dstCol: number, src: tf.Tensor4D, srcRow: number, srcCol: number, len: number): void {
  const [rows, kvH, capacity, width] = dst.shape;
  const [srcRows, srcKvH, srcCapacity, srcWidth] = src.shape;
  if (srcKvH !== kvH || srcWidth !== width) throw new Error(`kvCopyRow: caches [${src.shape}] and [${dst.shape}] differ in heads or width`);
  const ok = (n: number, lo: number, hi: number) => Number.isInteger(n) && n >= lo && n <= hi;
  if (!ok(len, 1, Infinity) || !ok(srcRow, 0, srcRows - 1) || !ok(dstRow, 0, rows - 1) || !ok(srcCol, 0, srcCapacity - len) || !ok(dstCol, 0, capacity - len)) {
    throw new Error(`kvCopyRow: ${len} columns from row ${srcRow}, column ${srcCol} of [${src.shape}] to row ${dstRow}, column ${dstCol} of [${dst.shape}] are outside a cache`);
  }
  runProgramInPlace(new KVCopyRowProgram(dst.shape, kvH * len * width), [src], dst,
    [srcRow, srcCol, dstRow, dstCol, len].map((n) => ({ type: 'int32' as const, data: [n] })));
}
