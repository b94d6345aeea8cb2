/**
 * Llama family (model_type llama, mistral, qwen2): RMSNorm, rotary embeddings (HF rotate_half convention,
 * rope_theta), grouped-query attention, SiLU-gated MLP, tied or untied lm_head, optional q/k/v biases (Qwen2).
 * Checkpoint quirks: Linear weights are stored [out, in] and transposed once at load to our [in, out];
 * q|k|v and gate|up are fused into one matmul each, with `parts` recording each module's columns.
 */
import * as tf from '@tensorflow/tfjs-core';
import { fail } from '../errors.ts';
import type { Checkpoint } from './checkpoint.ts';
import { applyRope, attention, linear, rmsNorm, ropeTables, silu, toHeads, type Linear } from './layers.ts';
import type { Arch, StepContext } from './model.ts';
import type { LinearModule, ModelConfig } from './types.ts';

/** Per-layer modules: [HF name under model.layers.N., fused linear it belongs to, in, out]. */
function linearTable(c: ModelConfig): [name: string, fused: string, inF: number, outF: number][] {
  const d = c.hiddenSize;
  const q = c.numHeads * c.headDim;
  const kv = c.numKvHeads * c.headDim;
  const I = c.intermediateSize;
  return [
    ['self_attn.q_proj', 'qkv', d, q],
    ['self_attn.k_proj', 'qkv', d, kv],
    ['self_attn.v_proj', 'qkv', d, kv],
    ['self_attn.o_proj', 'o', q, d],
    ['mlp.gate_proj', 'gate_up', d, I],
    ['mlp.up_proj', 'gate_up', d, I],
    ['mlp.down_proj', 'down', I, d],
  ];
}

export function llamaModules(c: ModelConfig): LinearModule[] {
  const out: LinearModule[] = [];
  for (let layer = 0; layer < c.numLayers; layer++) {
    for (const [name, , inFeatures, outFeatures] of linearTable(c)) {
      out.push({
        path: `model.layers.${layer}.${name}`, key: `${layer}.${name}`, layer,
        name: name.split('.').pop()!, inFeatures, outFeatures, conv1d: false,
      });
    }
  }
  return out;
}

interface LlamaLayer {
  inputNorm: tf.Tensor1D;
  postNorm: tf.Tensor1D;
  qkv: Linear;
  o: Linear;
  gateUp: Linear;
  down: Linear;
}

