/**
 * Models and adapters from the Hugging Face Hub, against a local stand-in for the Hub (test/helpers/fake-hub.ts,
 * never the internet) serving a generated demo model and PEFT adapters: a model by repo id and by revision, the
 * cache on disk in huggingface_hub's layout, adapters with adapter_source "hub" (a private repo with no, a wrong and
 * the right token), Hub adapters in merged_adapters, 404s, an unreachable Hub, and offline mode served from the cache
 * the first runs filled.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { cpSync, existsSync, lstatSync, readdirSync, readFileSync, readlinkSync, writeFileSync } from 'node:fs';
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { freePort } from '../bench/server.ts';
import { DEFAULT_OPTIONS, type ServerOptions } from '../src/cli.ts';
import { TINY_LLAMA, writeCheckpoint, writePeftAdapter } from '../src/demo/index.ts';
import { HubClient, hubSettingsFromEnv, parseRepoSpec, type HubSettings } from '../src/hub/client.ts';
import { downloadModel } from '../src/hub/model.ts';
import { HubAdapters } from '../src/lora/hub-adapters.ts';
import { startRuntime } from '../src/runtime.ts';
import { createServer, type Server } from '../src/server/server.ts';
import { FakeHub, folderFiles, gitBlobId, sha256 } from './helpers/fake-hub.ts';
import { generate, request, TEST_RUNTIME } from './helpers/runtime.ts';
import { tempDir } from './helpers/tf.ts';

const tmp = tempDir();
const hub = new FakeHub();
const MODEL = 'test-org/tiny-llama';
const STYLE = 'test-org/style';
const PRIVATE = 'test-org/private-style';
const TOKEN = 'hf_right';
/** Hub copies of the local adapters local/style and local/style-2, for merged_adapters. */
const MERGE_A = 'test-org/merge-a';
const MERGE_B = 'test-org/merge-b';
const CACHE = join(tmp.dir, 'hf-cache');
let modelFiles: Record<string, Uint8Array>;
let styleFiles: Record<string, Uint8Array>;
let commitV1: string;
let commitMain: string;
let styleCommit: string;

const settings = (over: Partial<HubSettings> = {}): HubSettings => ({ endpoint: hub.url, cacheDir: CACHE, offline: false, ...over });
const repoDir = (repo: string) => join(CACHE, `models--${repo.replace('/', '--')}`);
const spec = (s: string) => parseRepoSpec(s)!;
/** Requests the fake Hub received while `fn` ran. */
async function hubRequests(fn: () => Promise<unknown>) {
  const before = hub.requests.length;
  await fn();
  return hub.requests.slice(before);
}

before(async () => {
  await hub.start();
  const fixtures = join(tmp.dir, 'fixtures');
  const { config } = await writeCheckpoint(join(fixtures, 'model'), { ...TINY_LLAMA, shards: 2 });
  await writePeftAdapter(join(fixtures, 'style'), { baseConfig: config, r: 4, loraAlpha: 8, seed: 7, baseModelNameOrPath: MODEL });
  await writePeftAdapter(join(fixtures, 'style-2'), { baseConfig: config, r: 4, loraAlpha: 8, seed: 8, baseModelNameOrPath: MODEL });
  modelFiles = { ...folderFiles(join(fixtures, 'model')) };
  styleFiles = { ...folderFiles(join(fixtures, 'style')) };
  commitV1 = hub.commit(MODEL, modelFiles);
  hub.tag(MODEL, 'v1', commitV1);
  commitMain = hub.commit(MODEL, { ...modelFiles, 'README.md': new TextEncoder().encode('# tiny llama\n') });
  styleCommit = hub.commit(STYLE, styleFiles);
  hub.commit(PRIVATE, styleFiles, { token: TOKEN });
  hub.commit('test-org/concurrent', styleFiles);
  hub.commit('test-org/private-model', modelFiles, { token: 'hf_model' });
  hub.commit('test-org/pickle-only', { 'adapter_config.json': styleFiles['adapter_config.json']!, 'adapter_model.bin': new Uint8Array(8) });
  hub.commit(MERGE_A, styleFiles);
  hub.commit(MERGE_B, folderFiles(join(fixtures, 'style-2')));
  // The same adapters in the local folder, to compare Hub loads (and merges) with.
  cpSync(join(fixtures, 'style'), join(tmp.dir, 'adapters', 'local', 'style'), { recursive: true });
  cpSync(join(fixtures, 'style-2'), join(tmp.dir, 'adapters', 'local', 'style-2'), { recursive: true });
  cpSync(join(fixtures, 'style-2'), join(tmp.dir, 'style-2'), { recursive: true });
});

