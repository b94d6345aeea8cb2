/**
 * The AdapterManager on a TINY_LLAMA fixture (wasm backend): pinning and waiting for a device slot, user pins,
 * single-flight loads, replace/delete while a lease is held, bad uploads leaving the old version, the failed
 * state, and the device byte limit. Tensor counts return to their baseline at the end of every test.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { readdirSync, readFileSync, statSync, mkdirSync, writeFileSync } from 'node:fs';
import { join, relative } from 'node:path';
import * as tf from '@tensorflow/tfjs-core';
import { TINY_LLAMA, writePeftAdapter, type AdapterOptions } from '../src/demo/index.ts';
import { AdapterManager, type AdapterManagerOptions } from '../src/lora/manager.ts';
import { adapterVersion, AdapterStore } from '../src/lora/store.ts';
import type { AdapterLease, AdapterMetrics, MergeSpec } from '../src/lora/types.ts';
import { mergeId, mergeVersion } from '../src/lora/merged-adapter.ts';
import type { DeviceAdapter } from '../src/exec/lora-bank.ts';
import type { AdapterExecutor } from '../src/engine/executor.ts';
import { CausalLM } from '../src/model/model.ts';
import { scratchBuffers } from '../src/lora/host-buffers.ts';
import { TfExecutor } from '../src/exec/tf-executor.ts';
import { greedyBatch } from './helpers/lora.ts';
import { fixtureCheckpoint, maxRelErr, setupBackend, tempDir } from './helpers/tf.ts';

const tmp = tempDir();
let model: CausalLM;
let baseConfig: Record<string, unknown>;
before(async () => {
  await setupBackend();
  const { config } = await fixtureCheckpoint(join(tmp.dir, 'model'), TINY_LLAMA);
  baseConfig = config;
  model = CausalLM.load(join(tmp.dir, 'model'));
});
after(() => {
  model.dispose();
  tmp.cleanup();
});

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

class CountingMetrics implements AdapterMetrics {
  misses = 0;
  readonly hits = { device: 0, host: 0 };
  readonly failed: string[] = [];
  readonly evictions = { device: 0, host: 0 };
  hit(tier: 'device' | 'host'): void {
    this.hits[tier]++;
  }
  miss(): void {
    this.misses++;
  }
  loaded(): void {}
  loadFailed(code: string): void {
    this.failed.push(code);
  }
  evicted(tier: 'device' | 'host'): void {
    this.evictions[tier]++;
  }
  resident(): void {}
  readonly merges: string[] = [];
  merged(strategy: string): void {
    this.merges.push(strategy);
  }
}

let dirs = 0;
/** A fresh adapter folder with a manager over it; counts store reads. */
/** Device tensors of every upload so far, by key (to check when they are freed). */
const uploaded = new Map<string, DeviceAdapter>();

/** An in-process executor's adapter side (by default of an executor the test does not run), recording uploads. */
function localDevice(ex = new TfExecutor(model)): AdapterExecutor {
  return {
    get copiesOnUpload() {
      return ex.copiesOnUpload;
    },
    loadAdapter: async (w, key) => {
      const a = await ex.loadAdapter(w, key);
      uploaded.set(key, ex.resident(key)!);
      return a;
    },
    offloadAdapter: (a) => ex.offloadAdapter(a),
  };
}

function setup(opts: Partial<AdapterManagerOptions> = {}, device: AdapterExecutor = localDevice()) {
  const dir = join(tmp.dir, `adapters-${++dirs}`);
  mkdirSync(dir, { recursive: true });
  const store = new AdapterStore({ dir, maxAdapterBytes: 64 << 20 });
  const reads: string[] = [];
  const readWith = store.readWith.bind(store);
  store.readWith = (id, use) => {
    reads.push(id);
    return readWith(id, use);
  };
  const metrics = new CountingMetrics();
  const manager = new AdapterManager(store, model, {
    maxRank: 64, maxDeviceAdapters: 16, maxDeviceBytes: 0, maxHostBytes: 64 << 20, ...opts,
  }, device, metrics);
  const write = (id: string, o: Omit<AdapterOptions, 'baseConfig'> = {}) =>
    writePeftAdapter(join(dir, id), { baseConfig, r: 4, loraAlpha: 8, targetModules: ['q_proj', 'v_proj'], seed: 7, ...o });
  return { dir, store, manager, metrics, reads, write };
}

