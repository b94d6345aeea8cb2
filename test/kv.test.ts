/** KV cache row/column selection: the memory-copy fast paths equal tf.gather / tf.slice exactly, on wasm and cpu. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as tf from '@tensorflow/tfjs-core';
import '@tensorflow/tfjs-backend-wasm';
import '@tensorflow/tfjs-backend-cpu';
import { dropLeadingCols, gatherRows } from '../src/backend/raw-copy.ts';

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
