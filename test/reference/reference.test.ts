/**
 * Sanity checks of the slow reference itself (test/reference/forward.ts, lora.ts) on tiny
 * hand-made weights. Weights are small dyadic rationals (k/32), so a merged LoRA weight is exact
 * in float32 and "LoRA as a delta" vs "LoRA merged" can be compared to float64 rounding.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  argmax,
  geluNew,
  getterFromMap,
  logSoftmax,
  referenceForward,
  referenceGreedy,
  ropeRotate,
  silu,
  type RefTensor,
} from './forward.ts';
import { refLoraDelta, refLoraFromPeft, refMergedWeight, refPatternKey, type RefLora } from './lora.ts';

// ---------------------------------------------------------------------------------------------
// Tiny checkpoints

/** Deterministic PRNG (mulberry32). */
function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** A tensor of values k/32, k in [-16, 16]. */
function randTensor(shape: number[], next: () => number): RefTensor {
  const n = shape.reduce((a, b) => a * b, 1);
  const data = new Float32Array(n);
  for (let i = 0; i < n; i++) data[i] = (Math.floor(next() * 33) - 16) / 32;
  return { shape, data };
}

function constTensor(shape: number[], value: number): RefTensor {
  return { shape, data: new Float32Array(shape.reduce((a, b) => a * b, 1)).fill(value) };
}

interface Tiny {
  config: Record<string, any>;
  tensors: Map<string, RefTensor>;
}

function tinyGpt2(opts: { prefix?: boolean; seed?: number; nLayer?: number } = {}): Tiny {
  const { prefix = true, seed = 1, nLayer = 2 } = opts;
  const d = 8, nHead = 2, vocab = 11, nPos = 16, inner = 4 * d;
  const next = rng(seed);
  const p = prefix ? 'transformer.' : '';
  const tensors = new Map<string, RefTensor>();
  tensors.set(`${p}wte.weight`, randTensor([vocab, d], next));
  tensors.set(`${p}wpe.weight`, randTensor([nPos, d], next));
  for (let l = 0; l < nLayer; l++) {
    const n = `${p}h.${l}.`;
    tensors.set(`${n}ln_1.weight`, randTensor([d], next));
    tensors.set(`${n}ln_1.bias`, randTensor([d], next));
    tensors.set(`${n}attn.c_attn.weight`, randTensor([d, 3 * d], next));
    tensors.set(`${n}attn.c_attn.bias`, randTensor([3 * d], next));
    tensors.set(`${n}attn.c_proj.weight`, randTensor([d, d], next));
    tensors.set(`${n}attn.c_proj.bias`, randTensor([d], next));
    tensors.set(`${n}ln_2.weight`, randTensor([d], next));
    tensors.set(`${n}ln_2.bias`, randTensor([d], next));
    tensors.set(`${n}mlp.c_fc.weight`, randTensor([d, inner], next));
    tensors.set(`${n}mlp.c_fc.bias`, randTensor([inner], next));
    tensors.set(`${n}mlp.c_proj.weight`, randTensor([inner, d], next));
    tensors.set(`${n}mlp.c_proj.bias`, randTensor([d], next));
  }
  tensors.set(`${p}ln_f.weight`, randTensor([d], next));
  tensors.set(`${p}ln_f.bias`, randTensor([d], next));
  const config = {
    model_type: 'gpt2', n_embd: d, n_layer: nLayer, n_head: nHead, n_positions: nPos, n_inner: null,
    vocab_size: vocab, layer_norm_epsilon: 1e-5, activation_function: 'gelu_new',
  };
  return { config, tensors };
}

function tinyLlama(
  opts: { nHead?: number; nKv?: number; headDim?: number; seed?: number; nLayer?: number; tie?: boolean; lmHead?: boolean } = {},
): Tiny {
  const { nHead = 2, nKv = 2, headDim, seed = 2, nLayer = 2, tie = false, lmHead = true } = opts;
  const d = 8, vocab = 13, inner = 12;
  const hd = headDim ?? d / nHead;
  const next = rng(seed);
  const tensors = new Map<string, RefTensor>();
  tensors.set('model.embed_tokens.weight', randTensor([vocab, d], next));
  for (let l = 0; l < nLayer; l++) {
    const n = `model.layers.${l}.`;
    tensors.set(`${n}input_layernorm.weight`, randTensor([d], next));
    tensors.set(`${n}self_attn.q_proj.weight`, randTensor([nHead * hd, d], next));
    tensors.set(`${n}self_attn.k_proj.weight`, randTensor([nKv * hd, d], next));
    tensors.set(`${n}self_attn.v_proj.weight`, randTensor([nKv * hd, d], next));
    tensors.set(`${n}self_attn.o_proj.weight`, randTensor([d, nHead * hd], next));
    tensors.set(`${n}post_attention_layernorm.weight`, randTensor([d], next));
    tensors.set(`${n}mlp.gate_proj.weight`, randTensor([inner, d], next));
    tensors.set(`${n}mlp.up_proj.weight`, randTensor([inner, d], next));
    tensors.set(`${n}mlp.down_proj.weight`, randTensor([d, inner], next));
  }
  tensors.set('model.norm.weight', randTensor([d], next));
  if (lmHead) tensors.set('lm_head.weight', randTensor([vocab, d], next));
  const config: Record<string, any> = {
    model_type: 'llama', hidden_size: d, num_hidden_layers: nLayer, num_attention_heads: nHead,
    num_key_value_heads: nKv, intermediate_size: inner, vocab_size: vocab, rms_norm_eps: 1e-6,
    rope_theta: 10000, rope_scaling: null, hidden_act: 'silu', tie_word_embeddings: tie,
  };
  if (headDim !== undefined) config.head_dim = headDim;
  return { config, tensors };
}