/** The files of an adapter as an upload body (written outside any adapter folder). */
async function uploadFiles(name: string, o: Omit<AdapterOptions, 'baseConfig'>): Promise<{ config: Record<string, unknown>; weights: Uint8Array }> {
  const d = join(tmp.dir, 'staging', `${name}-${++dirs}`);
  await writePeftAdapter(d, { baseConfig, r: 4, loraAlpha: 8, targetModules: ['q_proj', 'v_proj'], ...o });
  return { config: JSON.parse(readFileSync(join(d, 'adapter_config.json'), 'utf8')), weights: readFileSync(join(d, 'adapter_model.safetensors')) };
}

const firstModule = (l: AdapterLease) => uploaded.get(l.adapter.key)!.modules.values().next().value!;

/** Whether the promise settles within `ms`. */
async function settlesWithin(p: Promise<unknown>, ms: number): Promise<boolean> {
  let done = false;
  void p.then(() => (done = true), () => (done = true));
  const t0 = Date.now();
  while (!done && Date.now() - t0 < ms) await sleep(5);
  return done;
}

/** Every file under `dir` with its size (relative paths, sorted). */
function snapshot(dir: string): string[] {
  const out: string[] = [];
  const walk = (d: string) => {
    for (const name of readdirSync(d)) {
      const p = join(d, name);
      if (statSync(p).isDirectory()) walk(p);
      else out.push(`${relative(dir, p)}:${statSync(p).size}`);
    }
  };
  walk(dir);
  return out.sort();
}

test('pinning: with one device slot, a second adapter waits for the lease on the first, which is then evicted', async () => {
  const baseline = tf.memory().numTensors;
  const { manager, write } = setup({ maxDeviceAdapters: 1 });
  await write('a', { seed: 1 });
  await write('b', { seed: 2 });
  const la = await manager.acquire('a');
  assert.equal(tf.memory().numTensors > baseline, true, 'a is on the device');
  let lb: AdapterLease | undefined;
  const pb = manager.acquire('b').then((l) => (lb = l));
  await sleep(100);
  assert.equal(lb, undefined, 'acquire(b) must wait while a is pinned');
  assert.equal((await manager.info('a')).tier, 'device');
  assert.equal((await manager.info('a')).activeRequests, 1);
  assert.equal((await manager.info('b')).state, 'loading');
  assert.equal(manager.stats().deviceAdapters, 1);

  la.release();
  assert.equal(await settlesWithin(pb, 3000), true, 'acquire(b) resolves once a is released');
  assert.equal(lb!.adapter.id, 'b');
  const ia = await manager.info('a');
  assert.notEqual(ia.tier, 'device');
  assert.equal(ia.activeRequests, 0);
  assert.equal(firstModule(la).At.isDisposed, true, "a's tensors were freed on eviction");
  assert.equal((await manager.info('b')).tier, 'device');
  assert.equal(manager.stats().deviceAdapters, 1);
  la.release(); // idempotent
  assert.equal((await manager.info('b')).tier, 'device');

  lb!.release();
  manager.dispose();
  assert.equal(tf.memory().numTensors, baseline, 'tensors leaked');
});

test('load(pin) keeps an adapter on the device under pressure; unload releases it', async () => {
  const baseline = tf.memory().numTensors;
  const { manager, write } = setup({ maxDeviceAdapters: 2 });
  for (const [i, id] of ['p', 'b', 'c', 'd', 'x', 'y'].entries()) await write(id, { seed: 10 + i });
  const info = await manager.load('p', { pin: true });
  assert.equal(info.pinned, true);
  assert.equal(info.tier, 'device');
  assert.equal(info.activeRequests, 0);
  for (const id of ['b', 'c', 'd']) (await manager.acquire(id)).release();
  assert.equal((await manager.info('p')).tier, 'device', 'the pinned adapter survived');
  assert.notEqual((await manager.info('b')).tier, 'device', 'unpinned ones were evicted instead');
  assert.notEqual((await manager.info('c')).tier, 'device');
  assert.equal((await manager.info('d')).tier, 'device');

  // Both slots held (p pinned, x leased): y waits until unload(p).
  const lx = await manager.acquire('x');
  let ly: AdapterLease | undefined;
  const py = manager.acquire('y').then((l) => (ly = l));
  await sleep(100);
  assert.equal(ly, undefined, 'acquire(y) must wait: every slot is pinned');
  const after = await manager.unload('p');
  assert.equal(after.pinned, false);
  assert.equal(await settlesWithin(py, 3000), true, 'unload(p) made room');
  assert.notEqual((await manager.info('p')).tier, 'device');
  assert.equal(manager.stats().deviceAdapters, 2);

  lx.release();
  ly!.release();
  await assert.rejects(manager.unload('never-existed'), { code: 'ADAPTER_NOT_FOUND' });
  manager.dispose();
  assert.equal(tf.memory().numTensors, baseline, 'tensors leaked');
});

