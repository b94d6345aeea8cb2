/**
 * The server listens before the model loads (startServer, as main.ts starts it): over a real socket, while
 * start-up is held at a phase through StartupProgress's gate (the test seam), every route answers 503 NOT_READY
 * with Retry-After and the loading progress, HEAD /health the status alone, /metrics answers; once loaded and
 * ready, the app serves on the same socket. In this thread the weights load layer by layer, yielding between.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import * as tf from '@tensorflow/tfjs-core';
import { pino } from 'pino';
import { request as http } from 'undici';
import { DEFAULT_OPTIONS, type ServerOptions } from '../src/cli.ts';
import { DEMO_LLAMA, TINY_GEMMA2, TINY_GPT2, TINY_PHI3, writeCheckpoint } from '../src/demo/index.ts';
import { CausalLM } from '../src/model/model.ts';
import { startServer, type Server } from '../src/server/server.ts';
import { StartupProgress, type StartupPhase } from '../src/startup.ts';
import { setupBackend, tempDir } from './helpers/tf.ts';

const tmp = tempDir();
before(async () => {
  await setupBackend();
  await writeCheckpoint(join(tmp.dir, 'model'), DEMO_LLAMA);
});
after(tmp.cleanup);

/** A gate that holds start-up at the given phases until `release(phase)`. */
function gate(phases: StartupPhase[]) {
  const held = new Map<StartupPhase, { promise: Promise<void>; open: () => void; reached: boolean }>();
  for (const p of phases) {
    let open!: () => void;
    const promise = new Promise<void>((r) => (open = r));
    held.set(p, { promise, open, reached: false });
  }
  return {
    progress: new StartupProgress(async (phase) => {
      const h = held.get(phase);
      if (!h) return;
      h.reached = true;
      await h.promise;
    }),
    reached: (p: StartupPhase) => held.get(p)!.reached,
    release: (p: StartupPhase) => held.get(p)!.open(),
  };
}

/** Starts the server (not awaited: it resolves once loaded) and returns its URL as soon as it listens. */
async function start(workers: number, progress: StartupProgress, extra: Partial<ServerOptions> = {}): Promise<{ url: string; server: Promise<Server> }> {
  let listening!: (url: string) => void;
  const url = new Promise<string>((r) => (listening = r));
  const sink = new Writable({
    write(chunk, _enc, done) {
      const m = /listening on (http:\/\/\S+)"/.exec(String(chunk));
      if (m) listening(m[1]!);
      done();
    },
  });
  const server = startServer({
    ...DEFAULT_OPTIONS, model: join(tmp.dir, 'model'), adapterDir: join(tmp.dir, `adapters-${workers}`), backend: 'wasm',
    host: '127.0.0.1', port: 0, maxInputLength: 64, maxTotalTokens: 128, workers, warmUpLoads: 2, ...extra,
  }, pino({ level: 'info' }, sink), progress);
  server.catch(() => {}); // awaited by the test
  return { url: await url, server };
}

async function until(what: string, ok: () => boolean): Promise<void> {
  for (let i = 0; i < 6000 && !ok(); i++) await new Promise((r) => setTimeout(r, 5));
  assert.ok(ok(), what);
}

async function get(url: string, method: 'GET' | 'HEAD' = 'GET', key?: string) {
  const res = await http(url, { method, ...(key ? { headers: { authorization: `Bearer ${key}` } } : {}) });
  const text = await res.body.text();
  return { status: res.statusCode, headers: res.headers, text, json: () => JSON.parse(text) };
}

async function post(url: string, body: unknown) {
  const res = await http(url, { method: 'POST', body: JSON.stringify(body), headers: { 'content-type': 'application/json' } });
  return { status: res.statusCode, headers: res.headers, json: (await res.body.json()) as any };
}

