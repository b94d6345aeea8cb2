/**
 * Sliding-window attention (Mistral's `sliding_window`, Qwen2's windowed layers) against the plain-loop reference,
 * whose windows are written from transformers: windows of 6 and 7 positions and sequences well past them, through
 * the executor as the engine drives it — prompts longer than the window prefilled whole (left-padded beside short
 * ones) or in chunks, decoding past the window, sequences joining and leaving the decode batch, with PEFT adapters
 * merged and unmerged — every logit to 1e-4. Plus the KV cache: columns no window reaches are dropped when every layer
 * slides, and all are kept when one layer is global.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import * as tf from '@tensorflow/tfjs-core';
import { TINY_LLAMA, writePeftAdapter, type CheckpointOptions } from '../src/demo/index.ts';
import { INITIAL_LORA_STATE, planLora, type LoraMode } from '../src/engine/scheduler.ts';
import { newKV } from '../src/exec/kv.ts';
import { TfExecutor } from '../src/exec/tf-executor.ts';
import type { AdapterLease } from '../src/lora/types.ts';
import { CausalLM } from '../src/model/model.ts';
import { referenceForward, type RefLoraMap } from './reference/forward.ts';
import { makeManager, refLora } from './helpers/lora.ts';
import { argmax, fixtureCheckpoint, maxRelErr, setupBackend, tempDir } from './helpers/tf.ts';

const tmp = tempDir();
before(setupBackend);
after(tmp.cleanup);

/** Mistral: every layer slides by 6. */
const MISTRAL: CheckpointOptions = {
  ...TINY_LLAMA, seed: 31, configExtra: { model_type: 'mistral', sliding_window: 6, architectures: ['MistralForCausalLM'] },
};
/** Qwen2 (q/k/v biases), 3 layers: the first global, the others sliding by 7 (max_window_layers 1). */
const QWEN2: CheckpointOptions = {
  ...TINY_LLAMA, attentionBias: true, numLayers: 3, seed: 32, configExtra: { use_sliding_window: true, sliding_window: 7, max_window_layers: 1 },
};
/** Qwen2 alternating sliding and global layers by layer_types (as Gemma 2 does). */
const QWEN2_ALTERNATING: CheckpointOptions = {
  ...TINY_LLAMA, attentionBias: true, numLayers: 3, seed: 33,
  configExtra: { use_sliding_window: true, sliding_window: 6, max_window_layers: 0, layer_types: ['sliding_attention', 'full_attention', 'sliding_attention'] },
};
const CASES: [string, CheckpointOptions, (number | null)[]][] = [
  ['mistral, window 6 on every layer', MISTRAL, [6, 6]],
  ['qwen2, window 7 from max_window_layers 1', QWEN2, [null, 7, 7]],
  ['qwen2, layer_types alternating sliding and full', QWEN2_ALTERNATING, [6, null, 6]],
];

const seq = (n: number, from: number) => Array.from({ length: n }, (_, i) => (from + i * 37) % 300);

interface Job {
  readonly prompt: number[];
  readonly lease: AdapterLease | null;
  /** Prefill in chunks of this many tokens (default: the whole prompt in one step, beside the other whole prompts). */
  readonly chunk?: number;
}

interface Run {
  /** Generated tokens. */
  tokens: number[];
  /** logits[t]: the logits at position t, for every prompt position and every decoded one. */
  logits: Float32Array[];
}

/**
 * Drives the executor as the engine does: each step decodes the running sequences and prefills the next chunk of the
 * others (whole prompts together in one left-padded pass, chunks alone); a sequence joins the decode batch after its
 * last chunk and is released when it has `newTokens`. LoRA plans follow the scheduler's rule for `mode`.
 */
