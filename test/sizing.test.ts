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
