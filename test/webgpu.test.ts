/**
 * The webgpu backend (src/backend/webgpu/). What needs no adapter runs everywhere: software-adapter detection,
 * the tensor-size refusal (with a faked limit), the refusal of worker threads, the error without a Vulkan driver.
 * With a WebGPU adapter (in CI: Mesa's lavapipe, scripts/install-lavapipe.sh) the reference tests (forward pass,
 * LoRA merged/unmerged/mixed, sliding windows, engine), test/webgpu/device.webgpu.ts, the fused kernels' tests
 * (test/webgpu/kernels.webgpu.ts), the packed KV cache's (test/webgpu/kv.webgpu.ts) and the recorded steps'
 * (test/webgpu/recorded-step.webgpu.ts) run on webgpu in a child process (the backend is process-global); without one those
 * tests are skipped with the reason.
 */
import { after, before, test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import * as tf from '@tensorflow/tfjs-core';
import { describeAdapter, isSoftwareAdapter, probeAdapter, type WebGPUAdapter } from '../src/backend/webgpu/init.ts';
import { TINY_LLAMA } from '../src/demo/index.ts';
import { openCheckpoint } from '../src/model/checkpoint.ts';
import { CausalLM } from '../src/model/model.ts';
import { startRuntime } from '../src/runtime.ts';
import { TEST_RUNTIME } from './helpers/runtime.ts';
import { fixtureCheckpoint, setupBackend, tempDir } from './helpers/tf.ts';

const tmp = tempDir();
before(setupBackend);
after(tmp.cleanup);

/** The files run on webgpu: the tests that compare with the float64 reference, and the webgpu-only ones (device, kernels, KV, recorded steps). */
const ON_WEBGPU = ['test/forward.test.ts', 'test/lora.test.ts', 'test/sliding-window.test.ts', 'test/engine.test.ts', 'test/webgpu/device.webgpu.ts',
  'test/webgpu/kernels.webgpu.ts', 'test/webgpu/greedy-pick.webgpu.ts', 'test/webgpu/kv.webgpu.ts', 'test/webgpu/recorded-step.webgpu.ts'];

/** Dawn's adapter, or why there is none. */
const probe: Promise<{ adapter: WebGPUAdapter } | { reason: string }> = probeAdapter().then(
  (adapter) => (adapter ? { adapter } : { reason: 'Dawn found no WebGPU adapter (no Vulkan driver: install one with scripts/install-lavapipe.sh)' }),
  (err: Error) => ({ reason: err.message }),
);

async function adapterOrSkip(t: TestContext): Promise<WebGPUAdapter | null> {
  const p = await probe;
  if ('adapter' in p) return p.adapter;
  t.skip(`webgpu tests skipped: ${p.reason}`);
  return null;
}

/** Runs node in a child process with the test environment (no node:test parent context), returning its output. */
function runNode(args: string[], env: Record<string, string>): Promise<{ code: number | null; out: string }> {
  const childEnv: Record<string, string | undefined> = { ...process.env, ...env };
  delete childEnv.NODE_TEST_CONTEXT; // else the child reports to this runner instead of printing
  if (!childEnv.XDG_RUNTIME_DIR) {
    childEnv.XDG_RUNTIME_DIR = join(tmp.dir, 'xdg'); // Mesa warns without one
    mkdirSync(childEnv.XDG_RUNTIME_DIR, { recursive: true, mode: 0o700 });
  }
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, ['--import', 'tsx', ...args], { env: childEnv, stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    child.stdout.on('data', (d) => (out += d));
    child.stderr.on('data', (d) => (out += d));
    child.on('error', reject);
    child.on('close', (code) => resolve({ code, out }));
  });
}

test('software adapters are recognised by the adapter info', () => {
  const lavapipe = { vendor: 'mesa', architecture: 'software', device: 'llvmpipe-llvm-15', description: 'llvmpipe: Mesa 25.0.7 (LLVM 15.0.6)' };
  assert.equal(isSoftwareAdapter(lavapipe), true);
  assert.equal(isSoftwareAdapter({ vendor: 'google', architecture: '', device: 'swiftshader device', description: 'SwiftShader Device (Subzero)' }), true);
  assert.equal(isSoftwareAdapter({ vendor: 'nvidia', architecture: 'hopper', device: '', description: 'NVIDIA H200', fallback: true }), true);
  assert.equal(isSoftwareAdapter({ vendor: 'nvidia', architecture: 'hopper', device: '', description: 'NVIDIA H200' }), false);
  assert.equal(isSoftwareAdapter({ vendor: 'amd', architecture: 'rdna-3', device: '', description: 'AMD Radeon RX 7900 XTX (RADV NAVI31)' }), false);
  assert.equal(describeAdapter({ ...lavapipe, software: true, maxStorageBufferBindingSize: 1, maxBufferSize: 1 }), 'mesa software (llvmpipe: Mesa 25.0.7 (LLVM 15.0.6))');
});

