/**
 * LoRA application end to end on the fixture checkpoints of every family: unmerged and merged logits against the
 * plain-loop reference (base + s·B·A·x per module; on Phi-3's fused modules, then split), mixed-adapter batches against
 * the reference row by row, batch invariance across mixed adapters, exact base restore after
 * merge/switch cycles, and eviction freeing tensors.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import * as tf from '@tensorflow/tfjs-core';
import { TINY_GEMMA, TINY_GEMMA2, TINY_GPT2, TINY_LLAMA, TINY_PHI3, writePeftAdapter, type AdapterOptions, type CheckpointOptions } from '../src/demo/index.ts';
import type { AdapterLease } from '../src/lora/types.ts';
import { CausalLM } from '../src/model/model.ts';
import { logSoftmax, referenceForward } from './reference/forward.ts';
import { TfExecutor } from '../src/exec/tf-executor.ts';
import { greedyBatch, makeManager, refLora } from './helpers/lora.ts';
import { argmax, fixtureCheckpoint, maxRelErr, setupBackend, tempDir, testBackend } from './helpers/tf.ts';

const tmp = tempDir();
before(setupBackend);
after(tmp.cleanup);

const PROMPT = [5, 17, 42, 99, 3, 250, 7];
const NEW = 5;

type AdapterCase = [string, Omit<AdapterOptions, 'baseConfig'>];
const ADAPTERS: Record<string, AdapterCase[]> = {
  gpt2: [
    ['r4 c_attn only', { r: 4, loraAlpha: 8, targetModules: ['c_attn'] }],
    ['r8 c_proj (attn and mlp) rsLoRA', { r: 8, loraAlpha: 16, targetModules: ['c_proj'], useRslora: true }],
    ['all-linear, rank/alpha patterns', { r: 4, loraAlpha: 4, targetModules: 'all-linear', rankPattern: { c_fc: 2 }, alphaPattern: { 'attn.c_attn': 32 } }],
  ],
  llama: [
    ['r2 q,v', { r: 2, loraAlpha: 4, targetModules: ['q_proj', 'v_proj'] }],
    ['r8 attention-only rsLoRA, bf16', { r: 8, loraAlpha: 8, targetModules: ['q_proj', 'k_proj', 'v_proj', 'o_proj'], useRslora: true, dtype: 'BF16' }],
    ['all-linear, patterns, layer 1 only, .default infix', { r: 4, loraAlpha: 16, targetModules: 'all-linear', rankPattern: { down_proj: 2 }, alphaPattern: { 'self_attn.k_proj': 2 }, layersToTransform: [1], nameInfix: true }],
    ['regex target', { r: 3, loraAlpha: 6, targetModules: '.*\\.(gate_proj|up_proj)' }],
  ],
  // PEFT targets Phi-3's fused modules: lora_B [q + 2·kv, r] on qkv_proj, [2·intermediate, r] on gate_up_proj.
  phi3: [
    ['r4 qkv_proj (PEFT default)', { r: 4, loraAlpha: 8 }],
    ['all-linear, gate_up_proj rank pattern', { r: 4, loraAlpha: 16, targetModules: 'all-linear', rankPattern: { gate_up_proj: 2 } }],
    ['r8 o_proj, down_proj rsLoRA, bf16', { r: 8, loraAlpha: 8, targetModules: ['o_proj', 'down_proj'], useRslora: true, dtype: 'BF16' }],
  ],
  gemma: [
    ['r2 q,v (PEFT default)', { r: 2, loraAlpha: 4 }],
    ['all-linear, patterns', { r: 4, loraAlpha: 16, targetModules: 'all-linear', rankPattern: { down_proj: 2 }, alphaPattern: { 'self_attn.k_proj': 2 } }],
  ],
  gemma2: [
    ['r2 q,v (PEFT default)', { r: 2, loraAlpha: 4 }],
    ['all-linear, layer 1 only', { r: 4, loraAlpha: 16, targetModules: 'all-linear', layersToTransform: [1] }],
  ],
};

/** The chosen token's logprob from the fast logits (log_softmax in float64, as the engine reports it) matches the reference's. */
function assertLogprob(fast: Float32Array, ref: Float64Array, token: number, label: string): void {
  const d = Math.abs(logSoftmax(Float64Array.from(fast))[token]! - logSoftmax(ref)[token]!);
  assert.ok(d < 1e-4, `${label}: logprob differs by ${d}`);
}

const BASES: [string, CheckpointOptions][] = [
  ['gpt2', TINY_GPT2], ['llama', TINY_LLAMA], ['phi3', TINY_PHI3], ['gemma', TINY_GEMMA], ['gemma2', TINY_GEMMA2],
];

