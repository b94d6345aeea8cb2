import * as tf from '@tensorflow/tfjs-core';
import { ROW_WORKGROUP, WORKGROUP_REDUCE, runProgram, type WebGPUProgram } from './program.ts';

/** The largest head_dim the kernel takes (its shared copy of q and its per-invocation accumulators). */
export const DECODE_ATTENTION_MAX_HEAD_DIM = 4 * ROW_WORKGROUP;

/**
 * One decode step's attention (one new token per row) over the packed KV cache in place, in one dispatch: one
 * workgroup per (row, query head) walks the cache's first C columns in blocks of the workgroup's width with an online
 * softmax (running max and sum, rescaling the weighted sum of V when the max grows). Grouped-query: query head h
 * reads KV head h / G. The cache is [B, kvH, capacity, 2·hd] (src/exec/kv.ts): column j holds a key then its value,
 * `k = cache[:, :, :C, :hd]`, `v = cache[:, :, :C, hd:]`; the columns from C on are spare and never read.
 * Its meaning, as the unfused ops for T = 1 (layers.ts's attend()):
 * `q4 = tf.reshape(q, [B, kvH, G, hd])`, `scores = tf.add(tf.matMul(tf.mul(q4, scale), k, false, true), mask)`,
 * `tf.reshape(tf.matMul(tf.softmax(scores), v), [B, H·hd])`; with a soft-cap c (Gemma 2) the scaled scores become
 * c·tanh(scores/c) before the mask is added. The mask (KVBatch.mask for T = 1) is computed in the kernel from the KV
 * state, int32 [1 + B] = [at, start_0 .. start_{B−1}] (src/exec/kv.ts): the new token is column at, so C = at + 1
 * columns are valid, and row b's query sees columns j with from_b ≤ j ≤ at, from_b = start_b, or with a sliding
 * window W (uniform `window`, 0: none) max(start_b, C − W). q: [B, H·hd]; H = kvH·G. Nothing that changes from step to
 * step is a uniform (C is read from the state buffer), so a recorded step can replay the dispatch as it is.
 */
export class DecodeAttentionProgram implements WebGPUProgram {
  readonly variableNames = ['q', 'cache', 'state'];
  readonly outputShape: number[];
  readonly shaderKey = 'loraServeDecodeAttention';
  readonly dispatchLayout = { x: [0, 1] };
  readonly dispatch: [number, number, number];
  readonly workgroupSize: [number, number, number] = [ROW_WORKGROUP, 1, 1];
  readonly uniforms = 'scale : f32, heads : i32, groups : i32, softcap : f32, window : i32,';

  constructor(rows: number, heads: number, headDim: number) {
    this.outputShape = [rows, heads * headDim];
    this.dispatch = [rows * heads, 1, 1];
  }