test('single-flight: 10 concurrent acquires of an adapter that is not loaded read the store once', async () => {
  const baseline = tf.memory().numTensors;
  const { manager, metrics, reads, write } = setup();
  await write('x');
  const leases = await Promise.all(Array.from({ length: 10 }, () => manager.acquire('x')));
  assert.equal(metrics.misses, 1);
  assert.deepEqual(reads, ['x']);
  assert.equal(new Set(leases.map((l) => l.adapter)).size, 1, 'one device adapter shared by all');
  assert.equal((await manager.info('x')).activeRequests, 10);
  assert.equal(manager.stats().deviceAdapters, 1);
  leases.forEach((l) => l.release());
  assert.equal((await manager.info('x')).activeRequests, 0);
  // Resident now: a further acquire is a device hit, no new read.
  (await manager.acquire('x')).release();
  assert.equal(metrics.misses, 1);
  assert.equal(metrics.hits.device, 1);
  assert.deepEqual(reads, ['x']);
  manager.dispose();
  assert.equal(tf.memory().numTensors, baseline, 'tensors leaked');
});

test('replace while in use: the old lease keeps v1 until released, new acquires get v2', async () => {
  const baseline = tf.memory().numTensors;
  const evicted: string[] = []; // device keys
  const device = localDevice();
  const { manager, write } = setup({}, {
    copiesOnUpload: true,
    loadAdapter: device.loadAdapter,
    offloadAdapter: (a) => {
      evicted.push(a.key);
      device.offloadAdapter(a);
    },
  });
  await write('r', { seed: 1 });
  const l1 = await manager.acquire('r');
  const v1 = l1.version;
  assert.equal((await manager.info('r')).version, v1);

  const v2files = await uploadFiles('v2', { seed: 2 });
  const v2 = adapterVersion(v2files.config, v2files.weights);
  assert.notEqual(v2, v1);
  const info = await manager.put('r', v2files);
  assert.equal(info.version, v2);
  assert.equal(info.source, 'upload');

  assert.equal(l1.version, v1);
  const m1 = firstModule(l1);
  assert.equal(m1.At.isDisposed, false, 'v1 still alive while leased');
  assert.equal(m1.Bt.isDisposed, false);
  assert.deepEqual(evicted, []);

  const l2 = await manager.acquire('r');
  assert.equal(l2.version, v2);
  assert.notEqual(l2.adapter, l1.adapter);
  assert.equal((await manager.info('r')).version, v2);

  l1.release();
  assert.equal(m1.At.isDisposed, true, 'v1 disposed once its last lease is released');
  assert.equal(m1.Bt.isDisposed, true);
  assert.deepEqual(evicted, [l1.adapter.key], 'the executor was told to forget v1');
  assert.equal(firstModule(l2).At.isDisposed, false, 'v2 untouched');
  assert.equal((await manager.info('r')).tier, 'device');

  l2.release();
  manager.dispose();
  assert.equal(tf.memory().numTensors, baseline, 'tensors leaked');
});

