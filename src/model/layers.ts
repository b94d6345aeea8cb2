/**
 * The building blocks shared by the architectures: linear layers with per-row LoRA, norms,
 * activations, rotary embeddings and batched causal attention over a KV cache.
 */
import * as tf from '@tensorflow/tfjs-core';
import { isLaidOut, matmulW, matmulWPlus, type Weight } from '../backend/weights.ts';
import { ATTENTION_MAX_HEAD_DIM, attentionGpu } from '../backend/webgpu/kernels/attention.ts';
import { DECODE_LINEAR_MAX_RANK, DECODE_LINEAR_MAX_ROWS, decodeLinearGpu, type DecodeLinearParts, type GatedActivation } from '../backend/webgpu/kernels/decode-linear.ts';
import { geluNewGpu } from '../backend/webgpu/kernels/gelu-new.ts';
import { LORA_BGMV_MAX_RANK, loraBgmvGpu } from '../backend/webgpu/kernels/lora-bgmv.ts';
import { layerNormGpu } from '../backend/webgpu/kernels/layer-norm.ts';
import { fusedKernels } from '../backend/webgpu/kernels/program.ts';
import { rmsNormGpu } from '../backend/webgpu/kernels/rms-norm.ts';
import { ropeGpu } from '../backend/webgpu/kernels/rope.ts';
import { siluMulGpu } from '../backend/webgpu/kernels/silu-mul.ts';
import { profiler } from '../obs/profile.ts';
import type { Checkpoint } from './checkpoint.ts';
import type { LayerKV, StepContext } from './model.ts';
import type { LinearModule, ModelConfig } from './types.ts';

/**
 * A linear layer y = x·W + b with W stored [in, out]. It computes columns [moduleOffset, moduleOffset + out)
 * of one HF module's output: the whole module for Llama's projections, a third of it for each of GPT-2's
 * fused c_attn (q, k and v get a matmul each, so no split of a fused output is ever needed: tf.split and
 * tf.slice copy element by element on the wasm backend). A LoRA delta for the module lands in those columns.
 */
export interface Linear {
  readonly key: string;
  /** [in, out], in the backend's layout (src/backend/weights.ts). */
  readonly W: Weight;
  readonly b: tf.Tensor1D | null;
  readonly module: LinearModule;
  readonly moduleOffset: number;
}

/**
 * The LoRA-targetable linears of every layer, with the paths PEFT names them by (`${prefix}.${layer}.${name}`) and
 * keys `${layer}.${name}`. `table` lists each layer's linears as [name, in, out]; conv1d: GPT-2's Conv1D layout.
 */
export function layerModules(numLayers: number, prefix: string, table: readonly (readonly [string, number, number])[], conv1d: boolean): LinearModule[] {
  const out: LinearModule[] = [];
  for (let layer = 0; layer < numLayers; layer++) {
    for (const [name, inFeatures, outFeatures] of table) {
      out.push({ path: `${prefix}.${layer}.${name}`, key: `${layer}.${name}`, layer, name: name.split('.').pop()!, inFeatures, outFeatures, conv1d });
    }
  }
  return out;
}

/**
 * Per-step LoRA for the rows of a batch (see src/exec/lora-bank.ts). For a linear with unmerged LoRA:
 * y += ((x·A) ⊙ mask) · B, with A [in, K] the column-concatenation of the step's adapters' Aᵀ (each padded
 * to R columns), B [K, out] the row-concatenation of their s·Bᵀ (this linear's columns), and mask [N, K]
 * selecting, per row, the block of that row's adapter. On webgpu the same delta is one gathered kernel that reads
 * each row's block through `slots` (src/backend/webgpu/kernels/lora-bgmv.ts).
 */
export interface StepLora {
  /** Replacement weights (W + s·Aᵀ·Bᵀ) when one adapter is merged, keyed by Linear.key. */
  readonly merged?: ReadonlyMap<string, Weight>;
  readonly unmerged?: ReadonlyMap<string, UnmergedLora>;
}

export interface UnmergedLora {
  readonly A: Weight;
  readonly B: Weight;
  readonly mask: tf.Tensor2D;
  /** R: columns of A (rows of B) per adapter. */
  readonly rank: number;
  /** int32 [N]: each row's adapter block in A and B, −1 for none; made only for the fused kernels (webgpu). */
  readonly slots?: tf.Tensor1D;
}

