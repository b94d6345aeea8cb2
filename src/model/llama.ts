/**
 * Llama family (model_type llama, mistral, qwen2): RMSNorm, rotary embeddings (HF rotate_half convention,
 * rope_theta, the rope_scaling variants of src/model/rope.ts), grouped-query attention, SiLU-gated MLP, tied or
 * untied lm_head, optional q/k/v biases (Qwen2).
 * Checkpoint quirks: Linear weights are stored [out, in] and transposed once at load to our [in, out].
 * Each projection is its own matmul (no fused q|k|v or gate|up: splitting a fused output costs more than it saves
 * on the wasm backend).
 */
import * as tf from '@tensorflow/tfjs-core';
import { matmulW, storeWeight } from '../backend/weights.ts';
import { fail } from '../errors.ts';
import type { Checkpoint } from './checkpoint.ts';
import { attention, gatedActivation, layerConstants, layerModules, linear, rmsNorm, rotary, rotaryLinear, weightReader, type Linear, type WeightReader } from './layers.ts';
import type { Arch, StepContext } from './model.ts';
import type { LinearModule, ModelConfig } from './types.ts';

/** Per-layer modules: [HF name under model.layers.N., in, out]. */
function linearTable(c: ModelConfig): [name: string, inF: number, outF: number][] {
  const d = c.hiddenSize;
  const q = c.numHeads * c.headDim;
  const kv = c.numKvHeads * c.headDim;
  const I = c.intermediateSize;
  return [
    ['self_attn.q_proj', d, q],
    ['self_attn.k_proj', d, kv],
    ['self_attn.v_proj', d, kv],
    ['self_attn.o_proj', q, d],
    ['mlp.gate_proj', d, I],
    ['mlp.up_proj', d, I],
    ['mlp.down_proj', I, d],
  ];
}

export function llamaModules(c: ModelConfig): LinearModule[] {
  return layerModules(c.numLayers, 'model.layers', linearTable(c), false);
}

export interface LlamaLayer {
  inputNorm: tf.Tensor1D;
  postNorm: tf.Tensor1D;
  q: Linear;
  k: Linear;
  v: Linear;
  o: Linear;
  gate: Linear;
  up: Linear;
  down: Linear;
}

/** Yields after each layer's weights (CausalLM.loadAsync lets the event loop run there). */
export function* loadLlama(c: ModelConfig, ckpt: Checkpoint): Generator<void, Arch> {
  const d = c.hiddenSize;
  const weights = weightReader(ckpt);
  const { keep, read } = weights;
  const modules = llamaModules(c);
  const linears = new Map<string, Linear>();
  const layers: LlamaLayer[] = [];

  for (let l = 0; l < c.numLayers; l++) {
    const lin = (name: string, withBias: boolean): Linear => {
      const module = modules.find((m) => m.key === `${l}.${name}`)!;
      const w = read(`model.layers.${l}.${name}.weight`, [module.outFeatures, module.inFeatures]); // Linear: [out, in]
      const W = keep(storeWeight(tf.transpose(w) as tf.Tensor2D)); // → [in, out]
      const b = withBias ? keep(read(`model.layers.${l}.${name}.bias`, [module.outFeatures]) as tf.Tensor1D) : null;
      const L: Linear = { key: module.key, W, b, module, moduleOffset: 0 };
      linears.set(L.key, L);
      return L;
    };
    layers.push({
      inputNorm: keep(read(`model.layers.${l}.input_layernorm.weight`, [d]) as tf.Tensor1D),
      q: lin('self_attn.q_proj', c.attentionBias),
      k: lin('self_attn.k_proj', c.attentionBias),
      v: lin('self_attn.v_proj', c.attentionBias),
      o: lin('self_attn.o_proj', c.outputBias),
      postNorm: keep(read(`model.layers.${l}.post_attention_layernorm.weight`, [d]) as tf.Tensor1D),
      gate: lin('mlp.gate_proj', c.mlpBias),
      up: lin('mlp.up_proj', c.mlpBias),
      down: lin('mlp.down_proj', c.mlpBias),
    });
    yield;
  }
  return llamaArch(c, ckpt, { modules, linears, weights, layers });
}

/** What a Llama-block loader has read: the modules, the per-layer weights, and every tensor it kept. */
export interface LlamaParts {
  readonly modules: LinearModule[];
  readonly linears: Map<string, Linear>;
  /** The reader the layers were loaded with (the rest is read and kept through it too). */
  readonly weights: WeightReader;
  readonly layers: readonly LlamaLayer[];
}

/**
 * The Llama block over loaded layers (also Phi-3's, whose fused weights are cut into these layers at load): reads
 * the embedding, final norm and lm_head, and returns the architecture.
 */
export function llamaArch(c: ModelConfig, ckpt: Checkpoint, parts: LlamaParts): Arch {
  const { modules, linears, weights, layers } = parts;
  const { tensors, keep, read } = weights;
  const d = c.hiddenSize;
  const embed = keep(read('model.embed_tokens.weight', [c.vocabSize, d]) as tf.Tensor2D);
  const norm = keep(read('model.norm.weight', [d]) as tf.Tensor1D);
  if (!c.tieWordEmbeddings && !ckpt.names.has('lm_head.weight')) {
    throw fail('CHECKPOINT_MISSING_TENSOR', `checkpoint ${ckpt.dir} has no "lm_head.weight" and tie_word_embeddings is false`);
  }
  // lm_head [V, d] is kept transposed, [d, V] like the linear weights, so the head is an untransposed product.
  const lmHead = keep(storeWeight(tf.transpose(c.tieWordEmbeddings ? embed : read('lm_head.weight', [c.vocabSize, d])) as tf.Tensor2D));
  const rope = rotary(c);
  tensors.push(...rope.tensors);

  const nH = c.numHeads;
  const kvH = c.numKvHeads;
  const hd = c.headDim;
  const { eps, scale } = layerConstants(c.normEps, c.attentionScale);
  tensors.push(eps.scalar, scale.scalar);

  return {
    modules, linears, tensors,
    embed: (tokens) => tf.gather(embed, tokens), // [N, d]
    block(l, x, s: StepContext) {
      const L = layers[l]!;
      // x = x + attn(rmsnorm(x)) (Phi-3: [q | k | v] = qkv_proj(rmsnorm(x)))
      const h = rmsNorm(x, L.inputNorm, eps);
      const at = rope.step(s);
      const q = rotaryLinear(h, L.q, s.lora, nH, at); // [N, nH·hd]
      const k = rotaryLinear(h, L.k, s.lora, kvH, at); // [N, kvH·hd]
      const v = linear(h, L.v, s.lora); // [N, kvH·hd]
      const cache = s.kv.appendLayer(l, k, v); // the layer's keys and values, C+T columns
      x = linear(attention(q, cache, s, nH, kvH, hd, scale), L.o, s.lora, x);
      // x = x + down(silu(gate(h2)) * up(h2)), h2 = rmsnorm(x) (Phi-3: [gate | up] = gate_up_proj(h2))
      const h2 = rmsNorm(x, L.postNorm, eps);
      return linear(gatedActivation(h2, L.gate, L.up, s.lora), L.down, s.lora, x);
    },
    head: (x) => matmulW(rmsNorm(x, norm, eps), lmHead), // [N, V]
  };
}
