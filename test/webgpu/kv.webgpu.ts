/**
 * The packed KV cache of the webgpu backend (src/exec/kv.ts, src/backend/webgpu/kernels/kv-append.ts): the append
 * kernel against a plain loop, a packed batch against a split one (the wasm layout) through capacity growth, rows
 * joining and leaving, forks and sliding-window trims, and a long decode against the float64 reference.
 * test/webgpu.test.ts runs this file with TEST_BACKEND=webgpu.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import * as tf from '@tensorflow/tfjs-core';
import { webgpuCounts } from '../../src/backend/webgpu/counters.ts';
import { kvAppendGpu, kvCopyRowGpu } from '../../src/backend/webgpu/kernels/kv-append.ts';
import { TINY_LLAMA } from '../../src/demo/index.ts';
import { KVBatch, newKV } from '../../src/exec/kv.ts';
import { unpackKV } from '../../src/model/layers.ts';
import { CausalLM, type LayerKV } from '../../src/model/model.ts';
import { referenceForward } from '../reference/forward.ts';
import { argmax, fixtureCheckpoint, maxRelErr, setupBackend, tempDir, testBackend } from '../helpers/tf.ts';

const tmp = tempDir();
before(async () => {
  assert.equal(testBackend(), 'webgpu', 'run with TEST_BACKEND=webgpu (test/webgpu.test.ts does)');
  await setupBackend();
});
after(tmp.cleanup);

function rand(shape: number[], seed: number): tf.Tensor {
  return tf.randomUniform(shape, -1, 1, 'float32', seed);
}

function dispatches(): number {
  return webgpuCounts()!.dispatch;
}

test('the KV append kernel writes k and v into the packed cache in place, as a plain loop, in one dispatch', async () => {
  const baseline = tf.memory().numTensors;
  // [B, kvH, capacity, hd, at, T]: single elements, odd sizes, the last column, a whole cache at once.
  for (const [B, kvH, cap, hd, at, T] of [[1, 1, 1, 1, 0, 1], [3, 2, 7, 5, 4, 3], [2, 3, 40, 33, 39, 1], [5, 1, 17, 64, 0, 17]] as const) {
    const cache = rand([B, kvH, cap, 2 * hd], cap) as tf.Tensor4D;
    const k = rand([B * T, kvH * hd], at + 1) as tf.Tensor2D; // token rows (b, t), as the projections give them
    const v = rand([B * T, kvH * hd], at + 2) as tf.Tensor2D;
    // Read first, so that tfjs keeps the values on the host: the write must drop that copy.
    const expected = Float32Array.from(await cache.data() as Float32Array);
    const [kv, vv] = [await k.data(), await v.data()];
    for (let b = 0; b < B; b++) {
      for (let h = 0; h < kvH; h++) {
        for (let t = 0; t < T; t++) {
          for (let d = 0; d < hd; d++) {
            const to = ((b * kvH + h) * cap + at + t) * 2 * hd;
            const from = (b * T + t) * kvH * hd + h * hd + d; // k[b·T + t, h·hd + d]
            expected[to + d] = kv[from]!;
            expected[to + hd + d] = vv[from]!;
          }
        }
      }
    }
    const state = tf.tensor1d([at, ...new Array<number>(B).fill(0)], 'int32'); // the KV state: at, then the rows' starts
    const before = dispatches();
    kvAppendGpu(cache, k, v, state, at);
    assert.equal(dispatches() - before, 1, 'one dispatch');
    assert.deepEqual(await cache.data(), expected, `[${B}, ${kvH}, ${cap}, ${hd}] at ${at}, T ${T}`);
    assert.throws(() => kvAppendGpu(cache, k, v, state, cap - T + 1), /outside the cache/);
    tf.dispose([cache, k, v, state]);
  }
  // A cache whose data another tensor shares (a reshape) is refused: writing it would change both.
  const cache = rand([1, 1, 4, 2], 1) as tf.Tensor4D;
  const alias = tf.reshape(cache, [8]);
  const one = tf.zeros([1, 1]) as tf.Tensor2D;
  const state = tf.tensor1d([0, 0], 'int32');
  assert.throws(() => kvAppendGpu(cache, one, one, state, 0), /shared by 2 tensors/);
  tf.dispose([cache, alias, one, state]);
  assert.equal(tf.memory().numTensors, baseline, 'no tensor leaks');
});

test('the KV row-copy kernel copies columns of one row of a packed cache into a row of another, in place, as a plain loop, in one dispatch', async () => {
  const baseline = tf.memory().numTensors;
  // [src rows, src capacity, dst rows, dst capacity, kvH, hd, srcRow, srcCol, dstRow, dstCol, len]
  for (const [sB, sCap, dB, dCap, kvH, hd, srcRow, srcCol, dstRow, dstCol, len] of [[1, 4, 1, 4, 1, 1, 0, 0, 0, 0, 4], [3, 9, 4, 20, 2, 5, 2, 3, 1, 13, 6], [2, 70, 3, 90, 3, 33, 0, 1, 2, 20, 65]] as const) {
    const src = rand([sB, kvH, sCap, 2 * hd], sCap) as tf.Tensor4D;
    const dst = rand([dB, kvH, dCap, 2 * hd], dCap) as tf.Tensor4D;
    const expected = Float32Array.from(await dst.data() as Float32Array);
    const from = await src.data();
    for (let h = 0; h < kvH; h++) {
      for (let t = 0; t < len; t++) {
        for (let e = 0; e < 2 * hd; e++) {
          expected[((dstRow * kvH + h) * dCap + dstCol + t) * 2 * hd + e] = from[((srcRow * kvH + h) * sCap + srcCol + t) * 2 * hd + e]!;
        }
      }
    }
    const before = dispatches();
    kvCopyRowGpu(dst, dstRow, dstCol, src, srcRow, srcCol, len);
    assert.equal(dispatches() - before, 1, 'one dispatch');
    assert.deepEqual(await dst.data(), expected, `row ${srcRow} [${srcCol}, +${len}) → row ${dstRow} at ${dstCol}`);
    assert.throws(() => kvCopyRowGpu(dst, dstRow, dCap - len + 1, src, srcRow, srcCol, len), /outside a cache/);
    tf.dispose([src, dst]);
  }
  assert.equal(tf.memory().numTensors, baseline, 'no tensor leaks');
});

test('a packed KV batch frees a row in place (retire) and moves a prefilled row into it (place), right-aligned, the other rows and the tensors unchanged', async () => {
  const baseline = tf.memory().numTensors;
  const [L, kvH, hd] = [2, 2, 3];
  const batch = new KVBatch(L, kvH, hd, null, true);
  const joiner = new KVBatch(L, kvH, hd, null, true);
  const forward = async (kv: KVBatch, T: number, pad?: number[]) => {
    kv.begin(pad);
    for (let l = 0; l < L; l++) {
      const k = rand([kv.rows * T, kvH * hd], 100 + l + T) as tf.Tensor2D;
      const v = rand([kv.rows * T, kvH * hd], 200 + l + T) as tf.Tensor2D;
      kv.appendLayer(l, k, v);
      tf.dispose([k, v]);
    }
    kv.commit(T, pad);
  };
  batch.addEmptyRows(3);
  await forward(batch, 8, [0, 2, 5]);
  joiner.addEmptyRows(2);
  await forward(joiner, 5, [1, 0]);
  const layerOf = (kv: KVBatch, l: number) => (kv as unknown as { layers: tf.Tensor4D[][] }).layers[l]![0]!;
  const tensors = [0, 1].map((l) => layerOf(batch, l));
  const before = await Promise.all([0, 1].map((l) => layerOf(batch, l).data()));
  const joined = await Promise.all([0, 1].map((l) => layerOf(joiner, l).data()));
  batch.retire(1);
  assert.deepEqual(batch.start, [0, 8, 5], 'a retired row has no valid column');
  assert.ok(batch.fits(joiner, 0) && batch.fits(joiner, 1));
  const d0 = dispatches();
  batch.place(1, joiner, 0); // joiner row 0: columns 1..4 (4 columns) → batch row 1, columns 4..7
  assert.equal(dispatches() - d0, L, 'one dispatch per layer');
  assert.deepEqual(batch.start, [0, 4, 5]);
  const cap = batch.capacity;
  const jCap = joiner.capacity;
  const w = 2 * hd;
  for (let l = 0; l < L; l++) {
    assert.equal(layerOf(batch, l), tensors[l], 'the same tensor');
    const after = await layerOf(batch, l).data();
    for (let b = 0; b < 3; b++) {
      for (let h = 0; h < kvH; h++) {
        for (let j = 0; j < 8; j++) {
          const at = ((b * kvH + h) * cap + j) * w;
          const want = b === 1 && j >= 4 ? joined[l]!.slice(((0 * kvH + h) * jCap + j - 3) * w, ((0 * kvH + h) * jCap + j - 3) * w + w) : before[l]!.slice(at, at + w);
          assert.deepEqual(after.slice(at, at + w), want, `layer ${l}, row ${b}, head ${h}, column ${j}`);
        }
      }
    }
  }
  // A row longer than the batch's columns does not fit; nor does anything into an empty batch.
  const long = new KVBatch(L, kvH, hd, null, true);
  long.addEmptyRows(1);
  await forward(long, 9);
  assert.equal(batch.fits(long, 0), false);
  assert.throws(() => batch.place(2, long, 0), /does not fit/);
  // A row left free holds back no trim: the running row is replaced by a 3-column sequence every 10 steps while row 2
  // stays free, and the cache keeps within 4/3 of the longest running sequence (13 columns) plus a step's growth.
  batch.retire(2);
  let widest = 0;
  for (let step = 0; step < 80; step++) {
    if (step % 10 === 0) {
      batch.retire(step % 20 === 0 ? 0 : 1);
      const short = new KVBatch(L, kvH, hd, null, true);
      short.addEmptyRows(1);
      await forward(short, 3);
      batch.place(step % 20 === 0 ? 0 : 1, short, 0);
      short.dispose();
    }
    await forward(batch, 1);
    assert.equal(batch.start[2], batch.cols, 'the free row has no valid column');
    widest = Math.max(widest, batch.cols);
  }
  assert.ok(widest <= 25, `the cache grew to ${widest} columns`);
  [batch, joiner, long].forEach((kv) => kv.dispose());
  assert.equal(tf.memory().numTensors, baseline, 'no tensor leaks');
});

/** The keys and values a layer's cache holds, as host arrays of its `cols` columns. */
async function columns(c: LayerKV): Promise<[Float32Array, Float32Array]> {
  const { k, v } = 'packed' in c ? unpackKV(c.packed, c.cols) : c;
  const out: [Float32Array, Float32Array] = [await k.data() as Float32Array, await v.data() as Float32Array];
  if ('packed' in c) tf.dispose([k, v]);
  return out;
}