/**
 * y = x·W + b + the row's LoRA delta, plus `residual` when given (residual + y: the transformer's skip connection).
 * On webgpu the bias or residual is the fused matmul's addend and the unmerged delta one BGMV kernel.
 */
export function linear(x: tf.Tensor2D, lin: Linear, lora?: StepLora, residual?: tf.Tensor2D): tf.Tensor2D {
  const W = lora?.merged?.get(lin.key) ?? lin.W;
  const u = lora?.unmerged?.get(lin.key);
  if (fusedKernels()) return linearGpu(x, W, lin.b, u, residual);
  let y: tf.Tensor2D = profiler.time('base_matmul', () => matmulW(x, W)); // [N, out]
  if (u) y = profiler.time('lora_delta', () => tf.add(y, matmulW(tf.mul(matmulW(x, u.A), u.mask) as tf.Tensor2D, u.B))); // [N, K] → [N, out]
  const b = lin.b;
  if (b) y = profiler.time('base_matmul', () => tf.add(y, b));
  return residual ? tf.add(residual, y) : y;
}

function linearGpu(x: tf.Tensor2D, W: Weight, b: tf.Tensor1D | null, u: UnmergedLora | undefined, residual?: tf.Tensor2D): tf.Tensor2D {
  const addend = residual && b ? tf.add<tf.Tensor2D>(residual, b) : residual ?? b ?? undefined;
  const decode = decodeParts(x, W, u, addend);
  if (decode) return profiler.time('base_matmul', () => decodeLinearGpu(x, decode.W, decode.parts));
  let y = profiler.time('base_matmul', () => (addend ? matmulWPlus(x, W, addend) : matmulW(x, W))); // [N, out]
  if (u) {
    const { A, B, slots, rank } = u;
    y = profiler.time('lora_delta', () => slots && rank <= LORA_BGMV_MAX_RANK && !isLaidOut(A) && !isLaidOut(B)
      ? loraBgmvGpu(x, A as tf.Tensor2D, B as tf.Tensor2D, y, slots, rank)
      : tf.add(y, matmulW(tf.mul(matmulW(x, A), u.mask) as tf.Tensor2D, B)));
  }
  return y;
}

/**
 * W and what decode-linear.ts folds into one dispatch for a decode step's few rows (x·W + addend + the LoRA delta),
 * or null when the product goes to the tiled matmul (more rows, a laid-out weight, a rank over the kernel's).
 */
function decodeParts(x: tf.Tensor2D, W: Weight, u: UnmergedLora | undefined, addend?: tf.Tensor1D | tf.Tensor2D): { W: tf.Tensor2D; parts: DecodeLinearParts } | null {
  if (x.shape[0] > DECODE_LINEAR_MAX_ROWS || isLaidOut(W)) return null;
  if (!u) return { W: W as tf.Tensor2D, parts: { addend } };
  if (!u.slots || u.rank > DECODE_LINEAR_MAX_RANK || isLaidOut(u.A) || isLaidOut(u.B)) return null;
  return { W: W as tf.Tensor2D, parts: { addend, lora: { A: u.A as tf.Tensor2D, B: u.B as tf.Tensor2D, slots: u.slots, rank: u.rank } } };
}

/**
 * applyRope(linear(x, lin, lora), H, rope): the projection to the H rotated heads of q or k. A decode step on webgpu
 * computes it as one kernel (decode-linear.ts), the rotation applied to each output column as it is computed.
 */
export function rotaryLinear(x: tf.Tensor2D, lin: Linear, lora: StepLora | undefined, H: number, rope: StepRope): tf.Tensor2D {
  if (fusedKernels() && 'cosSin' in rope.tables) {
    const W = lora?.merged?.get(lin.key) ?? lin.W;
    const u = lora?.unmerged?.get(lin.key);
    const decode = u && lin.b ? null : decodeParts(x, W, u, lin.b ?? undefined); // 8 buffers at most: no bias with LoRA
    if (decode) {
      const table = rope.tables.cosSin;
      return profiler.time('base_matmul', () => decodeLinearGpu(x, decode.W, { ...decode.parts, rope: { table, rows: rope.rows } }));
    }
  }
  return applyRope(linear(x, lin, lora), H, rope);
}

