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
