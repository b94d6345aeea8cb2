/**
 * Security (README "Security"): which key opens which route (--api-key, --admin-api-key, --metrics-public), uploads
 * that cannot write outside the adapter folder (ids, part file names, symlinks planted in the folder), body limits
 * checked before the body is read, and error bodies that never carry a file path or a stack.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdir, readdir, readFile, stat, symlink, writeFile } from 'node:fs/promises';
import { connect } from 'node:net';
import { execFileSync } from 'node:child_process';
import { tmpdir } from 'node:os';
import path from 'node:path';
import type { InjectOptions } from 'fastify';
import { registeredRoutes } from '../src/server/app.ts';
import { fail } from '../src/errors.ts';
import { build } from './helpers/app.ts';
import { adapterFor, buildWithStore, multipart, uploadParts } from './helpers/store-app.ts';

const json = (body: unknown) => ({ payload: JSON.stringify(body), headers: { 'content-type': 'application/json' } });

// ------------------------------------------------------------------------------------------------
// Keys

/** The routes that change what is stored or loaded: the only ones --admin-api-key guards. */
const ADMIN_ROUTES = ['DELETE /adapters/*', 'POST /adapters/*', 'POST /v1/load_lora_adapter', 'POST /v1/unload_lora_adapter', 'PUT /adapters/*'];

/** A concrete request for each registered route (wildcards filled in). */
function requestFor(method: string, url: string): { method: string; url: string } {
  if (url === '/adapters/*') return { method, url: method === 'POST' ? '/adapters/demo/load' : '/adapters/demo' };
  return { method, url };
}

test('keys: --api-key opens every route but /health; --admin-api-key alone opens the admin routes; either key opens the others', async () => {
  const s = await build({ options: { apiKey: 'plain-key', adminApiKey: 'admin-key' } });
  await s.app.ready();
  const routes = registeredRoutes(s.app);
  assert.deepEqual(routes.filter((r) => r.admin).map((r) => `${r.method} ${r.url}`).sort(), ADMIN_ROUTES);
  const auth = (key?: string) => (key ? { authorization: `Bearer ${key}` } : {});
  for (const r of routes) {
    const req = requestFor(r.method, r.url);
    const status = async (key?: string) => (await s.inject({ ...req, headers: auth(key) })).statusCode;
    const what = `${r.method} ${r.url}`;
    if (r.url === '/health') {
      assert.equal(await status(), 200, what);
      continue;
    }
    assert.equal(await status(), 401, what);
    assert.equal(await status('wrong'), 401, what);
    if (r.admin) {
      const plain = await s.inject({ ...req, headers: auth('plain-key') });
      assert.equal(plain.statusCode, 403, what);
      assert.equal(r.url.startsWith('/v1/') ? plain.json().error.code : plain.json().code, 'ADMIN_KEY_REQUIRED', what);
    } else {
      assert.ok(![401, 403].includes(await status('plain-key')), `${what}: the API key opens it`);
    }
    assert.ok(![401, 403].includes(await status('admin-key')), `${what}: the admin key opens it`);
  }

  // Only the admin key: the other routes are open, the admin routes need it.
  const adminOnly = await build({ options: { adminApiKey: 'admin-key' } });
  assert.equal((await adminOnly.inject({ method: 'GET', url: '/adapters' })).statusCode, 200);
  assert.equal((await adminOnly.inject({ method: 'POST', url: '/adapters/demo/load' })).statusCode, 401);
  assert.equal((await adminOnly.inject({ method: 'POST', url: '/adapters/demo/load', headers: auth('admin-key') })).statusCode, 200);
  assert.equal((await adminOnly.inject({ method: 'DELETE', url: '/adapters/demo', headers: auth('plain-key') })).statusCode, 401);
  // Only the API key: it opens the admin routes too.
  const plainOnly = await build({ options: { apiKey: 'plain-key' } });
  assert.equal((await plainOnly.inject({ method: 'POST', url: '/adapters/demo/load', headers: auth('plain-key') })).statusCode, 200);
  assert.equal((await plainOnly.inject({ method: 'POST', url: '/adapters/demo/load' })).statusCode, 401);
  // --metrics-public: /metrics without a key, nothing else.
  const scrape = await build({ options: { apiKey: 'plain-key', adminApiKey: 'admin-key', metricsPublic: true } });
  assert.equal((await scrape.inject({ method: 'GET', url: '/metrics' })).statusCode, 200);
  assert.equal((await scrape.inject({ method: 'GET', url: '/info' })).statusCode, 401);
});