export function loadLlama(c: ModelConfig, ckpt: Checkpoint): Arch {
  const d = c.hiddenSize;
  const tensors: tf.Tensor[] = [];
  const keep = <T extends tf.Tensor>(t: T): T => {
    tensors.push(t);
    return t;
  };
  const read = (name: string, shape: number[]): tf.Tensor => tf.tensor(ckpt.read(name, shape).data, shape);
  const modules = llamaModules(c);
  const table = linearTable(c);
  const linears = new Map<string, Linear>();
  const layers: LlamaLayer[] = [];

  for (let l = 0; l < c.numLayers; l++) {
    const fuse = (fused: string, withBias: boolean): Linear => {
      const rows = table.filter(([, f]) => f === fused);
      const parts: { module: LinearModule; offset: number }[] = [];
      const Ws: tf.Tensor2D[] = [];
      const bs: tf.Tensor1D[] = [];
      let offset = 0;
      for (const [name, , inF, outF] of rows) {
        const module = modules.find((m) => m.key === `${l}.${name}`)!;
        parts.push({ module, offset });
        offset += outF;
        const w = read(`model.layers.${l}.${name}.weight`, [outF, inF]); // Linear: [out, in]
        Ws.push(tf.transpose(w) as tf.Tensor2D); // → [in, out]
        w.dispose();
        if (withBias) bs.push(read(`model.layers.${l}.${name}.bias`, [outF]) as tf.Tensor1D);
      }
      const W = keep(Ws.length === 1 ? Ws[0]! : tf.concat2d(Ws, 1));
      const b = withBias ? keep(bs.length === 1 ? bs[0]! : tf.concat1d(bs)) : null;
      if (Ws.length > 1) Ws.forEach((w) => w.dispose());
      if (bs.length > 1) bs.forEach((x) => x.dispose());
      const L: Linear = { key: `${l}.${fused}`, W, b, parts };
      linears.set(L.key, L);
      return L;
    };
    layers.push({
      inputNorm: keep(read(`model.layers.${l}.input_layernorm.weight`, [d]) as tf.Tensor1D),
      qkv: fuse('qkv', c.attentionBias),
      o: fuse('o', c.outputBias),
      postNorm: keep(read(`model.layers.${l}.post_attention_layernorm.weight`, [d]) as tf.Tensor1D),
      gateUp: fuse('gate_up', c.mlpBias),
      down: fuse('down', c.mlpBias),
    });
  }
  const embed = keep(read('model.embed_tokens.weight', [c.vocabSize, d]) as tf.Tensor2D);
  const norm = keep(read('model.norm.weight', [d]) as tf.Tensor1D);
  if (!c.tieWordEmbeddings && !ckpt.names.has('lm_head.weight')) {
    throw fail('CHECKPOINT_MISSING_TENSOR', `checkpoint ${ckpt.dir} has no "lm_head.weight" and tie_word_embeddings is false`);
  }
  // lm_head [V, d] is kept transposed, [d, V]: matMul with transposeB is ~10× slower on wasm.
  const lmHead = keep(tf.transpose(c.tieWordEmbeddings ? embed : read('lm_head.weight', [c.vocabSize, d])) as tf.Tensor2D);
  const rope = ropeTables(c.maxPositions, c.headDim, c.ropeTheta);
  tensors.push(rope.cos, rope.sin);

  const nH = c.numHeads;
  const kvH = c.numKvHeads;
  const hd = c.headDim;
  const I = c.intermediateSize;

  return {
    modules, linears, tensors,
    embed: (tokens) => tf.gather(embed, tokens), // [N, d]
    block(l, x, s: StepContext) {
      const L = layers[l]!;
      // x = x + attn(rmsnorm(x))
      const qkv = linear(rmsNorm(x, L.inputNorm, c.normEps), L.qkv, s.lora); // [N, (nH + 2·kvH)·hd]
      const [qk, v] = tf.split(qkv, [(nH + kvH) * hd, kvH * hd], 1) as [tf.Tensor2D, tf.Tensor2D];
      const cos = s.cache('rope.cos', () => tf.reshape(tf.gather(rope.cos, s.positions), [s.B * s.T, 1, hd / 2]) as tf.Tensor3D);
      const sin = s.cache('rope.sin', () => tf.reshape(tf.gather(rope.sin, s.positions), [s.B * s.T, 1, hd / 2]) as tf.Tensor3D);
      const rotated = applyRope(tf.reshape(qk, [s.B * s.T, nH + kvH, hd]), cos, sin); // [N, nH + kvH, hd]
      const [q, k] = tf.split(tf.reshape(rotated, [s.B * s.T, (nH + kvH) * hd]), [nH * hd, kvH * hd], 1) as [tf.Tensor2D, tf.Tensor2D];
      const cache = s.kv.appendLayer(l, toHeads(k, s.B, s.T, kvH, hd), toHeads(v, s.B, s.T, kvH, hd)); // [B, kvH, C+T, hd]
      x = tf.add(x, linear(attention(q, cache.k, cache.v, s, nH, kvH, hd), L.o, s.lora));
      // x = x + down(silu(gate(h)) * up(h)), h = rmsnorm(x)
      const gu = linear(rmsNorm(x, L.postNorm, c.normEps), L.gateUp, s.lora); // [N, 2I]
      const [gate, up] = tf.split(gu, [I, I], 1) as [tf.Tensor2D, tf.Tensor2D];
      return tf.add(x, linear(tf.mul(silu(gate), up), L.down, s.lora));
    },
    head: (x) => tf.matMul(rmsNorm(x, norm, c.normEps), lmHead), // [N, V]
  };
}
