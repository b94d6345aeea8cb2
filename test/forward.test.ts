/**
 * The TensorFlow.js forward pass (through the executor: prefill + batched KV-cache decode) against the
 * independent plain-loop reference, for every family (GPT-2, Llama/Qwen2, Phi-3, Gemma, Gemma 2) and the RoPE
 * variants, batch 1 and a batch of 3 sequences of different lengths: logits, greedy tokens and the chosen tokens'
 * logprobs.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import * as tf from '@tensorflow/tfjs-core';
import { TINY_GEMMA, TINY_GEMMA2, TINY_GPT2, TINY_LLAMA, TINY_LLAMA32, TINY_PHI3, type CheckpointOptions } from '../src/demo/index.ts';
import { CausalLM } from '../src/model/model.ts';
import { isLaidOut } from '../src/backend/weights.ts';
import type { LoraPlan } from '../src/engine/executor.ts';
import { TfExecutor } from '../src/exec/tf-executor.ts';
import { logSoftmax, referenceForward } from './reference/forward.ts';
import { argmax, fixtureCheckpoint, maxRelErr, nativeMatmulOn, setupBackend, tempDir } from './helpers/tf.ts';

const tmp = tempDir();
before(setupBackend);
after(tmp.cleanup);

const PROMPTS = [[5, 17, 42, 99, 3, 250, 7], [11, 12], [200, 201, 202, 203]];
const NEW_TOKENS = 6;
/** The base model only: no LoRA. */
const NO_LORA: LoraPlan = { kind: 'none' };

/** Greedy-decodes the prompts together through the executor; returns per prompt the logits of every step. */
async function runBatch(model: CausalLM, prompts: number[][]): Promise<{ tokens: number[][]; logits: Float32Array[][] }> {
  const ex = new TfExecutor(model);
  const tokens = prompts.map(() => [] as number[]);
  const logits = prompts.map(() => [] as Float32Array[]);
  const res = await ex.prefill(prompts.map((p, seq) => ({ seq, tokens: p, start: 0, last: true, adapter: null, allLogits: false })), NO_LORA);
  prompts.forEach((_, s) => {
    const l = res.logits.get(s)!;
    logits[s]!.push(l.slice());
    tokens[s]!.push(argmax(l));
  });
  for (let step = 1; step < NEW_TOKENS; step++) {
    const r = await ex.decode(prompts.map((p, seq) => ({ seq, token: tokens[seq]!.at(-1)!, position: p.length + step - 1, adapter: null })), NO_LORA);
    prompts.forEach((_, s) => {
      const l = r.logits.get(s)!;
      logits[s]!.push(l.slice());
      tokens[s]!.push(argmax(l));
    });
  }
  prompts.forEach((_, s) => ex.release(s));
  ex.dispose();
  return { tokens, logits };
}

/** A prompt longer than LONGROPE's original context (8), so its whole prefill takes the long factors. */
const LONG_PROMPT = [9, 8, 7, 6, 5, 4, 3, 2, 1, 30];

/*
 * RoPE variants on tiny contexts (original_max_position_embeddings 8 to 64), so the positions of these prompts
 * reach the frequencies each variant changes: yarn and llama3 change inv_freq at every position, longrope switches
 * from the short to the long factors once a step's sequence length passes 8 (the 7-token prompt switches while
 * decoding, the 10-token one in its prefill).
 */
const LONGROPE: CheckpointOptions = {
  ...TINY_LLAMA, seed: 12, configExtra: { original_max_position_embeddings: 8 },
  ropeScaling: { rope_type: 'longrope', short_factor: [1, 1.2, 1.5, 2], long_factor: [1, 2.5, 4, 9] },
};