/**
 * Drives a packed and a split KVBatch alike (as the executor does: prefills, rows joining after their prefill, decode
 * steps, rows leaving, forks) and checks after every append that both hold the same columns, exactly.
 */
async function driveAlike(reach: number | null, limitBytes = Infinity): Promise<{ capacities: number[]; widths: number[] }> {
  const [L, kvH, hd] = [2, 3, 5];
  const make = (packed: boolean) => new KVBatch(L, kvH, hd, reach, packed, limitBytes);
  /** Bytes of one packed layer of `kv`. */
  const layerBytes = (kv: KVBatch) => kv.rows * kvH * kv.capacity * 2 * hd * 4;
  const packed = make(true);
  const split = make(false);
  let seed = 0;
  /** One forward of T columns into both batches (pad: a first forward's left padding), checked layer by layer. */
  const step = async (p: KVBatch, s: KVBatch, T: number, pad?: number[]) => {
    const inPlace = p.capacity >= p.cols + T && p.cols > 0;
    p.begin(pad);
    s.begin(pad);
    // The KV state the kernels mask with: the columns cached before the step, then each row's first valid column (a
    // first forward's: its left padding).
    const state = [p.cols, ...(p.cols === 0 && pad ? pad : p.start)];
    for (let l = 0; l < L; l++) {
      const k = rand([p.rows * T, kvH * hd], ++seed) as tf.Tensor2D;
      const v = rand([p.rows * T, kvH * hd], ++seed) as tf.Tensor2D;
      const before = dispatches();
      const a = p.appendLayer(l, k, v);
      if (inPlace) assert.equal(dispatches() - before, 1, 'an append with room is one dispatch');
      const b = s.appendLayer(l, k, v);
      assert.ok('packed' in a, 'attention reads the packed cache');
      assert.deepEqual([...await a.state.data()], state, 'the KV state');
      const [[ak, av], [bk, bv]] = [await columns(a), await columns(b)];
      assert.deepEqual(ak, bk, `layer ${l}: keys`);
      assert.deepEqual(av, bv, `layer ${l}: values`);
      tf.dispose([k, v]);
    }
    p.commit(T, pad);
    s.commit(T, pad);
    assert.deepEqual([p.cols, p.start], [s.cols, s.start]);
    assert.ok(p.capacity >= p.cols);
    assert.ok(p.capacity === p.cols || layerBytes(p) <= limitBytes, `${p.rows} rows × ${p.capacity} columns: over the ${limitBytes}-byte limit`);
  };
  const capacities: number[] = [];
  const widths: number[] = [];
  packed.addEmptyRows(2);
  split.addEmptyRows(2);
  await step(packed, split, 5, [0, 2]);
  for (let i = 0; i < 90; i++) {
    if (i === 20) {
      // Two rows join after a prefill of their own (longer than the running rows: these are padded on the left).
      const [p2, s2] = [make(true), make(false)];
      p2.addEmptyRows(2);
      s2.addEmptyRows(2);
      await step(p2, s2, 40, [3, 0]);
      packed.append(p2);
      split.append(s2);
    }
    if (i === 35) [packed, split].forEach((kv) => kv.keepRows([1, 2, 3])); // row 0 leaves
    if (i === 50) [packed, split].forEach((kv) => kv.keepRows([0, 1, 2, 1])); // row 1 forks
    if (i === 20 || i === 50) assert.ok(packed.capacity === packed.cols || layerBytes(packed) <= limitBytes, 'joined or forked rows within the limit');
    if (i === 60) [packed, split].forEach((kv) => kv.keepRows([3, 0])); // two leave, in another order
    await step(packed, split, 1);
    capacities.push(packed.capacity);
    widths.push(packed.cols);
  }
  packed.dispose();
  split.dispose();
  return { capacities, widths };
}

