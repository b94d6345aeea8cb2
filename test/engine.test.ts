/** The engine over the real executor: continuous batching, determinism, details, cancellation and leaks. */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import * as tf from '@tensorflow/tfjs-core';
import { TINY_LLAMA, writePeftAdapter } from '../src/demo/index.ts';
import { Engine } from '../src/engine/engine.ts';
import type { DecodeItem, PrefillItem, StepResult } from '../src/engine/executor.ts';
import type { Runtime } from '../src/runtime.ts';
import { TfExecutor } from '../src/exec/tf-executor.ts';
import { fixtureRuntime, generate, request, TEST_RUNTIME, type Outcome } from './helpers/runtime.ts';
import { setupBackend, tempDir, testBackend } from './helpers/tf.ts';

const tmp = tempDir();
let rt: Runtime;
before(async () => {
  await setupBackend();
  const r = await fixtureRuntime(tmp.dir, TINY_LLAMA, { maxQueue: 64 });
  rt = r.rt;
  for (let i = 0; i < 4; i++) {
    await writePeftAdapter(join(tmp.dir, 'adapters', `ad${i}`), { baseConfig: r.config, seed: 50 + i, r: 4, loraAlpha: 8, targetModules: i % 2 ? 'all-linear' : ['q_proj', 'v_proj'] });
  }
});
after(async () => {
  await rt.close();
  tmp.cleanup();
});

const prompt = (i: number) => Array.from({ length: 2 + (i % 7) }, (_, t) => (i * 13 + t * 5) % 300 + 3);

test('concurrent requests on mixed adapters give the same tokens as each alone', async () => {
  const reqs = Array.from({ length: 12 }, (_, i) => request(prompt(i), { adapterId: i % 5 === 4 ? null : `ad${i % 4}`, maxNewTokens: 10, ignoreEos: true }));
  const alone = [];
  for (const r of reqs) alone.push((await generate(rt, r)).tokens.map((t) => t.id));
  const together = await Promise.all(reqs.map((r) => generate(rt, r)));
  assert.deepEqual(together.map((o) => o.tokens.map((t) => t.id)), alone);
  for (const o of together) {
    assert.equal(o.result?.generatedTokens, 10);
    assert.equal(o.result?.finishReason, 'length');
    assert.equal(o.text, o.result?.text);
  }
});

test('sequences that finish at different steps leave the batch without disturbing the others', async () => {
  // Different lengths and arrival times: rows leave (gather) and the cache is trimmed while others decode.
  const reqs = Array.from({ length: 10 }, (_, i) => request(prompt(i + 3), { adapterId: i % 3 ? `ad${i % 4}` : null, maxNewTokens: 3 + ((i * 7) % 17), ignoreEos: true }));
  const alone = [];
  for (const r of reqs) alone.push((await generate(rt, r)).tokens.map((t) => t.id));
  const together = await Promise.all(reqs.map(async (r, i) => {
    await new Promise((res) => setTimeout(res, i * 15));
    return generate(rt, r);
  }));
  assert.deepEqual(together.map((o) => o.tokens.map((t) => t.id)), alone);
});

test('seeded sampling is reproducible, seeds differ, top_k 1 is greedy; details carry prompt logprobs', async () => {
  const sampled = (seed: number, topK = 20) => generate(rt, request(prompt(3), {
    sampling: { doSample: true, temperature: 0.8, topK, seed }, maxNewTokens: 6, ignoreEos: true, decoderInputDetails: true,
  }));
  const ids = (o: Awaited<ReturnType<typeof generate>>) => o.tokens.map((t) => t.id);
  const r = request(prompt(3), { sampling: { doSample: true, temperature: 0.8, topK: 20, seed: 42 }, maxNewTokens: 6, ignoreEos: true, decoderInputDetails: true });
  const a = await generate(rt, r);
  const b = await sampled(42);
  assert.deepEqual(ids(a), ids(b), 'the same seed gives the same tokens');
  const others = await Promise.all([1, 2, 3, 4, 5].map((s) => sampled(s)));
  assert.ok(others.some((o) => ids(o).join() !== ids(a).join()), 'some other seed gives other tokens');
  const greedy = await generate(rt, request(prompt(3), { maxNewTokens: 6, ignoreEos: true }));
  assert.deepEqual(ids(await sampled(7, 1)), ids(greedy), 'top_k 1 samples the argmax');
  assert.ok(a.tokens.every((t) => t.logprob <= 0));
  assert.equal(a.result!.seed, 42);
  assert.equal(a.result!.prefill.length, r.inputIds.length);
  assert.equal(a.result!.prefill[0]!.logprob, null);
  assert.ok(a.result!.prefill.slice(1).every((p) => typeof p.logprob === 'number' && p.logprob <= 0));
});