// ------------------------------------------------------------------------------------------------
// Uploads stay inside the adapter folder

/** Every path under `root` (links not followed) with its content hash or link target. */
async function snapshot(root: string): Promise<Record<string, string>> {
  const out: Record<string, string> = {};
  const walk = async (dir: string) => {
    for (const entry of await readdir(dir, { withFileTypes: true })) {
      const p = path.join(dir, entry.name);
      const rel = path.relative(root, p);
      if (entry.isSymbolicLink()) out[rel] = `link`;
      else if (entry.isDirectory()) {
        out[rel] = 'dir';
        await walk(p);
      } else out[rel] = (await readFile(p)).toString('base64');
    }
  };
  await walk(root);
  return out;
}

test('ids: `..`, encoded slashes and dots, NUL, backslashes and unicode dots never reach the disk', async () => {
  const s = await buildWithStore();
  const root = path.dirname(s.dir);
  try {
    const upload = uploadParts(await adapterFor());
    await mkdir(s.dir, { recursive: true });
    const before = await snapshot(root);
    const ids = [
      '..', '../escape', '..%2Fescape', '%2e%2e/escape', '%2E%2E%2Fescape', 'org/..', 'org/%2e%2e', 'a%2F..%2F..%2Fescape',
      '%2Fetc%2Fescape', 'a%00b', 'a%5C..%5Cescape', '%E2%80%A4%E2%80%A4', '%EF%BC%8E%EF%BC%8E/escape', '.hidden', 'a/b/c',
      '.tmp-x-000000000000', encodeURIComponent('x'.repeat(129)),
    ];
    for (const id of ids) {
      for (const [method, extra] of [['PUT', upload], ['DELETE', {}], ['POST', {}]] as const) {
        const url = method === 'POST' ? `/adapters/${id}/load` : `/adapters/${id}`;
        const res = await s.app.inject({ method, url, ...extra });
        assert.ok([400, 404].includes(res.statusCode), `${method} ${url}: ${res.statusCode} ${res.body}`);
        assert.ok(['ADAPTER_INVALID_ID', 'NOT_FOUND', 'ADAPTER_NOT_FOUND'].includes(res.json().code), `${method} ${url}: ${res.body}`);
      }
    }
    assert.deepEqual(await snapshot(root), before, 'nothing was written, moved or removed');
  } finally {
    await s.close();
  }
});

test('part file names and field names: slashes, NUL and unicode dots are ignored; the files have their fixed names', async () => {
  const s = await buildWithStore();
  const root = path.dirname(s.dir);
  try {
    const a = await adapterFor();
    for (const [i, filename] of ['../../escape.json', '/etc/escape', 'a/b', 'x\0y', '\u2024\u2024/escape', '\uff0e\uff0e/escape', '..\\escape'].entries()) {
      const res = await s.app.inject({ method: 'PUT', url: `/adapters/ok${i}`, ...multipart([{ name: 'config', filename, content: a.config }, { name: 'weights', filename, content: a.weights }]) });
      assert.equal(res.statusCode, 200, `${JSON.stringify(filename)}: ${res.body}`);
      assert.deepEqual((await readdir(path.join(s.dir, `ok${i}`))).sort(), ['adapter_config.json', 'adapter_model.safetensors']);
    }
    const field = await s.app.inject({ method: 'PUT', url: '/adapters/bad-field', ...multipart([{ name: '../config', filename: 'c', content: a.config }, { name: 'weights', filename: 'w', content: a.weights }]) });
    assert.equal(field.statusCode, 422);
    assert.equal(field.json().code, 'VALIDATION');
    assert.deepEqual((await readdir(root)).sort(), ['adapters'], 'nothing beside the adapter folder');
    assert.deepEqual((await readdir(s.dir)).sort(), ['ok0', 'ok1', 'ok2', 'ok3', 'ok4', 'ok5', 'ok6']);
  } finally {
    await s.close();
  }
});