function forward(m: Tiny, tokens: number[], lora?: ReadonlyMap<string, RefLora>): Float64Array[] {
  return referenceForward(m.config, getterFromMap(m.tensors), tokens, lora);
}

function assertClose(actual: readonly Float64Array[], expected: readonly (Float64Array | number[])[], tol: number): void {
  assert.equal(actual.length, expected.length);
  for (let t = 0; t < actual.length; t++) {
    assert.equal(actual[t]!.length, expected[t]!.length);
    for (let i = 0; i < actual[t]!.length; i++) {
      const diff = Math.abs(actual[t]![i]! - expected[t]![i]!);
      assert.ok(diff <= tol, `position ${t}, index ${i}: ${actual[t]![i]} vs ${expected[t]![i]} (diff ${diff})`);
    }
  }
}

function maxAbsDiff(a: readonly Float64Array[], b: readonly Float64Array[]): number {
  let m = 0;
  for (let t = 0; t < a.length; t++) for (let i = 0; i < a[t]!.length; i++) m = Math.max(m, Math.abs(a[t]![i]! - b[t]![i]!));
  return m;
}

// ---------------------------------------------------------------------------------------------
// A second derivation in matrix form: rows are positions, weights as matrices, an explicit
// causal mask and explicit rotation matrices. Independent of the loops in forward.ts.

type Mat = number[][];

function toMat(t: RefTensor): Mat {
  const [rows, cols] = t.shape as [number, number];
  return Array.from({ length: rows }, (_, r) => Array.from(t.data.subarray(r * cols, (r + 1) * cols)));
}
const transpose = (A: Mat): Mat => A[0]!.map((_, j) => A.map((row) => row[j]!));
const matmul = (A: Mat, B: Mat): Mat => A.map((row) => B[0]!.map((_, j) => row.reduce((s, a, k) => s + a * B[k]![j]!, 0)));
const addRows = (A: Mat, B: Mat): Mat => A.map((row, i) => row.map((a, j) => a + B[i]![j]!));
const addBias = (A: Mat, b: RefTensor): Mat => A.map((row) => row.map((a, j) => a + b.data[j]!));
const cols = (A: Mat, from: number, to: number): Mat => A.map((row) => row.slice(from, to));
const concatCols = (parts: Mat[]): Mat => parts[0]!.map((_, i) => parts.flatMap((P) => P[i]!));
const vec = (t: RefTensor): number[] => Array.from(t.data);

/** softmax(Q·Kᵀ/sqrt(hd) + M)·V with M[t][s] = −∞ for s > t. */
function maskedAttention(Q: Mat, K: Mat, V: Mat): Mat {
  const hd = Q[0]!.length;
  const S = matmul(Q, transpose(K)).map((row, t) => row.map((x, s) => (s > t ? -Infinity : x / Math.sqrt(hd))));
  const P = S.map((row) => {
    const max = Math.max(...row);
    const e = row.map((x) => Math.exp(x - max));
    const z = e.reduce((a, b) => a + b, 0);
    return e.map((x) => x / z);
  });
  return matmul(P, V);
}

/** The rotation matrix R(p) [hd, hd] of HF RoPE: 2×2 rotations of the pairs (i, i + hd/2). */
function ropeMatrix(hd: number, p: number, theta: number): Mat {
  const R: Mat = Array.from({ length: hd }, () => new Array<number>(hd).fill(0));
  for (let i = 0; i < hd / 2; i++) {
    const a = p / Math.pow(theta, (2 * i) / hd);
    R[i]![i] = Math.cos(a);
    R[i]![i + hd / 2] = -Math.sin(a);
    R[i + hd / 2]![i] = Math.sin(a);
    R[i + hd / 2]![i + hd / 2] = Math.cos(a);
  }
  return R;
}