test('long prompts are prefilled in chunks and match an unchunked run', async () => {
  const long = Array.from({ length: 90 }, (_, t) => (t * 11) % 300 + 3);
  const chunked = await generate(rt, request(long, { maxNewTokens: 5, ignoreEos: true }));
  const other = await fixtureRuntime(join(tmp.dir, 'nochunk'), TINY_LLAMA, { prefillChunk: 128 });
  const whole = await generate(other.rt, request(long, { maxNewTokens: 5, ignoreEos: true }));
  await other.rt.close();
  assert.deepEqual(chunked.tokens.map((t) => t.id), whole.tokens.map((t) => t.id));
});

test('tokens picked or shortlisted on the device (webgpu) equal the host sampler\'s: ids, logprobs, stops, lengths, details, forks, mixed batches', async () => {
  const model = (rt.executor as TfExecutor).model;
  /** An engine over its own executor, counting the tokens it picked on the device. */
  const engineWith = (devicePick: boolean) => {
    const executor = new TfExecutor(model, { devicePick });
    const counts = { picked: 0, shortlisted: 0, logits: 0, mixed: 0, rowsRead: 0, edited: 0 };
    /** Items with logit edits that the executor answered on the device. */
    const edited = (items: readonly (PrefillItem | DecodeItem)[]) => (r: StepResult): StepResult => {
      counts.edited += items.filter((i) => i.edits && (r.picked?.has(i.seq) || r.shortlists?.has(i.seq))).length;
      return r;
    };
    const count = (r: StepResult): StepResult => {
      counts.picked += r.picked?.size ?? 0;
      counts.shortlisted += r.shortlists?.size ?? 0;
      counts.logits += r.logits.size;
      if ((r.picked?.size ?? 0) + (r.shortlists?.size ?? 0) > 0 && r.logits.size > 0) counts.mixed++;
      const read = r.readLogits;
      return read ? { ...r, readLogits: (seqs) => ((counts.rowsRead += seqs.length), read(seqs)) } : r;
    };
    const counted = Object.assign(Object.create(executor) as TfExecutor, {
      prefill: (...a: Parameters<TfExecutor['prefill']>) => executor.prefill(...a).then(edited(a[0])).then(count),
      decode: (...a: Parameters<TfExecutor['decode']>) => executor.decode(...a).then(edited(a[0])).then(count),
    });
    const { maxBatchSize, maxBatchTokens, prefillChunk, loraMode, maxQueue, maxInputLength, maxTotalTokens } = TEST_RUNTIME;
    const engine = new Engine(counted, rt.tokenizer, null, {
      maxBatchSize, maxBatchTokens, prefillChunk, loraMode, maxQueue, maxInputLength, maxTotalTokens, maxPositions: model.config.maxPositions,
    });
    return { engine, executor, counts };
  };
  const plain = await generate(rt, request(prompt(5), { maxNewTokens: 12, ignoreEos: true }));
  const stop = plain.text.slice(1).match(/[A-Za-z0-9]{2}/)![0]; // met mid-generation
  const group = {};
  const long = Array.from({ length: 70 }, (_, t) => (t * 7) % 300 + 3); // prefilled in chunks of 32
  const reqs = () => [
    ...Array.from({ length: 6 }, (_, i) => request(prompt(i), { maxNewTokens: 3 + i, ignoreEos: i % 2 === 0 })),
    request(prompt(5), { maxNewTokens: 12, stop: [stop] }),
    request(prompt(6), { maxNewTokens: 5, decoderInputDetails: true }), // prompt logprobs: its prefill reads logits
    request(long, { maxNewTokens: 4, ignoreEos: true }),
    ...[0, 1, 2].map(() => request(prompt(7), { maxNewTokens: 6, ignoreEos: true, prefixGroup: group })), // choices sharing one prefill
    request(prompt(8), { maxNewTokens: 6, sampling: { logitBias: [[5, 2]] } }), // greedy, biased: picked after the device's edits
    request(prompt(9), { maxNewTokens: 6, sampling: { doSample: true, temperature: 0.7, seed: 3 } }), // plain sampling: from a shortlist, or the row
    // top_k ≤ 64: sampled from shortlists, with top_p, typical_p and temperatures
    request(prompt(10), { maxNewTokens: 8, ignoreEos: true, sampling: { doSample: true, topK: 5, seed: 11 } }),
    request(prompt(11), { maxNewTokens: 8, ignoreEos: true, sampling: { doSample: true, topK: 40, topP: 0.8, temperature: 0.6, seed: 12 } }),
    request(prompt(12), { maxNewTokens: 8, ignoreEos: true, sampling: { doSample: true, topK: 64, typicalP: 0.9, temperature: 1.3, seed: 13 } }),
    request(prompt(13), { maxNewTokens: 8, ignoreEos: true, sampling: { doSample: true, topK: 65, seed: 14 } }), // over 64: logits
    request(prompt(14), { maxNewTokens: 8, ignoreEos: true, sampling: { doSample: true, topK: 10, temperature: 0.01, seed: 15 } }), // low temperature
    // top_p alone: sampled from shortlists, from the row where the nucleus reaches past the shortlist (flat at T = 8)
    request(prompt(15), { maxNewTokens: 8, ignoreEos: true, sampling: { doSample: true, topP: 0.6, temperature: 0.3, seed: 16 } }),
    request(prompt(16), { maxNewTokens: 8, ignoreEos: true, sampling: { doSample: true, topP: 0.95, temperature: 8, seed: 17 } }),
    // logit_bias and penalties: edits of the logits on the device before the pick or shortlist
    request(prompt(17), { maxNewTokens: 8, ignoreEos: true, sampling: { repetitionPenalty: 1.5 } }),
    request(prompt(18), { maxNewTokens: 8, ignoreEos: true, sampling: { doSample: true, topK: 20, frequencyPenalty: 0.7, presencePenalty: 0.3, seed: 19 } }),
    // (flat at T = 8: its shortlists miss, and the row read after the step is sampled with the history's penalties)
    request(prompt(19), { maxNewTokens: 8, ignoreEos: true, penalizeGeneratedOnly: true, sampling: { doSample: true, topP: 0.95, temperature: 8, repetitionPenalty: 1.2, logitBias: [[7, 3], [7, 1]], seed: 20 } }),
    // top-n alternatives (≤ 64) from shortlists too, greedy or sampled
    request(prompt(20), { maxNewTokens: 6, ignoreEos: true, sampling: { topNTokens: 2, repetitionPenalty: 1.2 } }),
    request(prompt(21), { maxNewTokens: 6, ignoreEos: true, sampling: { doSample: true, topK: 30, topNTokens: 3, temperature: 0.8, seed: 22 } }),
  ];
  /** Greedy and top_p requests alone (every step picks or shortlists), then everything together (mixed steps read logits). */
  const run = async (devicePick: boolean) => {
    const e = engineWith(devicePick);
    const alone: Outcome[] = [];
    for (const r of [...reqs().slice(0, 9), ...reqs().slice(-7)]) alone.push(await generate(e, r)); // alone: steps replayed
    const together = await Promise.all(reqs().map((r) => generate(e, r)));
    e.executor.dispose();
    return { outs: [...alone, ...together], counts: e.counts };
  };
  const baseline = tf.memory().numTensors;
  const host = await run(false);
  const device = await run(true);
  assert.equal(tf.memory().numTensors, baseline, 'no tensor leaks');
  assert.equal(host.counts.picked + host.counts.shortlisted, 0);
  if (testBackend() === 'webgpu') {
    assert.ok(device.counts.picked > 0, 'tokens were picked on the device');
    assert.ok(device.counts.shortlisted >= 8 * 8, `tokens were sampled from shortlists (${device.counts.shortlisted})`);
    assert.ok(device.counts.rowsRead > 0, 'rows of undecided shortlists were read after their step');
    assert.ok(device.counts.edited >= 4 * 8, `rows with logit_bias or penalties were picked or shortlisted after edits on the device (${device.counts.edited})`);
    assert.ok(device.counts.mixed > 0, 'steps with picked and host-sampled rows read both from one download');
  } else {
    assert.equal(device.counts.picked + device.counts.shortlisted, 0, 'only the webgpu backend picks or shortlists on the device');
  }
  host.outs.forEach((h, i) => {
    const d = device.outs[i]!;
    assert.equal(d.error, undefined, d.error?.message);
    assert.deepEqual(d.tokens.map((t) => t.id), h.tokens.map((t) => t.id), `request ${i}: tokens`);
    assert.equal(d.text, h.text);
    assert.equal(d.result!.finishReason, h.result!.finishReason);
    assert.deepEqual(d.result!.prefill, h.result!.prefill);
    // float32 on the device, float64 on the host
    d.tokens.forEach((t, j) => {
      const ht = h.tokens[j]!;
      assert.ok(Math.abs(t.logprob - ht.logprob) <= 1e-5, `request ${i} token ${j}: logprob ${t.logprob} vs ${ht.logprob}`);
      assert.deepEqual(t.top?.map((x) => x.id), ht.top?.map((x) => x.id), `request ${i} token ${j}: alternatives`);
      t.top?.forEach((x, k) => assert.ok(Math.abs(x.logprob - ht.top![k]!.logprob) <= 1e-5, `request ${i} token ${j}: alternative ${k}`));
    });
  });
  assert.equal(host.outs[6]!.result!.finishReason, 'stop_sequence');
});