const CASES: [string, CheckpointOptions, number[][]?][] = [
  ['gpt2 (transformer. prefix)', { ...TINY_GPT2, gpt2Prefix: true }],
  ['gpt2 (hub layout, no prefix, attn.bias buffers)', { ...TINY_GPT2, gpt2Prefix: false }],
  ['llama (GQA)', TINY_LLAMA],
  ['llama bf16, tied embeddings', { ...TINY_LLAMA, dtype: 'BF16', tieWordEmbeddings: true, seed: 7 }],
  ['qwen2-style q/k/v bias, MHA, explicit head_dim', { ...TINY_LLAMA, attentionBias: true, numKvHeads: 4, headDim: 6, seed: 8 }],
  ['llama 3.2 style: llama3 rope, tied embeddings', TINY_LLAMA32],
  ['rope linear (legacy "type" key)', { ...TINY_LLAMA, seed: 9, ropeScaling: { type: 'linear', factor: 4.0 } }],
  ['rope dynamic (within max_position_embeddings)', { ...TINY_LLAMA, seed: 9, ropeScaling: { rope_type: 'dynamic', factor: 2.0 } }],
  ['rope yarn, Qwen2.5 style', { ...TINY_LLAMA, attentionBias: true, ropeTheta: 100, seed: 10, ropeScaling: { type: 'yarn', factor: 4.0, original_max_position_embeddings: 64 } }],
  ['rope yarn, mscale, betas, no truncation', {
    ...TINY_LLAMA, ropeTheta: 100, seed: 11,
    ropeScaling: { rope_type: 'yarn', factor: 8.0, beta_fast: 8, beta_slow: 2, mscale: 1, mscale_all_dim: 0.5, truncate: false, original_max_position_embeddings: 64 },
  }],
  ['rope longrope, Phi-3 style', LONGROPE, [PROMPTS[0]!, LONG_PROMPT, PROMPTS[2]!]],
  ['phi3: fused qkv_proj and gate_up_proj, GQA', TINY_PHI3],
  ['phi3: tied embeddings, bf16', { ...TINY_PHI3, seed: 24, tieWordEmbeddings: true, dtype: 'BF16' }],
  ['phi3: longrope under its legacy type "su"', {
    ...TINY_PHI3, seed: 25, configExtra: { original_max_position_embeddings: 8 },
    ropeScaling: { type: 'su', short_factor: [1, 1.2, 1.5, 2], long_factor: [1, 2.5, 4, 9] },
  }, [PROMPTS[0]!, LONG_PROMPT, PROMPTS[2]!]],
  ['gemma: head_dim ≠ hidden / heads, multi-query, tied', TINY_GEMMA],
  ['gemma: untied lm_head', { ...TINY_GEMMA, seed: 26, tieWordEmbeddings: false }],
  ['gemma: attention_bias (q/k/v/o biases)', { ...TINY_GEMMA, seed: 28, attentionBias: true }],
  ['gemma2: 4 norms, soft-capped scores and logits, query_pre_attn_scalar', TINY_GEMMA2],
  ['gemma2: transformers defaults (caps 50 and 30, window 4096)', { ...TINY_GEMMA, gemma2: true, seed: 27 }],
];

for (const [name, opts, prompts = PROMPTS] of CASES) {
  test(`forward matches the plain-loop reference: ${name}`, async (t) => {
    const { dir, config, get } = await fixtureCheckpoint(`${tmp.dir}/${name.replace(/\W+/g, '_')}`, opts);
    const baseline = tf.memory().numTensors;
    const model = CausalLM.load(dir);
    // With the native matmul, weights whose output width is a multiple of 16 are stored packed (src/backend/wasm/native-matmul.ts).
    const linears = [...model.linears.values()];
    const packable = !nativeMatmulOn() ? [] : linears.filter((l) => l.W.shape[1] % 16 === 0);
    assert.deepEqual(linears.filter((l) => isLaidOut(l.W)).map((l) => l.key), packable.map((l) => l.key));
    let worst = 0;
    for (const batch of [[prompts[0]!], prompts]) {
      const { tokens, logits } = await runBatch(model, batch);
      batch.forEach((prompt, s) => {
        // The reference recomputes the whole sequence: prompt + the tokens the fast path chose, rotated as
        // generate() with a KV cache rotates them (prompt in one step, then a token a step).
        const seq = [...prompt, ...tokens[s]!];
        const ref = referenceForward(config, get, seq, undefined, { prefill: prompt.length });
        for (let step = 0; step < NEW_TOKENS; step++) {
          const r = ref[prompt.length - 1 + step]!;
          const err = maxRelErr(logits[s]![step]!, r);
          worst = Math.max(worst, err);
          assert.ok(err < 1e-4, `${name}, batch ${batch.length}, seq ${s}, step ${step}: rel err ${err}`);
          assert.equal(tokens[s]![step], argmax(r), `greedy token differs at step ${step}`);
          // The chosen token's logprob (log_softmax in float64, as the engine reports it).
          const token = tokens[s]![step]!;
          const dLogprob = Math.abs(logSoftmax(Float64Array.from(logits[s]![step]!))[token]! - logSoftmax(r)[token]!);
          assert.ok(dLogprob < 1e-4, `${name}, batch ${batch.length}, seq ${s}, step ${step}: logprob differs by ${dLogprob}`);
        }
      });
    }
    t.diagnostic(`max rel err vs reference on ${tf.getBackend()}: ${worst.toExponential(2)}`);
    model.dispose();
    assert.equal(tf.memory().numTensors, baseline, 'tensors leaked');
  });
}

test('warmUp runs a throwaway prefill and decode and touches heap without leaving tensors or state behind', async () => {
  const { dir, config, get } = await fixtureCheckpoint(`${tmp.dir}/warmup`, TINY_LLAMA);
  const model = CausalLM.load(dir);
  const ex = new TfExecutor(model);
  const tensors = tf.memory().numTensors;
  const bytes = tf.memory().numBytes;
  ex.warmUp(1 << 20);
  assert.equal(tf.memory().numTensors, tensors, 'no tensor left');
  assert.equal(tf.memory().numBytes, bytes, 'the touched heap is freed');
  assert.equal(ex.running, 0, 'no sequence joined the decode batch');
  // The executor still computes the reference afterwards.
  const prompt = PROMPTS[0]!;
  const res = await ex.prefill([{ seq: 1, tokens: prompt, start: 0, last: true, adapter: null, allLogits: false }], NO_LORA);
  const ref = referenceForward(config, get, prompt);
  assert.ok(maxRelErr(res.logits.get(1)!, ref[prompt.length - 1]!) < 1e-4);
  ex.release(1);
  ex.dispose();
  model.dispose();
});
