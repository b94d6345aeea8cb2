/**
 * Gemma family (model_type gemma, gemma2): the Llama layout with
 * - RMSNorm computing x/rms · (1 + w) (the checkpoint stores w − 1; 1 + w is formed once at load, in float32 as
 *   transformers does),
 * - embeddings multiplied by √hidden_size (transformers rounds the normaliser to the model dtype: float32 here),
 * - a GeGLU MLP: down(gelu(gate(x)) · up(x)), gelu the tanh approximation unless the config says otherwise,
 * - head_dim set by the config (not hidden / heads), lm_head tied to the embeddings unless tie_word_embeddings is false.
 * Gemma 2 adds a norm after attention and around the MLP (x = x + norm(attn(norm(x))); x = x + norm(mlp(norm(x)))),
 * scores scaled by query_pre_attn_scalar^−1/2 and soft-capped (c·tanh(s/c)) before the mask, and soft-capped logits.
 * Checkpoint quirks: Linear weights are stored [out, in] and transposed once at load to our [in, out].
 */
import * as tf from '@tensorflow/tfjs-core';
import { matmulW, storeWeight } from '../backend/weights.ts';
import { fail } from '../errors.ts';
import type { Checkpoint } from './checkpoint.ts';
import { attention, constant, gatedActivation, gelu, layerConstants, linear, rmsNorm, rotary, rotaryLinear, softCap, weightReader, type Linear } from './layers.ts';
import { llamaModules } from './llama.ts';
import type { Arch, StepContext } from './model.ts';
import type { ModelConfig } from './types.ts';

/** Per-layer modules: Llama's seven projections (q, k, v, o, gate, up, down), by the same names. */
export const gemmaModules = llamaModules;

/** A layer's norms as 1 + w. Gemma 2 only: postAttn normalizes the attention output, postMlp the MLP's. */
interface GemmaLayer {
  inputNorm: tf.Tensor1D;
  postAttnNorm: tf.Tensor1D | null;
  preMlpNorm: tf.Tensor1D;
  postMlpNorm: tf.Tensor1D | null;
  q: Linear;
  k: Linear;
  v: Linear;
  o: Linear;
  gate: Linear;
  up: Linear;
  down: Linear;
}

/** Yields after each layer's weights (CausalLM.loadAsync lets the event loop run there). */
export function* loadGemma(c: ModelConfig, ckpt: Checkpoint): Generator<void, Arch> {
  const d = c.hiddenSize;
  const { tensors, keep, read } = weightReader(ckpt);
  /** A Gemma RMSNorm weight w, kept as 1 + w. */
  const norm = (name: string): tf.Tensor1D => keep(tf.add(read(name, [d]), 1) as tf.Tensor1D);
  const modules = gemmaModules(c);
  const linears = new Map<string, Linear>();
  const layers: GemmaLayer[] = [];

  for (let l = 0; l < c.numLayers; l++) {
    const n = `model.layers.${l}.`;
    const lin = (name: string, withBias: boolean): Linear => {
      const module = modules.find((m) => m.key === `${l}.${name}`)!;
      const w = read(`${n}${name}.weight`, [module.outFeatures, module.inFeatures]); // Linear: [out, in]
      const W = keep(storeWeight(tf.transpose(w) as tf.Tensor2D)); // → [in, out]
      const b = withBias ? keep(read(`${n}${name}.bias`, [module.outFeatures]) as tf.Tensor1D) : null;
      const L: Linear = { key: module.key, W, b, module, moduleOffset: 0 };
      linears.set(L.key, L);
      return L;
    };
    // Gemma: post_attention_layernorm is the MLP's input norm. Gemma 2: it normalizes the attention output, and
    // pre_feedforward_layernorm / post_feedforward_layernorm surround the MLP.
    const sandwich = c.sandwichNorms;
    layers.push({
      inputNorm: norm(`${n}input_layernorm.weight`),
      q: lin('self_attn.q_proj', c.attentionBias),
      k: lin('self_attn.k_proj', c.attentionBias),
      v: lin('self_attn.v_proj', c.attentionBias),
      o: lin('self_attn.o_proj', c.outputBias),
      postAttnNorm: sandwich ? norm(`${n}post_attention_layernorm.weight`) : null,
      preMlpNorm: norm(sandwich ? `${n}pre_feedforward_layernorm.weight` : `${n}post_attention_layernorm.weight`),
      gate: lin('mlp.gate_proj', false),
      up: lin('mlp.up_proj', false),
      down: lin('mlp.down_proj', false),
      postMlpNorm: sandwich ? norm(`${n}post_feedforward_layernorm.weight`) : null,
    });
    yield;
  }
  const embed = keep(read('model.embed_tokens.weight', [c.vocabSize, d]) as tf.Tensor2D);
  const finalNorm = norm('model.norm.weight');
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
  const embedScale = keep(tf.scalar(Math.sqrt(d))); // float32(√d), as transformers' normaliser
  const attnCap = c.attnLogitSoftcap === null ? null : constant(c.attnLogitSoftcap);
  const finalCap = c.finalLogitSoftcap === null ? null : keep(tf.scalar(c.finalLogitSoftcap));
  tensors.push(eps.scalar, scale.scalar, ...(attnCap ? [attnCap.scalar] : []));
  const act = c.activation === 'gelu' ? gelu : 'gelu_tanh'; // gelu_pytorch_tanh: fused with the products on webgpu

  return {
    modules, linears, tensors,
    embed: (tokens) => tf.mul(tf.gather(embed, tokens), embedScale), // [N, d]
    block(l, x, s: StepContext) {
      const L = layers[l]!;
      // x = x + postAttnNorm(attn(inputNorm(x)))   (Gemma: no postAttnNorm, so o's output adds to x in its product)
      const h = rmsNorm(x, L.inputNorm, eps);
      const at = rope.step(s);
      const q = rotaryLinear(h, L.q, s.lora, nH, at); // [N, nH·hd]
      const k = rotaryLinear(h, L.k, s.lora, kvH, at); // [N, kvH·hd]
      const v = linear(h, L.v, s.lora); // [N, kvH·hd]
      const cache = s.kv.appendLayer(l, k, v); // the layer's keys and values, C+T columns
      const a = attention(q, cache, s, nH, kvH, hd, scale, attnCap);
      x = L.postAttnNorm ? tf.add(x, rmsNorm(linear(a, L.o, s.lora), L.postAttnNorm, eps)) : linear(a, L.o, s.lora, x);
      // x = x + postMlpNorm(down(gelu(gate(h2)) · up(h2))), h2 = preMlpNorm(x)   (Gemma: no postMlpNorm)
      const m = gatedActivation(rmsNorm(x, L.preMlpNorm, eps), L.gate, L.up, s.lora, act);
      return L.postMlpNorm ? tf.add(x, rmsNorm(linear(m, L.down, s.lora), L.postMlpNorm, eps)) : linear(m, L.down, s.lora, x);
    },
    head(x) {
      const logits = matmulW(rmsNorm(x, finalNorm, eps), lmHead); // [N, V]
      return finalCap ? softCap(logits, finalCap) : logits;
    },
  };
}