test('symlinks planted in the adapter folder: uploads and deletes through them are refused (403) and nothing outside changes', async () => {
  const s = await buildWithStore();
  const root = path.dirname(s.dir);
  const outside = path.join(root, 'outside');
  try {
    const a = await adapterFor({ seed: 1 });
    await mkdir(path.join(outside, 'victim'), { recursive: true });
    await writeFile(path.join(outside, 'victim', 'adapter_config.json'), a.config);
    await writeFile(path.join(outside, 'victim', 'adapter_model.safetensors'), a.weights);
    await writeFile(path.join(outside, 'secret.txt'), 'secret');
    await mkdir(s.dir, { recursive: true });
    await symlink(path.join(outside, 'victim'), path.join(s.dir, 'linked-adapter')); // a symlinked adapter folder
    await symlink(outside, path.join(s.dir, 'linked-org')); // a symlinked org folder
    await symlink(path.join(outside, 'secret.txt'), path.join(s.dir, 'file-link'));
    await symlink(path.join(outside, 'missing'), path.join(s.dir, 'dangling'));
    const before = await snapshot(root);

    const upload = uploadParts(await adapterFor({ seed: 2 }));
    for (const id of ['linked-adapter', 'linked-org/victim', 'linked-org/new', 'file-link', 'dangling', 'dangling/x']) {
      const put = await s.app.inject({ method: 'PUT', url: `/adapters/${id}`, ...upload });
      assert.equal(put.statusCode, 403, `PUT ${id}: ${put.body}`);
      assert.equal(put.json().code, 'ADAPTER_PATH_NOT_ALLOWED', id);
      assert.ok(!put.json().error.includes(root), `PUT ${id}: no path in ${put.json().error}`);
      const del = await s.app.inject({ method: 'DELETE', url: `/adapters/${id}` });
      assert.ok([403, 404].includes(del.statusCode), `DELETE ${id}: ${del.body}`);
    }
    assert.deepEqual(await snapshot(root), before, 'nothing inside or outside the adapter folder changed');

    // A link inside a real adapter folder: replacing the adapter swaps the folder; the link's target is untouched.
    await mkdir(path.join(s.dir, 'real'));
    await writeFile(path.join(s.dir, 'real', 'adapter_config.json'), a.config);
    await symlink(path.join(outside, 'victim', 'adapter_model.safetensors'), path.join(s.dir, 'real', 'adapter_model.safetensors'));
    const replaced = await s.app.inject({ method: 'PUT', url: '/adapters/real', ...upload });
    assert.equal(replaced.statusCode, 200, replaced.body);
    assert.ok((await stat(path.join(s.dir, 'real', 'adapter_model.safetensors'))).isFile());
    assert.deepEqual(await readFile(path.join(outside, 'victim', 'adapter_model.safetensors')), a.weights);
    assert.equal((await s.app.inject({ method: 'DELETE', url: '/adapters/real' })).statusCode, 200);
    assert.deepEqual(await readFile(path.join(outside, 'victim', 'adapter_model.safetensors')), a.weights);
    assert.equal(await readFile(path.join(outside, 'secret.txt'), 'utf8'), 'secret');
  } finally {
    await s.close();
  }
});

// ------------------------------------------------------------------------------------------------
// Body limits before the body is read

/** Sends `head` and `firstBytes` over a raw socket, never the rest; resolves with the response's status line and body. */
function rawRequest(port: number, head: string, firstBytes: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const socket = connect(port, '127.0.0.1');
    let got = '';
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new Error(`no response within 5 s; got ${JSON.stringify(got)}`));
    }, 5000);
    socket.on('data', (d) => {
      got += d.toString('latin1');
      // One response: headers and a JSON body.
      const end = got.indexOf('\r\n\r\n');
      if (end >= 0 && got.slice(end + 4).trimEnd().endsWith('}')) {
        clearTimeout(timer);
        socket.destroy();
        resolve(got);
      }
    });
    socket.on('error', (err) => {
      clearTimeout(timer);
      reject(err);
    });
    socket.write(head + firstBytes);
  });
}