for (const [family, opts] of BASES) {
  test(`${family}: merged and unmerged LoRA match the plain-loop reference`, async (t) => {
    const root = join(tmp.dir, `ref-${family}`);
    const { config, get } = await fixtureCheckpoint(join(root, 'model'), opts);
    const baseline = tf.memory().numTensors;
    const model = CausalLM.load(join(root, 'model'));
    const ex = new TfExecutor(model);
    const manager = makeManager(model, join(root, 'adapters'), ex);
    let worst = 0;
    for (const [i, [name, aopts]] of ADAPTERS[family]!.entries()) {
      const id = `a${i}`;
      await writePeftAdapter(join(root, 'adapters', id), { baseConfig: config, seed: 100 + i, ...aopts });
      const lease = await manager.acquire(id);
      const ref = refLora(model, join(root, 'adapters', id));
      assert.ok(ref.size > 0);
      const unmerged = await greedyBatch(ex, [{ prompt: PROMPT, lease }], NEW, { mode: 'unmerged' });
      const merged = await greedyBatch(ex, [{ prompt: PROMPT, lease }], NEW, { mode: 'merged' });
      const base = await greedyBatch(ex, [{ prompt: PROMPT, lease: null }], 1);
      const refLogits = referenceForward(config, get, [...PROMPT, ...unmerged.tokens[0]!], ref);
      for (let s = 0; s < NEW; s++) {
        const r = refLogits[PROMPT.length - 1 + s]!;
        const eu = maxRelErr(unmerged.logits[0]![s]!, r);
        const em = maxRelErr(merged.logits[0]![s]!, r);
        worst = Math.max(worst, eu, em);
        assert.ok(eu < 1e-4, `${name}: unmerged step ${s} rel err ${eu}`);
        assert.ok(em < 1e-4, `${name}: merged step ${s} rel err ${em}`);
        assert.equal(unmerged.tokens[0]![s], argmax(r));
        assert.equal(merged.tokens[0]![s], argmax(r));
        assertLogprob(unmerged.logits[0]![s]!, r, unmerged.tokens[0]![s]!, `${name}: unmerged step ${s}`);
        assertLogprob(merged.logits[0]![s]!, r, merged.tokens[0]![s]!, `${name}: merged step ${s}`);
      }
      // The adapter visibly changes the output (else the comparison would prove nothing).
      assert.ok(maxRelErr(base.logits[0]![0]!, refLogits[PROMPT.length - 1]!) > 1e-3, `${name}: adapter has no effect`);
      lease.release();
    }
    t.diagnostic(`max rel err vs reference on ${tf.getBackend()}: ${worst.toExponential(2)}`);
    ex.dispose();
    manager.dispose();
    model.dispose();
    assert.equal(tf.memory().numTensors, baseline, 'tensors leaked');
  });
}

test('llama: 8 sequences on 8 adapters plus one on the base give the same greedy tokens as each alone', async () => {
  const root = join(tmp.dir, 'mixed');
  const { config } = await fixtureCheckpoint(join(root, 'model'), TINY_LLAMA);
  const model = CausalLM.load(join(root, 'model'));
  const ex = new TfExecutor(model);
  const manager = makeManager(model, join(root, 'adapters'), ex);
  const leases: AdapterLease[] = [];
  for (let i = 0; i < 8; i++) {
    await writePeftAdapter(join(root, 'adapters', `m${i}`), { baseConfig: config, seed: 200 + i, r: 2 + (i % 4) * 2, loraAlpha: 8, targetModules: i % 2 ? 'all-linear' : ['q_proj', 'v_proj', 'o_proj'] });
    leases.push(await manager.acquire(`m${i}`));
  }
  const prompts = Array.from({ length: 9 }, (_, i) => Array.from({ length: 3 + i }, (_, t) => (i * 31 + t * 7) % 300));
  const jobs = prompts.map((prompt, i) => ({ prompt, lease: i < 8 ? leases[i]! : null }));
  for (const mode of ['unmerged', 'auto'] as const) {
    const together = await greedyBatch(ex, jobs, 8, { mode });
    const alone = [];
    for (const j of jobs) alone.push((await greedyBatch(ex, [j], 8, { mode, seqBase: 100 })).tokens[0]);
    assert.deepEqual(together.tokens, alone, `${mode}: batch composition changed greedy tokens`);
    // Different adapters really give different continuations.
    assert.ok(new Set(together.tokens.map((t) => t.join(','))).size > 4);
  }
  leases.forEach((l) => l.release());
  ex.dispose();
  manager.dispose();
  model.dispose();
});

