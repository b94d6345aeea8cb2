/** `auto` options (src/sizing.ts): the rules as table tests, and the runtime resolving them on a real start. */
import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import { availableParallelism } from 'node:os';
import { TINY_LLAMA } from '../src/demo/index.ts';
import { autoAdapterDeviceBytes, autoWorkers } from '../src/sizing.ts';
import { fixtureRuntime } from './helpers/runtime.ts';
import { tempDir } from './helpers/tf.ts';

const GiB = 2 ** 30;
const MiB = 2 ** 20;

test('autoWorkers: one copy per core on wasm and cpu while copies fit in half the free memory; 1 elsewhere', () => {
  const cases: [backend: string, modelBytes: number, cores: number, free: number, want: number][] = [
    ['wasm', 300 * MiB, 2, 20 * GiB, 2],
    ['wasm', 300 * MiB, 16, 20 * GiB, 12], // 10 GiB holds 12 copies of 300 MiB + 512 MiB overhead
    ['cpu', 300 * MiB, 4, 20 * GiB, 4],
    ['wasm', 3 * GiB, 8, 20 * GiB, 2], // half of 20 GiB holds two copies of 3.5 GiB
    ['wasm', 3 * GiB, 8, 4 * GiB, 1], // not even one fits: still one
    ['wasm', 300 * MiB, 1, 20 * GiB, 1],
    ['webgpu', 300 * MiB, 16, 20 * GiB, 1],
    ['tensorflow', 300 * MiB, 16, 20 * GiB, 1],
  ];
  for (const [backend, modelBytes, cores, free, want] of cases) {
    const c = autoWorkers(backend, modelBytes, { cores, freeMemoryBytes: free });
    assert.equal(c.value, want, `${backend}, ${modelBytes} B, ${cores} cores, ${free} B free: ${c.why}`);
    assert.ok(c.why.length > 0);
  }
});

test('autoAdapterDeviceBytes: a quarter of the wasm heap beside the model, of free host memory on cpu, 1 GiB elsewhere', () => {
  const m = { cores: 2, freeMemoryBytes: 16 * GiB };
  assert.equal(autoAdapterDeviceBytes('wasm', 1 * GiB, 2, m).value, 0.75 * GiB);
  assert.equal(autoAdapterDeviceBytes('wasm', 5 * GiB, 1, m).value, 0, 'a model that fills the heap leaves nothing');
  assert.equal(autoAdapterDeviceBytes('cpu', 1 * GiB, 2, m).value, 2 * GiB, 'a quarter of 16 GiB, shared by two copies');
  assert.equal(autoAdapterDeviceBytes('webgpu', 1 * GiB, 1, m).value, GiB);
});

const tmp = tempDir();
after(tmp.cleanup);

test('the runtime resolves --workers auto and --adapter-device-bytes auto and reports them', async () => {
  const { rt } = await fixtureRuntime(tmp.dir, TINY_LLAMA, { workers: 'auto', adapterDeviceBytes: 'auto' });
  try {
    // The tiny model fits any number of times: one copy per core.
    assert.equal(rt.workers, availableParallelism());
    assert.equal(rt.adapterDeviceBytes, Math.floor(0.25 * (4 * GiB - rt.modelBytes)));
    assert.equal(rt.adapters.stats().maxDeviceBytes, rt.adapterDeviceBytes, 'the adapter manager got the chosen limit');
  } finally {
    await rt.close();
  }
});

test('a model whose float32 weights do not fit the wasm heap is refused before any weight is read', async () => {
  const { assertModelFits } = await import('../src/sizing.ts');
  assert.throws(() => assertModelFits('wasm', 3.9e9), (e: { code?: string; message: string }) => e.code === 'MODEL_TOO_LARGE' && /--backend webgpu/.test(e.message));
  assert.doesNotThrow(() => assertModelFits('wasm', 1e9));
  assert.doesNotThrow(() => assertModelFits('webgpu', 10e9), 'other backends check their own limits');

  // A checkpoint whose header declares 4 GiB as float32 (a sparse 2 GiB BF16 file: nothing is written or read).
  const { writeCheckpoint } = await import('../src/demo/index.ts');
  const { openSync, writeSync, ftruncateSync, closeSync } = await import('node:fs');
  const { join } = await import('node:path');
  const { startRuntime } = await import('../src/runtime.ts');
  const { TEST_RUNTIME } = await import('./helpers/runtime.ts');
  const dir = join(tmp.dir, 'huge');
  await writeCheckpoint(dir, TINY_LLAMA);
  const n = 2 ** 30;
  const header = Buffer.from(JSON.stringify({ 'model.embed_tokens.weight': { dtype: 'BF16', shape: [n], data_offsets: [0, 2 * n] } }));
  const fd = openSync(join(dir, 'model.safetensors'), 'w');
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(header.length));
  writeSync(fd, len);
  writeSync(fd, header);
  ftruncateSync(fd, 8 + header.length + 2 * n);
  closeSync(fd);
  await assert.rejects(startRuntime({ ...TEST_RUNTIME, model: dir, adapterDir: join(tmp.dir, 'huge-adapters') }), { code: 'MODEL_TOO_LARGE' });
});
