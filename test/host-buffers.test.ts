/** src/lora/host-buffers.ts: spare pre-touched buffers for adapter host copies, refilled by a helper thread; recycled scratch buffers. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { ScratchBuffers, SpareBuffers } from '../src/lora/host-buffers.ts';

test('take gives a zeroed buffer of exactly the size asked, and spares of that size are refilled in the background', async () => {
  const pool = new SpareBuffers(2, 4, 1 << 20);
  const first = pool.take(4096);
  assert.equal(first.byteLength, 4096);
  assert.ok(first instanceof SharedArrayBuffer);
  await pool.settled();
  assert.equal(pool.heldBytes, 2 * 4096, 'depth 2: two spares of the size just used');
  const spare = pool.take(4096);
  assert.equal(spare.byteLength, 4096);
  assert.ok(new Uint8Array(spare).every((b) => b === 0), 'a spare is zeroed');
  assert.ok(pool.heldBytes <= 2 * 4096);
  await pool.settled();
  assert.equal(pool.heldBytes, 2 * 4096, 'the spare taken is replaced');
  new Uint8Array(spare).fill(7); // a taken buffer is the caller's: writing it does not touch the pool
  assert.ok(new Uint8Array(pool.take(4096)).every((b) => b === 0));
});

test('sizes above the limit get no spares; only the most recently used sizes keep theirs', async () => {
  const pool = new SpareBuffers(1, 2, 8192);
  pool.take(16384);
  await pool.settled();
  assert.equal(pool.heldBytes, 0, 'no spare above maxBytes');
  for (const size of [1024, 2048, 4096]) {
    pool.take(size);
    await pool.settled();
  }
  assert.equal(pool.heldBytes, 2048 + 4096, 'the oldest size (1024) was dropped');
  pool.take(0);
  await pool.settled();
  assert.equal(pool.heldBytes, 2048 + 4096, 'nothing kept for empty buffers');
});

test('scratch buffers: a buffer given back is borrowed again; at most perSize kept per size, for the sizes given back last', async () => {
  const spares = new SpareBuffers(0, 1, 0); // no spares: every new buffer is fresh
  const scratch = new ScratchBuffers(spares, 2, 2);
  const a = scratch.borrow(4096);
  const b = scratch.borrow(4096);
  assert.notEqual(a, b, 'two loads in flight never share a buffer');
  assert.equal(a.byteLength, 4096);
  scratch.giveBack(a);
  assert.equal(scratch.borrow(4096), a, 'reused');
  scratch.giveBack(a);
  scratch.giveBack(b);
  scratch.giveBack(new SharedArrayBuffer(4096));
  assert.equal(scratch.held, 2, 'perSize 2');
  scratch.giveBack(new SharedArrayBuffer(1024));
  scratch.giveBack(new SharedArrayBuffer(2048));
  assert.equal(scratch.held, 2, 'the 4096 size, given back least recently, was dropped (maxSizes 2)');
  assert.notEqual(scratch.borrow(4096), a);
  assert.equal(scratch.borrow(2048).byteLength, 2048);
});

test('the helper is replaced after helperBytes, so the buffers it made and the server dropped are freed (issue 12)', async () => {
  const v8 = await import('node:v8');
  const vm = await import('node:vm');
  v8.setFlagsFromString('--expose-gc');
  const gc = vm.runInNewContext('gc') as () => void;
  const MiB = 2 ** 20;
  // Buffers above glibc's largest mmap threshold (32 MiB) are mapped and unmapped on their own, so RSS shows exactly
  // what is still held, not what the allocator keeps for reuse.
  const size = 33 * MiB;
  const pool = new SpareBuffers(1, 4, 64 * MiB, 2 * size);
  /** RSS after garbage collection (array buffers' memory is freed by a sweep that may end after gc() returns). */
  const rss = async () => {
    for (let i = 0; i < 2; i++) {
      gc();
      await new Promise((r) => setTimeout(r, 50));
    }
    return process.memoryUsage().rss;
  };
  /** Takes `n` buffers and drops them; each take is refilled before the next, so `size` is asked of the helper. */
  const churn = async (n: number) => {
    for (let i = 0; i < n; i++) {
      assert.equal(pool.take(size).byteLength, size);
      await pool.settled();
    }
  };
  await churn(4);
  const before = await rss();
  const helpersBefore = pool.helpersStarted;
  await churn(20);
  const grown = ((await rss()) - before) / MiB;
  // A helper that kept the handles of the buffers it made would keep all 660 MiB resident.
  assert.ok(grown < 10 * size / MiB, `RSS grew ${grown.toFixed(0)} MiB over 20 buffers of 33 MiB taken and dropped`);
  assert.equal(pool.helpersStarted - helpersBefore, 20 / 2, 'a new helper every 2 buffers');
  assert.equal(pool.heldBytes, size, 'the spare of the size in use is kept across helpers');
});