function llamaMatrixForm(m: Tiny, tokens: number[]): Mat {
  const c = m.config;
  const W = (name: string): Mat => toMat(m.tensors.get(name)!);
  const nH: number = c.num_attention_heads, nKv: number = c.num_key_value_heads;
  const hd: number = c.head_dim ?? c.hidden_size / nH;
  const rms = (X: Mat, g: RefTensor): Mat =>
    X.map((row) => {
      const r = Math.sqrt(row.reduce((s, x) => s + x * x, 0) / row.length + c.rms_norm_eps);
      return row.map((x, j) => (x / r) * g.data[j]!);
    });
  const E = W('model.embed_tokens.weight');
  let X: Mat = tokens.map((tok) => E[tok]!.slice());
  for (let l = 0; l < c.num_hidden_layers; l++) {
    const n = `model.layers.${l}.`;
    const H = rms(X, m.tensors.get(`${n}input_layernorm.weight`)!);
    const Q = matmul(H, transpose(W(`${n}self_attn.q_proj.weight`)));
    const K = matmul(H, transpose(W(`${n}self_attn.k_proj.weight`)));
    const V = matmul(H, transpose(W(`${n}self_attn.v_proj.weight`)));
    // rotate row t of each head block by R(t): row' = (R(t)·rowᵀ)ᵀ = row·R(t)ᵀ
    const rope = (A: Mat): Mat => A.map((row, t) => matmul([row], transpose(ropeMatrix(hd, t, c.rope_theta)))[0]!);
    const heads: Mat[] = [];
    for (let h = 0; h < nH; h++) {
      const g = Math.floor((h * nKv) / nH);
      heads.push(maskedAttention(rope(cols(Q, h * hd, (h + 1) * hd)), rope(cols(K, g * hd, (g + 1) * hd)), cols(V, g * hd, (g + 1) * hd)));
    }
    X = addRows(X, matmul(concatCols(heads), transpose(W(`${n}self_attn.o_proj.weight`))));
    const H2 = rms(X, m.tensors.get(`${n}post_attention_layernorm.weight`)!);
    const G = matmul(H2, transpose(W(`${n}mlp.gate_proj.weight`)));
    const U = matmul(H2, transpose(W(`${n}mlp.up_proj.weight`)));
    const A = G.map((row, i) => row.map((g, j) => (g / (1 + Math.exp(-g))) * U[i]![j]!));
    X = addRows(X, matmul(A, transpose(W(`${n}mlp.down_proj.weight`))));
  }
  const out = c.tie_word_embeddings || !m.tensors.has('lm_head.weight') ? E : W('lm_head.weight');
  return matmul(rms(X, m.tensors.get('model.norm.weight')!), transpose(out));
}

function gpt2MatrixForm(m: Tiny, tokens: number[]): Mat {
  const c = m.config;
  const t = (name: string): RefTensor => m.tensors.get(`transformer.${name}`)!;
  const d: number = c.n_embd, nH: number = c.n_head, hd = d / nH;
  const ln = (X: Mat, g: RefTensor, b: RefTensor): Mat =>
    X.map((row) => {
      const mean = row.reduce((s, x) => s + x, 0) / d;
      const variance = row.reduce((s, x) => s + (x - mean) ** 2, 0) / d;
      return row.map((x, j) => ((x - mean) / Math.sqrt(variance + c.layer_norm_epsilon)) * g.data[j]! + b.data[j]!);
    });
  const wte = toMat(t('wte.weight'));
  const wpe = toMat(t('wpe.weight'));
  let X: Mat = tokens.map((tok, p) => wte[tok]!.map((x, j) => x + wpe[p]![j]!));
  for (let l = 0; l < c.n_layer; l++) {
    const n = `h.${l}.`;
    // Conv1D: weights are already [in, out], so y = X·W + b
    const QKV = addBias(matmul(ln(X, t(`${n}ln_1.weight`), t(`${n}ln_1.bias`)), toMat(t(`${n}attn.c_attn.weight`))), t(`${n}attn.c_attn.bias`));
    const heads: Mat[] = [];
    for (let h = 0; h < nH; h++) {
      heads.push(maskedAttention(cols(QKV, h * hd, (h + 1) * hd), cols(QKV, d + h * hd, d + (h + 1) * hd), cols(QKV, 2 * d + h * hd, 2 * d + (h + 1) * hd)));
    }
    X = addRows(X, addBias(matmul(concatCols(heads), toMat(t(`${n}attn.c_proj.weight`))), t(`${n}attn.c_proj.bias`)));
    const F = addBias(matmul(ln(X, t(`${n}ln_2.weight`), t(`${n}ln_2.bias`)), toMat(t(`${n}mlp.c_fc.weight`))), t(`${n}mlp.c_fc.bias`));
    const G = F.map((row) => row.map((x) => 0.5 * x * (1 + Math.tanh(Math.sqrt(2 / Math.PI) * (x + 0.044715 * x ** 3)))));
    X = addRows(X, addBias(matmul(G, toMat(t(`${n}mlp.c_proj.weight`))), t(`${n}mlp.c_proj.bias`)));
  }
  return matmul(ln(X, t('ln_f.weight'), t('ln_f.bias')), transpose(wte));
}