async function drive(ex: TfExecutor, jobs: readonly Job[], newTokens: number, mode: LoraMode): Promise<Run[]> {
  const V = ex.vocabSize;
  const runs: Run[] = jobs.map(() => ({ tokens: [], logits: [] }));
  const prefilled = jobs.map(() => 0);
  const released = jobs.map(() => false);
  let state = INITIAL_LORA_STATE;
  const key = (j: number) => jobs[j]!.lease?.adapter.key ?? null;
  while (released.includes(false)) {
    const decoding = jobs.map((_, j) => j).filter((j) => prefilled[j] === jobs[j]!.prompt.length && !released[j]);
    const prefilling = jobs.map((_, j) => j).filter((j) => prefilled[j]! < jobs[j]!.prompt.length);
    const plan = planLora(state, { decode: decoding.map(key), prefill: prefilling.map(key) }, { loraMode: mode });
    state = plan.state;
    if (decoding.length > 0) {
      const res = await ex.decode(decoding.map((j) => ({
        seq: j, token: runs[j]!.tokens.at(-1)!, position: jobs[j]!.prompt.length + runs[j]!.tokens.length - 1, adapter: jobs[j]!.lease?.adapter ?? null,
      })), plan.decode);
      for (const j of decoding) {
        const l = res.logits.get(j)!.slice();
        runs[j]!.logits.push(l);
        runs[j]!.tokens.push(argmax(l));
      }
    }
    if (prefilling.length > 0) {
      const items = prefilling.map((j) => {
        const { prompt, chunk = prompt.length } = jobs[j]!;
        const start = prefilled[j]!;
        const tokens = prompt.slice(start, start + chunk);
        return { seq: j, tokens, start, last: start + tokens.length === prompt.length, adapter: jobs[j]!.lease?.adapter ?? null, allLogits: true };
      });
      const res = await ex.prefill(items, plan.prefill);
      for (const item of items) {
        const all = res.logits.get(item.seq)!;
        assert.equal(all.length, item.tokens.length * V);
        for (let t = 0; t < item.tokens.length; t++) runs[item.seq]!.logits.push(all.slice(t * V, (t + 1) * V));
        prefilled[item.seq] = item.start + item.tokens.length;
        if (item.last) runs[item.seq]!.tokens.push(argmax(runs[item.seq]!.logits.at(-1)!));
      }
    }
    for (const j of decoding) {
      if (runs[j]!.tokens.length === newTokens) {
        ex.release(j);
        released[j] = true;
      }
    }
  }
  return runs;
}

/** Every logit of each run against the reference over prompt + generated tokens; returns the worst error. */
function compare(name: string, config: Record<string, unknown>, get: Parameters<typeof referenceForward>[1], jobs: readonly Job[], runs: readonly Run[],
  lora: (job: Job) => RefLoraMap | undefined = () => undefined): number {
  let worst = 0;
  jobs.forEach((job, j) => {
    const run = runs[j]!;
    const ref = referenceForward(config, get, [...job.prompt, ...run.tokens], lora(job));
    assert.equal(run.logits.length, job.prompt.length + run.tokens.length - 1);
    run.logits.forEach((l, t) => {
      const err = maxRelErr(l, ref[t]!);
      worst = Math.max(worst, err);
      assert.ok(err < 1e-4, `${name}, job ${j}, position ${t}: rel err ${err}`);
    });
    run.tokens.forEach((tok, i) => assert.equal(tok, argmax(ref[job.prompt.length - 1 + i]!), `${name}, job ${j}: greedy token ${i}`));
  });
  return worst;
}

/** The reference without any window; a served logit past the window must differ from it (the window is in effect). */
function windowMatters(config: Record<string, unknown>, get: Parameters<typeof referenceForward>[1], job: Job, run: Run, window: number): void {
  const global = { ...config, model_type: 'llama' }; // same weights and biases (read when present), no window
  const ref = referenceForward(global, get, [...job.prompt, ...run.tokens]);
  const last = run.logits.length - 1;
  assert.ok(last >= window, 'the sequence passes the window');
  assert.ok(maxRelErr(run.logits[last]!, ref[last]!) > 1e-3, 'the windowed logits differ from global attention');
}

for (const [name, opts, windows] of CASES) {
  test(`${name}: prefill past the window, chunked prefill, decode past it and a mixed batch match the reference`, async (t) => {
    const { dir, config, get } = await fixtureCheckpoint(join(tmp.dir, name.replace(/\W+/g, '_')), opts);
    const baseline = tf.memory().numTensors;
    const model = CausalLM.load(dir);
    assert.deepEqual(model.config.layerWindows, windows);
    assert.equal(model.config.maxPositions, 128, 'the context is not clamped to the window');
    const ex = new TfExecutor(model);
    const jobs: Job[] = [
      { prompt: seq(30, 1), lease: null, chunk: 7 }, // chunks straddling the window
      { prompt: seq(34, 2), lease: null }, // whole, left-padded with the short ones
      { prompt: seq(3, 3), lease: null },
      { prompt: seq(5, 4), lease: null },
      { prompt: seq(11, 5), lease: null, chunk: 4 },
    ];
    const runs = await drive(ex, jobs, 12, 'unmerged');
    const worst = compare(name, config, get, jobs, runs);
    windowMatters(config, get, jobs[2]!, runs[2]!, 7);
    t.diagnostic(`max rel err vs reference on ${tf.getBackend()}: ${worst.toExponential(2)}`);
    assert.equal(ex.running, 0);
    ex.dispose();
    model.dispose();
    assert.equal(tf.memory().numTensors, baseline, 'tensors leaked');
  });
}

