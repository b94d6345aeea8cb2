/** Two executor worker threads: same tokens as in-process, adapters on every worker, no leaks. */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { cpSync } from 'node:fs';
import { join } from 'node:path';
import { TINY_LLAMA, writePeftAdapter } from '../src/demo/index.ts';
import { validateAdapterFiles } from '../src/lora/store.ts';
import { modulesFor } from '../src/model/model.ts';
import { ParallelExecutor } from '../src/exec/parallel-executor.ts';
import type { WorkerRequest } from '../src/exec/protocol.ts';
import type { Runtime } from '../src/runtime.ts';
import { fixtureRuntime, generate, request } from './helpers/runtime.ts';
import { setupBackend, tempDir } from './helpers/tf.ts';

const tmp = tempDir();
let local: Runtime;
let parallel: Runtime;
before(async () => {
  await setupBackend();
  const r = await fixtureRuntime(tmp.dir, TINY_LLAMA);
  local = r.rt;
  for (let i = 0; i < 4; i++) {
    await writePeftAdapter(join(tmp.dir, 'adapters', `p${i}`), { baseConfig: r.config, seed: 90 + i, r: 4, targetModules: i % 2 ? 'all-linear' : ['q_proj', 'v_proj'] });
  }
  // The same files under a second id: the same content version.
  cpSync(join(tmp.dir, 'adapters', 'p1'), join(tmp.dir, 'adapters', 'p1-twin'), { recursive: true });
  const { startRuntime } = await import('../src/runtime.ts');
  const { TEST_RUNTIME } = await import('./helpers/runtime.ts');
  parallel = await startRuntime({ ...TEST_RUNTIME, model: join(tmp.dir, 'model'), adapterDir: join(tmp.dir, 'adapters'), workers: 2, maxLoadedAdapters: 2 });
});
after(async () => {
  await local.close();
  await parallel.close();
  tmp.cleanup();
});

const prompt = (i: number) => Array.from({ length: 3 + (i % 5) }, (_, t) => (i * 17 + t * 3) % 300 + 3);

test('2 workers give the same greedy tokens as in-process, with adapters evicted and reloaded', async () => {
  const reqs = Array.from({ length: 12 }, (_, i) => request(prompt(i), { adapterId: i % 5 === 0 ? null : `p${i % 4}`, maxNewTokens: 4 + (i % 6), ignoreEos: true }));
  const expected = [];
  for (const r of reqs) expected.push((await generate(local, r)).tokens.map((t) => t.id));
  const got = await Promise.all(reqs.map((r) => generate(parallel, r)));
  assert.deepEqual(got.map((o) => o.error?.code ?? o.tokens.map((t) => t.id)), expected);
  assert.equal(parallel.executor.running, 0);
});

test('worker memory returns to its baseline once requests finish and adapters are evicted', async () => {
  const ex = parallel.executor;
  const unloadAll = async () => {
    for (const a of await parallel.adapters.list()) if (a.state === 'ready') await parallel.adapters.unload(a.id);
  };
  await unloadAll();
  const baseline = (await ex.deviceMemory()).numTensors;
  for (let round = 0; round < 3; round++) {
    await Promise.all(Array.from({ length: 8 }, (_, i) => generate(parallel, request(prompt(i), { adapterId: i % 3 ? `p${(i + round) % 4}` : null, maxNewTokens: 3 }))));
  }
  assert.ok((await ex.deviceMemory()).numTensors > baseline, 'adapters were resident on the workers');
  await unloadAll();
  assert.equal((await ex.deviceMemory()).numTensors, baseline);
});