test('a packed KV batch holds the same columns as a split one through growth, rows joining and leaving, and forks', async () => {
  const baseline = tf.memory().numTensors;
  const { capacities, widths } = await driveAlike(null);
  assert.equal(tf.memory().numTensors, baseline, 'no tensor leaks');
  // Geometric growth: over 90 steps (and a join) the tensor was replaced only a few times.
  const changes = capacities.filter((c, i) => i > 0 && c !== capacities[i - 1]).length;
  assert.ok(changes <= 6, `capacities ${capacities.join(' ')}`);
  assert.ok(widths.at(-1)! > 90, `widths ${widths.join(' ')}`);
});

test('a packed KV batch gives up spare columns where joined or forked rows would not bind on the device', async () => {
  const baseline = tf.memory().numTensors;
  // 4 rows × 3 heads × 2·5 floats × 4 bytes = 480 bytes a column: at most 44 columns of 4 rows. The two rows joining
  // at 40 columns would keep the running rows' 7 spare columns (47) without the limit.
  const limit = 44 * 4 * 3 * 2 * 5 * 4;
  const { widths } = await driveAlike(null, limit);
  assert.equal(tf.memory().numTensors, baseline, 'no tensor leaks');
  assert.ok(widths.at(-1)! > 90, `widths ${widths.join(' ')}`);
});

