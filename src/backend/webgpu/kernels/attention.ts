import * as tf from '@tensorflow/tfjs-core';
import { ROW_WORKGROUP, WORKGROUP_REDUCE, runProgram, type WebGPUProgram } from './program.ts';

/** The largest head_dim the kernel takes (its shared copy of q and its per-invocation accumulators). */
export const ATTENTION_MAX_HEAD_DIM = 4 * ROW_WORKGROUP;

/**
 * A step's attention over the packed KV cache in place, for T new tokens per row (a decode step, T = 1, or a prompt
 * chunk), in one dispatch: one workgroup per (row, new token, query head) walks the columns its query may see in blocks
 * of the workgroup's width with an online softmax (running max and sum, rescaling the weighted sum of V when the max
 * grows). Grouped-query: query head h reads KV head h / G. The cache is [B, kvH, capacity, 2·hd] (src/exec/kv.ts):
 * column j holds a key then its value, `k = cache[:, :, :C, :hd]`, `v = cache[:, :, :C, hd:]`, and this step's T
 * columns were written (kv-append.ts) before; the columns from C on are spare and never read.
 * Its meaning, as the unfused ops (layers.ts's attend()): with q4 the queries [B, kvH, T·G, hd] (rows (t, g)),
 * `scores = tf.add(tf.matMul(tf.mul(q4, scale), k, false, true), mask)`, `tf.matMul(tf.softmax(scores), v)` back in
 * q's layout; with a soft-cap c (Gemma 2) the scaled scores become c·tanh(scores/c) before the mask is added. The mask
 * (KVBatch.mask) is computed in the kernel from the KV state, int32 [1 + B] = [at, first_0 .. first_{B−1}]
 * (src/exec/kv.ts): the step's tokens are columns at .. at + T − 1, and row b's token t (column i = at + t) sees the
 * columns j with first_b ≤ j ≤ i, or with a sliding window W (uniform `window`, 0: none) also j > i − W. A token that
 * sees no column (a left pad of a first forward, before its row's first column) gets zeros, where the unfused ops'
 * softmax over a row of −1e9 averages every value; the pad's output is never read (its logits are not asked for, and
 * its key and value are masked for every later query). q: [B·T, H·hd], rows (b, t); H = kvH·G. Nothing that changes
 * from step to step is a uniform (at is read from the state buffer), so a recorded step can replay the dispatch as it is.
 */
export class AttentionProgram implements WebGPUProgram {
  readonly variableNames = ['q', 'cache', 'state'];
  readonly outputShape: number[];
  readonly shaderKey = 'loraServeAttention';
  readonly dispatchLayout = { x: [0, 1] };
  readonly dispatch: [number, number, number];
  readonly workgroupSize: [number, number, number] = [ROW_WORKGROUP, 1, 1];
  readonly uniforms = 'scale : f32, heads : i32, groups : i32, softcap : f32, window : i32, tokens : i32,';

  constructor(queries: number, heads: number, headDim: number) {
    this.outputShape = [queries, heads * headDim];
    this.dispatch = [queries * heads, 1, 1];
  }