test('delete while in use: new acquires get ADAPTER_NOT_FOUND; the old lease keeps working until released', async () => {
  const baseline = tf.memory().numTensors;
  const ex = new TfExecutor(model);
  const { manager, write } = setup({}, localDevice(ex));
  await write('d', { seed: 3, std: 1 });
  const l1 = await manager.acquire('d');
  const prompt = [5, 17, 42, 99];
  const before = await greedyBatch(ex, [{ prompt, lease: l1 }], 3);
  const base = await greedyBatch(ex, [{ prompt, lease: null }], 1);
  assert.ok(maxRelErr(before.logits[0]![0]!, base.logits[0]![0]!) > 1e-4, 'the adapter changes the logits');

  assert.equal(await manager.delete('d'), true);
  await assert.rejects(manager.acquire('d'), { code: 'ADAPTER_NOT_FOUND' });
  await assert.rejects(manager.info('d'), { code: 'ADAPTER_NOT_FOUND' });
  assert.equal((await manager.ids()).includes('d'), false);

  assert.equal(firstModule(l1).At.isDisposed, false);
  const again = await greedyBatch(ex, [{ prompt, lease: l1 }], 3);
  assert.deepEqual(again.tokens, before.tokens);
  assert.deepEqual(again.logits, before.logits, 'the held version computes exactly as before');

  l1.release();
  assert.equal(firstModule(l1).At.isDisposed, true, 'disposed with its last lease');
  assert.equal(await manager.delete('d'), false, 'a second delete finds nothing');
  ex.dispose();
  manager.dispose();
  assert.equal(tf.memory().numTensors, baseline, 'tensors leaked');
});

test('a bad upload is rejected with its code and leaves the previous version (memory and disk) in place', async () => {
  const baseline = tf.memory().numTensors;
  const { dir, store, manager, write } = setup();
  await write('u', { seed: 4 });
  const l0 = await manager.acquire('u');
  const v1 = l0.version;
  l0.release();
  const disk = snapshot(dir);
  const cfgBefore = readFileSync(join(dir, 'u', 'adapter_config.json'));

  const good = await uploadFiles('u-next', { seed: 5 });
  await assert.rejects(manager.put('u', { config: { ...good.config, use_dora: true }, weights: good.weights }), { code: 'ADAPTER_UNSUPPORTED' });
  await assert.rejects(manager.put('u', { config: good.config, weights: good.weights.subarray(0, good.weights.length - 64) }), { code: 'SAFETENSORS_INVALID' });
  await assert.rejects(manager.put('u', { config: { ...good.config, target_modules: null }, weights: good.weights }), { code: 'ADAPTER_INVALID_CONFIG' });

  const info = await manager.info('u');
  assert.equal(info.version, v1);
  assert.equal(info.state, 'ready');
  assert.equal(info.error, null);
  const l1 = await manager.acquire('u');
  assert.equal(l1.version, v1);
  l1.release();
  assert.deepEqual(snapshot(dir), disk, 'nothing new on disk');
  assert.deepEqual(readFileSync(join(dir, 'u', 'adapter_config.json')), cfgBefore);

  // A fresh manager on the same folder loads the same version from disk.
  const fresh = new AdapterManager(store, model, { maxRank: 64, maxDeviceAdapters: 4, maxDeviceBytes: 0, maxHostBytes: 64 << 20 }, localDevice());
  const l2 = await fresh.acquire('u');
  assert.equal(l2.version, v1);
  l2.release();
  fresh.dispose();

  // A bad upload under a new id stores nothing and is not listed.
  await assert.rejects(manager.put('fresh-bad', { config: { ...good.config, use_dora: true }, weights: good.weights }), { code: 'ADAPTER_UNSUPPORTED' });
  await assert.rejects(manager.info('fresh-bad'), { code: 'ADAPTER_NOT_FOUND' });
  assert.deepEqual(snapshot(dir), disk);
  manager.dispose();
  assert.equal(tf.memory().numTensors, baseline, 'tensors leaked');
});