// ---------------------------------------------------------------------------------------------
// Elementary functions

test('gelu_new, silu and logSoftmax have their textbook values', () => {
  assert.ok(Math.abs(geluNew(1) - 0.8411919906082768) < 1e-15);
  assert.ok(Math.abs(geluNew(-1) - -0.15880800939172324) < 1e-15);
  assert.equal(geluNew(0), 0);
  assert.ok(Math.abs(silu(1) - 0.7310585786300049) < 1e-15);

  const ls = logSoftmax(new Float64Array([1, 2, 3]));
  assert.ok(Math.abs(ls.reduce((s, x) => s + Math.exp(x), 0) - 1) < 1e-15);
  assert.ok(Math.abs(ls[2]! - (3 - Math.log(Math.exp(1) + Math.exp(2) + Math.exp(3)))) < 1e-15);
  const shifted = logSoftmax(new Float64Array([101, 102, 103]));
  for (let i = 0; i < 3; i++) assert.ok(Math.abs(shifted[i]! - ls[i]!) < 1e-13);
  const huge = logSoftmax(new Float64Array([1000, 0]));
  assert.equal(huge[0], 0);
  assert.equal(huge[1], -1000);
  assert.equal(argmax(new Float64Array([1, 3, 3, 2])), 1); // first index on ties, as torch.argmax
});

// ---------------------------------------------------------------------------------------------
// Whole-model checks

test('GPT-2 loop forward equals the matrix-form derivation', () => {
  const m = tinyGpt2();
  const tokens = [3, 1, 4, 1, 5, 9];
  assertClose(forward(m, tokens), gpt2MatrixForm(m, tokens), 1e-12);
});

test('Llama loop forward equals the matrix-form derivation (GQA, explicit head_dim, RoPE)', () => {
  for (const opts of [{ nKv: 2 }, { nKv: 1 }, { nHead: 4, nKv: 2 }, { nKv: 1, headDim: 6 }, { nKv: 2, tie: true, lmHead: false }]) {
    const m = tinyLlama(opts);
    const tokens = [3, 1, 4, 1, 5, 9, 2, 6];
    assertClose(forward(m, tokens), llamaMatrixForm(m, tokens), 1e-12);
  }
});

test('causal: logits at position t do not depend on later tokens, but do on earlier ones', () => {
  for (const m of [tinyGpt2(), tinyLlama({ nKv: 1 })]) {
    const a = forward(m, [1, 2, 3, 4, 5]);
    const b = forward(m, [1, 2, 3, 9, 0]);
    for (let t = 0; t < 3; t++) assert.deepEqual(a[t], b[t]);
    assert.notDeepEqual(a[3], b[3]);

    const c = forward(m, [7, 2, 3, 4, 5]); // only the first token differs
    for (let t = 0; t < 5; t++) assert.ok(maxAbsDiff([a[t]!], [c[t]!]) > 1e-6, `position ${t} should see token 0`);
  }
});

test('RoPE: ropeRotate equals multiplication by the explicit rotation matrix', () => {
  const next = rng(7);
  for (const hd of [2, 4, 8]) {
    const v = Float64Array.from(randTensor([hd], next).data);
    for (const p of [0, 1, 5, 37]) {
      const R = ropeMatrix(hd, p, 10000);
      const expected = R.map((row) => row.reduce((s, r, j) => s + r * v[j]!, 0));
      assertClose([ropeRotate(v, p, 10000)], [expected], 1e-15);
    }
    assert.deepEqual(ropeRotate(v, 0, 10000), v); // position 0 is the identity
  }
});

test('RoPE: q·k depends only on the relative position', () => {
  const next = rng(8);
  const hd = 8;
  const q = Float64Array.from(randTensor([hd], next).data);
  const k = Float64Array.from(randTensor([hd], next).data);
  const dot = (a: Float64Array, b: Float64Array) => a.reduce((s, x, i) => s + x * b[i]!, 0);
  const score = (m: number, n: number, theta = 10000) => dot(ropeRotate(q, m, theta), ropeRotate(k, n, theta));
  for (const [m, n] of [[3, 1], [7, 7], [2, 9]] as const) {
    for (const shift of [1, 10, 100]) assert.ok(Math.abs(score(m, n) - score(m + shift, n + shift)) < 1e-12);
  }
  assert.ok(Math.abs(score(3, 1) - score(4, 1)) > 1e-6); // and it does depend on it
  assert.ok(Math.abs(score(3, 1, 10000) - score(3, 1, 100)) > 1e-6); // rope_theta matters
});