test('a packed KV batch trims the columns no sliding window reaches, as a split one does', async () => {
  const baseline = tf.memory().numTensors;
  const { capacities, widths } = await driveAlike(12);
  assert.equal(tf.memory().numTensors, baseline, 'no tensor leaks');
  assert.ok(widths.slice(70).every((c) => c >= 11 && c <= 16), `widths ${widths.join(' ')}`);
  assert.ok(capacities.at(-1)! <= 64, `capacities ${capacities.join(' ')}`);
});

test('a long decode on the packed cache (several capacity growths, GQA) matches the float64 reference; nothing leaks', async () => {
  const { dir, config, get } = await fixtureCheckpoint(join(tmp.dir, 'llama'), TINY_LLAMA);
  const model = CausalLM.load(dir);
  const baseline = tf.memory().numTensors;
  const kv = newKV(model.config);
  assert.ok(kv.packed);
  kv.addEmptyRows(1);
  const tokens = [5, 77, 140];
  const forward = async (chunk: number[], start: number) => {
    const logits = model.forward({
      kv, tokens: Int32Array.from(chunk), positions: Int32Array.from(chunk, (_, i) => start + i), T: chunk.length, logitRows: Int32Array.of(chunk.length - 1),
    });
    const l = await logits.data() as Float32Array;
    logits.dispose();
    return l;
  };
  const logits = [await forward(tokens, 0)];
  const capacities = new Set<number>();
  for (let p = tokens.length; p < 120; p++) {
    const next = argmax(logits.at(-1)!);
    tokens.push(next);
    logits.push(await forward([next], p));
    capacities.add(kv.capacity);
  }
  assert.ok(capacities.size >= 4, `capacities ${[...capacities].join(' ')}`);
  const ref = referenceForward(config, get, tokens);
  logits.forEach((l, i) => assert.ok(maxRelErr(l, ref[2 + i]!) < 1e-4, `step ${i}: max rel err ${maxRelErr(l, ref[2 + i]!)}`));
  kv.dispose();
  assert.equal(tf.memory().numTensors, baseline, 'tensors leaked');
  model.dispose();
});