after(async () => {
  await hub.close();
  tmp.cleanup();
});

/** The snapshot of `repo` at `commit` holds `files` as relative links to blobs named by their ETag, with their bytes. */
function assertSnapshot(repo: string, commit: string, files: Record<string, Uint8Array>) {
  for (const [name, bytes] of Object.entries(files)) {
    const link = join(repoDir(repo), 'snapshots', commit, name);
    assert.ok(lstatSync(link).isSymbolicLink(), `${name} is a link`);
    const etag = name.endsWith('.safetensors') ? sha256(bytes) : gitBlobId(bytes);
    assert.equal(readlinkSync(link), `../../blobs/${etag}`, `${name} links to its blob`);
    assert.deepEqual(new Uint8Array(readFileSync(link)), bytes, `${name}: the bytes the Hub has`);
  }
}

test('a model by repo id, then by revision: downloaded into the Hub cache in huggingface_hub\'s layout, and served', async () => {
  const logs: string[] = [];
  const rt = await startRuntime({ ...TEST_RUNTIME, model: MODEL, adapterDir: join(tmp.dir, 'adapters'), hub: settings() }, { log: (m) => logs.push(m) });
  try {
    assert.equal(rt.modelId, MODEL);
    assert.equal(readFileSync(join(repoDir(MODEL), 'refs', 'main'), 'utf8'), commitMain);
    assertSnapshot(MODEL, commitMain, modelFiles);
    assert.ok(!existsSync(join(repoDir(MODEL), 'snapshots', commitMain, 'README.md')), 'only the files the server reads');
    assert.ok(logs.some((l) => l.includes(`model ${MODEL} at main: commit ${commitMain}`)), logs.join('\n'));
    const out = await generate(rt, request([1, 5, 6], { maxNewTokens: 3 }));
    assert.equal(out.error, undefined);
    assert.equal(out.result!.generatedTokens, 3);
  } finally {
    await rt.close();
  }

  // Another revision: its own ref and snapshot; the blobs both commits share are not fetched again.
  const seen = await hubRequests(async () => {
    const v1 = await startRuntime({ ...TEST_RUNTIME, model: `${MODEL}@v1`, adapterDir: join(tmp.dir, 'adapters'), hub: settings() });
    assert.equal(v1.modelId, MODEL);
    await v1.close();
  });
  assert.equal(readFileSync(join(repoDir(MODEL), 'refs', 'v1'), 'utf8'), commitV1);
  assertSnapshot(MODEL, commitV1, modelFiles);
  assert.deepEqual(seen.filter((r) => r.url.startsWith('/cdn/')), [], 'no LFS file downloaded twice');
  assert.equal(readdirSync(join(repoDir(MODEL), 'blobs')).length, Object.keys(modelFiles).length, 'one blob per distinct file');
});

test('hubSettingsFromEnv reads huggingface_hub\'s variables with its precedence', () => {
  const home = join(tmp.dir, 'hf-home');
  writeFileSync(join(tmp.dir, 'token-file'), 'hf_from_file\n');
  const s = hubSettingsFromEnv({ HF_HOME: home, HF_TOKEN_PATH: join(tmp.dir, 'token-file'), HF_HUB_OFFLINE: '1', HF_ENDPOINT: 'http://mirror.local/' });
  assert.deepEqual(s, { endpoint: 'http://mirror.local', cacheDir: join(home, 'hub'), token: 'hf_from_file', offline: true });
  const t = hubSettingsFromEnv({ HF_HOME: home, HF_HUB_CACHE: join(tmp.dir, 'c'), HF_TOKEN: 'hf_env', HF_TOKEN_PATH: join(tmp.dir, 'token-file'), HF_HUB_OFFLINE: '0' });
  assert.deepEqual(t, { endpoint: 'https://huggingface.co', cacheDir: join(tmp.dir, 'c'), token: 'hf_env', offline: false });
  assert.equal(hubSettingsFromEnv({ HF_HOME: home }).token, undefined, 'no HF_TOKEN and no token file: anonymous');
});