test('failed state: a bad adapter folder fails with its code and is reported as failed; unknown ids are 404 and unlisted', async () => {
  const baseline = tf.memory().numTensors;
  const { manager, metrics, write } = setup();
  await write('dora', { extraConfig: { use_dora: true } });
  await write('notargets', { extraConfig: { target_modules: null } });
  await write('ok');

  for (const [id, code] of [['dora', 'ADAPTER_UNSUPPORTED'], ['notargets', 'ADAPTER_INVALID_CONFIG']] as const) {
    await assert.rejects(manager.acquire(id), { code });
    const info = await manager.info(id);
    assert.equal(info.state, 'failed', id);
    assert.equal(info.error?.code, code);
    assert.notEqual(info.tier, 'device');
    // Still failing on a retry (not silently served).
    await assert.rejects(manager.acquire(id), { code });
  }
  assert.deepEqual(metrics.failed, ['ADAPTER_UNSUPPORTED', 'ADAPTER_UNSUPPORTED', 'ADAPTER_INVALID_CONFIG', 'ADAPTER_INVALID_CONFIG']);
  const listed = new Map((await manager.list()).map((i) => [i.id, i]));
  assert.equal(listed.get('dora')?.state, 'failed');
  assert.equal(listed.get('notargets')?.error?.code, 'ADAPTER_INVALID_CONFIG');
  assert.equal(listed.get('ok')?.state, 'available');

  await assert.rejects(manager.acquire('ghost'), { code: 'ADAPTER_NOT_FOUND' });
  await assert.rejects(manager.info('ghost'), { code: 'ADAPTER_NOT_FOUND' });
  assert.equal(listed.has('ghost'), false);
  assert.equal((await manager.list()).some((i) => i.id === 'ghost'), false);
  assert.equal((await manager.ids()).includes('ghost'), false);
  await assert.rejects(manager.acquire('../etc'), { code: 'ADAPTER_INVALID_ID' });

  // Fixing the folder on disk via put clears the failure.
  const fixed = await uploadFiles('fixed', { seed: 9 });
  const info = await manager.put('dora', fixed);
  assert.equal(info.error, null);
  const l = await manager.acquire('dora');
  assert.equal((await manager.info('dora')).state, 'ready');
  l.release();
  manager.dispose();
  assert.equal(tf.memory().numTensors, baseline, 'tensors leaked');
});

test('byte limit: at most one of two adapters fits; an adapter larger than the limit fails with ADAPTER_TOO_LARGE', async () => {
  const baseline = tf.memory().numTensors;
  // Measure the sizes with an unlimited manager.
  const probe = setup();
  await probe.write('a', { seed: 1 });
  const la = await probe.manager.acquire('a');
  const bytes = (await probe.manager.info('a')).bytes!;
  la.release();
  probe.manager.dispose();
  assert.ok(bytes > 0);
  const limit = Math.floor(1.5 * bytes);

  const { manager, write } = setup({ maxDeviceAdapters: 0, maxDeviceBytes: limit });
  await write('a', { seed: 1 });
  await write('b', { seed: 2 });
  await write('big', { seed: 3, r: 16, loraAlpha: 16 });

  (await manager.acquire('a')).release();
  assert.equal(manager.stats().deviceBytes, bytes);
  const lb = await manager.acquire('b');
  assert.equal(manager.stats().deviceAdapters, 1);
  assert.equal(manager.stats().deviceBytes, bytes);
  assert.notEqual((await manager.info('a')).tier, 'device', 'a was evicted to make room for b');

  let la2: AdapterLease | undefined;
  const pa = manager.acquire('a').then((l) => (la2 = l));
  await sleep(100);
  assert.equal(la2, undefined, 'a waits while b is leased');
  assert.ok(manager.stats().deviceBytes <= limit);
  lb.release();
  assert.equal(await settlesWithin(pa, 3000), true);
  assert.equal(manager.stats().deviceAdapters, 1);
  la2!.release();

  await assert.rejects(manager.acquire('big'), { code: 'ADAPTER_TOO_LARGE' });
  const big = await manager.info('big');
  assert.equal(big.state, 'failed');
  assert.equal(big.error?.code, 'ADAPTER_TOO_LARGE');
  const needs = Number(/needs (\d+) device bytes/.exec(big.error!.message)?.[1]);
  assert.ok(needs > limit, `big needs ${needs} bytes`);
  assert.equal((await manager.info('a')).tier, 'device', 'a failed load evicts nothing');
  assert.ok(manager.stats().deviceBytes <= limit);
  manager.dispose();
  assert.equal(tf.memory().numTensors, baseline, 'tensors leaked');
});


