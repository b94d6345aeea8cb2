/**
 * Phi-3 (model_type phi3): the Llama block (RMSNorm, rotary embeddings with Phi-3's longrope, grouped-query
 * attention, SiLU-gated MLP) with fused projections: `self_attn.qkv_proj` whose output rows are [q | k | v] and
 * `mlp.gate_up_proj` whose output rows are [gate | up]. No biases; lm_head untied unless tie_word_embeddings.
 * Checkpoint quirks: Linear weights are stored [out, in] and transposed once at load to our [in, out]. Each fused
 * weight is cut at load into one Linear per part (as GPT-2's c_attn), each computing its columns of the module's
 * output, so no output is ever split. PEFT adapters target the fused modules (lora_B [out_fused, r]); each part
 * takes its columns of the delta, which is the split of the fused output transformers does. After loading, the layers
 * are Llama's, and so is the block (`llamaArch` in llama.ts).
 */
import * as tf from '@tensorflow/tfjs-core';
import { storeWeight } from '../backend/weights.ts';
import type { Checkpoint } from './checkpoint.ts';
import { layerModules, weightReader, type Linear } from './layers.ts';
import { llamaArch, type LlamaLayer } from './llama.ts';
import type { Arch } from './model.ts';
import type { LinearModule, ModelConfig } from './types.ts';

/** Per-layer modules: [HF name under model.layers.N., in, out]. */
function linearTable(c: ModelConfig): [name: string, inF: number, outF: number][] {
  const d = c.hiddenSize;
  const q = c.numHeads * c.headDim;
  const kv = c.numKvHeads * c.headDim;
  const I = c.intermediateSize;
  return [
    ['self_attn.qkv_proj', d, q + 2 * kv],
    ['self_attn.o_proj', q, d],
    ['mlp.gate_up_proj', d, 2 * I],
    ['mlp.down_proj', I, d],
  ];
}

export function phi3Modules(c: ModelConfig): LinearModule[] {
  return layerModules(c.numLayers, 'model.layers', linearTable(c), false);
}


/** Yields after each layer's weights (CausalLM.loadAsync lets the event loop run there). */
export function* loadPhi3(c: ModelConfig, ckpt: Checkpoint): Generator<void, Arch> {
  const d = c.hiddenSize;
  const weights = weightReader(ckpt);
  const { keep, read } = weights;
  const modules = phi3Modules(c);
  const linears = new Map<string, Linear>();
  const layers: LlamaLayer[] = [];

  for (let l = 0; l < c.numLayers; l++) {
    const moduleOf = (name: string) => modules.find((m) => m.key === `${l}.${name}`)!;
    const add = (L: Linear): Linear => {
      linears.set(L.key, L);
      return L;
    };
    const lin = (name: string): Linear => {
      const module = moduleOf(name);
      const w = read(`model.layers.${l}.${name}.weight`, [module.outFeatures, module.inFeatures]); // Linear: [out, in]
      return add({ key: module.key, W: keep(storeWeight(tf.transpose(w) as tf.Tensor2D)), b: null, module, moduleOffset: 0 }); // → [in, out]
    };
    /** A fused module cut into parts: part i is output rows [offset_i, offset_i + size_i) of the [out, in] weight. */
    const fused = (name: string, parts: [part: string, size: number][]): Linear[] => {
      const module = moduleOf(name);
      const w = ckpt.read(`model.layers.${l}.${name}.weight`, [module.outFeatures, module.inFeatures]).data; // [out, in]
      let offset = 0;
      return parts.map(([part, size]) => {
        const rows = tf.tensor2d(w.subarray(offset * module.inFeatures, (offset + size) * module.inFeatures), [size, module.inFeatures]); // [size, in]
        const L: Linear = { key: `${module.key}.${part}`, W: keep(storeWeight(tf.transpose(rows) as tf.Tensor2D)), b: null, module, moduleOffset: offset }; // → [in, size]
        offset += size;
        return add(L);
      });
    };
    const kv = c.numKvHeads * c.headDim;
    const inputNorm = keep(read(`model.layers.${l}.input_layernorm.weight`, [d]) as tf.Tensor1D);
    const [q, k, v] = fused('self_attn.qkv_proj', [['q', c.numHeads * c.headDim], ['k', kv], ['v', kv]]);
    const o = lin('self_attn.o_proj');
    const postNorm = keep(read(`model.layers.${l}.post_attention_layernorm.weight`, [d]) as tf.Tensor1D);
    const [gate, up] = fused('mlp.gate_up_proj', [['gate', c.intermediateSize], ['up', c.intermediateSize]]);
    layers.push({ inputNorm, q: q!, k: k!, v: v!, o, postNorm, gate: gate!, up: up!, down: lin('mlp.down_proj') });
    yield;
  }
  return llamaArch(c, ckpt, { modules, linears, weights, layers });
}