test('GQA: num_key_value_heads = 1 equals MHA with the k/v head duplicated', () => {
  const gqa = tinyLlama({ nKv: 1 });
  const mha: Tiny = { config: { ...gqa.config, num_key_value_heads: 2 }, tensors: new Map(gqa.tensors) };
  for (let l = 0; l < gqa.config.num_hidden_layers; l++) {
    for (const p of ['k_proj', 'v_proj']) {
      const name = `model.layers.${l}.self_attn.${p}.weight`;
      const one = gqa.tensors.get(name)!; // [hd, d]
      const two = new Float32Array(2 * one.data.length); // [2·hd, d]: the same head twice
      two.set(one.data, 0);
      two.set(one.data, one.data.length);
      mha.tensors.set(name, { shape: [2 * one.shape[0]!, one.shape[1]!], data: two });
    }
  }
  const tokens = [5, 3, 8, 1, 0];
  assert.deepEqual(forward(gqa, tokens), forward(mha, tokens));
});

test('Llama lm_head: tied uses embed_tokens, untied uses lm_head, absent lm_head falls back to embed_tokens', () => {
  const tokens = [2, 7, 1];
  const untied = tinyLlama({ tie: false, lmHead: true });
  const embed = untied.tensors.get('model.embed_tokens.weight')!;
  const withoutHead = new Map(untied.tensors);
  withoutHead.delete('lm_head.weight');

  const tiedNoHead = forward({ config: { ...untied.config, tie_word_embeddings: true }, tensors: withoutHead }, tokens);
  const tiedWithHead = forward({ config: { ...untied.config, tie_word_embeddings: true }, tensors: untied.tensors }, tokens);
  const untiedNoHead = forward({ config: untied.config, tensors: withoutHead }, tokens);
  const untiedHeadIsEmbed = forward({ config: untied.config, tensors: new Map(untied.tensors).set('lm_head.weight', embed) }, tokens);
  const untiedOwnHead = forward(untied, tokens);

  assert.deepEqual(tiedWithHead, tiedNoHead); // tie_word_embeddings wins over a stored lm_head
  assert.deepEqual(untiedNoHead, tiedNoHead);
  assert.deepEqual(untiedHeadIsEmbed, tiedNoHead);
  assert.ok(maxAbsDiff(untiedOwnHead, tiedNoHead) > 1e-3);
});

test('Llama-family biases: q/k/v biases are used when present (Qwen2), zero biases change nothing', () => {
  const base = tinyLlama();
  const qwen = { ...base.config, model_type: 'qwen2' };
  const tokens = [4, 4, 2];
  const zeros = new Map(base.tensors);
  const ones = new Map(base.tensors);
  for (let l = 0; l < base.config.num_hidden_layers; l++) {
    for (const p of ['q_proj', 'k_proj', 'v_proj']) {
      const rows = base.tensors.get(`model.layers.${l}.self_attn.${p}.weight`)!.shape[0]!;
      zeros.set(`model.layers.${l}.self_attn.${p}.bias`, constTensor([rows], 0));
      ones.set(`model.layers.${l}.self_attn.${p}.bias`, constTensor([rows], 0.25));
    }
  }
  const plain = forward({ config: qwen, tensors: base.tensors }, tokens);
  assert.deepEqual(forward({ config: qwen, tensors: zeros }, tokens), plain);
  assert.ok(maxAbsDiff(forward({ config: qwen, tensors: ones }, tokens), plain) > 1e-4);
});

test('GPT-2 with and without the "transformer." prefix gives identical logits', () => {
  const prefixed = tinyGpt2({ prefix: true });
  const bare = new Map<string, RefTensor>();
  for (const [name, t] of prefixed.tensors) bare.set(name.replace(/^transformer\./, ''), t);
  // the hub's gpt2 file also stores the causal-mask buffer h.N.attn.bias; it is not a parameter
  const nPos = prefixed.config.n_positions;
  for (let l = 0; l < prefixed.config.n_layer; l++) bare.set(`h.${l}.attn.bias`, constTensor([1, 1, nPos, nPos], 1));

  const tokens = [1, 2, 3, 10, 0];
  assert.deepEqual(forward({ config: prefixed.config, tensors: bare }, tokens), forward(prefixed, tokens));
  // and a getter without `has` (it only throws on a missing name) behaves the same
  const throwing = (name: string): RefTensor => {
    const t = bare.get(name);
    if (t === undefined) throw new Error(`missing ${name}`);
    return t;
  };
  assert.deepEqual(referenceForward(prefixed.config, throwing, tokens), forward(prefixed, tokens));
});