test('two loads waiting for the one device slot, woken by one release: only one gets it', async () => {
  const baseline = tf.memory().numTensors;
  const { manager, store, write } = setup({ maxDeviceAdapters: 1 });
  for (const [i, id] of ['a', 'b', 'c'].entries()) await write(id, { seed: 20 + i });
  const leases: AdapterLease[] = [];
  try {
    // Loaded once before, so their next loads keep them in the host tier (admitToHost), where the test sees them.
    for (const id of ['b', 'c']) (await manager.acquire(id)).release();
    const la = await manager.acquire('a');
    const pending = ['b', 'c'].map((id) => manager.acquire(id).then((l) => leases.push(l)));
    // Both read and validated (host tier), now waiting for the slot.
    for (let i = 0; i < 400 && manager.stats().hostAdapters < 2; i++) await sleep(5);
    assert.equal(manager.stats().hostAdapters, 2);
    await sleep(20);
    la.release();
    for (let i = 0; i < 600 && leases.length === 0; i++) await sleep(5);
    await sleep(50); // time for a second, wrong grant to show
    assert.equal(manager.stats().deviceAdapters, 1, 'the freed slot is used, by one adapter');
    assert.equal(leases.length, 1, 'only one of b, c may get the slot');
    leases[0]!.release();
    await Promise.all(pending);
    // They hashed their files before waiting (and gave the read buffers back): the versions are the files'.
    for (const id of ['b', 'c']) assert.equal((await manager.info(id)).version, (await store.read(id)).version);
  } finally {
    leases.forEach((l) => l.release());
    manager.dispose();
    assert.equal(tf.memory().numTensors, baseline, 'tensors leaked');
  }
});

test('two host-tier adapters acquired at once into an empty device tier: only one is resident', async () => {
  const baseline = tf.memory().numTensors;
  const { manager, write, reads } = setup({ maxDeviceAdapters: 1 });
  for (const [i, id] of ['b', 'c'].entries()) await write(id, { seed: 30 + i });
  const leases: AdapterLease[] = [];
  try {
    // Second loads keep them in the host tier (admitToHost).
    for (let round = 0; round < 2; round++) for (const id of ['b', 'c']) (await manager.acquire(id)).release();
    await manager.unload('c');
    assert.equal(manager.stats().deviceAdapters, 0);
    assert.equal((await manager.info('b')).tier, 'host');
    const pending = ['b', 'c'].map((id) => manager.acquire(id).then((l) => leases.push(l)));
    for (let i = 0; i < 600 && leases.length === 0; i++) await sleep(5);
    await sleep(50); // time for a second, wrong grant to show
    assert.deepEqual(reads, ['b', 'c', 'b', 'c'], 'both came from the host tier');
    assert.equal(manager.stats().deviceAdapters, 1, 'one adapter resident with maxDeviceAdapters 1');
    assert.equal(leases.length, 1, 'the other waits for the slot');
    leases[0]!.release();
    assert.equal(await settlesWithin(Promise.all(pending), 3000), true, 'the waiting one gets the slot once it is released');
    assert.equal(leases.length, 2);
    assert.notEqual(leases[0]!.adapter.id, leases[1]!.adapter.id);
  } finally {
    leases.forEach((l) => l.release());
    manager.dispose();
    assert.equal(tf.memory().numTensors, baseline, 'tensors leaked');
  }
});

test('info/ids: disk adapters are listed as available with no version until loaded', async () => {
  const { manager, write, dir } = setup();
  await write('org/name', { seed: 1 });
  writeFileSync(join(dir, 'README.txt'), 'not an adapter');
  assert.deepEqual(await manager.ids(), ['org/name']);
  const i = await manager.info('org/name');
  assert.equal(i.state, 'available');
  assert.equal(i.tier, 'disk');
  assert.equal(i.version, null);
  const l = await manager.acquire('org/name');
  const j = await manager.info('org/name');
  assert.equal(j.state, 'ready');
  assert.equal(j.version, l.version);
  assert.equal(j.rank, 4);
  assert.deepEqual([...j.targetModules!].sort(), ['q_proj', 'v_proj']);
  l.release();
  manager.dispose();
});

test('warmUp runs the load path on a synthetic adapter (every base module) and keeps nothing', async () => {
  const baseline = tf.memory().numTensors;
  const local = localDevice();
  const uploads: { key: string; modules: number; bytes: number }[] = [];
  let disposed = 0;
  const { manager, metrics, reads, write } = setup({}, {
    copiesOnUpload: true,
    loadAdapter: (w, key) => {
      uploads.push({ key, modules: w.modules.length, bytes: w.bytes });
      return local.loadAdapter(w, key);
    },
    offloadAdapter: (a) => {
      disposed++;
      local.offloadAdapter(a);
    },
  });
  await manager.warmUp(3);
  assert.equal(uploads.length, 3);
  assert.equal(disposed, 3);
  assert.equal(new Set(uploads.map((u) => u.key)).size, 3, 'each round is its own upload');
  for (const u of uploads) {
    assert.equal(u.modules, model.modules.length, 'a pair on every base module');
    assert.ok(u.bytes > 0);
  }
  assert.equal(tf.memory().numTensors, baseline, 'nothing stays on the device');
  assert.deepEqual(manager.stats(), { ...manager.stats(), deviceAdapters: 0, deviceBytes: 0, hostAdapters: 0, hostBytes: 0 });
  assert.deepEqual(reads, [], 'the store is not read');
  assert.deepEqual([metrics.misses, metrics.hits.device, metrics.hits.host, metrics.failed.length], [0, 0, 0, 0]);
  assert.deepEqual(await manager.ids(), []);
  // A real adapter loads as usual afterwards, under a key of its own.
  await write('after');
  const l = await manager.acquire('after');
  assert.ok(!uploads.slice(0, 3).some((u) => u.key === l.adapter.key));
  l.release();
  manager.dispose();
  assert.equal(tf.memory().numTensors, baseline, 'tensors leaked');
});

