/**
 * The TensorFlow.js forward pass (through the executor: prefill + batched KV-cache decode) against the
 * independent plain-loop reference, for both families, batch 1 and a batch of 3 sequences of different lengths.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import * as tf from '@tensorflow/tfjs-core';
import { TINY_GPT2, TINY_LLAMA, type CheckpointOptions } from '../src/demo/index.ts';
import { CausalLM } from '../src/model/model.ts';
import { isPacked } from '../src/backend/wasm/native-matmul.ts';
import { TfExecutor } from '../src/exec/tf-executor.ts';
import { referenceForward } from './reference/forward.ts';
import { argmax, fixtureCheckpoint, maxRelErr, nativeMatmulOn, setupBackend, tempDir } from './helpers/tf.ts';

const tmp = tempDir();
before(setupBackend);
after(tmp.cleanup);

const PROMPTS = [[5, 17, 42, 99, 3, 250, 7], [11, 12], [200, 201, 202, 203]];
const NEW_TOKENS = 6;

/** Greedy-decodes the prompts together through the executor; returns per prompt the logits of every step. */
async function runBatch(model: CausalLM, prompts: number[][]): Promise<{ tokens: number[][]; logits: Float32Array[][] }> {
  const ex = new TfExecutor(model, { loraMode: 'unmerged' });
  const tokens = prompts.map(() => [] as number[]);
  const logits = prompts.map(() => [] as Float32Array[]);
  const res = await ex.prefill(prompts.map((p, seq) => ({ seq, tokens: p, start: 0, last: true, adapter: null, allLogits: false })));
  prompts.forEach((_, s) => {
    const l = res.logits.get(s)!;
    logits[s]!.push(l.slice());
    tokens[s]!.push(argmax(l));
  });
  for (let step = 1; step < NEW_TOKENS; step++) {
    const r = await ex.decode(prompts.map((p, seq) => ({ seq, token: tokens[seq]!.at(-1)!, position: p.length + step - 1, adapter: null })));
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

const CASES: [string, CheckpointOptions][] = [
  ['gpt2 (transformer. prefix)', { ...TINY_GPT2, gpt2Prefix: true }],
  ['gpt2 (hub layout, no prefix, attn.bias buffers)', { ...TINY_GPT2, gpt2Prefix: false }],
  ['llama (GQA)', TINY_LLAMA],
  ['llama bf16, tied embeddings', { ...TINY_LLAMA, dtype: 'BF16', tieWordEmbeddings: true, seed: 7 }],
  ['qwen2-style q/k/v bias, MHA, explicit head_dim', { ...TINY_LLAMA, attentionBias: true, numKvHeads: 4, headDim: 6, seed: 8 }],
];

for (const [name, opts] of CASES) {
  test(`forward matches the plain-loop reference: ${name}`, async (t) => {
    const { dir, config, get } = await fixtureCheckpoint(`${tmp.dir}/${name.replace(/\W+/g, '_')}`, opts);
    const baseline = tf.memory().numTensors;
    const model = CausalLM.load(dir);
    // With the native matmul, weights whose output width is a multiple of 16 are stored packed (src/backend/wasm/native-matmul.ts).
    const linears = [...model.linears.values()];
    const packable = !nativeMatmulOn() ? [] : linears.filter((l) => l.W.shape[1] % 16 === 0);
    assert.deepEqual(linears.filter((l) => isPacked(l.W)).map((l) => l.key), packable.map((l) => l.key));
    let worst = 0;
    for (const batch of [[PROMPTS[0]!], PROMPTS]) {
      const { tokens, logits } = await runBatch(model, batch);
      batch.forEach((prompt, s) => {
        // The reference recomputes the whole sequence: prompt + the tokens the fast path chose.
        const seq = [...prompt, ...tokens[s]!];
        const ref = referenceForward(config, get, seq);
        for (let step = 0; step < NEW_TOKENS; step++) {
          const r = ref[prompt.length - 1 + step]!;
          const err = maxRelErr(logits[s]![step]!, r);
          worst = Math.max(worst, err);
          assert.ok(err < 1e-4, `${name}, batch ${batch.length}, seq ${s}, step ${step}: rel err ${err}`);
          assert.equal(tokens[s]![step], argmax(r), `greedy token differs at step ${step}`);
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
  const ex = new TfExecutor(model, { loraMode: 'unmerged' });
  const tensors = tf.memory().numTensors;
  const bytes = tf.memory().numBytes;
  ex.warmUp(1 << 20);
  assert.equal(tf.memory().numTensors, tensors, 'no tensor left');
  assert.equal(tf.memory().numBytes, bytes, 'the touched heap is freed');
  assert.equal(ex.running, 0, 'no sequence joined the decode batch');
  // The executor still computes the reference afterwards.
  const prompt = PROMPTS[0]!;
  const res = await ex.prefill([{ seq: 1, tokens: prompt, start: 0, last: true, adapter: null, allLogits: false }]);
  const ref = referenceForward(config, get, prompt);
  assert.ok(maxRelErr(res.logits.get(1)!, ref[prompt.length - 1]!) < 1e-4);
  ex.release(1);
  ex.dispose();
  model.dispose();
});