test('greedy re-runs the forward and takes the argmax of the last position', () => {
  const m = tinyLlama();
  const prompt = [1, 2];
  const out = referenceGreedy(m.config, getterFromMap(m.tensors), prompt, 4);
  assert.equal(out.length, 4);
  const seq = [...prompt];
  for (const tok of out) {
    const logits = forward(m, seq);
    assert.equal(tok, argmax(logits[logits.length - 1]!));
    seq.push(tok);
  }
});

// ---------------------------------------------------------------------------------------------
// Sliding windows

const WINDOW_SEQ = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4];

test('sliding window: with one layer, position t sees exactly the last W tokens (RoPE is relative, so a forward of those W alone gives its logits)', () => {
  const W = 4;
  const m = tinyLlama({ nLayer: 1, seed: 21 });
  const windowed = forward({ ...m, config: { ...m.config, model_type: 'mistral', sliding_window: W } }, WINDOW_SEQ);
  const full = forward(m, WINDOW_SEQ);
  for (let t = 0; t < WINDOW_SEQ.length; t++) {
    const alone = forward(m, WINDOW_SEQ.slice(Math.max(0, t - W + 1), t + 1));
    assertClose([windowed[t]!], [alone[alone.length - 1]!], 1e-9);
    // Positions within the window see everything; past it, dropping the oldest token changes the logits.
    if (t < W) assertClose([windowed[t]!], [full[t]!], 1e-12);
    else assert.ok(Math.max(...windowed[t]!.map((x, i) => Math.abs(x - full[t]![i]!))) > 1e-6, `position ${t} is windowed`);
  }
  // W + 1 tokens would be one too many: the boundary is i − W < j.
  const tooMany = forward(m, WINDOW_SEQ.slice(WINDOW_SEQ.length - W - 1));
  assert.ok(Math.max(...windowed.at(-1)!.map((x, i) => Math.abs(x - tooMany.at(-1)![i]!))) > 1e-6);
});

test('sliding window: Mistral\'s is on by default (4096) and off with null; Qwen2\'s needs use_sliding_window and picks layers', () => {
  const m = tinyLlama({ seed: 22 });
  const run = (extra: Record<string, unknown>) => forward({ ...m, config: { ...m.config, ...extra } }, WINDOW_SEQ);
  const full = run({});
  const differs = (a: Float64Array[], b: Float64Array[]) => a.some((row, t) => row.some((x, i) => Math.abs(x - b[t]![i]!) > 1e-6));
  assertClose(run({ model_type: 'mistral' }), full, 0); // 4096 ≥ 20 tokens
  assertClose(run({ model_type: 'mistral', sliding_window: null }), full, 0);
  assertClose(run({ model_type: 'mistral', sliding_window: WINDOW_SEQ.length }), full, 0);
  const mistral = run({ model_type: 'mistral', sliding_window: 5 });
  assert.ok(differs(mistral, full));
  // Qwen2: no window without use_sliding_window; with it, layers from max_window_layers (default 28) on.
  assertClose(run({ model_type: 'qwen2', sliding_window: 5 }), full, 0);
  assertClose(run({ model_type: 'qwen2', use_sliding_window: true, sliding_window: 5 }), full, 0);
  assertClose(run({ model_type: 'qwen2', use_sliding_window: true, sliding_window: 5, max_window_layers: 0 }), mistral, 0);
  const second = run({ model_type: 'qwen2', use_sliding_window: true, sliding_window: 5, max_window_layers: 1 });
  assert.ok(differs(second, full) && differs(second, mistral));
  assertClose(run({ model_type: 'qwen2', use_sliding_window: true, sliding_window: 5, layer_types: ['full_attention', 'sliding_attention'] }), second, 0);
  const first = run({ model_type: 'qwen2', use_sliding_window: true, sliding_window: 5, layer_types: ['sliding_attention', 'full_attention'] });
  assert.ok(differs(first, second) && differs(first, full));
});

test('unsupported configurations throw instead of computing something else', () => {
  const m = tinyLlama();
  assert.throws(() => forward({ ...m, config: { ...m.config, rope_scaling: { rope_type: 'mrope', factor: 8 } } }, [1]), /unsupported in reference/);
  assert.throws(() => forward({ ...m, config: { ...m.config, model_type: 'phi' } }, [1]), /unsupported in reference/);
  assert.throws(() => forward({ ...m, config: { ...m.config, model_type: 'qwen2', layer_types: ['full_attention', 'chunked_attention'] } }, [1]), /unsupported in reference/);
  assert.throws(() => forward({ ...m, config: { ...m.config, model_type: 'qwen2', layer_types: ['full_attention', 'sliding_attention'] } }, [1]), /without sliding_window/);
  assert.throws(() => forward(m, [13]), /outside the vocabulary/);
  const g = tinyGpt2();
  assert.throws(() => forward({ ...g, config: { ...g.config, activation_function: 'relu' } }, [1]), /unsupported in reference/);
});

