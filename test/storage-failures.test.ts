/**
 * A full or read-only adapter folder during an upload or delete: a coded error that is not a 500 (507
 * INSUFFICIENT_STORAGE for ENOSPC/EDQUOT, 503 STORAGE_UNAVAILABLE for EROFS/EACCES/EPERM), no path in the body,
 * the stored version still served, no work folder left, and the next upload after the disk recovers succeeds.
 *
 * The tests run as root, where chmod does not stop a write, so the failures are injected through the store's
 * write seam (`AdapterStoreOptions.writeFs`), at each step of a write: creating the temp folder, writing a file
 * (half of it written first, as a disk that fills up mid-file), and the renames that swap the new version in.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { access, mkdir, readdir, readFile, rename, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { adapterFor, buildWithStore, uploadParts, type StoreServer } from './helpers/store-app.ts';

/** mkdir: the temp folder; writeFile: the weights, half written; rename: the first rename; swap: the rename of the new version into place once the old one was moved aside (or, for a new id, the first). */
type Step = 'mkdir' | 'writeFile' | 'rename' | 'swap';
const ERRNOS: Record<string, { status: number; code: string }> = {
  ENOSPC: { status: 507, code: 'INSUFFICIENT_STORAGE' },
  EDQUOT: { status: 507, code: 'INSUFFICIENT_STORAGE' },
  EROFS: { status: 503, code: 'STORAGE_UNAVAILABLE' },
  EACCES: { status: 503, code: 'STORAGE_UNAVAILABLE' },
  EPERM: { status: 503, code: 'STORAGE_UNAVAILABLE' },
};

/** An error as Node's fs raises it: the message and `path` name the file. */
function fsError(code: string, syscall: string, file: string): NodeJS.ErrnoException {
  return Object.assign(new Error(`${code}: injected failure, ${syscall} '${file}'`), { code, syscall, path: file, errno: -1 });
}

/** A store whose write calls fail with `fault.errno` at `fault.step` while `fault` is set. */
async function faultyServer(): Promise<{ s: StoreServer; fault: { current: { step: Step; errno: string } | null } }> {
  const fault: { current: { step: Step; errno: string } | null } = { current: null };
  const failing = (step: Step, file: string) => {
    if (fault.current?.step === step) throw fsError(fault.current.errno, step, file);
  };
  const s = await buildWithStore({
    store: {
      writeFs: {
        async mkdir(dir, recursive) {
          // The adapter folder itself exists; the temp folder's mkdir is the one a read-only disk refuses.
          if (!recursive) failing('mkdir', dir);
          await mkdir(dir, { recursive });
        },
        async writeFile(file, data) {
          if (fault.current?.step === 'writeFile' && path.basename(file) === 'adapter_model.safetensors') {
            await writeFile(file, data.subarray(0, data.length >> 1));
            failing('writeFile', file);
          }
          await writeFile(file, data, { flag: 'wx' });
        },
        async rename(from, to) {
          failing('rename', to);
          const free = await access(to).then(() => false, () => true);
          if (path.basename(from).startsWith('.tmp-') && free) failing('swap', to);
          await rename(from, to);
        },
      },
    },
  });
  return { s, fault };
}

async function workFolders(dir: string): Promise<string[]> {
  return (await readdir(dir)).filter((n) => n.startsWith('.'));
}

test('upload onto a full or read-only disk: coded 507/503, no path in the body, old version still served, no temp left', async () => {
  const { s, fault } = await faultyServer();
  try {
    const v1 = await adapterFor({ seed: 1 });
    const v2 = await adapterFor({ seed: 2 });
    const first = await s.app.inject({ method: 'PUT', url: '/adapters/org/a', ...uploadParts(v1) });
    assert.equal(first.statusCode, 200, first.body);
    const version1 = first.json().version;
    const onDisk = await readFile(path.join(s.dir, 'org', 'a', 'adapter_model.safetensors'));

    for (const [errno, expected] of Object.entries(ERRNOS)) {
      for (const step of ['mkdir', 'writeFile', 'rename', 'swap'] as const) {
        fault.current = { step, errno };
        for (const id of ['org/a', 'fresh']) {
          const res = await s.app.inject({ method: 'PUT', url: `/adapters/${id}`, ...uploadParts(v2) });
          const what = `${errno} at ${step}, ${id}`;
          assert.equal(res.statusCode, expected.status, `${what}: ${res.body}`);
          const body = res.json();
          assert.equal(body.code, expected.code, what);
          assert.match(body.error, new RegExp(`adapter "${id}"`), what);
          assert.ok(!body.error.includes(s.dir) && !/\/tmp\/|\.tmp-|injected/.test(body.error), `${what}: the body leaks a path: ${body.error}`);
          assert.deepEqual(await workFolders(s.dir), [], `${what}: a work folder is left`);
        }
        fault.current = null;
        // The stored version is untouched and still served; the new id never appeared.
        const info = await s.app.inject({ method: 'GET', url: '/adapters/org/a' });
        assert.equal(info.json().version, version1, `${errno} at ${step}`);
        assert.deepEqual(await readFile(path.join(s.dir, 'org', 'a', 'adapter_model.safetensors')), onDisk);
        assert.equal((await s.app.inject({ method: 'GET', url: '/adapters/fresh' })).statusCode, 404);
        assert.equal((await s.store.read('org/a')).version, version1);
      }
    }

    // The disk recovered: the same upload now replaces the adapter.
    const ok = await s.app.inject({ method: 'PUT', url: '/adapters/org/a', ...uploadParts(v2) });
    assert.equal(ok.statusCode, 200, ok.body);
    assert.notEqual(ok.json().version, version1);
    assert.equal((await s.store.read('org/a')).version, ok.json().version);
  } finally {
    await s.close();
  }
});

test('delete on a read-only disk: 503 STORAGE_UNAVAILABLE and the adapter stays', async () => {
  const { s, fault } = await faultyServer();
  try {
    const put = await s.app.inject({ method: 'PUT', url: '/adapters/keep', ...uploadParts(await adapterFor()) });
    assert.equal(put.statusCode, 200);
    fault.current = { step: 'rename', errno: 'EROFS' };
    const del = await s.app.inject({ method: 'DELETE', url: '/adapters/keep' });
    assert.equal(del.statusCode, 503);
    assert.equal(del.json().code, 'STORAGE_UNAVAILABLE');
    assert.ok(!del.json().error.includes(s.dir));
    fault.current = null;
    assert.equal((await s.app.inject({ method: 'GET', url: '/adapters/keep' })).json().version, put.json().version);
    assert.equal((await s.app.inject({ method: 'DELETE', url: '/adapters/keep' })).statusCode, 200);
  } finally {
    await s.close();
  }
});