test('a weight larger than the device can bind is refused at load with MODEL_TOO_LARGE, naming it; nothing leaks', async () => {
  const { dir } = await fixtureCheckpoint(join(tmp.dir, 'big'), TINY_LLAMA);
  const ckpt = openCheckpoint(dir);
  const { vocabSize: V, hiddenSize: d } = ckpt.config;
  ckpt.close();
  const embedBytes = V * d * 4;
  // Room for every weight but the [vocab, hidden] ones (embedding, lm_head), which the loader reads last.
  const limit = { bytes: embedBytes - 4, on: 'a test device' };
  const baseline = tf.memory().numTensors;
  let err: any;
  try {
    CausalLM.load(dir, { maxTensorBytes: limit });
  } catch (e) {
    err = e;
  }
  assert.equal(err?.code, 'MODEL_TOO_LARGE', String(err));
  assert.match(err.message, new RegExp(`"(model\\.embed_tokens|lm_head)\\.weight" \\[${V}, ${d}\\] needs ${embedBytes} bytes .* ${limit.bytes} bytes .*a test device.*maxStorageBufferBindingSize`));
  assert.equal(err.details.maxStorageBufferBindingSize, limit.bytes);
  assert.equal(tf.memory().numTensors, baseline, 'the weights uploaded before the refusal are freed');
  CausalLM.load(dir, { maxTensorBytes: { bytes: embedBytes, on: 'a test device' } }).dispose(); // exactly at the limit: fits
});

test('webgpu refuses executor worker threads with a clear error', async () => {
  const err: any = await startRuntime({ ...TEST_RUNTIME, backend: 'webgpu', workers: 2, model: (await fixtureCheckpoint(join(tmp.dir, 'w'), TINY_LLAMA)).dir, adapterDir: join(tmp.dir, 'w-adapters') })
    .then(() => null, (e) => e);
  assert.equal(err?.code, 'BACKEND_UNAVAILABLE', String(err));
  assert.match(err.message, /main thread only.*--workers 1/);
});

test('--backend webgpu without a Vulkan driver fails with BACKEND_UNAVAILABLE; auto then runs wasm', async () => {
  const script = `import { initBackend } from './src/backend/select.ts';
    const err = await initBackend('webgpu').then(() => null, (e) => e);
    const auto = await initBackend('auto');
    console.log(JSON.stringify({ code: err?.code, message: err?.message, auto: auto.name, skipped: auto.skipped }));`;
  const { code, out } = await runNode(['--input-type=module', '-e', script], { VK_DRIVER_FILES: '/nonexistent/icd.json', VK_ICD_FILENAMES: '/nonexistent/icd.json' });
  assert.equal(code, 0, out);
  const r = JSON.parse(out.trim().split('\n').at(-1)!);
  assert.equal(r.code, 'BACKEND_UNAVAILABLE');
  assert.match(r.message, /no WebGPU adapter|webgpu package \(Dawn\) failed to load/);
  assert.equal(r.auto, 'wasm');
  assert.ok(r.skipped.some((s: string) => s.startsWith('webgpu: ')), r.skipped.join('\n'));
});

test('auto uses a hardware WebGPU adapter and never a software one', async (t) => {
  const adapter = await adapterOrSkip(t);
  if (!adapter) return;
  const script = `import { initBackend } from './src/backend/select.ts';
    const auto = await initBackend('auto');
    console.log(JSON.stringify({ name: auto.name, skipped: auto.skipped }));`;
  const { code, out } = await runNode(['--input-type=module', '-e', script], {});
  assert.equal(code, 0, out);
  const r = JSON.parse(out.trim().split('\n').at(-1)!);
  if (adapter.software) {
    assert.notEqual(r.name, 'webgpu');
    assert.ok(r.skipped.some((s: string) => /^webgpu: .*software/.test(s)), r.skipped.join('\n'));
  } else {
    assert.equal(r.name, 'webgpu'); // unless tensorflow-gpu came first
  }
});

test('on webgpu: forward pass, LoRA (merged, unmerged, mixed batches), sliding windows and engine match the reference', { timeout: 15 * 60_000 }, async (t) => {
  const adapter = await adapterOrSkip(t);
  if (!adapter) return;
  t.diagnostic(`adapter: ${describeAdapter(adapter)}`);
  const { code, out } = await runNode(['--test', '--test-concurrency=1', '--test-reporter=tap', ...ON_WEBGPU], { TEST_BACKEND: 'webgpu' });
  for (const line of out.split('\n')) if (/max rel err/.test(line)) t.diagnostic(line.replace(/^\s*#\s*/, ''));
  const count = (what: string) => [...out.matchAll(new RegExp(`^# ${what} (\\d+)$`, 'gm'))].at(-1)?.[1] ?? '?';
  t.diagnostic(`on webgpu: ${count('tests')} tests, ${count('pass')} passed, ${count('fail')} failed, ${count('skipped')} skipped`);
  const failures = out.split('\n').filter((l) => /^\s*not ok /.test(l));
  assert.equal(code, 0, `the tests failed on webgpu:\n${failures.join('\n')}\n${out.slice(-6000)}`);
  assert.match(out, /^# fail 0$/m);
});