/**
 * The gated MLP's activation act(linear(x, gate))·linear(x, up): SiLU (Llama's SwiGLU) or gelu's tanh approximation
 * (Gemma's GeGLU, gelu_pytorch_tanh) by name, or another activation given as a function (Gemma's exact gelu). With a
 * named activation, a decode step on webgpu computes it as one kernel (decode-linear.ts) when neither projection has
 * a bias or an unmerged LoRA delta; otherwise the separate products and the activation's own op(s).
 */
export function gatedActivation(x: tf.Tensor2D, gate: Linear, up: Linear, lora?: StepLora,
  act: GatedActivation | ((g: tf.Tensor2D) => tf.Tensor2D) = 'silu'): tf.Tensor2D {
  if (typeof act === 'string' && fusedKernels() && !gate.b && !up.b && !lora?.unmerged?.has(gate.key) && !lora?.unmerged?.has(up.key)) {
    const Wg = lora?.merged?.get(gate.key) ?? gate.W;
    const Wu = lora?.merged?.get(up.key) ?? up.W;
    if (x.shape[0] <= DECODE_LINEAR_MAX_ROWS && !isLaidOut(Wg) && !isLaidOut(Wu)) {
      return profiler.time('base_matmul', () => decodeLinearGpu(x, Wg as tf.Tensor2D, { up: Wu as tf.Tensor2D, activation: act }));
    }
  }
  if (act === 'silu') return siluMul(linear(x, gate, lora), linear(x, up, lora));
  const f = act === 'gelu_tanh' ? geluNew : act;
  return tf.mul(f(linear(x, gate, lora)), linear(x, up, lora));
}

/**
 * A model constant as a device scalar made once at load (a number argument to a TensorFlow.js op would be a new
 * device tensor at each use) and as a number (a fused WebGPU kernel takes it as a uniform).
 */
export interface Constant {
  readonly value: number;
  readonly scalar: tf.Scalar;
}

/** The constants every layer uses. The caller keeps their scalars with the model's tensors. */
export function layerConstants(normEps: number, attentionScale: number): { eps: Constant; scale: Constant } {
  return { eps: constant(normEps), scale: constant(attentionScale) };
}

/** A Constant of `value` (its scalar is the caller's to keep with the model's tensors). */
export function constant(value: number): Constant {
  return { value, scalar: tf.scalar(value) };
}

const valueOf = (c: number | Constant): number => (typeof c === 'number' ? c : c.value);
const scalarOf = (c: number | Constant): number | tf.Scalar => (typeof c === 'number' ? c : c.scalar);

/** LayerNorm of each row; one fused kernel on webgpu (src/backend/webgpu/kernels/layer-norm.ts). */
export function layerNorm(x: tf.Tensor2D, w: tf.Tensor1D, b: tf.Tensor1D, eps: number | Constant): tf.Tensor2D {
  if (fusedKernels()) return layerNormGpu(x, w, b, valueOf(eps));
  const { mean, variance } = tf.moments(x, -1, true);
  return tf.add(tf.mul(tf.mul(tf.sub(x, mean), tf.rsqrt(tf.add(variance, scalarOf(eps)))), w), b) as tf.Tensor2D;
}

/** RMSNorm of each row; one fused kernel on webgpu (src/backend/webgpu/kernels/rms-norm.ts). */
export function rmsNorm(x: tf.Tensor2D, w: tf.Tensor1D, eps: number | Constant): tf.Tensor2D {
  if (fusedKernels()) return rmsNormGpu(x, w, valueOf(eps));
  const ms = tf.mean(tf.square(x), -1, true); // [N, 1]
  return tf.mul(tf.mul(x, tf.rsqrt(tf.add(ms, scalarOf(eps)))), w);
}

/** GPT-2's gelu_new: the tanh approximation 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))); one kernel on webgpu. */
export function geluNew(x: tf.Tensor2D): tf.Tensor2D {
  if (fusedKernels()) return geluNewGpu(x);
  const inner = tf.mul(tf.add(x, tf.mul(tf.pow(x, 3), 0.044715)), Math.sqrt(2 / Math.PI));
  return tf.mul(tf.mul(x, 0.5), tf.add(tf.tanh(inner), 1));
}

/** Exact gelu: 0.5·x·(1 + erf(x/√2)). */
export function gelu(x: tf.Tensor2D): tf.Tensor2D {
  return tf.mul(tf.mul(x, 0.5), tf.add(tf.erf(tf.mul(x, Math.SQRT1_2)), 1));
}

