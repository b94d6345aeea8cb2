/**
 * GPT-2 (model_type "gpt2"). Checkpoint quirks handled here:
 * - Conv1D weights are stored [in, out] (y = x·W + b), which is already our layout: no transpose.
 * - Files saved from GPT2LMHeadModel prefix every name with `transformer.`; the hub's original gpt2 file
 *   has no prefix and also stores `h.N.attn.bias` / `h.N.attn.masked_bias`, causal-mask buffers that are
 *   not parameters: we read tensors by exact name from the table below, so those are never touched
 *   (note `h.N.attn.c_attn.bias` also ends in `attn.bias`; exact names keep them apart).
 * - lm_head is tied to wte.
 * - The fused c_attn [d, 3d] is split at load into three matmuls (q, k, v), each computing its third of the
 *   module's output (so a LoRA delta on c_attn lands in the right columns, and no output is ever split).
 */
import * as tf from '@tensorflow/tfjs-core';
import { matmulW, storeWeight } from '../backend/weights.ts';
import type { Checkpoint } from './checkpoint.ts';
import { attention, layerConstants, gelu, geluNew, layerModules, layerNorm, linear, weightReader, type Linear } from './layers.ts';
import type { Arch, StepContext } from './model.ts';
import type { LinearModule, ModelConfig } from './types.ts';

/** Per-layer linear modules: HF name (under h.N.) → [in, out]. PEFT paths are `transformer.h.N.<name>`. */
function linearTable(c: ModelConfig): [name: string, inF: number, outF: number][] {
  const d = c.hiddenSize;
  return [
    ['attn.c_attn', d, 3 * d],
    ['attn.c_proj', d, d],
    ['mlp.c_fc', d, c.intermediateSize],
    ['mlp.c_proj', c.intermediateSize, d],
  ];
}

export function gpt2Modules(c: ModelConfig): LinearModule[] {
  return layerModules(c.numLayers, 'transformer.h', linearTable(c), true);
}

interface Gpt2Layer {
  ln1: [tf.Tensor1D, tf.Tensor1D];
  ln2: [tf.Tensor1D, tf.Tensor1D];
  q: Linear;
  k: Linear;
  v: Linear;
  attnProj: Linear;
  fc: Linear;
  mlpProj: Linear;
}

/** Yields after each layer's weights (CausalLM.loadAsync lets the event loop run there). */
export function* loadGpt2(c: ModelConfig, ckpt: Checkpoint): Generator<void, Arch> {
  const prefix = ckpt.names.has('transformer.wte.weight') ? 'transformer.' : '';
  const d = c.hiddenSize;
  const { tensors, keep, read } = weightReader(ckpt, prefix);
  const load = (name: string, shape: number[]): tf.Tensor => keep(read(name, shape));
  const modules = gpt2Modules(c);
  const linears = new Map<string, Linear>();
  const layers: Gpt2Layer[] = [];
  for (let l = 0; l < c.numLayers; l++) {
    const moduleOf = (name: string) => modules.find((m) => m.key === `${l}.${name}`)!;
    const add = (L: Linear): Linear => {
      linears.set(L.key, L);
      return L;
    };
    const lin = (name: string): Linear => {
      const module = moduleOf(name);
      const W = keep(storeWeight(read(`h.${l}.${name}.weight`, [module.inFeatures, module.outFeatures]) as tf.Tensor2D)); // Conv1D: [in, out]
      const b = load(`h.${l}.${name}.bias`, [module.outFeatures]) as tf.Tensor1D;
      return add({ key: module.key, W, b, module, moduleOffset: 0 });
    };
    // c_attn: columns [0, d) are q, [d, 2d) k, [2d, 3d) v.
    const cAttn = moduleOf('attn.c_attn');
    const w = ckpt.read(`${prefix}h.${l}.attn.c_attn.weight`, [d, 3 * d]).data; // [d, 3d]
    const bias = ckpt.read(`${prefix}h.${l}.attn.c_attn.bias`, [3 * d]).data;
    const third = (i: number): Linear => {
      const Wi = new Float32Array(d * d);
      for (let r = 0; r < d; r++) Wi.set(w.subarray(r * 3 * d + i * d, r * 3 * d + (i + 1) * d), r * d);
      const W = storeWeight(tf.tensor2d(Wi, [d, d]));
      const b = tf.tensor1d(bias.slice(i * d, (i + 1) * d));
      tensors.push(W, b);
      return add({ key: `${cAttn.key}.${'qkv'[i]}`, W, b, module: cAttn, moduleOffset: i * d });
    };
    layers.push({
      ln1: [load(`h.${l}.ln_1.weight`, [d]) as tf.Tensor1D, load(`h.${l}.ln_1.bias`, [d]) as tf.Tensor1D],
      q: third(0),
      k: third(1),
      v: third(2),
      attnProj: lin('attn.c_proj'),
      ln2: [load(`h.${l}.ln_2.weight`, [d]) as tf.Tensor1D, load(`h.${l}.ln_2.bias`, [d]) as tf.Tensor1D],
      fc: lin('mlp.c_fc'),
      mlpProj: lin('mlp.c_proj'),
    });
    yield;
  }
  const wte = load('wte.weight', [c.vocabSize, d]) as tf.Tensor2D;
  const wpe = load('wpe.weight', [c.maxPositions, d]) as tf.Tensor2D;
  // Tied lm_head, kept transposed [d, V] like the linear weights, so the head is an untransposed product.
  const lmHead = storeWeight(tf.transpose(wte) as tf.Tensor2D);
  tensors.push(lmHead);
  const lnf: [tf.Tensor1D, tf.Tensor1D] = [load('ln_f.weight', [d]) as tf.Tensor1D, load('ln_f.bias', [d]) as tf.Tensor1D];
  const act = c.activation === 'gelu_new' ? geluNew : c.activation === 'gelu' ? gelu : tf.relu;
  const nH = c.numHeads;
  const hd = c.headDim;
  const { eps, scale } = layerConstants(c.normEps, c.attentionScale);
  tensors.push(eps.scalar, scale.scalar);

  return {
    modules, linears, tensors,
    embed: (tokens, positions) => tf.add(tf.gather(wte, tokens), tf.gather(wpe, positions)), // [N, d]
    block(l, x, s: StepContext) {
      const L = layers[l]!;
      // x = x + attn(ln_1(x))
      const h = layerNorm(x, L.ln1[0], L.ln1[1], eps);
      const [q, k, v] = [linear(h, L.q, s.lora), linear(h, L.k, s.lora), linear(h, L.v, s.lora)]; // [N, d] each
      const cache = s.kv.appendLayer(l, k, v); // the layer's keys and values, C+T columns
      x = linear(attention(q, cache, s, nH, nH, hd, scale), L.attnProj, s.lora, x);
      // x = x + mlp(ln_2(x))
      const m = act(linear(layerNorm(x, L.ln2[0], L.ln2[1], eps), L.fc, s.lora));
      return linear(m, L.mlpProj, s.lora, x);
    },
    head: (x) => matmulW(layerNorm(x, lnf[0], lnf[1], eps), lmHead), // [N, V]
  };
}