// ---------------------------------------------------------------------------------------------
// LoRA

function randLora(inFeatures: number, outFeatures: number, r: number, scale: number, next: () => number, zeroB = false): RefLora {
  return {
    A: randTensor([r, inFeatures], next).data,
    B: zeroB ? new Float32Array(outFeatures * r) : randTensor([outFeatures, r], next).data,
    r, inFeatures, outFeatures, scale,
  };
}

/** [path, tensor name, layout, in, out] of every LoRA-targetable module of a tiny model. */
function modulesOf(m: Tiny, prefix = 'transformer.'): [string, string, 'linear' | 'conv1d', number, number][] {
  const out: [string, string, 'linear' | 'conv1d', number, number][] = [];
  if (m.config.model_type === 'gpt2') {
    for (let l = 0; l < m.config.n_layer; l++) {
      for (const name of ['attn.c_attn', 'attn.c_proj', 'mlp.c_fc', 'mlp.c_proj']) {
        const w = m.tensors.get(`${prefix}h.${l}.${name}.weight`)!; // [in, out]
        out.push([`transformer.h.${l}.${name}`, `${prefix}h.${l}.${name}.weight`, 'conv1d', w.shape[0]!, w.shape[1]!]);
      }
    }
  } else {
    for (let l = 0; l < m.config.num_hidden_layers; l++) {
      for (const name of ['self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj', 'self_attn.o_proj', 'mlp.gate_proj', 'mlp.up_proj', 'mlp.down_proj']) {
        const path = `model.layers.${l}.${name}`;
        const w = m.tensors.get(`${path}.weight`)!; // [out, in]
        out.push([path, `${path}.weight`, 'linear', w.shape[1]!, w.shape[0]!]);
      }
    }
  }
  return out;
}

test('refLoraDelta and refMergedWeight on hand-computed numbers', () => {
  // A = [[1, 2]] (r = 1, in = 2), B = [[3], [4]] (out = 2), scale 0.5, x = [1, 1]: A·x = 3, delta = 0.5·[9, 12]
  const l: RefLora = { A: new Float32Array([1, 2]), B: new Float32Array([3, 4]), r: 1, inFeatures: 2, outFeatures: 2, scale: 0.5 };
  assert.deepEqual(refLoraDelta(new Float64Array([1, 1]), l), new Float64Array([4.5, 6]));
  // B·A = [[3, 6], [4, 8]]; linear W [out, in] = 0 → 0.5·B·A; conv1d W [in, out] → its transpose
  assert.deepEqual(refMergedWeight(new Float32Array(4), 'linear', l), new Float64Array([1.5, 3, 2, 4]));
  assert.deepEqual(refMergedWeight(new Float32Array(4), 'conv1d', l), new Float64Array([1.5, 2, 3, 4]));
  assert.deepEqual(refMergedWeight(new Float32Array([1, 0, 0, 1]), 'linear', l), new Float64Array([2.5, 3, 2, 5]));
});

test('LoRA with B = 0 changes nothing; otherwise the delta forward equals the merged-weight forward', () => {
  const cases: [Tiny, string][] = [
    [tinyGpt2({ prefix: true }), 'transformer.'],
    [tinyGpt2({ prefix: false }), ''],
    [tinyLlama({ nKv: 1 }), ''],
  ];
  for (const [m, prefix] of cases) {
    const next = rng(99);
    const tokens = [1, 5, 2, 8];
    const base = forward(m, tokens);

    const zero = new Map<string, RefLora>();
    for (const [path, , , nIn, nOut] of modulesOf(m, prefix)) zero.set(path, randLora(nIn, nOut, 2, 2, next, true));
    assert.deepEqual(forward(m, tokens, zero), base);

    const lora = new Map<string, RefLora>();
    const merged = new Map(m.tensors);
    for (const [path, name, layout, nIn, nOut] of modulesOf(m, prefix)) {
      const l = randLora(nIn, nOut, 2, 0.5, next);
      lora.set(path, l);
      const w = refMergedWeight(m.tensors.get(name)!.data, layout, l);
      const w32 = Float32Array.from(w);
      assert.deepEqual(Float64Array.from(w32), w, 'dyadic test weights merge exactly in float32');
      merged.set(name, { shape: m.tensors.get(name)!.shape, data: w32 });
    }
    const withLora = forward(m, tokens, lora);
    assert.ok(maxAbsDiff(withLora, base) > 1e-3, 'the adapter changes the logits');
    assertClose(withLora, forward({ config: m.config, tensors: merged }, tokens), 1e-10);
  }
});