test('a declared body over the limit is refused before it is read (JSON and uploads); a chunked upload is cut off at the limit', async () => {
  const s = await buildWithStore({ options: { maxAdapterBytes: 64 * 1024, bodyLimitBytes: 16 * 1024 } });
  const port = Number(new URL(await s.app.listen({ port: 0, host: '127.0.0.1' })).port);
  try {
    const gib = 2 ** 30;
    const cases: [string, string, number, string][] = [
      ['POST /generate', 'application/json', 413, 'PAYLOAD_TOO_LARGE'],
      ['POST /v1/completions', 'application/json', 413, 'PAYLOAD_TOO_LARGE'],
      ['POST /v1/load_lora_adapter', 'application/json', 413, 'PAYLOAD_TOO_LARGE'],
      ['PUT /adapters/big', 'multipart/form-data; boundary=b', 413, 'ADAPTER_TOO_LARGE'],
    ];
    for (const [route, type, status, code] of cases) {
      const res = await rawRequest(port, `${route} HTTP/1.1\r\nHost: x\r\nContent-Type: ${type}\r\nContent-Length: ${gib}\r\n\r\n`, '{"a');
      assert.match(res, new RegExp(`^HTTP/1.1 ${status} `), route);
      assert.match(res, new RegExp(`"${code}"`), route);
    }
    // No declared length: the parts are counted as they stream, and the 413 comes before the body ends.
    const head = 'PUT /adapters/big HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\nTransfer-Encoding: chunked\r\n\r\n';
    const part = '--b\r\nContent-Disposition: form-data; name="weights"; filename="w"\r\n\r\n' + 'x'.repeat(100 * 1024);
    const chunked = await rawRequest(port, head, `${part.length.toString(16)}\r\n${part}\r\n`);
    assert.match(chunked, /^HTTP\/1.1 413 /);
    assert.match(chunked, /"ADAPTER_TOO_LARGE"/);
    const jsonHead = 'POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n';
    const text = `{"inputs": "${'x'.repeat(32 * 1024)}`;
    const chunkedJson = await rawRequest(port, jsonHead, `${text.length.toString(16)}\r\n${text}\r\n`);
    assert.match(chunkedJson, /^HTTP\/1.1 413 /);
    assert.match(chunkedJson, /"PAYLOAD_TOO_LARGE"/);
    assert.deepEqual(await readdir(s.dir).catch(() => []), [], 'nothing stored');
  } finally {
    await s.close();
  }
});

// ------------------------------------------------------------------------------------------------
// Error bodies