test('unknown adapters are refused, never served by the base model', async () => {
  const o = await generate(rt, request(prompt(1), { adapterId: 'nope' }));
  assert.equal(o.error?.code, 'ADAPTER_NOT_FOUND');
  assert.equal(o.tokens.length, 0);
  assert.throws(() => rt.engine.generate(request(Array(101).fill(5)), { onToken() {}, onDone() {}, onError() {} }), { code: 'INPUT_TOO_LONG' });
});

test('cancelling mid-generation frees the sequence', async () => {
  const ac = new AbortController();
  const o = await generate(rt, request(prompt(2), { maxNewTokens: 100, ignoreEos: true, signal: ac.signal, adapterId: 'ad1' }), (n) => {
    if (n === 3) ac.abort();
  });
  assert.equal(o.error?.code, 'CANCELLED');
  assert.ok(o.tokens.length >= 3 && o.tokens.length < 100);
  assert.equal(rt.engine.stats().running, 0);
  assert.equal(rt.executor.running, 0);
});

test('no tensor leaks after 200 generate calls', async () => {
  await generate(rt, request(prompt(0), { adapterId: 'ad0' })); // warm: adapter resident, bank built
  const baseline = tf.memory().numTensors;
  for (let round = 0; round < 20; round++) {
    const outs = await Promise.all(Array.from({ length: 10 }, (_, i) => generate(rt, request(prompt(i), { adapterId: i % 3 === 0 ? null : 'ad0', maxNewTokens: 4 }))));
    for (const o of outs) {
      assert.equal(o.error, undefined, `round ${round}: ${o.error?.message}`);
      assert.ok(o.result && o.result.generatedTokens >= 1 && o.result.generatedTokens <= 4);
    }
  }
  assert.equal(rt.engine.stats().running, 0);
  assert.equal(tf.memory().numTensors, baseline);
});
