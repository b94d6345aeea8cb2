/**
 * vLLM's LoRA routes (src/server/routes/vllm.ts) and the scale-out gauges on a real server (tiny Llama fixture,
 * wasm): a folder inside --allowed-local-adapter-paths loads and then serves as `model`, exactly as the same
 * adapter from the adapter folder; paths outside a root, relative ones, `..`, and symlinks out of a root are
 * refused with ADAPTER_PATH_NOT_ALLOWED; unload; the LoRA info gauge and the vLLM-named twins on /metrics.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync, symlinkSync, cpSync } from 'node:fs';
import { join } from 'node:path';
import { TINY_LLAMA, writeCheckpoint, writePeftAdapter } from '../src/demo/index.ts';
import { createServer, type Server } from '../src/server/server.ts';
import { docValidator } from './helpers/app.ts';
import { fixtureServerOptions } from './helpers/listening.ts';
import { tempDir } from './helpers/tf.ts';

const tmp = tempDir();
const allowed = join(tmp.dir, 'allowed');
const outside = join(tmp.dir, 'outside');
let server: Server;

before(async () => {
  const { config } = await writeCheckpoint(join(tmp.dir, 'model'), TINY_LLAMA);
  await writePeftAdapter(join(allowed, 'style'), { baseConfig: config, seed: 5, r: 4, targetModules: ['q_proj', 'v_proj'] });
  cpSync(join(allowed, 'style'), join(tmp.dir, 'adapters', 'same-as-style'), { recursive: true });
  await writePeftAdapter(join(outside, 'secret'), { baseConfig: config, seed: 6, r: 4, targetModules: ['q_proj', 'v_proj'] });
  symlinkSync(join(outside, 'secret'), join(allowed, 'link-out'));
  mkdirSync(join(allowed, 'file-link'));
  cpSync(join(allowed, 'style', 'adapter_config.json'), join(allowed, 'file-link', 'adapter_config.json'));
  symlinkSync(join(outside, 'secret', 'adapter_model.safetensors'), join(allowed, 'file-link', 'adapter_model.safetensors'));
  server = await createServer(fixtureServerOptions(tmp.dir, {
    maxBatchSize: 4, maxLoadedAdapters: 3, allowedLocalAdapterPaths: `${allowed},${join(tmp.dir, 'missing-root')}`, metricsCompat: 'vllm',
  }));
  server.setReady(true);
});
after(async () => {
  await server.close();
  tmp.cleanup();
});

async function post(url: string, body: unknown) {
  const res = await server.app.inject({ method: 'POST', url, payload: body as object });
  docValidator().validate('POST', url, res);
  return res;
}

const complete = async (model: string) => {
  const res = await post('/v1/completions', { model, prompt: 'once upon a time', max_tokens: 8, temperature: 0 });
  assert.equal(res.statusCode, 200, res.body);
  return res.json().choices[0].text as string;
};

test('load_lora_adapter from an allowed folder: 200 in vLLM\'s words, then `model` names it and it answers as the same files from the adapter folder', async () => {
  const res = await post('/v1/load_lora_adapter', { lora_name: 'org/style', lora_path: join(allowed, 'style') });
  assert.equal(res.statusCode, 200, res.body);
  assert.match(res.headers['content-type'] as string, /^text\/plain/);
  assert.equal(res.body, "Success: LoRA adapter 'org/style' added successfully.");
  const info = (await server.app.inject({ method: 'GET', url: '/adapters/org/style' })).json();
  assert.equal(info.state, 'ready');
  assert.equal(await complete('org/style'), await complete('same-as-style'));
  assert.notEqual(await complete('org/style'), await complete(server.runtime.modelId));
  // Without lora_path (or with lora_path = lora_name) the adapter comes from the store.
  assert.equal((await post('/v1/load_lora_adapter', { lora_name: 'same-as-style' })).statusCode, 200);
  assert.equal((await post('/v1/load_lora_adapter', { lora_name: 'same-as-style', lora_path: 'same-as-style' })).statusCode, 200);
});

test('load_lora_adapter refuses paths outside the allowed folders, relative paths, `..` and symlinks out, with coded errors', async () => {
  const cases: [body: object, status: number, code: string, message: RegExp][] = [
    [{ lora_name: 'x', lora_path: join(outside, 'secret') }, 403, 'ADAPTER_PATH_NOT_ALLOWED', /not inside an allowed folder/],
    [{ lora_name: 'x', lora_path: 'allowed/style' }, 403, 'ADAPTER_PATH_NOT_ALLOWED', /must be an absolute path/],
    [{ lora_name: 'x', lora_path: `${allowed}/../outside/secret` }, 403, 'ADAPTER_PATH_NOT_ALLOWED', /not inside an allowed folder/],
    [{ lora_name: 'x', lora_path: `${allowed}/style/../style` }, 403, 'ADAPTER_PATH_NOT_ALLOWED', /not inside an allowed folder/],
    [{ lora_name: 'x', lora_path: join(allowed, 'link-out') }, 403, 'ADAPTER_PATH_NOT_ALLOWED', /not inside an allowed folder/],
    [{ lora_name: 'x', lora_path: join(allowed, 'file-link') }, 403, 'ADAPTER_PATH_NOT_ALLOWED', /adapter_model\.safetensors is a symlink that leads out/],
    [{ lora_name: 'x', lora_path: `${allowed}-sibling/style` }, 403, 'ADAPTER_PATH_NOT_ALLOWED', /not inside an allowed folder/],
    [{ lora_name: 'x', lora_path: join(allowed, 'nope') }, 404, 'ADAPTER_NOT_FOUND', /does not exist/],
    [{ lora_name: 'x', lora_path: allowed }, 404, 'ADAPTER_NOT_FOUND', /has no adapter_config\.json/],
    [{ lora_name: '../x', lora_path: join(allowed, 'style') }, 400, 'ADAPTER_INVALID_ID', /segment starting with "."/],
    [{ lora_name: 'never-seen' }, 404, 'ADAPTER_NOT_FOUND', /not found/],
    [{ lora_path: join(allowed, 'style') }, 400, 'VALIDATION', /lora_name/],
  ];
  for (const [body, status, code, message] of cases) {
    const res = await post('/v1/load_lora_adapter', body);
    assert.equal(res.statusCode, status, `${JSON.stringify(body)}: ${res.body}`);
    const err = res.json().error;
    assert.equal(err.code, code, JSON.stringify(body));
    assert.match(err.message, message, JSON.stringify(body));
  }
  assert.equal((await server.app.inject({ method: 'GET', url: '/adapters/x' })).statusCode, 404, 'nothing was stored');
});

test('unload_lora_adapter drops the adapter from the device; it stays servable from the store', async () => {
  assert.equal((await post('/v1/load_lora_adapter', { lora_name: 'org/style', lora_path: join(allowed, 'style') })).statusCode, 200);
  const res = await post('/v1/unload_lora_adapter', { lora_name: 'org/style' });
  assert.equal(res.statusCode, 200, res.body);
  assert.equal(res.body, "Success: LoRA adapter 'org/style' removed successfully.");
  assert.equal((await server.app.inject({ method: 'GET', url: '/adapters/org/style' })).json().tier === 'device', false);
  const missing = await post('/v1/unload_lora_adapter', { lora_name: 'never-seen' });
  assert.equal(missing.statusCode, 404);
  assert.equal(missing.json().error.code, 'ADAPTER_NOT_FOUND');
  assert.equal((await complete('org/style')).length > 0, true);
});

test('a server started without --allowed-local-adapter-paths refuses every lora_path', async () => {
  const { readAllowedAdapterFolder } = await import('../src/lora/local-path.ts');
  await assert.rejects(readAllowedAdapterFolder('x', join(allowed, 'style'), [], 1 << 20), (e: any) => e.code === 'ADAPTER_PATH_NOT_ALLOWED' && /disabled/.test(e.message));
});

test('/metrics: the LoRA info gauge (ours and vLLM\'s name) reports max_lora and the adapters of requests in flight', async () => {
  const scrape = async () => (await server.app.inject({ method: 'GET', url: '/metrics' })).body;
  // A scrape while a request for org/style runs: the engine holds it until its step yields to the event loop.
  const running = server.app.inject({ method: 'POST', url: '/v1/completions', payload: { model: 'org/style', prompt: 'hello', max_tokens: 40, temperature: 0 } });
  let during = '';
  // Until the request holds KV tokens too (its prompt is prefilled): while the first prefill runs it holds none yet.
  for (let i = 0; i < 2000 && !(/running_lora_adapters="org\/style"/.test(during) && /^lora_serve_kv_cache_usage_ratio 0\.\d+$/m.test(during)); i++) {
    await new Promise((r) => setImmediate(r));
    during = await scrape();
  }
  assert.equal((await running).statusCode, 200);
  for (const name of ['lora_serve_lora_requests_info', 'vllm:lora_requests_info']) {
    assert.match(during, new RegExp(`^${name}\\{max_lora="3",running_lora_adapters="org/style",waiting_lora_adapters=""\\} \\d+(\\.\\d+)?$`, 'm'), name);
  }
  assert.match(during, /^lora_serve_kv_cache_usage_ratio 0\.\d+$/m);
  assert.match(during, /^vllm:kv_cache_usage_perc 0\.\d+$/m);
  assert.match(during, /^vllm:num_requests_running 1$/m);
  const idle = await scrape();
  assert.match(idle, /^vllm:lora_requests_info\{max_lora="3",running_lora_adapters="",waiting_lora_adapters=""\} /m);
  assert.match(idle, /^lora_serve_kv_cache_usage_ratio 0$/m);
  assert.match(idle, /^vllm:num_requests_waiting 0$/m);
});