for (const [family, opts] of BASES.filter(([f]) => ['phi3', 'gemma', 'gemma2'].includes(f))) {
  test(`${family}: a batch mixing three adapters and the base matches the reference row by row, and each row alone merged`, async () => {
    const root = join(tmp.dir, `mixed-${family}`);
    const { config, get } = await fixtureCheckpoint(join(root, 'model'), opts);
    const baseline = tf.memory().numTensors;
    const model = CausalLM.load(join(root, 'model'));
    const ex = new TfExecutor(model);
    const manager = makeManager(model, join(root, 'adapters'), ex);
    const leases: AdapterLease[] = [];
    for (const [i, targetModules] of (['all-linear', 'all-linear', undefined] as const).entries()) {
      await writePeftAdapter(join(root, 'adapters', `x${i}`), { baseConfig: config, seed: 400 + i, r: 2 + 2 * i, loraAlpha: 8, targetModules });
      leases.push(await manager.acquire(`x${i}`));
    }
    const prompts = [PROMPT, [11, 12], [200, 201, 202, 203], [40, 41, 42]];
    const jobs = prompts.map((prompt, i) => ({ prompt, lease: leases[i] ?? null }));
    const together = await greedyBatch(ex, jobs, NEW, { mode: 'unmerged' });
    jobs.forEach((j, i) => {
      const ref = referenceForward(config, get, [...j.prompt, ...together.tokens[i]!], j.lease ? refLora(model, join(root, 'adapters', `x${i}`)) : undefined);
      for (let s = 0; s < NEW; s++) {
        const r = ref[j.prompt.length - 1 + s]!;
        const err = maxRelErr(together.logits[i]![s]!, r);
        assert.ok(err < 1e-4, `row ${i} step ${s}: rel err ${err}`);
        assert.equal(together.tokens[i]![s], argmax(r), `row ${i} step ${s}: greedy token`);
        assertLogprob(together.logits[i]![s]!, r, together.tokens[i]![s]!, `row ${i} step ${s}`);
      }
    });
    // Alone with its adapter merged (W + s·B·A), each row gives the same tokens.
    for (const [i, j] of jobs.entries()) {
      assert.deepEqual((await greedyBatch(ex, [j], NEW, { mode: 'merged', seqBase: 100 })).tokens[0], together.tokens[i], `row ${i} alone, merged`);
    }
    assert.ok(new Set(together.tokens.map((t) => t.join(','))).size > 2, 'the adapters change the continuations');
    leases.forEach((l) => l.release());
    ex.dispose();
    manager.dispose();
    model.dispose();
    assert.equal(tf.memory().numTensors, baseline, 'tensors leaked');
  });
}

test('merge/switch cycles restore the base logits bit for bit', async () => {
  const root = join(tmp.dir, 'cycles');
  const { config } = await fixtureCheckpoint(join(root, 'model'), TINY_LLAMA);
  const model = CausalLM.load(join(root, 'model'));
  const ex = new TfExecutor(model);
  const manager = makeManager(model, join(root, 'adapters'), ex);
  await writePeftAdapter(join(root, 'adapters', 'x'), { baseConfig: config, seed: 1, targetModules: 'all-linear' });
  await writePeftAdapter(join(root, 'adapters', 'y'), { baseConfig: config, seed: 2, targetModules: 'all-linear' });
  const x = await manager.acquire('x');
  const y = await manager.acquire('y');
  const pristine = (await greedyBatch(ex, [{ prompt: PROMPT, lease: null }], 1)).logits[0]![0]!;
  const baseline = tf.memory().numTensors;
  // A cycle is dispatch-bound on webgpu (tens of ms on a software adapter): fewer cycles there.
  const cycles = testBackend() === 'webgpu' ? 100 : 1000;
  for (let i = 0; i < cycles; i++) {
    await greedyBatch(ex, [{ prompt: [1 + (i % 50)], lease: i % 2 ? x : y }], 1, { mode: 'merged' });
  }
  const after = (await greedyBatch(ex, [{ prompt: PROMPT, lease: null }], 1)).logits[0]![0]!;
  assert.deepEqual(Array.from(after), Array.from(pristine));
  assert.ok(tf.memory().numTensors <= baseline + 64, 'merged weights of at most one adapter are kept');
  x.release();
  y.release();
  ex.dispose();
  manager.dispose();
  model.dispose();
});

test('eviction: device tier of 2, 10 adapters in turn: tensors freed, results correct', async () => {
  const root = join(tmp.dir, 'evict');
  const { config, get } = await fixtureCheckpoint(join(root, 'model'), TINY_LLAMA);
  const model = CausalLM.load(join(root, 'model'));
  const ex = new TfExecutor(model);
  const manager = makeManager(model, join(root, 'adapters'), ex, { maxDeviceAdapters: 2, maxHostBytes: 1 });
  for (let i = 0; i < 10; i++) await writePeftAdapter(join(root, 'adapters', `e${i}`), { baseConfig: config, seed: 300 + i, r: 4, targetModules: ['q_proj', 'v_proj'] });
  const baseline = tf.memory().numTensors;
  for (let round = 0; round < 2; round++) {
    for (let i = 0; i < 10; i++) {
      const lease = await manager.acquire(`e${i}`);
      assert.ok(manager.stats().deviceAdapters <= 2);
      const out = await greedyBatch(ex, [{ prompt: PROMPT, lease }], 1);
      const ref = referenceForward(config, get, PROMPT, refLora(model, join(root, 'adapters', `e${i}`)));
      const err = maxRelErr(out.logits[0]![0]!, ref.at(-1)!);
      assert.ok(err < 1e-4, `adapter e${i}: rel err ${err}`);
      lease.release();
    }
  }
  manager.dispose();
  ex.dispose();
  assert.equal(tf.memory().numTensors, baseline, 'device tensors of evicted adapters were not freed');
  model.dispose();
});