test('a LoRA entry for a module the model does not run throws', () => {
  const m = tinyGpt2({ prefix: false });
  const next = rng(5);
  // GPT-2 module paths always carry "transformer.", whatever the checkpoint's names
  const wrong = new Map([['h.0.attn.c_attn', randLora(8, 24, 2, 1, next)]]);
  assert.throws(() => forward(m, [1, 2], wrong), /no module h\.0\.attn\.c_attn/);
});

test('refPatternKey follows re.match(r"(.*\\.)?(" + key + r")$") and the first key wins', () => {
  assert.equal(refPatternKey({ q_proj: 1 }, 'model.layers.0.self_attn.q_proj'), 'q_proj');
  assert.equal(refPatternKey({ q_proj: 1 }, 'model.layers.0.self_attn.xq_proj'), undefined);
  assert.equal(refPatternKey({ q_proj: 1 }, 'model.layers.0.self_attn.q_proj.base'), undefined);
  assert.equal(refPatternKey({ 'layers.1.self_attn.q_proj': 1 }, 'model.layers.11.self_attn.q_proj'), undefined);
  assert.equal(refPatternKey({ 'layers.1.self_attn.q_proj': 1 }, 'model.layers.1.self_attn.q_proj'), 'layers.1.self_attn.q_proj');
  assert.equal(refPatternKey({ 'model.layers.1.self_attn.q_proj': 1 }, 'model.layers.1.self_attn.q_proj'), 'model.layers.1.self_attn.q_proj');
  assert.equal(refPatternKey({ 'layers\\.\\d+\\.mlp\\..*': 1 }, 'model.layers.3.mlp.up_proj'), 'layers\\.\\d+\\.mlp\\..*');
  // first matching key in object order
  const pattern = { 'attn.c_proj': 1, c_proj: 2 };
  assert.equal(refPatternKey(pattern, 'transformer.h.0.attn.c_proj'), 'attn.c_proj');
  assert.equal(refPatternKey(pattern, 'transformer.h.0.mlp.c_proj'), 'c_proj');
  assert.equal(refPatternKey(undefined, 'transformer.h.0.mlp.c_proj'), undefined);
});

test('refLoraFromPeft: tensor names, effective rank, alpha_pattern and rsLoRA scaling', () => {
  const next = rng(11);
  const tensors = new Map<string, RefTensor>();
  const put = (path: string, r: number, nIn: number, nOut: number, named = false) => {
    const mid = named ? '.default' : '';
    tensors.set(`base_model.model.${path}.lora_A${mid}.weight`, randTensor([r, nIn], next));
    tensors.set(`base_model.model.${path}.lora_B${mid}.weight`, randTensor([nOut, r], next));
  };
  put('transformer.h.0.attn.c_attn', 4, 8, 24);
  put('transformer.h.0.attn.c_proj', 2, 8, 8, true); // adapter name kept: .lora_A.default.weight
  put('transformer.h.0.mlp.c_proj', 4, 32, 8);
  const paths = ['transformer.h.0.attn.c_attn', 'transformer.h.0.attn.c_proj', 'transformer.h.0.mlp.c_fc', 'transformer.h.0.mlp.c_proj'];
  const config = { r: 4, lora_alpha: 8, rank_pattern: { 'attn.c_proj': 2 }, alpha_pattern: { 'attn.c_proj': 3, c_proj: 32 } };

  const map = refLoraFromPeft(config, getterFromMap(tensors), paths);
  assert.deepEqual([...map.keys()], ['transformer.h.0.attn.c_attn', 'transformer.h.0.attn.c_proj', 'transformer.h.0.mlp.c_proj']);
  const cAttn = map.get('transformer.h.0.attn.c_attn')!;
  assert.deepEqual([cAttn.r, cAttn.inFeatures, cAttn.outFeatures, cAttn.scale], [4, 8, 24, 8 / 4]);
  assert.equal(cAttn.A, tensors.get('base_model.model.transformer.h.0.attn.c_attn.lora_A.weight')!.data);
  const attnProj = map.get('transformer.h.0.attn.c_proj')!;
  assert.deepEqual([attnProj.r, attnProj.scale], [2, 3 / 2]); // first alpha_pattern key wins
  assert.equal(map.get('transformer.h.0.mlp.c_proj')!.scale, 32 / 4);

  const rs = refLoraFromPeft({ ...config, use_rslora: true }, getterFromMap(tensors), paths);
  assert.equal(rs.get('transformer.h.0.attn.c_attn')!.scale, 8 / Math.sqrt(4));
  assert.equal(rs.get('transformer.h.0.attn.c_proj')!.scale, 3 / Math.sqrt(2));

  tensors.delete('base_model.model.transformer.h.0.mlp.c_proj.lora_B.weight');
  assert.throws(() => refLoraFromPeft(config, getterFromMap(tensors), paths), /only one of lora_A \/ lora_B/);
});