export function silu(x: tf.Tensor2D): tf.Tensor2D {
  return tf.mul(x, tf.sigmoid(x));
}

/** The gated MLP's activation silu(gate)·up; one kernel on webgpu (src/backend/webgpu/kernels/silu-mul.ts). */
export function siluMul(gate: tf.Tensor2D, up: tf.Tensor2D): tf.Tensor2D {
  if (fusedKernels()) return siluMulGpu(gate, up);
  return tf.mul(silu(gate), up);
}

/**
 * Rotary tables [sets·maxPositions, headDim] (each half repeated, as HF's emb = cat(freqs, freqs)), computed in
 * float64 on the host: row s·maxPositions + p holds scale·cos(p·invFreqs[s][i]) (and sin) for i < headDim/2.
 * `scale` is the variant's attention factor (transformers multiplies cos and sin by it).
 */
export function ropeTables(maxPositions: number, invFreqs: readonly (readonly number[])[], scale: number): { cos: tf.Tensor2D; sin: tf.Tensor2D } {
  const { cos, sin, rows, headDim } = ropeTableData(maxPositions, invFreqs, scale);
  return { cos: tf.tensor2d(cos, [rows, headDim]), sin: tf.tensor2d(sin, [rows, headDim]) };
}

/** The same tables as one [sets·maxPositions, 2·headDim] tensor, each row cos | sin: what the WebGPU kernels read. */
export function ropeGpuTable(maxPositions: number, invFreqs: readonly (readonly number[])[], scale: number): tf.Tensor2D {
  const { cos, sin, rows, headDim } = ropeTableData(maxPositions, invFreqs, scale);
  const both = new Float32Array(2 * cos.length);
  for (let r = 0; r < rows; r++) {
    both.set(cos.subarray(r * headDim, (r + 1) * headDim), 2 * r * headDim);
    both.set(sin.subarray(r * headDim, (r + 1) * headDim), (2 * r + 1) * headDim);
  }
  return tf.tensor2d(both, [rows, 2 * headDim]);
}

/** The rotary tables in the layout the backend reads: cos and sin, or on webgpu one cos | sin table. */
export type RopeTables = { readonly cos: tf.Tensor2D; readonly sin: tf.Tensor2D } | { readonly cosSin: tf.Tensor2D };

export function backendRopeTables(maxPositions: number, invFreqs: readonly (readonly number[])[], scale: number): RopeTables {
  return fusedKernels() ? { cosSin: ropeGpuTable(maxPositions, invFreqs, scale) } : ropeTables(maxPositions, invFreqs, scale);
}

function ropeTableData(maxPositions: number, invFreqs: readonly (readonly number[])[], scale: number) {
  const half = invFreqs[0]!.length;
  const headDim = 2 * half;
  const rows = invFreqs.length * maxPositions;
  const cos = new Float32Array(rows * headDim);
  const sin = new Float32Array(rows * headDim);
  invFreqs.forEach((invFreq, set) => {
    for (let p = 0; p < maxPositions; p++) {
      const row = (set * maxPositions + p) * headDim;
      for (let i = 0; i < half; i++) {
        const angle = p * invFreq[i]!;
        cos[row + i] = cos[row + i + half] = scale * Math.cos(angle);
        sin[row + i] = sin[row + i + half] = scale * Math.sin(angle);
      }
    }
  });
  return { cos, sin, rows, headDim };
}

/**
 * The table rows of a step's tokens when the table holds a second set (longrope's long factors) from row
 * `offset` on: a row of the batch reads the second set for all its T tokens when its largest position p has
 * p + 1 > `after`. positions: [B·T], left-padded rows (pads are position 0). Host values (the step uploads them).
 */
export function ropeRows(positions: Int32Array, B: number, T: number, second: { readonly after: number; readonly offset: number }): Int32Array {
  const rows = new Int32Array(B * T);
  for (let b = 0; b < B; b++) {
    const row = positions.subarray(b * T, (b + 1) * T);
    const last = row.reduce((m, p) => Math.max(m, p), 0); // the row's largest position (pads are 0)
    const shift = last + 1 > second.after ? second.offset : 0;
    row.forEach((p, t) => (rows[b * T + t] = p + shift));
  }
  return rows;
}