  getUserCode(): string {
    const W = ROW_WORKGROUP;
    return `
      ${WORKGROUP_REDUCE}
      var<workgroup> qs : array<f32, ${ATTENTION_MAX_HEAD_DIM}>;
      var<workgroup> probs : array<f32, ${W}>;
      var<workgroup> firstShared : i32;
      var<workgroup> colsShared : i32;
      // c·tanh(x/c), tanh written with exp(−2|x|) ≤ 1 so that no large argument overflows.
      fn softCap(x : f32, c : f32) -> f32 {
        let e = exp(-2.0 * abs(x / c));
        return c * sign(x) * (1.0 - e) / (1.0 + e);
      }
      fn main(index : i32) {
        let tid = i32(localId.x);
        let H = uniforms.heads;
        let G = uniforms.groups;
        let T = uniforms.tokens;
        let kvH = H / G;
        let capacity = uniforms.cacheShape[2];
        let hd = uniforms.cacheShape[3] / 2;
        let pairs = uniforms.outShape[0] * H;
        let rh = min(index / ${W}, pairs - 1); // (r, h), r = b·T + t: q[r, h·hd ..]
        let r = rh / H;
        let h = rh % H;
        let b = r / T;
        let last = state[0] + r % T; // the query's column: it sees no later one
        let kvRow = (b * kvH + h / G) * capacity; // cache[b, h / G, 0, :] in rows of 2·hd
        var lo = state[1 + b]; // the row's first visible column
        if (uniforms.window > 0) { lo = max(lo, last + 1 - uniforms.window); }
        if (tid == 0) {
          firstShared = (lo / ${W}) * ${W};
          colsShared = last + 1;
        }
        let firstBlock = workgroupUniformLoad(&firstShared); // the block holding column lo: earlier blocks are wholly masked
        let cols = workgroupUniformLoad(&colsShared); // the columns up to the query's, the same for the whole workgroup
        for (var d = tid; d < hd; d = d + ${W}) {
          qs[d] = q[rh * hd + d] * uniforms.scale; // q[r, h·hd + d]
        }
        workgroupBarrier();
        var m = -3.402823e+38;
        var l = 0.0;
        var acc = array<f32, 4>(0.0, 0.0, 0.0, 0.0); // out[r, h·hd + tid + i·${W}]
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
          if (d < hd) { result[rh * hd + d] = select(0.0, acc[i] / l, lo < cols); }
        }
      }
    `;
  }
}

/**
 * Attention on the webgpu backend of q [B·T, H·hd] (T new tokens per row, rows (b, t)) over the first C (`cols`)
 * columns of the packed cache [B, kvH, capacity, 2·hd], the step's own T columns among them (the last T), masked as the
 * KV state [at = C − T, first_0 .. first_{B−1}] (int32, whose values must agree with `cols`: it is checked on the host
 * only through the shapes) and the sliding `window` (null: none) say; returns [B·T, H·hd]. head_dim at most
 * ATTENTION_MAX_HEAD_DIM. softcap: the scores' soft-cap c > 0, or null for none.
 */
export function attentionGpu(q: tf.Tensor2D, cache: tf.Tensor4D, C: number, state: tf.Tensor1D, heads: number, scale: number,
  softcap: number | null = null, window: number | null = null): tf.Tensor2D {
  const [B, kvH, capacity, width] = cache.shape;
  const hd = width / 2;
  const G = heads / kvH;
  const T = q.shape[0] / B;
  if (!Number.isInteger(G) || !Number.isInteger(T) || T < 1 || q.shape[1] !== heads * hd) {
    throw new Error(`attention: q [${q.shape}] does not fit the cache [${cache.shape}] with ${heads} heads`);
  }
  if (!Number.isInteger(C) || C < T || C > capacity) throw new Error(`attention: ${C} columns (${T} new) of a cache of ${capacity}`);
  if (state.dtype !== 'int32' || state.shape[0] !== 1 + B) throw new Error(`attention: the KV state [${state.shape}] is not int32 [${1 + B}]`);
  if (window !== null && !(Number.isInteger(window) && window > 0)) throw new Error(`attention: window ${window} is not a positive integer`);
  if (hd > ATTENTION_MAX_HEAD_DIM) throw new Error(`attention: head_dim ${hd} is over ${ATTENTION_MAX_HEAD_DIM}`);
  return runProgram(new AttentionProgram(B * T, heads, hd), [q, cache, state],
    [{ type: 'float32', data: [scale] }, { type: 'int32', data: [heads] }, { type: 'int32', data: [G] }, { type: 'float32', data: [softcap ?? 0] },
      { type: 'int32', data: [window ?? 0] }, { type: 'int32', data: [T] }]);
}
