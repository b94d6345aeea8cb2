/** KV cache row/column selection: the memory-copy fast paths equal tf.gather / tf.slice exactly, on wasm and cpu; the attention mask, causal and windowed. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as tf from '@tensorflow/tfjs-core';
import '@tensorflow/tfjs-backend-wasm';
import '@tensorflow/tfjs-backend-cpu';
import { dropLeadingCols, gatherRows } from '../src/backend/raw-copy.ts';
import { KVBatch, packedCapacity } from '../src/exec/kv.ts';

for (const backend of ['wasm', 'cpu']) {
  test(`gatherRows and dropLeadingCols are exact on ${backend}`, async () => {
    assert.ok(await tf.setBackend(backend));
    const t = tf.randomNormal([5, 3, 7, 4], 0, 1, 'float32', 1) as tf.Tensor4D;
    const before = tf.memory().numTensors;
    for (const rows of [[0, 2, 4], [4, 3, 2, 1, 0], [1], [2, 2]]) {
      const fast = gatherRows(t, rows);
      const ref = tf.gather(t, rows);
      assert.deepEqual(fast.shape, ref.shape);
      assert.deepEqual(Array.from(fast.dataSync()), Array.from(ref.dataSync()));
      fast.dispose();
      ref.dispose();
    }
    for (const from of [0, 1, 6]) {
      const fast = dropLeadingCols(t, from);
      const ref = tf.slice(t, [0, 0, from, 0], [-1, -1, -1, -1]);
      assert.deepEqual(fast.shape, ref.shape);
      assert.deepEqual(Array.from(fast.dataSync()), Array.from(ref.dataSync()));
      fast.dispose();
      ref.dispose();
    }
    assert.equal(tf.memory().numTensors, before);
    t.dispose();
  });
}

test('KVBatch.mask: causal from each row\'s first column, and with a window W only the last W positions (i − W < j ≤ i)', () => {
  const kv = new KVBatch(1, 1, 1);
  // Three rows right-aligned on C = 5 columns, starting at columns 0, 2 and 4.
  kv.start = [0, 2, 4];
  kv.cols = 5;
  const T = 3;
  const G = 2;
  for (const window of [null, 1, 2, 4, 7]) {
    const m = kv.mask(T, G, undefined, window);
    for (let b = 0; b < 3; b++) {
      for (let t = 0; t < T; t++) {
        for (let g = 0; g < G; g++) {
          for (let j = 0; j < kv.cols + T; j++) {
            // Positions: row b's column j holds position j − start[b]; query t is at column C + t.
            const i = kv.cols + t - kv.start[b]!;
            const p = j - kv.start[b]!;
            const visible = p >= 0 && p <= i && (window === null || p > i - window);
            assert.equal(m[((b * T + t) * G + g) * (kv.cols + T) + j], visible ? 0 : -1e9, `window ${window}, row ${b}, query ${t}, column ${j}`);
          }
        }
      }
    }
  }
});

test('KVBatch.mask on a first forward: each row\'s left padding is masked, the window counts from its own tokens', () => {
  const kv = new KVBatch(1, 1, 1);
  kv.addEmptyRows(2);
  const m = kv.mask(4, 1, [0, 2], 2);
  const rows = Array.from({ length: 8 }, (_, r) => Array.from(m.subarray(r * 4, r * 4 + 4), (x) => (x === 0 ? 1 : 0)).join(''));
  assert.deepEqual(rows, ['1000', '1100', '0110', '0011', '0000', '0000', '0010', '0011']);
});

test('packedCapacity: 1.5× the held columns in blocks of 16, at least what is needed, within the binding limit', () => {
  // [need, held, bytes per column, limit bytes, capacity]
  for (const [need, held, perColumn, limit, capacity] of [
    [1, 0, 8, Infinity, 16], [20, 0, 8, Infinity, 32], [33, 32, 8, Infinity, 48], [49, 48, 8, Infinity, 80], [200, 48, 8, Infinity, 208],
    [33, 32, 8, 8 * 40, 40], // the limit caps the growth
    [50, 32, 8, 8 * 40, 50], // never below what is needed (the device then refuses the step)
  ] as const) {
    assert.equal(packedCapacity(need, held, perColumn, limit), capacity, `need ${need}, held ${held}, limit ${limit}`);
  }
});