/**
 * rotate_half as a matrix: x·R = [−x2, x1] for x = [x1, x2] (HF's convention: first half / second half of
 * each head, not interleaved pairs). A matmul instead of split + concat, which copy element-wise on wasm;
 * exact, since each output is one input times ±1 plus zeros.
 */
export function rotateHalfMatrix(headDim: number): tf.Tensor2D {
  const half = headDim / 2;
  const R = new Float32Array(headDim * headDim);
  for (let i = 0; i < half; i++) {
    R[(i + half) * headDim + i] = -1; // out[i] = −x[i + half]
    R[i * headDim + i + half] = 1; // out[i + half] = x[i]
  }
  return tf.tensor2d(R, [headDim, headDim]);
}

/** The rotary embedding of a step's N tokens. */
export interface StepRope {
  readonly tables: RopeTables;
  /** The table row of each token, [N]: its position, or its row in longrope's second set (ropeRows). */
  readonly rows: tf.Tensor1D;
  /** rotateHalfMatrix(headDim). */
  readonly R: tf.Tensor2D;
  /** The cos and sin rows of the step's tokens, [N, 1, headDim] each, gathered once per step (separate tables only). */
  gathered(): { cos: tf.Tensor3D; sin: tf.Tensor3D };
}

/**
 * x' = x·cos + rotate_half(x)·sin for each of the H heads of x [N, H·headDim]; [N, H·headDim]. One kernel on
 * webgpu (src/backend/webgpu/kernels/rope.ts), which reads the table directly.
 */
export function applyRope(x: tf.Tensor2D, H: number, r: StepRope): tf.Tensor2D {
  if ('cosSin' in r.tables) return ropeGpu(x, r.tables.cosSin, r.rows);
  const [N] = x.shape;
  const D = r.R.shape[0];
  const { cos, sin } = r.gathered();
  const x3 = tf.reshape(x, [N, H, D]);
  const rotated = tf.reshape(tf.matMul(tf.reshape(x3, [N * H, D]), r.R), [N, H, D]);
  return tf.reshape(tf.add(tf.mul(x3, cos), tf.mul(rotated, sin)), [N, H * D]); // [N, H, D] → [N, H·D]
}

/**
 * A rotary-family config's rotary embedding, made at load: the tables (both longrope sets; on webgpu the one
 * cos | sin table the kernels read) and the rotate-half matrix, kept with the model's tensors. `step` gives the
 * StepRope of a step's positions (for applyRope / rotaryLinear); its table rows are gathered once for all layers.
 */
export interface Rotary {
  readonly tensors: readonly tf.Tensor[];
  step(s: StepContext): StepRope;
}

export function rotary(c: ModelConfig): Rotary {
  const spec = c.rope!;
  const hd = c.headDim;
  const tables = backendRopeTables(c.maxPositions, spec.long ? [spec.invFreq, spec.long.invFreq] : [spec.invFreq], spec.attentionFactor);
  const R = rotateHalfMatrix(hd);
  return {
    tensors: [...('cosSin' in tables ? [tables.cosSin] : [tables.cos, tables.sin]), R],
    step(s) {
      const N = s.B * s.T;
      const rows = s.ropeRows ?? s.positions;
      return {
        tables, R, rows,
        gathered: () => {
          if ('cosSin' in tables) throw new Error('rope: the combined table is read by the webgpu kernels only');
          return {
            cos: s.cache('rope.cos', () => tf.reshape(tf.gather(tables.cos, rows), [N, 1, hd]) as tf.Tensor3D),
            sin: s.cache('rope.sin', () => tf.reshape(tf.gather(tables.sin, rows), [N, 1, hd]) as tf.Tensor3D),
          };
        },
      };
    },
  };
}

/** Shapes of one forward step: B rows, T new tokens per row (left-padded), N = B·T. */
export interface StepShape {
  readonly B: number;
  readonly T: number;
  /** The layer's additive mask [B, 1, T·G, C+T] (KVCache.mask), G = numHeads / numKvHeads, made at its first use. */
  mask(): tf.Tensor4D;
  /** The layer's sliding window (null: none), which the webgpu attention kernel applies itself. */
  readonly window: number | null;
}