  getUserCode(): string {
    const W = ROW_WORKGROUP;
    return `
      ${WORKGROUP_REDUCE}
      var<workgroup> qs : array<f32, ${DECODE_ATTENTION_MAX_HEAD_DIM}>;
      var<workgroup> probs : array<f32, ${W}>;
      var<workgroup> firstShared : i32;
      // c·tanh(x/c), tanh written with exp(−2|x|) ≤ 1 so that no large argument overflows.
      fn softCap(x : f32, c : f32) -> f32 {
        let e = exp(-2.0 * abs(x / c));
        return c * sign(x) * (1.0 - e) / (1.0 + e);
      }
      fn main(index : i32) {
        let tid = i32(localId.x);
        let H = uniforms.heads;
        let G = uniforms.groups;
        let kvH = H / G;
        let cols = state[0] + 1;
        let capacity = uniforms.cacheShape[2];
        let hd = uniforms.cacheShape[3] / 2;
        let pairs = uniforms.outShape[0] * H;
        let bh = min(index / ${W}, pairs - 1); // (b, h): q[b, h·hd ..]
        let b = bh / H;
        let h = bh % H;
        let kvRow = (b * kvH + h / G) * capacity; // cache[b, h / G, 0, :] in rows of 2·hd
        var lo = state[1 + b]; // the row's first visible column
        if (uniforms.window > 0) { lo = max(lo, cols - uniforms.window); }
        if (tid == 0) { firstShared = (lo / ${W}) * ${W}; }
        let firstBlock = workgroupUniformLoad(&firstShared); // the block holding column lo: earlier blocks are wholly masked
        for (var d = tid; d < hd; d = d + ${W}) {
          qs[d] = q[bh * hd + d] * uniforms.scale; // q[b, h·hd + d]
        }
        workgroupBarrier();
        var m = -3.402823e+38;
        var l = 0.0;
        var acc = array<f32, 4>(0.0, 0.0, 0.0, 0.0); // out[b, h·hd + tid + i·${W}]
        for (var j0 = firstBlock; j0 < cols; j0 = j0 + ${W}) {
          let j = j0 + tid;
          var s = -3.402823e+38;
          if (j < cols) {
            var dot = 0.0;
            let kAt = (kvRow + j) * 2 * hd; // cache[b, h / G, j, 0]: k[b, h / G, j, 0]
            for (var d = 0; d < hd; d = d + 1) {
              dot = dot + qs[d] * cache[kAt + d];
            }
            if (uniforms.softcap > 0.0) { dot = softCap(dot, uniforms.softcap); }
            s = select(-1e9, dot, j >= lo); // KVBatch.mask's −1e9 before the row's first visible column
          }
          let mNew = max(m, reduceMax(s));
          let corr = exp(m - mNew);
          probs[tid] = select(0.0, exp(s - mNew), j < cols);
          workgroupBarrier();
          let n = min(${W}, cols - j0);
          var blockSum = 0.0;
          for (var t = 0; t < n; t = t + 1) {
            blockSum = blockSum + probs[t];
          }
          l = l * corr + blockSum;
          for (var i = 0; i < 4; i = i + 1) {
            let d = tid + i * ${W};
            if (d < hd) {
              var a = acc[i] * corr;
              for (var t = 0; t < n; t = t + 1) {
                a = a + probs[t] * cache[(kvRow + j0 + t) * 2 * hd + hd + d]; // cache[b, h / G, j0 + t, hd + d]: v[b, h / G, j0 + t, d]
              }
              acc[i] = a;
            }
          }
          m = mNew;
          workgroupBarrier();
        }
        if (index / ${W} >= pairs) { return; }
        for (var i = 0; i < 4; i = i + 1) {
          let d = tid + i * ${W};
          if (d < hd) { result[bh * hd + d] = acc[i] / l; }
        }
      }
    `;
  }
}

/**
 * Decode attention on the webgpu backend: q [B, H·hd] (one token per row) over the first C (`cols`) columns of the
 * packed cache [B, kvH, capacity, 2·hd], masked as the KV state [at = C − 1, start_0 .. start_{B−1}] (int32, whose
 * values must agree with `cols`: it is checked on the host only through the shapes) and the sliding `window` (null:
 * none) say; returns [B, H·hd]. head_dim at most DECODE_ATTENTION_MAX_HEAD_DIM. softcap: the scores' soft-cap c > 0,
 * or null for none.
 */
export function decodeAttentionGpu(q: tf.Tensor2D, cache: tf.Tensor4D, C: number, state: tf.Tensor1D, heads: number, scale: number,
  softcap: number | null = null, window: number | null = null): tf.Tensor2D {
  const [B, kvH, capacity, width] = cache.shape;
  const hd = width / 2;
  const G = heads / kvH;
  if (!Number.isInteger(G) || q.shape[0] !== B || q.shape[1] !== heads * hd) throw new Error(`decodeAttention: q [${q.shape}] does not fit the cache [${cache.shape}] with ${heads} heads`);
  if (!Number.isInteger(C) || C < 1 || C > capacity) throw new Error(`decodeAttention: ${C} columns of a cache of ${capacity}`);
  if (state.dtype !== 'int32' || state.shape[0] !== 1 + B) throw new Error(`decodeAttention: the KV state [${state.shape}] is not int32 [${1 + B}]`);
  if (window !== null && !(Number.isInteger(window) && window > 0)) throw new Error(`decodeAttention: window ${window} is not a positive integer`);
  if (hd > DECODE_ATTENTION_MAX_HEAD_DIM) throw new Error(`decodeAttention: head_dim ${hd} is over ${DECODE_ATTENTION_MAX_HEAD_DIM}`);
  return runProgram(new DecodeAttentionProgram(B, heads, hd), [q, cache, state],
    [{ type: 'float32', data: [scale] }, { type: 'int32', data: [heads] }, { type: 'int32', data: [G] }, { type: 'float32', data: [softcap ?? 0] },
      { type: 'int32', data: [window ?? 0] }]);
}
