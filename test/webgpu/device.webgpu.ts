/**
 * Tests that need the webgpu backend itself; test/webgpu.test.ts runs this file with TEST_BACKEND=webgpu when Dawn
 * finds an adapter (its name keeps it out of the default `test/*.test.ts test/*\/*.test.ts` run).
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import * as tf from '@tensorflow/tfjs-core';
import { initBackend } from '../../src/backend/select.ts';
import { webgpuCounts } from '../../src/backend/webgpu/counters.ts';
import { TFJS_SUBMIT_BATCH } from '../../src/backend/webgpu/submit.ts';
import { activeAdapter, maxTensorBytes } from '../../src/backend/webgpu/init.ts';
import { TINY_LLAMA, writePeftAdapter } from '../../src/demo/index.ts';
import { CausalLM } from '../../src/model/model.ts';
import { fixtureRuntime, generate, request } from '../helpers/runtime.ts';
import { fixtureCheckpoint, setupBackend, tempDir, testBackend } from '../helpers/tf.ts';

const tmp = tempDir();
before(async () => {
  assert.equal(testBackend(), 'webgpu', 'run with TEST_BACKEND=webgpu (test/webgpu.test.ts does)');
  await setupBackend();
});
after(tmp.cleanup);

test('the webgpu backend runs on Dawn\'s adapter and knows its limits', async () => {
  const info = await initBackend('webgpu');
  assert.equal(info.name, 'webgpu');
  assert.equal(tf.getBackend(), 'webgpu');
  const a = info.adapter!;
  assert.equal(a, activeAdapter());
  assert.ok(a.vendor || a.description, 'the adapter has a name');
  // WebGPU's guaranteed minimum of both limits is 128 MiB (maxBufferSize 256 MiB).
  assert.ok(a.maxStorageBufferBindingSize >= 2 ** 27, String(a.maxStorageBufferBindingSize));
  assert.ok(a.maxBufferSize >= 2 ** 27, String(a.maxBufferSize));
  assert.equal(maxTensorBytes()!.bytes, Math.min(a.maxStorageBufferBindingSize, a.maxBufferSize));
});

test('dispatches, submits, uploads, readbacks and readback bytes are counted', async () => {
  const before = webgpuCounts()!;
  assert.ok(before, 'counters are installed with the backend');
  // Larger than WEBGPU_CPU_HANDOFF_SIZE_THRESHOLD (1000), so the kernels run on the GPU, not on the host values.
  const a = tf.tensor1d(Float32Array.from({ length: 4096 }, (_, i) => i));
  const b = tf.mul(tf.add(a, a), a);
  const values = await b.data();
  assert.equal(values[3], 18);
  const after = webgpuCounts()!;
  assert.equal(after.upload - before.upload, 1, 'a tensor made from host values is uploaded once');
  assert.equal(after.dispatch - before.dispatch, 2, 'add, mul');
  assert.equal(after.readback - before.readback, 1);
  assert.equal(after.readbackBytes - before.readbackBytes, 4096 * 4, 'the bytes of the buffer read back');
  assert.ok(after.submit - before.submit >= 1, 'the readback submits the pending commands');
  await b.data();
  assert.equal(webgpuCounts()!.readback, after.readback, 'read values are kept on the host');
  tf.dispose([a, b]);
});

test('a tensor larger than the device can bind fails its read with DEVICE_ERROR instead of reading zeros', async () => {
  const limit = activeAdapter()!.maxStorageBufferBindingSize;
  const n = limit / 4 + 1024; // just over the binding limit
  const a = tf.fill([n], 1);
  const b = tf.add(a, a);
  const err: any = await b.data().then(() => null, (e) => e);
  tf.dispose([a, b]);
  assert.equal(err?.code, 'DEVICE_ERROR', String(err));
  assert.match(err.message, /binding size.*--max-batch-size/i);
  // The device is still usable afterwards.
  const one = tf.ones([4096]);
  const c = tf.add(one, 1);
  assert.equal((await c.data())[0], 2);
  tf.dispose([one, c]);
});

test('loading checks every weight against the device limit by default; a refused load leaks nothing', async () => {
  const { dir } = await fixtureCheckpoint(join(tmp.dir, 'limit'), TINY_LLAMA);
  const baseline = tf.memory().numTensors;
  CausalLM.load(dir).dispose(); // the fixture fits the device
  const err: any = (() => {
    try {
      CausalLM.load(dir, { maxTensorBytes: { bytes: 1024, on: 'a faked small device' } });
      return null;
    } catch (e) {
      return e;
    }
  })();
  assert.equal(err?.code, 'MODEL_TOO_LARGE', String(err));
  assert.match(err.message, /a faked small device/);
  assert.equal(tf.memory().numTensors, baseline);
});

test('a runtime on webgpu serves LoRA requests, reports its adapter, and leaves no tensors behind', async () => {
  const baseline = tf.memory().numTensors;
  const { rt, config } = await fixtureRuntime(tmp.dir, TINY_LLAMA);
  try {
    assert.equal(rt.backend, 'webgpu');
    assert.equal(rt.nativeMatmul, false);
    assert.deepEqual(rt.webgpuAdapter, activeAdapter());
    // tf.tensor on webgpu keeps a reference to the host array until the first upload: never a copy.
    assert.equal(rt.executor.copiesOnUpload, false);
    await writePeftAdapter(join(tmp.dir, 'adapters', 'a'), { baseConfig: config, seed: 5, r: 4, loraAlpha: 8, targetModules: 'all-linear' });
    const outs = await Promise.all([null, 'a', 'a', null].map((adapterId) => generate(rt, request([3, 7, 11], { adapterId, maxNewTokens: 4, ignoreEos: true }))));
    for (const o of outs) {
      assert.equal(o.error, undefined, o.error?.message);
      assert.equal(o.result?.generatedTokens, 4);
    }
    const ids = outs.map((o) => o.tokens.map((t) => t.id).join(','));
    assert.equal(ids[1], ids[2], 'same adapter, same prompt: same greedy tokens');
    assert.equal(ids[0], ids[3], 'base model rows in a mixed batch agree');
  } finally {
    await rt.close();
  }
  assert.equal(tf.memory().numTensors, baseline, 'closing the runtime frees every tensor');
});

test('a decode step is one command-buffer submit; a prefill keeps tfjs\'s submit every 15 dispatches', async () => {
  const { rt } = await fixtureRuntime(join(tmp.dir, 'submits'), TINY_LLAMA);
  try {
    /** Dispatches and submits of one request of `newTokens` tokens. */
    const run = async (newTokens: number) => {
      const before = webgpuCounts()!;
      const o = await generate(rt, request([3, 7, 11, 2, 9], { maxNewTokens: newTokens, ignoreEos: true }));
      assert.equal(o.result?.generatedTokens, newTokens, o.error?.message);
      const after = webgpuCounts()!;
      return { dispatch: after.dispatch - before.dispatch, submit: after.submit - before.submit };
    };
    await run(2); // compile the kernels
    const prefill = await run(1);
    const steps = 5;
    const long = await run(1 + steps);
    assert.ok(prefill.dispatch > 15, `the prefill makes ${prefill.dispatch} dispatches`);
    assert.ok(prefill.submit >= Math.floor(prefill.dispatch / 15), `prefill: ${prefill.submit} submits for ${prefill.dispatch} dispatches`);
    assert.ok((long.dispatch - prefill.dispatch) / steps > 15, 'a decode step makes more dispatches than one default batch');
    assert.equal(long.submit - prefill.submit, steps, `one submit per decode step (${JSON.stringify({ prefill, long })})`);
    // After the steps, work outside a step (merges, LoRA banks, joins) submits as before: nothing holds its buffers.
    assert.equal(tf.env().getNumber('WEBGPU_DEFERRED_SUBMIT_BATCH_SIZE'), TFJS_SUBMIT_BATCH, 'the submit batch is restored after a decode step');
  } finally {
    await rt.close();
  }
});