/**
 * Causal attention of this step's queries over the cache (which already includes this step's keys).
 * q: [N, nH·hd]; cache: the layer's keys and values [B, kvH, C+T, hd], or its packed cache (webgpu; LayerKV), which the
 * attention kernel reads in place (unpacked, unpackKV, only for a head_dim over the kernel's). Grouped-query attention without copying K/V:
 * the G query heads that share a KV head become G·T query rows of that head.
 * s.mask() is the layer's own mask (causal, banded by the layer's sliding window if it has one).
 * softcap (Gemma 2's attn_logit_softcapping c): the scaled scores become c·tanh(scores/c) before the mask is added,
 * as modeling_gemma2.py's eager_attention_forward. On webgpu a step's attention, decode or prefill, is one kernel over
 * the cache (src/backend/webgpu/kernels/attention.ts), which makes the same mask from the KV state and the window and
 * applies the same soft-cap.
 */
export function attention(q: tf.Tensor2D, cache: LayerKV, s: StepShape, nH: number, kvH: number, hd: number,
  scale: number | Constant = 1 / Math.sqrt(hd), softcap: Constant | null = null): tf.Tensor2D {
  if ('packed' in cache && hd <= ATTENTION_MAX_HEAD_DIM) {
    return profiler.time('attention', () => attentionGpu(q, cache.packed, cache.cols, cache.state, nH, valueOf(scale), softcap?.value ?? null, s.window));
  }
  return profiler.time('attention', () => {
    const { k, v } = 'packed' in cache ? unpackKV(cache.packed, cache.cols) : cache;
    return attend(q, k, v, s, nH, kvH, hd, scalarOf(scale), softcap?.scalar ?? null);
  });
}

/** The keys and values [B, kvH, cols, hd] of the first `cols` columns of a packed cache [B, kvH, capacity, 2·hd] (copies). */
export function unpackKV(packed: tf.Tensor4D, cols: number): { k: tf.Tensor4D; v: tf.Tensor4D } {
  const hd = packed.shape[3] / 2;
  return { k: tf.slice(packed, [0, 0, 0, 0], [-1, -1, cols, hd]), v: tf.slice(packed, [0, 0, 0, hd], [-1, -1, cols, hd]) };
}

/** scale: the score factor (1/√hd), as a number or the model's kept scalar. */
function attend(q: tf.Tensor2D, k: tf.Tensor4D, v: tf.Tensor4D, s: StepShape, nH: number, kvH: number, hd: number,
  scale: number | tf.Scalar, softcap: tf.Scalar | null): tf.Tensor2D {
  const { B, T } = s;
  const G = nH / kvH;
  const q4 = tf.reshape(tf.transpose(tf.reshape(q, [B, T, kvH, G * hd]), [0, 2, 1, 3]), [B, kvH, T * G, hd]); // rows (t, g)
  let raw: tf.Tensor4D = tf.matMul(tf.mul(q4, scale), k, false, true); // [B, kvH, T·G, C+T]
  if (softcap) raw = softCap(raw, softcap);
  const scores = tf.add(raw, s.mask()); // [B, kvH, T·G, C+T]
  const o = tf.matMul(tf.softmax(scores), v); // [B, kvH, T·G, hd]
  return tf.reshape(tf.transpose(tf.reshape(o, [B, kvH, T, G * hd]), [0, 2, 1, 3]), [B * T, nH * hd]);
}

/** c·tanh(x/c): Gemma 2's soft-capping of attention scores and logits. */
export function softCap<T extends tf.Tensor>(x: T, c: tf.Scalar): T {
  return tf.mul(tf.tanh(tf.div(x, c)), c);
}

/** A loader's tensors: every tensor it keeps for the model (disposed with it), and a reader by checkpoint name. */
export interface WeightReader {
  readonly tensors: (tf.Tensor | Weight)[];
  /** Adds `t` to the model's tensors and returns it. */
  keep<T extends tf.Tensor | Weight>(t: T): T;
  /** The checkpoint tensor `prefix + name`, shape checked, as a new (not yet kept) tensor. */
  read(name: string, shape: number[]): tf.Tensor;
}

export function weightReader(ckpt: Checkpoint, prefix = ''): WeightReader {
  const tensors: (tf.Tensor | Weight)[] = [];
  return {
    tensors,
    keep: (t) => {
      tensors.push(t);
      return t;
    },
    read: (name, shape) => tf.tensor(ckpt.read(prefix + name, shape).data, shape),
  };
}