test('host tier admission: an adapter is kept on the host from its second load; its first load reuses a scratch buffer', async () => {
  const baseline = tf.memory().numTensors;
  const { manager, metrics, reads, write } = setup({ maxDeviceAdapters: 2 });
  for (const [i, id] of ['a', 'b', 'c'].entries()) await write(id, { seed: 40 + i });
  const la = await manager.acquire('a');
  const aAt = firstModule(la).At;
  const before = aAt.dataSync().slice();
  assert.equal(manager.stats().hostAdapters, 0, 'a first load is not kept on the host');
  la.release();
  const held = scratchBuffers.held;
  assert.ok(held >= 1, 'its host copy went back to the scratch buffers');
  // b has the same size as a: its load reuses the buffer a's host copy was in. a's device tensors are untouched.
  (await manager.acquire('b')).release();
  assert.equal(scratchBuffers.held, held, 'the same buffer was borrowed and given back');
  assert.deepEqual(aAt.dataSync(), before);
  const va = (await manager.info('a')).version;
  (await manager.acquire('c')).release(); // evicts a
  const gone = await manager.info('a');
  assert.deepEqual([gone.tier, gone.version], ['disk', null], 'evicted and not kept: back to the disk tier');
  assert.match(va!, /^[0-9a-f]{16}$/);
  // The second load of a keeps it; once evicted again, a third load comes from the host tier, not the disk.
  (await manager.acquire('a')).release();
  assert.equal(manager.stats().hostAdapters, 1);
  assert.equal((await manager.info('a')).version, va);
  (await manager.acquire('b')).release(); // evicts c
  (await manager.acquire('c')).release(); // evicts a
  assert.equal((await manager.info('a')).tier, 'host');
  const readsBefore = reads.length;
  (await manager.acquire('a')).release();
  assert.equal(reads.length, readsBefore, 'served from the host tier');
  assert.equal(metrics.hits.host, 1);
  manager.dispose();
  assert.equal(tf.memory().numTensors, baseline, 'tensors leaked');
});

test('host tier admission: a device that keeps host arrays (copiesOnUpload false) gets a kept copy on the first load', async () => {
  const baseline = tf.memory().numTensors;
  const local = localDevice();
  const { manager, write } = setup({}, { copiesOnUpload: false, loadAdapter: local.loadAdapter, offloadAdapter: local.offloadAdapter });
  await write('a', { seed: 50 });
  (await manager.acquire('a')).release();
  assert.equal(manager.stats().hostAdapters, 1);
  await manager.unload('a');
  assert.equal((await manager.info('a')).tier, 'host');
  manager.dispose();
  assert.equal(tf.memory().numTensors, baseline, 'tensors leaked');
});

test('a resident adapter whose source has a newer version (store.revalidate true) serves it from the next request on', async () => {
  const { manager, store, write } = setup();
  await write('r', { seed: 7 });
  const first = await manager.acquire('r');
  first.release();
  await write('r', { seed: 8 }); // what the store's revalidation commits when the source changed
  const checked: string[] = [];
  store.revalidate = async (id) => {
    checked.push(id);
    return checked.length === 1;
  };
  const hit = await manager.acquire('r');
  assert.equal(hit.version, first.version, 'the request that triggers the check runs on the resident version');
  hit.release();
  await sleep(10);
  const next = await manager.acquire('r');
  assert.notEqual(next.version, first.version);
  next.release();
  assert.deepEqual(checked, ['r', 'r'], 'the device hit asked, then the reload from disk (store.read) did');
  manager.dispose();
});