test('a large download is logged with its progress', async () => {
  const logs: string[] = [];
  const client = new HubClient(settings({ cacheDir: join(tmp.dir, 'other-cache') }), { progressBytes: 1, log: (m) => logs.push(m) });
  await downloadModel(client, spec(MODEL));
  await client.close();
  const shard = Object.keys(modelFiles).find((f) => f.endsWith('.safetensors'))!;
  assert.ok(logs.some((l) => l.startsWith(`downloading Hub repo "${MODEL}": ${shard} (`)), logs.join('\n'));
  assert.ok(logs.some((l) => l.startsWith(`downloading Hub repo "${MODEL}": ${shard}: 100% (`)), logs.join('\n'));
});

test('Hub errors are coded: 401 without a token, 404 of a repo or revision, an unreachable Hub; a bad --model fails the start', async () => {
  const client = new HubClient(settings());
  const denied = await downloadModel(client, spec('test-org/no-such-model')).catch((e) => e);
  assert.equal(denied.code, 'HUB_ACCESS_DENIED', denied.message); // as the Hub answers anonymous requests for missing repos
  assert.match(denied.message, /test-org\/no-such-model.*no token was sent/);
  const withToken = new HubClient(settings({ token: 'hf_someone' }));
  await assert.rejects(downloadModel(withToken, spec('test-org/no-such-model')), { code: 'HUB_NOT_FOUND', message: /"test-org\/no-such-model".*HTTP 404/ });
  await assert.rejects(downloadModel(client, spec(`${MODEL}@no-such-branch`)), { code: 'HUB_NOT_FOUND', message: /revision "no-such-branch"/ });
  await assert.rejects(downloadModel(client, spec(STYLE)), { code: 'HUB_NOT_FOUND', message: /has no config\.json/ });

  // Nothing listens on this port.
  const port = await freePort();
  const down = new HubClient(settings({ endpoint: `http://127.0.0.1:${port}`, cacheDir: join(tmp.dir, 'empty-cache') }));
  await assert.rejects(downloadModel(down, spec(MODEL)), { code: 'HUB_UNAVAILABLE', message: /could not be reached \(ECONNREFUSED\)/ });
  // Unreachable, but the ref is cached: the cache serves, with a warning.
  const logs: string[] = [];
  const fallback = new HubClient(settings({ endpoint: `http://127.0.0.1:${port}` }), { log: (m) => logs.push(m) });
  assert.equal((await downloadModel(fallback, spec(MODEL))).commit, commitMain);
  assert.match(logs.join('\n'), /could not be reached.*using the cached commit/);

  await assert.rejects(startRuntime({ ...TEST_RUNTIME, model: 'test-org/no-such-model', adapterDir: join(tmp.dir, 'adapters'), hub: settings() }), { code: 'HUB_ACCESS_DENIED' });
  await assert.rejects(startRuntime({ ...TEST_RUNTIME, model: './no/such/folder', adapterDir: join(tmp.dir, 'adapters'), hub: settings() }),
    { code: 'CHECKPOINT_INVALID', message: /no such folder, and not a Hugging Face Hub repo id/ });
});

test('a Hub adapter beyond --max-adapter-bytes, and a download whose bytes do not match their sha256, are refused and leave nothing in the cache', async () => {
  const cacheDir = join(tmp.dir, 'small-cache');
  const adapters = new HubAdapters(new HubClient(settings({ cacheDir })), { maxAdapterBytes: 100, refreshAfterMs: 0 });
  const key = await adapters.key(STYLE);
  await assert.rejects(adapters.read(key, undefined, (n) => new Uint8Array(n)), { code: 'ADAPTER_TOO_LARGE', message: /adapter_model\.safetensors is \d+ bytes \(limit 100\)/ });

  const repo = 'test-org/corrupted';
  const weights = new Uint8Array(4096).fill(7); // only downloaded here, never parsed
  const commit = hub.commit(repo, { 'adapter_model.safetensors': weights });
  hub.corrupt(weights);
  const client = new HubClient(settings({ cacheDir }));
  const snap = await client.resolve({ repo, revision: 'main' });
  await assert.rejects(client.file(snap, 'adapter_model.safetensors'), { code: 'HUB_UNAVAILABLE', message: /do not match their sha256/ });
  assert.deepEqual(readdirSync(join(cacheDir, 'models--test-org--corrupted', 'blobs')), []);
  assert.ok(!existsSync(join(cacheDir, 'models--test-org--corrupted', 'snapshots', commit, 'adapter_model.safetensors')));
  await client.close();
});