/** Fails when an error body carries an absolute path of this machine or a stack line. */
function assertNoLeak(body: string, what: string, paths: readonly string[]): void {
  for (const p of paths) assert.ok(!body.includes(p), `${what}: the error body names ${p}: ${body}`);
  assert.doesNotMatch(body, /\bat [^\n]*\(?(?:file:|node:|\/)[^\n]*:\d+:\d+/, `${what}: a stack line in ${body}`);
  assert.doesNotMatch(body, /\\n\s+at /, `${what}: a stack in ${body}`);
  assert.doesNotMatch(body, /(?:^|[\s"'(])\/(?:home|root|tmp|usr|var|etc|proc|work|app)\//, `${what}: an absolute path in ${body}`);
  assert.doesNotMatch(body, /node_modules|file:\/\//, `${what}: a module path in ${body}`);
}

test('error bodies carry no path and no stack: corrupted and unreadable adapter files, internal errors', async () => {
  const s = await buildWithStore({ options: { allowedAdapterPaths: [] } });
  const root = path.dirname(s.dir);
  const paths = [root, s.dir, process.cwd(), tmpdir() + path.sep];
  const a = await adapterFor();
  const folder = async (id: string, files: Record<string, string | Buffer | null>) => {
    await mkdir(path.join(s.dir, id), { recursive: true });
    for (const [name, content] of Object.entries(files)) {
      if (content !== null) await writeFile(path.join(s.dir, id, name), content);
    }
  };
  try {
    await folder('garbage-weights', { 'adapter_config.json': a.config, 'adapter_model.safetensors': Buffer.from('\x10\x00\x00\x00\x00\x00\x00\x00{"a":1}garbage') });
    await folder('truncated', { 'adapter_config.json': a.config, 'adapter_model.safetensors': a.weights.subarray(0, a.weights.length - 7) });
    await folder('bad-json', { 'adapter_config.json': '{"r": 2,', 'adapter_model.safetensors': a.weights });
    await folder('no-weights', { 'adapter_config.json': a.config });
    await folder('pickle', { 'adapter_config.json': a.config, 'adapter_model.bin': Buffer.from([0x80, 0x02, 0x7d]) });
    await folder('dir-weights', { 'adapter_config.json': a.config });
    await mkdir(path.join(s.dir, 'dir-weights', 'adapter_model.safetensors'));
    await folder('fifo-weights', { 'adapter_config.json': a.config });
    execFileSync('mkfifo', [path.join(s.dir, 'fifo-weights', 'adapter_model.safetensors')]);
    await folder('loop', {});
    await symlink('adapter_config.json', path.join(s.dir, 'loop', 'adapter_config.json')); // ELOOP: an internal error
    await folder('wrong-shape', { 'adapter_config.json': a.config, 'adapter_model.safetensors': (await adapterFor({ baseConfig: { model_type: 'llama', hidden_size: 16, num_hidden_layers: 1, num_attention_heads: 2 } })).weights });

    /** `fails`: the request is expected to be answered with an error (a GET of a broken adapter on disk is a 200). */
    const requests: { method: string; url: string; payload?: string | Buffer; headers?: Record<string, string>; fails: boolean }[] = [];
    for (const id of ['garbage-weights', 'truncated', 'bad-json', 'no-weights', 'pickle', 'dir-weights', 'fifo-weights', 'loop', 'wrong-shape', 'missing']) {
      requests.push({ method: 'POST', url: `/adapters/${id}/load`, fails: true }, { method: 'GET', url: `/adapters/${id}`, fails: false });
      requests.push({ method: 'POST', url: '/v1/load_lora_adapter', ...json({ lora_name: id }), fails: true });
      requests.push({ method: 'POST', url: '/v1/load_lora_adapter', ...json({ lora_name: id, lora_path: path.join(root, 'outside') }), fails: true });
    }
    requests.push({ method: 'PUT', url: '/adapters/up', ...uploadParts({ config: a.config, weights: Buffer.from('not safetensors at all') }), fails: true });
    requests.push({ method: 'POST', url: '/generate', payload: '{"inputs": "x",', headers: { 'content-type': 'application/json' }, fails: true });
    requests.push({ method: 'POST', url: '/v1/completions', payload: '\u0000', headers: { 'content-type': 'application/json' }, fails: true });

    const codes = new Set<string>();
    for (const { fails, ...r } of requests) {
      const res = await s.app.inject(r as InjectOptions);
      const what = `${r.method} ${r.url} → ${res.statusCode}`;
      if (fails) assert.ok(res.statusCode >= 400, `${what}: ${res.body}`);
      if (res.statusCode < 400) continue;
      assertNoLeak(res.body, what, paths);
      const body = res.json();
      codes.add(body.code ?? body.error.code);
    }
    // The failures were of every kind provoked: corrupted files, unreadable ones, an internal error.
    for (const code of ['SAFETENSORS_INVALID', 'ADAPTER_INVALID_CONFIG', 'ADAPTER_NOT_FOUND', 'ADAPTER_PICKLE', 'ADAPTER_SHAPE_MISMATCH', 'INTERNAL', 'ADAPTER_PATH_NOT_ALLOWED', 'BAD_REQUEST']) {
      assert.ok(codes.has(code), `${code} among ${[...codes].join(', ')}`);
    }
  } finally {
    await s.close();
  }
});

test('an internal error thrown anywhere answers a generic 500 with no message, path or stack', async () => {
  const s = await build({ validate: false });
  const inner = Object.assign(new Error(`EACCES: permission denied, open '${path.join(process.cwd(), 'secret')}'`), { code: 'EACCES' });
  for (const reject of [inner, fail('CHECKPOINT_INVALID', `bad checkpoint ${path.join(process.cwd(), 'model.safetensors')}`)]) {
    s.engine.script = { tokens: [], finishReason: 'length', reject: reject as never };
    for (const url of ['/generate', '/generate_stream', '/v1/completions']) {
      const res = await s.inject({ method: 'POST', url, ...json(url === '/v1/completions' ? { prompt: 'x' } : { inputs: 'x' }) });
      assert.equal(res.statusCode, 500, `${url}: ${res.body}`);
      assert.match(res.body, /internal server error/);
      assertNoLeak(res.body, url, [process.cwd()]);
    }
  }
});