test('two ids with the same content are separate on the workers: unloading one leaves the other serving', async () => {
  const req = (id: string) => request(prompt(7), { adapterId: id, maxNewTokens: 5, ignoreEos: true });
  const expected = (await generate(local, req('p1'))).tokens.map((t) => t.id);
  const a = await parallel.adapters.load('p1');
  const b = await parallel.adapters.load('p1-twin');
  assert.equal(a.version, b.version, 'same content, same version');
  await parallel.adapters.unload('p1');
  const got = await generate(parallel, req('p1-twin'));
  assert.deepEqual(got.error?.code ?? got.tokens.map((t) => t.id), expected);
  await parallel.adapters.unload('p1-twin');
});

test('an upload that fails on one worker is undone on the others', async () => {
  const ex = parallel.executor as ParallelExecutor;
  const clients = (ex as unknown as { clients: { call(req: WorkerRequest): Promise<unknown> }[] }).clients;
  const baseline = (await ex.deviceMemory()).numTensors;
  const good = validateAdapterFiles(await parallel.store.read('p0'), { modules: modulesFor(parallel.config) }, { maxRank: 64 });
  // Worker 0 already holds key "split" (it then skips the upload); worker 1 gets weights whose arrays are too short.
  await clients[0]!.call({ op: 'loadAdapter', weights: good, key: 'split' });
  assert.ok((await ex.deviceMemory()).numTensors > baseline);
  const bad = { ...good, modules: good.modules.map((m) => ({ ...m, At: m.At.subarray(1) })) };
  await assert.rejects(ex.loadAdapter(bad, 'split'));
  assert.equal((await ex.deviceMemory()).numTensors, baseline, 'the copy on worker 0 was offloaded too');
});

test('a release or an offload that fails on a worker is reported to onError, not dropped', async () => {
  const errors: string[] = [];
  const ex = await ParallelExecutor.start({
    workers: 2, modelDir: join(tmp.dir, 'model'), backend: 'wasm', onError: (err, context) => errors.push(`${context}: ${err.message}`),
  });
  try {
    const clients = (ex as unknown as { clients: { call(req: WorkerRequest): Promise<unknown> }[] }).clients;
    const weights = validateAdapterFiles(await parallel.store.read('p0'), { modules: modulesFor(parallel.config) }, { maxRank: 64 });
    const adapter = await ex.loadAdapter(weights, 'k1');
    // Sequence 1 lives on worker 0, sequence 2 on worker 1 (the least loaded worker takes a new sequence).
    await ex.prefill([1, 2].map((seq) => ({ seq, tokens: prompt(seq), start: 0, last: true, adapter, allLogits: false })), { kind: 'merged', key: 'k1' });
    // Worker 1 frees everything: from now on it fails every release and offload.
    await clients[1]!.call({ op: 'dispose' });
    ex.release(1);
    ex.release(2);
    ex.offloadAdapter(adapter);
    await ex.deviceMemory(); // every worker has answered what was posted before
    assert.deepEqual(errors, [
      'releasing sequence 2: worker: not initialised',
      'offloading adapter p0 (upload k1): worker: not initialised',
    ]);
  } finally {
    await ex.close();
  }
});

test('choices sharing one prefill (fork on the worker) give the tokens of separate requests, with an adapter; memory returns to baseline', async () => {
  const ex = parallel.executor;
  const baseline = (await ex.deviceMemory()).numTensors;
  const choice = (i: number, group?: object) => request(prompt(3), {
    adapterId: 'p2', maxNewTokens: 6, ignoreEos: true, sampling: { doSample: true, temperature: 1.3, seed: 50 + i }, ...(group ? { prefixGroup: group } : {}),
  });
  const expected = [];
  for (let i = 0; i < 3; i++) expected.push((await generate(local, choice(i))).tokens.map((t) => t.id));
  const group = {};
  const got = await Promise.all([0, 1, 2].map((i) => generate(parallel, choice(i, group))));
  assert.deepEqual(got.map((o) => o.error?.code ?? o.tokens.map((t) => t.id)), expected);
  assert.equal(ex.running, 0);
  await parallel.adapters.unload('p2');
  assert.equal((await ex.deviceMemory()).numTensors, baseline);
});