/** Runs the server's main with `args` and the HF_* variables `env` (none of this process's), until `until` matches its output or it exits. */
async function runMain(args: string[], env: Record<string, string>, until?: RegExp): Promise<{ code: number | null; out: string }> {
  const clean = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('HF_') && !k.startsWith('LORA_SERVE_')));
  const child = spawn(process.execPath, ['--import', 'tsx', 'src/server/main.ts', ...args], { env: { ...clean, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  const exited = new Promise<number | null>((resolve) => child.on('exit', resolve));
  await new Promise<void>((resolve) => {
    const onData = (d: Buffer) => {
      out += d;
      if (until?.test(out)) resolve();
    };
    child.stdout.on('data', onData);
    child.stderr.on('data', onData);
    void exited.then(() => resolve());
  });
  if (child.exitCode === null) child.kill('SIGTERM');
  return { code: await exited, out };
}

test('main: --model org/name with HF_ENDPOINT, HF_HUB_CACHE and HF_TOKEN; a refused repo is a clear start-up failure', async () => {
  const env = { HF_ENDPOINT: hub.url, HF_HUB_CACHE: join(tmp.dir, 'main-cache'), HF_HOME: join(tmp.dir, 'no-token-here') };
  const args = ['--model', 'test-org/private-model', '--adapter-dir', join(tmp.dir, 'main-adapters'), '--port', '0', '--workers', '1', '--log-level', 'info'];
  const refused = await runMain(args, env);
  assert.equal(refused.code, 1, refused.out);
  const fatal = refused.out.split('\n').filter((l) => l.includes('"level":60')).map((l) => JSON.parse(l));
  assert.equal(fatal.length, 1, refused.out);
  assert.equal(fatal[0].code, 'HUB_ACCESS_DENIED');
  assert.match(fatal[0].msg, /^failed to start: Hub repo "test-org\/private-model" at revision "main": the Hub refused access \(HTTP 401\).*set HF_TOKEN/);

  // It listens before the model is downloaded and loaded; "ready" comes after both.
  const served = await runMain(args, { ...env, HF_TOKEN: 'hf_model' }, /"msg":"ready"/);
  assert.match(served.out, /"msg":"listening on [^]*"msg":"ready"/, served.out);
  assert.equal(served.code, 0, served.out);
  assert.ok(lstatSync(join(tmp.dir, 'main-cache', 'models--test-org--private-model', 'snapshots', readFileSync(join(tmp.dir, 'main-cache', 'models--test-org--private-model', 'refs', 'main'), 'utf8'), 'config.json')).isSymbolicLink());
});

async function startServer(over: Partial<ServerOptions>): Promise<Server> {
  const server = await createServer({
    ...DEFAULT_OPTIONS, ...TEST_RUNTIME, model: join(tmp.dir, 'fixtures', 'model'), adapterDir: join(tmp.dir, 'adapters'),
    logLevel: 'silent', hub: settings(), ...over,
  });
  server.setReady(true);
  return server;
}

async function post(server: Server, url: string, body: unknown) {
  const res = await server.app.inject({ method: 'POST', url, payload: body as object });
  return { status: res.statusCode, json: res.json(), headers: res.headers };
}

const gen = (adapterId: string, params: Record<string, unknown> = {}) =>
  ({ inputs: 'Hello', parameters: { adapter_id: adapterId, max_new_tokens: 4, details: true, ...params } });

test('adapters with adapter_source "hub": validated, cached by commit, a private repo served only with the right api_token', async () => {
  const server = await startServer({});
  try {
    const local = await post(server, '/generate', gen('local/style'));
    assert.equal(local.status, 200, JSON.stringify(local.json));
    const fromHub = await post(server, '/generate', gen(STYLE, { adapter_source: 'hub' }));
    assert.equal(fromHub.status, 200, JSON.stringify(fromHub.json));
    assert.equal(fromHub.headers['x-adapter-id'], STYLE);
    assert.deepEqual(fromHub.json.details.tokens.map((t: any) => t.id), local.json.details.tokens.map((t: any) => t.id), 'the same adapter as the local copy');
    assertSnapshot(STYLE, styleCommit, styleFiles);
    assert.equal(readFileSync(join(repoDir(STYLE), 'refs', 'main'), 'utf8'), styleCommit);
    const listed = (await server.app.inject({ method: 'GET', url: '/adapters' })).json().adapters;
    const entry = listed.find((a: any) => a.id === `hub:${STYLE}@${styleCommit}`);
    assert.equal(entry?.source, 'hub', JSON.stringify(listed));
    assert.equal(entry.state, 'ready');
    // Resident and resolved: served without asking the Hub.
    assert.deepEqual(await hubRequests(() => post(server, '/generate', gen(STYLE, { adapter_source: 'hub' }))), []);
    // Concurrent first requests: one resolution and one download of each file.
    const together = await hubRequests(async () => {
      const all = await Promise.all([1, 2, 3, 4].map(() => post(server, '/generate', gen('test-org/concurrent', { adapter_source: 'hub' }))));
      assert.deepEqual(all.map((r) => r.status), [200, 200, 200, 200]);
    });
    assert.deepEqual(together.map((r) => r.url.replace(/\?.*/, '').replace(/[0-9a-f]{40,64}/, '<hash>')).sort(), [
      '/api/models/test-org/concurrent/revision/main', '/cdn/<hash>',
      '/test-org/concurrent/resolve/<hash>/adapter_config.json', '/test-org/concurrent/resolve/<hash>/adapter_model.safetensors',
    ]);

    for (const token of [undefined, 'hf_wrong', 'not-even-hf-shaped']) {
      const res = await post(server, '/generate', gen(PRIVATE, { adapter_source: 'hub', ...(token ? { api_token: token } : {}) }));
      assert.equal(res.status, 403, `${token}: ${JSON.stringify(res.json)}`);
      assert.equal(res.json.code, 'HUB_ACCESS_DENIED');
      assert.match(res.json.error, new RegExp(`"${PRIVATE}".*HTTP 401`));
    }
    const sent = await hubRequests(async () => {
      const ok = await post(server, '/generate', gen(PRIVATE, { adapter_source: 'hub', api_token: TOKEN }));
      assert.equal(ok.status, 200, JSON.stringify(ok.json));
    });
    assert.ok(sent.length > 0 && sent.every((r) => r.url.startsWith('/cdn/') || r.auth === `Bearer ${TOKEN}`), JSON.stringify(sent));
    // Loaded now, but a request without the token is still refused.
    assert.equal((await post(server, '/generate', gen(PRIVATE, { adapter_source: 'hub' }))).json.code, 'HUB_ACCESS_DENIED');
    // best_of: every sequence on the Hub adapter, each checked for the token.
    const bestOf = { adapter_source: 'hub', best_of: 2, do_sample: true };
    const best = await post(server, '/generate', gen(PRIVATE, { ...bestOf, api_token: TOKEN }));
    assert.equal(best.status, 200, JSON.stringify(best.json));
    assert.equal(best.json.details.best_of_sequences.length, 1);
    assert.equal((await post(server, '/generate', gen(PRIVATE, bestOf))).json.code, 'HUB_ACCESS_DENIED');

    const missing = await post(server, '/generate', gen('test-org/no-such-adapter', { adapter_source: 'hub', api_token: TOKEN }));
    assert.equal(missing.status, 404);
    assert.equal(missing.json.code, 'HUB_NOT_FOUND');
    assert.match(missing.json.error, /test-org\/no-such-adapter/);
    const pickle = await post(server, '/generate', gen('test-org/pickle-only', { adapter_source: 'hub' }));
    assert.equal(pickle.status, 422);
    assert.equal(pickle.json.code, 'ADAPTER_PICKLE');
    // Without adapter_source (default --adapter-source local), a Hub id is not fetched.
    assert.equal((await post(server, '/generate', gen(STYLE))).json.code, 'ADAPTER_NOT_FOUND');
    // Still serving.
    assert.equal((await post(server, '/generate', gen(STYLE, { adapter_source: 'hub' }))).status, 200);
  } finally {
    await server.close();
  }
});

test('--adapter-source hub: ids the adapter folder lacks come from the Hub; a new commit is a new adapter', async () => {
  const server = await startServer({ adapterSource: 'hub', adapterRevalidateAfter: 0.05 });
  try {
    const first = await post(server, '/v1/completions', { model: STYLE, prompt: 'Hello', max_tokens: 4 });
    assert.equal(first.status, 200, JSON.stringify(first.json));
    const local = await hubRequests(() => post(server, '/v1/completions', { model: 'local/style', prompt: 'Hello', max_tokens: 4 }));
    assert.deepEqual(local, [], 'an id of the adapter folder stays local');
    const loaded = await server.app.inject({ method: 'POST', url: `/adapters/${STYLE}/load?pin=true` });
    assert.equal(loaded.statusCode, 200, loaded.body);
    assert.deepEqual([loaded.json().id, loaded.json().source, loaded.json().pinned], [`hub:${STYLE}@${styleCommit}`, 'hub', true]);

    // vLLM's load_lora_adapter with a Hub repo as lora_path: stored under lora_name, then served by that name.
    const vllm = await server.app.inject({ method: 'POST', url: '/v1/load_lora_adapter', payload: { lora_name: 'renamed', lora_path: 'test-org/concurrent' } });
    assert.equal(vllm.statusCode, 200, vllm.body);
    assert.deepEqual(readFileSync(join(tmp.dir, 'adapters', 'renamed', 'adapter_model.safetensors')), Buffer.from(styleFiles['adapter_model.safetensors']!));
    assert.equal((await post(server, '/v1/completions', { model: 'renamed', prompt: 'Hello', max_tokens: 4 })).status, 200);
    const missing = await server.app.inject({ method: 'POST', url: '/v1/load_lora_adapter', payload: { lora_name: 'x', lora_path: 'test-org/no-such-adapter' } });
    assert.deepEqual([missing.statusCode, missing.json().error.code], [403, 'HUB_ACCESS_DENIED']);

    const next = hub.commit(STYLE, folderFiles(join(tmp.dir, 'style-2')));
    await new Promise((r) => setTimeout(r, 80));
    assert.equal((await post(server, '/v1/completions', { model: STYLE, prompt: 'Hello', max_tokens: 4 })).status, 200);
    const ids = (await server.app.inject({ method: 'GET', url: '/adapters' })).json().adapters.map((a: any) => a.id);
    assert.ok(ids.includes(`hub:${STYLE}@${styleCommit}`) && ids.includes(`hub:${STYLE}@${next}`), JSON.stringify(ids));
    assert.equal(readFileSync(join(repoDir(STYLE), 'refs', 'main'), 'utf8'), next);
  } finally {
    await server.close();
  }
});

const merged = (ids: string[], params: Record<string, unknown> = {}) =>
  ({ inputs: 'Hello', parameters: { merged_adapters: { ids, weights: [1, 0.5] }, max_new_tokens: 6, details: true, ...params } });
const tokenIds = (r: { json: any }) => r.json.details.tokens.map((t: any) => t.id) as number[];

test('merged_adapters with adapter_source "hub": Hub adapters merged as their local copies are, cached by commit, a private source only with its token', async () => {
  const server = await startServer({});
  try {
    const merges = () => server.runtime.adapters.mergesComputed;
    const local = await post(server, '/generate', merged(['local/style', 'local/style-2']));
    assert.equal(local.status, 200, JSON.stringify(local.json));
    const fromHub = await post(server, '/generate', merged([MERGE_A, MERGE_B], { adapter_source: 'hub' }));
    assert.equal(fromHub.status, 200, JSON.stringify(fromHub.json));
    assert.deepEqual(tokenIds(fromHub), tokenIds(local), 'the merge of the Hub copies is the merge of the local ones');
    assert.equal(merges(), 2);
    // Resident and resolved: neither the Hub asked nor a merge computed again.
    const again = await hubRequests(async () => assert.deepEqual(tokenIds(await post(server, '/generate', merged([MERGE_A, MERGE_B], { adapter_source: 'hub' }))), tokenIds(local)));
    assert.deepEqual(again, []);
    assert.equal(merges(), 2);

    // A private source: refused without its token, merged with it.
    const refused = await post(server, '/generate', merged([MERGE_A, PRIVATE], { adapter_source: 'hub' }));
    assert.deepEqual([refused.status, refused.json.code], [403, 'HUB_ACCESS_DENIED']);
    const withToken = await post(server, '/generate', merged([MERGE_A, PRIVATE], { adapter_source: 'hub', api_token: TOKEN }));
    assert.equal(withToken.status, 200, JSON.stringify(withToken.json));
    // The merge is cached now, and still refused without the token.
    assert.equal((await post(server, '/generate', merged([MERGE_A, PRIVATE], { adapter_source: 'hub' }))).json.code, 'HUB_ACCESS_DENIED');
    // Without adapter_source (default --adapter-source local), Hub ids are not fetched.
    assert.equal((await post(server, '/generate', merged([MERGE_A, MERGE_B]))).json.code, 'ADAPTER_NOT_FOUND');
  } finally {
    await server.close();
  }
});

test('merged_adapters with --adapter-source hub: local and Hub sources in one merge; a new commit of a Hub source is a new merge', async () => {
  const server = await startServer({ adapterSource: 'hub', adapterRevalidateAfter: 0.05 });
  try {
    const merges = () => server.runtime.adapters.mergesComputed;
    const reference = tokenIds(await post(server, '/generate', merged(['local/style', 'local/style-2'])));
    const mixed = await post(server, '/generate', merged(['local/style', MERGE_B]));
    assert.equal(mixed.status, 200, JSON.stringify(mixed.json));
    assert.deepEqual(tokenIds(mixed), reference);
    const before = merges();

    // merge-b's main now holds the first adapter: merging it again gives local/style merged with itself.
    hub.commit(MERGE_B, styleFiles);
    await new Promise((r) => setTimeout(r, 80));
    const renewed = await post(server, '/generate', merged(['local/style', MERGE_B]));
    assert.equal(renewed.status, 200, JSON.stringify(renewed.json));
    assert.equal(merges(), before + 1, 'the new commit is merged anew');
    assert.deepEqual(tokenIds(renewed), tokenIds(await post(server, '/generate', merged(['local/style', 'local/style']))));
  } finally {
    await server.close();
  }
});

test('HF_HUB_OFFLINE: the model and adapters come from the cache the runs above filled, without a request; the rest is HUB_NOT_CACHED', async () => {
  const offline = settings({ offline: true }); // the fake Hub is up: any request would be seen
  const seen = await hubRequests(async () => {
    const server = await startServer({ model: MODEL, hub: offline });
    try {
      const info = (await server.app.inject({ method: 'GET', url: '/info' })).json();
      assert.deepEqual([info.model_id, info.model_sha], [MODEL, commitMain]);
      const res = await post(server, '/generate', gen(STYLE, { adapter_source: 'hub' }));
      assert.equal(res.status, 200, JSON.stringify(res.json));
      const never = await post(server, '/generate', gen('test-org/never-fetched', { adapter_source: 'hub' }));
      assert.equal(never.status, 404);
      assert.equal(never.json.code, 'HUB_NOT_CACHED');
      assert.match(never.json.error, /"test-org\/never-fetched".*HF_HUB_OFFLINE/);
    } finally {
      await server.close();
    }
    const client = new HubClient(offline);
    assert.equal((await downloadModel(client, spec(`${MODEL}@v1`))).commit, commitV1);
    await assert.rejects(downloadModel(client, spec(`${MODEL}@v2`)), { code: 'HUB_NOT_CACHED', message: /revision "v2" is not in the cache/ });
    await assert.rejects(startRuntime({ ...TEST_RUNTIME, model: 'test-org/never-fetched', adapterDir: join(tmp.dir, 'adapters'), hub: offline }), { code: 'HUB_NOT_CACHED' });
  });
  assert.deepEqual(seen, []);
});