test('sliding windows with PEFT adapters, merged and unmerged, match the reference', async (t) => {
  const root = join(tmp.dir, 'lora');
  for (const [name, opts] of [CASES[0]!, CASES[1]!]) {
    const { dir, config, get } = await fixtureCheckpoint(join(root, name.replace(/\W+/g, '_'), 'model'), opts);
    const baseline = tf.memory().numTensors;
    const model = CausalLM.load(dir);
    const ex = new TfExecutor(model);
    const adapters = join(root, name.replace(/\W+/g, '_'), 'adapters');
    const manager = makeManager(model, adapters, ex);
    await writePeftAdapter(join(adapters, 'a'), { baseConfig: config, seed: 41, r: 4, loraAlpha: 8, targetModules: 'all-linear' });
    await writePeftAdapter(join(adapters, 'b'), { baseConfig: config, seed: 42, r: 2, loraAlpha: 4, targetModules: ['q_proj', 'k_proj', 'v_proj'] });
    const a = await manager.acquire('a');
    const b = await manager.acquire('b');
    const refs = new Map<AdapterLease | null, RefLoraMap | undefined>([[a, refLora(model, join(adapters, 'a'))], [b, refLora(model, join(adapters, 'b'))], [null, undefined]]);
    let worst = 0;
    // Unmerged: three adapters (one the base) in one batch, long and short, one prompt chunked.
    const mixed: Job[] = [{ prompt: seq(26, 6), lease: a, chunk: 9 }, { prompt: seq(4, 7), lease: b }, { prompt: seq(20, 8), lease: null }, { prompt: seq(15, 9), lease: a }];
    worst = Math.max(worst, compare(`${name} unmerged`, config, get, mixed, await drive(ex, mixed, 10, 'unmerged'), (j) => refs.get(j.lease)));
    // Merged: every row on one adapter.
    const merged: Job[] = [{ prompt: seq(28, 10), lease: a, chunk: 5 }, { prompt: seq(3, 11), lease: a }, { prompt: seq(17, 12), lease: a }];
    worst = Math.max(worst, compare(`${name} merged`, config, get, merged, await drive(ex, merged, 10, 'merged'), (j) => refs.get(j.lease)));
    t.diagnostic(`${name}: max rel err vs reference on ${tf.getBackend()}: ${worst.toExponential(2)}`);
    a.release();
    b.release();
    ex.dispose();
    manager.dispose();
    model.dispose();
    assert.equal(tf.memory().numTensors, baseline, 'tensors leaked');
  }
});

test('KV cache: when every layer slides, columns out of every window are dropped; with a global layer all are kept', async () => {
  for (const [name, opts, windows] of [CASES[0]!, CASES[1]!]) {
    const { dir, config, get } = await fixtureCheckpoint(join(tmp.dir, `kv-${name.replace(/\W+/g, '_')}`), opts);
    const model = CausalLM.load(dir);
    const baseline = tf.memory().numTensors;
    const slides = windows.every((w) => w !== null);
    const W = Math.max(...windows.map((w) => w ?? 0));
    const kv = newKV(model.config);
    kv.addEmptyRows(1);
    const tokens = seq(20, 13);
    const forward = async (chunk: number[], start: number) => {
      const logits = model.forward({
        kv, tokens: Int32Array.from(chunk), positions: Int32Array.from(chunk, (_, i) => start + i), T: chunk.length, logitRows: Int32Array.of(chunk.length - 1),
      });
      const l = (await logits.data()) as Float32Array;
      logits.dispose();
      return l;
    };
    const logits = [await forward(tokens, 0)];
    let length = tokens.length;
    const widths = [kv.cols];
    for (let step = 0; step < 30; step++) {
      const next = argmax(logits.at(-1)!);
      tokens.push(next);
      logits.push(await forward([next], length++));
      widths.push(kv.cols);
    }
    if (slides) {
      // At most about 4/3 of the window (trimmed in amortised batches), never fewer than the window needs.
      assert.ok(widths.every((c) => c >= W - 1 && c <= Math.ceil((4 * W) / 3)), `${name}: cache widths ${widths.join(' ')}`);
    } else {
      assert.deepEqual(widths, widths.map((_, i) => 20 + i), `${name}: every column kept`);
    }
    const ref = referenceForward(config, get, tokens);
    logits.forEach((l, i) => assert.ok(maxRelErr(l, ref[19 + i]!) < 1e-4, `${name}: step ${i}`));
    kv.dispose();
    assert.equal(tf.memory().numTensors, baseline, 'tensors leaked');
    model.dispose();
  }
});