test('listening before the model loads: 503 NOT_READY with progress and Retry-After on every route, /metrics served, then the app', async () => {
  const g = gate(['weights', 'tokenizer']);
  const { url, server } = await start(2, g.progress);
  await until('start-up reached the weights', () => g.reached('weights'));

  const health = await get(`${url}/health`);
  assert.equal(health.status, 503);
  assert.equal(health.headers['retry-after'], '2');
  const body = health.json();
  assert.equal(body.code, 'NOT_READY');
  assert.equal(body.error_type, 'not_ready');
  assert.match(body.error, /starting \(weights: 0 of \d+ tensors/);
  assert.equal(body.loading.phase, 'weights');
  assert.equal(body.loading.tensors_loaded, 0);
  assert.equal(body.loading.workers_started, 0);
  assert.equal(body.loading.workers_total, 2);
  assert.ok(body.loading.tensors_total > 0 && body.loading.bytes_total > 0);
  const head = await get(`${url}/health`, 'HEAD');
  assert.deepEqual([head.status, head.text, head.headers['retry-after']], [503, '', '2']);
  const gen = await post(`${url}/generate`, { inputs: 'Hi' });
  assert.deepEqual([gen.status, gen.json.code, gen.json.loading.phase], [503, 'NOT_READY', 'weights']);
  const oai = await post(`${url}/v1/completions`, { prompt: 'Hi' });
  assert.deepEqual([oai.status, oai.json.error.code, oai.json.error.type, oai.json.loading.phase], [503, 'NOT_READY', 'not_ready', 'weights']);
  const metrics = await get(`${url}/metrics`);
  assert.equal(metrics.status, 200);
  assert.match(metrics.text, /^# HELP /m);

  // After the weights: every tensor of both copies read, both workers started.
  g.release('weights');
  await until('start-up reached the tokenizer', () => g.reached('tokenizer'));
  const loaded = (await get(`${url}/health`)).json().loading;
  assert.equal(loaded.phase, 'tokenizer');
  assert.equal(loaded.workers_started, 2);
  assert.equal(loaded.tensors_loaded, loaded.tensors_total, 'the demo Llama reads every tensor of its checkpoint');
  assert.equal(loaded.bytes_loaded, loaded.bytes_total);

  g.release('tokenizer');
  const s = await server;
  assert.equal((await get(`${url}/health`)).status, 503, 'loaded, not ready until setReady(true)');
  s.setReady(true);
  assert.equal((await get(`${url}/health`)).status, 200);
  const ok = await post(`${url}/generate`, { inputs: 'Hi', parameters: { max_new_tokens: 2 } });
  assert.equal(ok.status, 200, JSON.stringify(ok.json));
  await s.close();
  await assert.rejects(http(`${url}/health`), /ECONNREFUSED/, 'close() stops listening');
});

test('while loading, --api-key is checked as the app checks it: /health open, /metrics open only with --metrics-public, others 401 without a key', async () => {
  for (const metricsPublic of [false, true]) {
    const g = gate(['tokenizer']);
    const { url, server } = await start(1, g.progress, { apiKey: 'plain-key', adminApiKey: 'admin-key', metricsPublic });
    await until('start-up reached the tokenizer', () => g.reached('tokenizer'));
    assert.equal((await get(`${url}/health`)).json().code, 'NOT_READY');
    const anon = await get(`${url}/info`);
    assert.deepEqual([anon.status, anon.json().code, anon.json().loading, anon.headers['www-authenticate']], [401, 'UNAUTHORIZED', undefined, 'Bearer']);
    const oai = await post(`${url}/v1/completions`, { prompt: 'Hi' });
    assert.deepEqual([oai.status, oai.json.error.code, oai.json.loading], [401, 'UNAUTHORIZED', undefined]);
    for (const key of ['plain-key', 'admin-key']) {
      const keyed = await get(`${url}/info`, 'GET', key);
      assert.deepEqual([keyed.status, keyed.json().code, keyed.json().loading.phase], [503, 'NOT_READY', 'tokenizer']);
      assert.equal((await get(`${url}/metrics`, 'GET', key)).status, 200);
    }
    assert.equal((await get(`${url}/metrics`)).status, metricsPublic ? 200 : 401);
    assert.equal((await get(`${url}/metrics`, 'GET', 'wrong')).status, metricsPublic ? 200 : 401);
    g.release('tokenizer');
    const s = await server;
    s.setReady(true);
    assert.equal((await get(`${url}/metrics`)).status, metricsPublic ? 200 : 401, 'the app answers /metrics as the loading handler did');
    await s.close();
  }
});

test('in this thread (--workers 1): the tensors read are reported once the weights phase ends', async () => {
  const g = gate(['adapters']);
  const { url, server } = await start(1, g.progress);
  await until('start-up reached the adapters', () => g.reached('adapters'));
  const loading = (await get(`${url}/health`)).json().loading;
  assert.equal(loading.phase, 'adapters');
  assert.deepEqual([loading.workers_started, loading.workers_total], [0, 0]);
  assert.ok(loading.tensors_loaded > 0);
  assert.equal(loading.tensors_loaded, loading.tensors_total);
  g.release('adapters');
  const s = await server;
  s.setReady(true);
  assert.equal((await get(`${url}/health`)).status, 200);
  await s.close();
});

test('CausalLM.loadAsync lets the event loop run between layers, for every architecture (a server loading in its own thread answers meanwhile); no tensor left after dispose', async () => {
  const archs = { llama: DEMO_LLAMA, gpt2: TINY_GPT2, phi3: TINY_PHI3, gemma2: TINY_GEMMA2 };
  for (const [name, opts] of Object.entries(archs)) {
    const dir = join(tmp.dir, `arch-${name}`);
    await writeCheckpoint(dir, opts);
    const baseline = tf.memory().numTensors;
    let ticks = 0;
    let loading = true;
    const tick = () => {
      if (!loading) return;
      ticks++;
      setImmediate(tick);
    };
    setImmediate(tick);
    const tickOfTensor: number[] = [];
    const model = await CausalLM.loadAsync(dir, { onTensor: () => tickOfTensor.push(ticks) });
    loading = false;
    const turns = new Set(tickOfTensor).size;
    assert.ok(turns > model.config.numLayers, `${name}: tensors read in ${turns} turns of the event loop, ${model.config.numLayers} layers`);
    model.dispose();
    assert.equal(tf.memory().numTensors, baseline, name);
  }
});

test('the connection timeouts (--headers-timeout, --body-timeout, --keep-alive-timeout) reach the server that listens early', async () => {
  const { server } = await start(1, new StartupProgress(), { headersTimeout: 7, bodyTimeout: 11, keepAliveTimeout: 13 });
  const s = await server;
  try {
    const http = s.app.server;
    assert.deepEqual([http.headersTimeout, http.requestTimeout, http.keepAliveTimeout], [7000, 11_000, 13_000]);
  } finally {
    await s.close();
  }
});
