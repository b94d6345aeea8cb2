import { execFileSync } from 'node:child_process';
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { mkdir, mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { freePort } from '../bench/server.ts';
import { listLinearModules, writePeftAdapter } from '../src/demo/adapter.ts';
import { writeSafetensors } from '../src/formats/safetensors.ts';
import { adapterDirFor, validateAdapterId } from '../src/lora/ids.ts';
import { AdapterStore, adapterVersion, validateAdapterFiles, type AdapterStoreOptions } from '../src/lora/store.ts';

const tmp = () => mkdtemp(path.join(tmpdir(), 'lora-store-'));
const LIMIT = 1 << 20;

/** A small distinct adapter per `n`. */
const files = (n: number) => ({
  config: { peft_type: 'LORA', r: 1, lora_alpha: n, target_modules: ['c_attn'] },
  weights: writeSafetensors({ 'base_model.model.transformer.h.0.attn.c_attn.lora_A.weight': { shape: [1, 2], data: new Float32Array([n, n]) } }),
});

async function rejectsWith(p: Promise<unknown>, code: string, message?: RegExp) {
  await assert.rejects(p, (err: { code?: string; message?: string }) => {
    assert.equal(err.code, code, err.message);
    if (message) assert.match(err.message!, message);
    return true;
  });
}

// --- ids -------------------------------------------------------------------------------------

const validIds = ['a', 'my-adapter_v1.2', 'org/name', 'Org-1/name.v2', 'x'.repeat(128), 'a..b', 'name.'];
const invalidIds: unknown[] = [
  '', '.', '..', '../x', 'org/..', 'org/.', '/abs', '/', 'a/', 'a//b', 'a/b/c', '.hidden', 'org/.hidden',
  'x'.repeat(129), 'ünïcode', 'adapter✓', 'a b', 'a\\b', 'a\0b', 'C:\\x', 42, null, undefined, ['a'],
];

for (const id of validIds) {
  test(`validateAdapterId accepts ${JSON.stringify(id.length > 20 ? `${id.slice(0, 8)}…(${id.length})` : id)}`, () => {
    assert.equal(validateAdapterId(id), id);
  });
}
for (const id of invalidIds) {
  const label = typeof id === 'string' && id.length > 20 ? `${id.slice(0, 8)}…(${id.length})` : String(JSON.stringify(id));
  test(`validateAdapterId rejects ${label}`, () => {
    assert.throws(() => validateAdapterId(id), { code: 'ADAPTER_INVALID_ID' });
  });
}

test('adapterDirFor stays inside the root', () => {
  const root = path.resolve('/srv/adapters');
  assert.equal(adapterDirFor(root, 'org/name'), path.join(root, 'org', 'name'));
  assert.equal(adapterDirFor('/srv/adapters/', 'a'), path.join(root, 'a'));
  assert.throws(() => adapterDirFor(root, '../etc'), { code: 'ADAPTER_INVALID_ID' });
  assert.throws(() => adapterDirFor(root, '/etc/passwd'), { code: 'ADAPTER_INVALID_ID' });
});

// --- disk ------------------------------------------------------------------------------------

test('readWith: borrowed read buffers give each read its own bytes (concurrent, different sizes, after errors)', async () => {
  const dir = await tmp();
  try {
    const store = new AdapterStore({ dir, maxAdapterBytes: LIMIT });
    /** Adapter n with 2·n values, so sizes differ. */
    const sized = (n: number) => ({
      config: { peft_type: 'LORA', r: 1, lora_alpha: n, target_modules: ['c_attn'] },
      weights: writeSafetensors({ 'base_model.model.transformer.h.0.attn.c_attn.lora_A.weight': { shape: [1, 2 * n], data: new Float32Array(2 * n).fill(n) } }),
    });
    for (const n of [1, 50, 3]) await store.write(`a${n}`, sized(n));
    const copy = (id: string) => store.readWith(id, (f) => ({ weights: f.weights.slice(), version: f.version, source: f.source }));
    const together = await Promise.all([copy('a1'), copy('a50'), copy('a3'), copy('a50')]);
    assert.deepEqual(together.map((r) => r.weights), [sized(1).weights, sized(50).weights, sized(3).weights, sized(50).weights]);
    assert.deepEqual(together.map((r) => r.source), ['disk', 'disk', 'disk', 'disk']);
    // Buffers go back to the pool and are reused for smaller and larger files.
    for (const n of [50, 1, 3, 50, 1]) {
      const r = await copy(`a${n}`);
      assert.deepEqual(r.weights, sized(n).weights);
      assert.equal(r.version, adapterVersion(sized(n).config, sized(n).weights));
    }
    await rejectsWith(copy('missing'), 'ADAPTER_NOT_FOUND');
    await assert.rejects(store.readWith('a3', () => { throw new Error('use failed'); }), /use failed/);
    assert.deepEqual((await copy('a3')).weights, sized(3).weights);
    // release gives the buffer back before use settles, once (the return after use does not add it again).
    const early = await store.readWith('a50', async (f, release) => {
      const mine = f.weights.slice();
      release();
      release();
      return { mine, next: await copy('a50') };
    });
    assert.deepEqual(early.mine, sized(50).weights);
    assert.deepEqual(early.next.weights, sized(50).weights);
    const pool = (store as unknown as { pool: Uint8Array[] }).pool;
    assert.equal(new Set(pool).size, pool.length, 'no buffer is in the pool twice');
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test('readWith: files.version is the hash of the files read, even when read after their buffer went back to the pool', async () => {
  const dir = await tmp();
  try {
    const store = new AdapterStore({ dir, maxAdapterBytes: LIMIT });
    const versionOf = (n: number) => adapterVersion(files(n).config, files(n).weights);
    await store.write('a', files(1));
    await store.write('b', files(2)); // same size: the next read reuses the buffer
    // Returned out of `use`: its buffer is recycled when `use` settles, then holds b's bytes.
    const kept = await store.readWith('a', (f) => f);
    assert.equal(await store.readWith('b', (f) => f.version), versionOf(2));
    assert.equal(kept.version, versionOf(1));
    // Given back early with release(), then overwritten while `use` still runs.
    const early = await store.readWith('a', async (f, release) => {
      release();
      assert.deepEqual(await store.readWith('b', (g) => g.weights.slice()), files(2).weights);
      return f.version;
    });
    assert.equal(early, versionOf(1));
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test('write → read/has/list → replace → delete', async () => {
  const dir = await tmp();
  try {
    const store = new AdapterStore({ dir, maxAdapterBytes: LIMIT });
    assert.deepEqual(await store.list(), []);
    assert.equal(await store.has('a'), false);
    await store.write('a', files(1));
    await store.write('org/b', files(2));
    await mkdir(path.join(dir, 'not-an-adapter'));
    await writeFile(path.join(dir, 'stray-file'), 'x');
    assert.deepEqual(await store.list(), ['a', 'org/b']);
    assert.equal(await store.has('org/b'), true);

    const a = await store.read('a');
    assert.equal(a.source, 'disk');
    assert.deepEqual(a.config, files(1).config);
    assert.deepEqual(new Uint8Array(a.weights), files(1).weights);
    assert.equal(a.version, adapterVersion(files(1).config, files(1).weights));
    assert.match(a.version, /^[0-9a-f]{16}$/);

    await store.write('a', files(3));
    const a2 = await store.read('a');
    assert.deepEqual(a2.config, files(3).config);
    assert.notEqual(a2.version, a.version);
    assert.deepEqual((await readdir(dir)).sort(), ['a', 'not-an-adapter', 'org', 'stray-file'], 'no work folders left');

    assert.equal(await store.delete('org'), false, 'an org folder is not an adapter');
    assert.equal(await store.delete('org/b'), true);
    assert.equal(await store.delete('org/b'), false);
    assert.deepEqual(await store.list(), ['a']);
    assert.deepEqual((await readdir(dir)).sort(), ['a', 'not-an-adapter', 'stray-file'], 'empty org folder removed');
    await rejectsWith(store.read('org/b'), 'ADAPTER_NOT_FOUND');
    await rejectsWith(store.read('../x'), 'ADAPTER_INVALID_ID');
    await rejectsWith(store.write('a/b/c', files(1)), 'ADAPTER_INVALID_ID');
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test('version ignores config formatting; reads wait for an in-flight write', async () => {
  const dir = await tmp();
  try {
    const store = new AdapterStore({ dir, maxAdapterBytes: LIMIT });
    await mkdir(path.join(dir, 'hand'));
    await writeFile(path.join(dir, 'hand', 'adapter_config.json'), JSON.stringify(files(1).config));
    await writeFile(path.join(dir, 'hand', 'adapter_model.safetensors'), files(1).weights);
    await store.write('written', files(1));
    assert.equal((await store.read('hand')).version, (await store.read('written')).version);

    const writing = store.write('hand', files(2));
    const read = await store.read('hand');
    await writing;
    assert.deepEqual(read.config, files(2).config, 'the read was queued behind the write');
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test('upload atomicity: a failure after the temp folder exists leaves the old version intact', async () => {
  const dir = await tmp();
  try {
    let seenTmp = '';
    let failNext = false;
    let expected: unknown = null;
    const store = new AdapterStore({
      dir, maxAdapterBytes: LIMIT,
      beforeCommit: async (tmpDir) => {
        seenTmp = tmpDir;
        if (!failNext) return;
        // The new version is complete in the temp folder, the old one is still what readers see.
        assert.deepEqual(JSON.parse(await readFile(path.join(tmpDir, 'adapter_config.json'), 'utf8')), expected);
        assert.deepEqual(JSON.parse(await readFile(path.join(dir, 'x', 'adapter_config.json'), 'utf8')), files(1).config);
        throw new Error('disk on fire');
      },
    });
    await store.write('x', files(1));
    failNext = true;
    expected = files(2).config;
    await assert.rejects(store.write('x', files(2)), /disk on fire/);
    assert.ok(path.basename(seenTmp).startsWith('.tmp-x-'));
    assert.equal((await store.read('x')).version, adapterVersion(files(1).config, files(1).weights));
    assert.deepEqual(await readdir(dir), ['x']);
    assert.deepEqual(await store.list(), ['x']);

    // A first upload that fails leaves nothing visible.
    expected = files(3).config;
    await assert.rejects(store.write('org/new', files(3)), /disk on fire/);
    assert.equal(await store.has('org/new'), false);
    assert.deepEqual(await store.list(), ['x']);
    assert.ok(!(await readdir(dir)).some((n) => n.startsWith('.')));

    failNext = false;
    await store.write('x', files(4));
    assert.deepEqual((await store.read('x')).config, files(4).config);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test('crash leftovers: .tmp-* and .del-* are removed, an orphaned .old-* is put back', async () => {
  const dir = await tmp();
  try {
    await mkdir(path.join(dir, '.tmp-a-0123456789ab'));
    await writeFile(path.join(dir, '.tmp-a-0123456789ab', 'adapter_config.json'), '{}');
    await mkdir(path.join(dir, '.old-org~b-0123456789ab'));
    await writeFile(path.join(dir, '.old-org~b-0123456789ab', 'adapter_config.json'), JSON.stringify(files(5).config));
    await writeFile(path.join(dir, '.old-org~b-0123456789ab', 'adapter_model.safetensors'), files(5).weights);
    await mkdir(path.join(dir, '.del-c-0123456789ab'));
    await writeFile(path.join(dir, '.del-c-0123456789ab', 'adapter_config.json'), '{}');
    const store = new AdapterStore({ dir, maxAdapterBytes: LIMIT });
    assert.deepEqual(await store.list(), ['org/b']);
    assert.deepEqual((await store.read('org/b')).config, files(5).config);
    assert.deepEqual(await readdir(dir), ['org']);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test('disk rejects: pickle only, missing weights, bad JSON, too large, not a regular file', async () => {
  const dir = await tmp();
  try {
    const store = new AdapterStore({ dir, maxAdapterBytes: 64 });
    await mkdir(path.join(dir, 'pickled'));
    await writeFile(path.join(dir, 'pickled', 'adapter_model.bin'), new Uint8Array([0x80, 2]));
    await rejectsWith(store.read('pickled'), 'ADAPTER_PICKLE', /convert it to adapter_model\.safetensors/);
    await writeFile(path.join(dir, 'pickled', 'adapter_config.json'), '{}');
    await rejectsWith(store.read('pickled'), 'ADAPTER_PICKLE');

    await mkdir(path.join(dir, 'noweights'));
    await writeFile(path.join(dir, 'noweights', 'adapter_config.json'), '{}');
    await rejectsWith(store.read('noweights'), 'ADAPTER_NOT_FOUND', /no adapter_model\.safetensors/);

    await mkdir(path.join(dir, 'badjson'));
    await writeFile(path.join(dir, 'badjson', 'adapter_config.json'), '{nope');
    await writeFile(path.join(dir, 'badjson', 'adapter_model.safetensors'), new Uint8Array(8));
    await rejectsWith(store.read('badjson'), 'ADAPTER_INVALID_CONFIG', /not valid JSON/);

    await mkdir(path.join(dir, 'big'));
    await writeFile(path.join(dir, 'big', 'adapter_config.json'), '{}');
    await writeFile(path.join(dir, 'big', 'adapter_model.safetensors'), new Uint8Array(65));
    await rejectsWith(store.read('big'), 'ADAPTER_TOO_LARGE');
    await rejectsWith(store.write('big2', { config: {}, weights: new Uint8Array(65) }), 'ADAPTER_TOO_LARGE');
    // A config the store could not read back is not written (the limit is 1 MiB both ways).
    await rejectsWith(store.write('bigconfig', { config: { note: 'x'.repeat(1 << 20) }, weights: new Uint8Array(8) }), 'ADAPTER_TOO_LARGE', /adapter_config\.json/);
    assert.equal(await store.has('bigconfig'), false);
    await rejectsWith(store.read('missing'), 'ADAPTER_NOT_FOUND');

    // A FIFO or a folder where a file should be is refused at once (a FIFO must not block the synchronous open).
    await mkdir(path.join(dir, 'fifo'));
    execFileSync('mkfifo', [path.join(dir, 'fifo', 'adapter_config.json')]);
    await rejectsWith(store.read('fifo'), 'ADAPTER_INVALID_CONFIG', /adapter_config\.json is not a regular file/);
    await mkdir(path.join(dir, 'folder'));
    await writeFile(path.join(dir, 'folder', 'adapter_config.json'), '{}');
    await mkdir(path.join(dir, 'folder', 'adapter_model.safetensors'));
    await rejectsWith(store.read('folder'), 'ADAPTER_INVALID_CONFIG', /adapter_model\.safetensors is not a regular file/);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test('validateAdapterFiles: the loader over store files', async () => {
  const dir = await tmp();
  try {
    const baseConfig = { model_type: 'gpt2', n_embd: 8, n_layer: 1, n_head: 2 };
    await writePeftAdapter(path.join(dir, 'good'), { baseConfig, targetModules: ['c_attn'] });
    const store = new AdapterStore({ dir, maxAdapterBytes: LIMIT });
    const base = { modules: listLinearModules('gpt2', baseConfig).map((m) => ({ ...m, key: m.path })) };
    const w = validateAdapterFiles(await store.read('good'), base, { maxRank: 8 });
    assert.equal(w.modules.length, 1);
    assert.throws(() => validateAdapterFiles({ id: 'half', ...files(1) }, base, { maxRank: 8 }),
      { code: 'ADAPTER_INVALID_CONFIG', message: /^adapter "half": .*has lora_A but no lora_B/ });
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

// --- remote ----------------------------------------------------------------------------------

type Handler = (req: IncomingMessage, res: ServerResponse) => void;
let server: Server;
let origin = '';
let handler: Handler = (_req, res) => { res.statusCode = 404; res.end(); };
const hits: string[] = [];

before(async () => {
  server = createServer((req, res) => {
    hits.push(`${req.method} ${req.url}`);
    handler(req, res);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  origin = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
});
after(async () => {
  server.closeAllConnections();
  await new Promise((resolve) => server.close(resolve));
});

/** Serves `files(n)` for every adapter; `override` may answer first (return true when it did). */
function serve(n: number, override?: (req: IncomingMessage, res: ServerResponse) => boolean) {
  hits.length = 0;
  const f = files(n);
  handler = (req, res) => {
    if (override?.(req, res)) return;
    if (req.url!.endsWith('/adapter_config.json')) res.end(JSON.stringify(f.config));
    else if (req.url!.endsWith('/adapter_model.safetensors')) res.end(f.weights);
    else { res.statusCode = 404; res.end(); }
  };
}

async function withRemoteStore(opts: Partial<AdapterStoreOptions>, fn: (store: AdapterStore, dir: string) => Promise<void>) {
  const dir = await tmp();
  const store = new AdapterStore({ dir, remoteUrl: `${origin}/adapters/{id}/`, maxAdapterBytes: LIMIT, retryDelayMs: 10, ...opts });
  try {
    await fn(store, dir);
  } finally {
    await store.close();
    await rm(dir, { recursive: true, force: true });
  }
}

test('remote: fetched, then cached on disk with the same version', async () => {
  serve(7);
  await withRemoteStore({}, async (store) => {
    const remote = await store.read('org/remote-a');
    assert.equal(remote.source, 'remote');
    assert.deepEqual(remote.config, files(7).config);
    assert.deepEqual(new Uint8Array(remote.weights), files(7).weights);
    assert.deepEqual(hits, ['GET /adapters/org/remote-a/adapter_config.json', 'GET /adapters/org/remote-a/adapter_model.safetensors']);
    assert.deepEqual(await store.list(), ['org/remote-a']);
    const cached = await store.read('org/remote-a');
    assert.equal(cached.source, 'disk');
    assert.equal(cached.version, remote.version);
    assert.equal(hits.length, 2, 'no second download');
  });
});

test('remote: 404 → ADAPTER_NOT_FOUND; only adapter_model.bin → ADAPTER_PICKLE; 403 → ADAPTER_FETCH_FAILED without retry', async () => {
  await withRemoteStore({ retries: 2 }, async (store) => {
    serve(1, (req, res) => { res.statusCode = 404; res.end(); return true; });
    await rejectsWith(store.read('nope'), 'ADAPTER_NOT_FOUND');
    assert.equal(hits.length, 1, '404 is not retried');

    serve(1, (req, res) => {
      if (req.url!.endsWith('.safetensors')) { res.statusCode = 404; res.end(); return true; }
      return false; // config and adapter_model.bin exist (the fallback serves 404 for .bin: override it)
    });
    const prev = handler;
    handler = (req, res) => { if (req.url!.endsWith('/adapter_model.bin')) { res.end(); return; } prev(req, res); };
    await rejectsWith(store.read('pickled'), 'ADAPTER_PICKLE', /convert/);
    assert.ok(hits.includes('HEAD /adapters/pickled/adapter_model.bin'));
    assert.equal(await store.has('pickled'), false);

    serve(1, (req, res) => { res.statusCode = 403; res.end('no'); return true; });
    await rejectsWith(store.read('forbidden'), 'ADAPTER_FETCH_FAILED', /HTTP 403/);
    assert.equal(hits.length, 1);
  });
});

test('remote: 500 then success is retried; persistent 500 fails after all attempts', async () => {
  await withRemoteStore({ retries: 2 }, async (store) => {
    let failures = 1;
    serve(3, (req, res) => {
      if (req.url!.endsWith('.safetensors') && failures-- > 0) { res.statusCode = 500; res.end('oops'); return true; }
      return false;
    });
    const got = await store.read('flaky');
    assert.deepEqual(got.config, files(3).config);
    assert.equal(hits.filter((h) => h.endsWith('.safetensors')).length, 2);

    serve(3, (req, res) => { res.statusCode = 503; res.end(); return true; });
    await rejectsWith(store.read('down'), 'ADAPTER_FETCH_FAILED', /HTTP 503/);
    assert.equal(hits.length, 3, 'one try + two retries');
  });
});

test('remote: oversize body → ADAPTER_TOO_LARGE (declared and streamed)', async () => {
  await withRemoteStore({ maxAdapterBytes: 1000, retries: 0 }, async (store) => {
    serve(1, (req, res) => {
      if (!req.url!.endsWith('.safetensors')) return false;
      res.setHeader('content-length', 5000);
      res.end(new Uint8Array(5000));
      return true;
    });
    await rejectsWith(store.read('big'), 'ADAPTER_TOO_LARGE', /5000 bytes/);

    serve(1, (req, res) => {
      if (!req.url!.endsWith('.safetensors')) return false;
      // Chunked, no content-length: the limit is enforced while streaming.
      res.write(new Uint8Array(600));
      res.write(new Uint8Array(600));
      res.end(new Uint8Array(600));
      return true;
    });
    await rejectsWith(store.read('big-chunked'), 'ADAPTER_TOO_LARGE', /more than 1000/);
    assert.equal(await store.has('big-chunked'), false);
  });
});

test('remote: a stalled body times out; a closed port fails', async () => {
  await withRemoteStore({ fetchTimeoutMs: 150, retries: 0 }, async (store) => {
    serve(1, (req, res) => {
      if (!req.url!.endsWith('.safetensors')) return false;
      res.setHeader('content-length', 100);
      res.write(new Uint8Array(10)); // ...and never the rest
      return true;
    });
    const t0 = Date.now();
    await rejectsWith(store.read('slow'), 'ADAPTER_FETCH_TIMEOUT', /timed out/);
    assert.ok(Date.now() - t0 < 1500);
  });
  const port = await freePort(); // nothing listens on it
  const dir = await tmp();
  const store = new AdapterStore({ dir, remoteUrl: `http://127.0.0.1:${port}/{id}`, maxAdapterBytes: LIMIT, retries: 1, retryDelayMs: 10 });
  try {
    await rejectsWith(store.read('x'), 'ADAPTER_FETCH_FAILED', /ECONNREFUSED/);
  } finally {
    await store.close();
    await rm(dir, { recursive: true, force: true });
  }
});

test('remote revalidation: ETag conditional GETs after revalidateAfterMs; 304 keeps the copy, 200 replaces it, a failing source leaves it in use', async () => {
  let n = 7;
  const etag = (file: string) => `"${file}-v${n}"`;
  const conditional: (string | undefined)[] = [];
  hits.length = 0;
  handler = (req, res) => {
    const file = req.url!.endsWith('/adapter_config.json') ? 'config' : req.url!.endsWith('/adapter_model.safetensors') ? 'weights' : null;
    if (file === null) { res.statusCode = 404; res.end(); return; }
    if (n < 0) { res.statusCode = 503; res.end(); return; }
    conditional.push(req.headers['if-none-match']);
    res.setHeader('etag', etag(file));
    if (req.headers['if-none-match'] === etag(file)) { res.statusCode = 304; res.end(); return; }
    const f = files(n);
    res.end(file === 'config' ? JSON.stringify(f.config) : f.weights);
  };
  const warnings: string[] = [];
  const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
  await withRemoteStore({ retries: 0, revalidateAfterMs: 200, onWarning: (m) => warnings.push(m) }, async (store, dir) => {
    const first = await store.read('org/r');
    assert.equal(first.source, 'remote');
    assert.deepEqual(conditional, [undefined, undefined], 'the first download is unconditional');
    const meta = JSON.parse(await readFile(path.join(dir, 'org', 'r', '.source.json'), 'utf8'));
    assert.deepEqual([meta.config.etag, meta.weights.etag], ['"config-v7"', '"weights-v7"']);

    assert.equal((await store.read('org/r')).version, first.version);
    assert.equal(conditional.length, 2, 'within revalidateAfterMs the disk copy is used without asking');

    await sleep(250);
    assert.equal(await store.revalidate('org/r'), false);
    assert.deepEqual(conditional.slice(2), ['"config-v7"', '"weights-v7"'], 'both files asked with If-None-Match');
    assert.equal((await store.read('org/r')).version, first.version, '304: the copy stays');
    assert.equal(conditional.length, 4, 'a 304 restarts the period');

    n = 8; // the adapter changed at the source
    await sleep(250);
    const updated = await store.read('org/r');
    assert.deepEqual(conditional.slice(4), ['"config-v7"', '"weights-v7"']);
    assert.equal(updated.source, 'disk');
    assert.deepEqual(updated.config, files(8).config);
    assert.deepEqual(new Uint8Array(updated.weights), files(8).weights);
    assert.notEqual(updated.version, first.version);
    assert.deepEqual(JSON.parse(await readFile(path.join(dir, 'org', 'r', '.source.json'), 'utf8')).weights.etag, '"weights-v8"');

    n = -1; // the source fails
    await sleep(250);
    assert.equal((await store.read('org/r')).version, updated.version, 'the cached copy stays in use');
    assert.equal(warnings.length, 1);
    assert.match(warnings[0]!, /revalidating against the remote source failed; the cached copy stays in use/);
    assert.deepEqual(await store.list(), ['org/r'], 'no work files are listed');
  });
});

test('remote revalidation is off by default, and an uploaded adapter (no .source.json) is never revalidated', async () => {
  serve(7);
  await withRemoteStore({}, async (store) => {
    await store.read('org/x');
    assert.equal(await store.revalidate('org/x'), false);
    assert.equal(hits.length, 2);
  });
  await withRemoteStore({ revalidateAfterMs: 1 }, async (store) => {
    await store.write('up', files(3));
    hits.length = 0;
    await new Promise((r) => setTimeout(r, 5));
    assert.equal(await store.revalidate('up'), false);
    assert.deepEqual(hits, []);
  });
});

test('remote revalidation against a source without ETag or Last-Modified: the same bytes keep the copy, new bytes replace it', async () => {
  serve(5);
  const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
  await withRemoteStore({ retries: 0, revalidateAfterMs: 50 }, async (store) => {
    const first = await store.read('plain');
    await sleep(70);
    assert.equal(await store.revalidate('plain'), false, 'unchanged bytes');
    assert.equal(hits.length, 4, 'both files were downloaded again (nothing to make them conditional)');
    serve(6);
    await sleep(70);
    assert.equal(await store.revalidate('plain'), true);
    const now = await store.read('plain');
    assert.notEqual(now.version, first.version);
    assert.deepEqual(now.config, files(6).config);
  });
});