// ------------------------------------------------------------------------------------------------
// Merged adapters (acquireMerged)

const MERGE: MergeSpec = { ids: ['a', 'b'], weights: [1, 0.5], strategy: 'ties', density: 0.5, majoritySignMethod: 'total', seed: 0 };

test('merged adapter: computed once; served from the device, then from the host tier after eviction; takes a device slot', async () => {
  const baseline = tf.memory().numTensors;
  const { manager, metrics, write, reads } = setup({ maxDeviceAdapters: 1 });
  await write('a', { seed: 1 });
  await write('b', { seed: 2 });
  const l1 = await manager.acquireMerged(MERGE);
  assert.equal(l1.adapter.id, mergeId(MERGE));
  assert.deepEqual(metrics.merges, ['ties']);
  assert.deepEqual(reads.sort(), ['a', 'b'], 'the sources were read, not loaded to the device');
  assert.equal(manager.stats().deviceAdapters, 1);
  l1.release();
  const l2 = await manager.acquireMerged({ ...MERGE, seed: 9 }); // ties ignores the seed: the same merge
  assert.equal(l2.adapter.key, l1.adapter.key, 'device hit');
  l2.release();
  (await manager.acquire('a')).release(); // the one slot: the merged adapter is evicted to the host tier
  const l3 = await manager.acquireMerged(MERGE);
  assert.notEqual(l3.adapter.key, l1.adapter.key, 'uploaded again');
  assert.equal(l3.version, l1.version);
  assert.equal(manager.mergesComputed, 1, 'from the host tier, not merged again');
  assert.deepEqual(metrics.merges, ['ties']);
  assert.equal(firstModule(l1).At.isDisposed, true, 'the evicted upload was freed');
  l3.release();
  assert.ok(!(await manager.ids()).some((id) => id.startsWith('merge:')), 'not an adapter id');
  manager.dispose();
  assert.equal(tf.memory().numTensors, baseline, 'tensors leaked');
});

test('merged adapter: a source replaced while the merge reads is not cached stale; deleting a source drops the merge, held leases finish', async () => {
  const baseline = tf.memory().numTensors;
  const { manager, store, write } = setup();
  await write('a', { seed: 1 });
  await write('b', { seed: 2 });
  // Hold the merge's read of b until a has been replaced.
  let open!: () => void;
  const gate = new Promise<void>((r) => (open = r));
  const readWith = store.readWith.bind(store);
  let held = false;
  store.readWith = async (id, use) => {
    if (id === 'b' && !held) {
      held = true;
      await gate;
    }
    return readWith(id, use);
  };
  const pending = manager.acquireMerged(MERGE);
  while (!held) await sleep(2);
  const v2 = await manager.put('a', await uploadFiles('a2', { seed: 3 }));
  open();
  const lease = await pending;
  assert.equal(manager.mergesComputed, 2, 'the merge of the old a was thrown away and computed again');
  const vb = (await manager.info('b')).version ?? (await store.read('b')).version;
  assert.equal(lease.version, mergeVersion(MERGE, [v2.version!, vb]));

  // Delete b while the lease is held: new requests fail, the lease keeps its tensors until released.
  assert.equal(await manager.delete('b'), true);
  await assert.rejects(manager.acquireMerged(MERGE), { code: 'ADAPTER_NOT_FOUND' });
  assert.equal(firstModule(lease).At.isDisposed, false);
  lease.release();
  assert.equal(firstModule(lease).At.isDisposed, true, 'freed with its last lease');
  await assert.rejects(manager.acquireMerged({ ...MERGE, ids: ['a', 'r8'] }), { code: 'ADAPTER_NOT_FOUND' });
  manager.dispose();
  assert.equal(tf.memory().numTensors, baseline, 'tensors leaked');
});

test('merged adapter: sources of different ranks are MERGE_INCOMPATIBLE and the manager keeps serving', async () => {
  const { manager, write } = setup();
  await write('a', { seed: 1 });
  await write('r8', { seed: 2, r: 8 });
  await assert.rejects(manager.acquireMerged({ ...MERGE, ids: ['a', 'r8'] }), { code: 'MERGE_INCOMPATIBLE' });
  (await manager.acquire('a')).release();
  manager.dispose();
});
