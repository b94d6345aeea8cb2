/**
 * The greedy-pick kernel (src/backend/webgpu/kernels/greedy-pick.ts) against a float64 plain loop written as the
 * host Sampler's greedy path: vocabularies not a multiple of the 64-wide workgroup, ties (within one thread's
 * stride and across threads), −∞, NaN and large values, several rows. test/webgpu.test.ts runs this file with
 * TEST_BACKEND=webgpu.
 */
import { before, test } from 'node:test';
import assert from 'node:assert/strict';
import * as tf from '@tensorflow/tfjs-core';
import { webgpuCounts } from '../../src/backend/webgpu/counters.ts';
import { greedyPickGpu, PICK_INFINITE, PICK_NO_FINITE } from '../../src/backend/webgpu/kernels/greedy-pick.ts';
import { logitEditsInPlace } from '../../src/backend/webgpu/kernels/logit-edits.ts';
import { shortlistGpu } from '../../src/backend/webgpu/kernels/shortlist.ts';
import type { LogitEdits } from '../../src/engine/executor.ts';
import { DEFAULT_SAMPLING, Sampler } from '../../src/engine/sampling.ts';
import { setupBackend, testBackend } from '../helpers/tf.ts';

before(async () => {
  assert.equal(testBackend(), 'webgpu', 'run with TEST_BACKEND=webgpu (test/webgpu.test.ts does)');
  await setupBackend();
});

/** The plain loop: lowest id among the largest finite logits (NaN as −∞), and its float64 log-softmax. */
function reference(row: Float32Array): { id: number; logprob: number } {
  let best = -1;
  for (let v = 0; v < row.length; v++) {
    if (row[v] === Infinity) return { id: PICK_INFINITE, logprob: NaN };
    if (Number.isFinite(row[v]) && (best < 0 || row[v]! > row[best]!)) best = v;
  }
  if (best < 0) return { id: PICK_NO_FINITE, logprob: NaN };
  let sum = 0;
  for (let v = 0; v < row.length; v++) if (Number.isFinite(row[v])) sum += Math.exp(row[v]! - row[best]!);
  return { id: best, logprob: -Math.log(sum) };
}

/** A deterministic pseudo-random row in [-scale, scale). */
function randomRow(vocab: number, seed: number, scale: number): Float32Array {
  let s = seed >>> 0 || 1;
  return Float32Array.from({ length: vocab }, () => {
    s ^= s << 13; s ^= s >>> 17; s ^= s << 5;
    return ((s >>> 0) / 2 ** 32 * 2 - 1) * scale;
  });
}

/** Rows of each case, built from a random row and edits. */
function rows(vocab: number, seed: number): Float32Array[] {
  const out: Float32Array[] = [];
  out.push(randomRow(vocab, seed, 8));
  out.push(randomRow(vocab, seed + 1, 0.01)); // nearly uniform: the sum is as large as it gets
  const tie = randomRow(vocab, seed + 2, 4);
  // The same maximum at ids in one thread's stride (v, v + 64) and in other threads' (v + 1, the last id).
  for (const v of [vocab - 1, Math.floor(vocab / 2), Math.floor(vocab / 2) + 64, Math.floor(vocab / 2) + 1]) if (v < vocab) tie[v] = 9;
  out.push(tie);
  const inf = randomRow(vocab, seed + 3, 5);
  for (let v = 0; v < vocab; v += 3) inf[v] = -Infinity;
  inf[Math.floor(vocab / 3)] = NaN;
  out.push(inf);
  const large = randomRow(vocab, seed + 4, 1e30); // exp(x − max) underflows to 0 for all but the maximum
  out.push(large);
  out.push(new Float32Array(vocab).fill(-Infinity)); // no finite logit
  const nan = randomRow(vocab, seed + 5, 1);
  nan[vocab - 1] = Infinity;
  out.push(nan);
  const allEqual = new Float32Array(vocab).fill(-3.5); // every id ties: id 0, logprob −log(vocab)
  out.push(allEqual);
  return out;
}

test('greedy pick equals the plain loop: lowest id among the largest logits and its log-softmax, one dispatch', async () => {
  const baseline = tf.memory().numTensors;
  let worst = 0;
  for (const [vocab, seed] of [[1, 1], [63, 2], [65, 3], [1000, 4], [32003, 5]] as const) {
    const cases = rows(vocab, seed * 101);
    const flat = new Float32Array(cases.length * vocab); // [rows, vocab]
    cases.forEach((r, i) => flat.set(r, i * vocab));
    const x = tf.tensor2d(flat, [cases.length, vocab]);
    const before = webgpuCounts()!.dispatch;
    const out = greedyPickGpu(x);
    assert.equal(webgpuCounts()!.dispatch - before, 1, 'one dispatch');
    assert.deepEqual(out.shape, [cases.length, 2]);
    const got = await out.data();
    tf.dispose([x, out]);
    cases.forEach((r, i) => {
      const want = reference(r);
      const what = `vocab ${vocab}, row ${i}`;
      assert.equal(got[2 * i], want.id, `${what}: id`);
      if (want.id < 0) return;
      const err = Math.abs(got[2 * i + 1]! - want.logprob);
      worst = Math.max(worst, err);
      assert.ok(err <= 2e-6 * Math.max(1, Math.abs(want.logprob)), `${what}: logprob ${got[2 * i + 1]} vs ${want.logprob}`);
    });
  }
  console.log(`greedy pick: max abs logprob err ${worst.toExponential(2)}`);
  assert.equal(tf.memory().numTensors, baseline, 'no tensor leaks');
});

test('greedy pick takes one workgroup per row for many rows', async () => {
  const vocab = 130;
  const B = 70;
  const flat = new Float32Array(B * vocab); // [rows, vocab]
  for (let b = 0; b < B; b++) flat.set(randomRow(vocab, 7 + b, 3), b * vocab);
  const x = tf.tensor2d(flat, [B, vocab]);
  const out = greedyPickGpu(x);
  const got = await out.data();
  tf.dispose([x, out]);
  for (let b = 0; b < B; b++) {
    const want = reference(flat.subarray(b * vocab, (b + 1) * vocab));
    assert.equal(got[2 * b], want.id, `row ${b}`);
    assert.ok(Math.abs(got[2 * b + 1]! - want.logprob) <= 2e-6 * Math.max(1, Math.abs(want.logprob)), `row ${b}: logprob`);
  }
});

/**
 * The plain loop of shortlistGpu: the S best ids (value desc, id asc; NaN as −∞, −0 as 0), their values, and
 * log Σ exp((x − M)·inv), M the largest value.
 */
function shortlistReference(row: Float32Array, S: number, inv: number): { ids: number[]; values: number[]; logNorm: number } {
  const value = (v: number) => (Number.isNaN(row[v]) ? -Infinity : row[v]!);
  const order = Array.from({ length: row.length }, (_, v) => v).sort((a, b) => (value(b) > value(a) ? 1 : value(b) < value(a) ? -1 : a - b));
  const ids = Array.from({ length: S }, (_, j) => order[j] ?? -1);
  const values = ids.map((v) => (v < 0 ? -Infinity : value(v)));
  if (row.some((x) => x === Infinity)) return { ids, values, logNorm: NaN };
  const top = values[0]!;
  if (top === -Infinity) return { ids, values, logNorm: -Infinity };
  let sum = 0;
  for (const x of row) if (Number.isFinite(x)) sum += x === top ? 1 : Math.exp((x - top) * inv);
  return { ids, values, logNorm: Math.log(sum) };
}

test('shortlist equals the plain loop: the 64 best ids in the host Sampler\'s order (ties, −0, NaN, ±∞, chunks merged), their logits, the tempered normaliser at low temperatures too', async () => {
  const baseline = tf.memory().numTensors;
  const S = 64;
  for (const [vocab, seed] of [[1, 1], [40, 2], [65, 3], [1000, 4], [2049, 6], [32003, 5]] as const) {
    const cases = rows(vocab, seed * 103);
    const ties = randomRow(vocab, seed * 7, 3).map((x) => Math.round(x)); // few distinct values, −0 among them
    cases.push(ties);
    const flat = new Float32Array(cases.length * vocab);
    cases.forEach((r, i) => flat.set(r, i * vocab));
    const invs = cases.map((_, i) => [1, 1 / 0.7, 1 / 1.3, 1e4, Infinity][i % 5]!); // T = 1e-4; T below float32's range
    const x = tf.tensor2d(flat, [cases.length, vocab]);
    const inv = tf.tensor1d(invs);
    const before = webgpuCounts()!.dispatch;
    const out = shortlistGpu(x, inv, S);
    assert.equal(webgpuCounts()!.dispatch - before, 2, 'two dispatches: the chunks, their merge');
    const got = await out.data();
    tf.dispose([x, inv, out]);
    cases.forEach((r, i) => {
      const want = shortlistReference(r, S, Math.fround(invs[i]!));
      const at = i * (2 * S + 1);
      assert.deepEqual(Array.from(got.subarray(at, at + S)), want.ids, `vocab ${vocab}, row ${i}: ids`);
      assert.deepEqual(Array.from(got.subarray(at + S, at + 2 * S)).map((v) => (Object.is(v, -0) ? 0 : v)), want.values.map((v) => (Object.is(v, -0) ? 0 : v)), `vocab ${vocab}, row ${i}: values`);
      const logNorm = got[at + 2 * S]!;
      if (!Number.isFinite(want.logNorm)) assert.ok(Object.is(logNorm, want.logNorm) || (Number.isNaN(logNorm) && Number.isNaN(want.logNorm)), `vocab ${vocab}, row ${i}: logNorm ${logNorm} vs ${want.logNorm}`);
      // The Sampler trusts exp(logNorm) to SHORTLIST_SUM_TOLERANCE (1e-4) relative: logNorm within 1e-5 absolute.
      else assert.ok(Math.abs(logNorm - want.logNorm) <= 1e-5, `vocab ${vocab}, row ${i}: logNorm ${logNorm} vs ${want.logNorm}`);
    });
  }
  assert.equal(tf.memory().numTensors, baseline, 'no tensor leaks');
});

test('logit edits equal the plain loop (bias, then the repetition penalty by sign, then minus; non-finite logits kept) and the host Sampler\'s own penalties to float32 rounding; other ids and rows untouched', async () => {
  const vocab = 300;
  const rows = 4;
  const x = new Float32Array(rows * vocab);
  for (let r = 0; r < rows; r++) x.set(randomRow(vocab, 40 + r, 6), r * vocab);
  x[5] = NaN;
  x[7] = -Infinity;
  x[2 * vocab + 299] = Infinity;
  // Row 0: the Sampler's edits of a history; row 1: none; row 2: hand-made entries; row 3: 250 entries (many per
  // invocation stride), every id but 50.
  const sampler = new Sampler({ ...DEFAULT_SAMPLING, repetitionPenalty: 1.3, frequencyPenalty: 0.4, presencePenalty: 0.25, logitBias: [[9, 2.5], [9, -0.5], [299, -100]] });
  const history = [5, 7, 9, 11, 11, 11, 250, 299, 1000];
  const e0 = sampler.edits(history.slice(0, 4), history.slice(4), 2, vocab)!;
  const e2 = { ids: Int32Array.of(0, 64, 128, 299), bias: Float32Array.of(0, 1, -1, 0), repetition: Float32Array.of(2, 1, 0.5, 1.5), minus: Float32Array.of(0, 0.5, 0, -3) };
  const many = Array.from({ length: 250 }, (_, j) => 50 + j);
  const e3 = {
    ids: Int32Array.from(many), bias: Float32Array.from(many, (id) => (id % 5) - 2), repetition: Float32Array.from(many, (id) => (id % 3 === 0 ? 1.2 : 1)),
    minus: Float32Array.from(many, (id) => (id % 4) * 0.3),
  };
  const entries: [number, LogitEdits][] = [[0, e0], [2, e2], [3, e3]];
  const cap = 512;
  const rowOf = new Int32Array(cap).fill(-1);
  const ids = new Int32Array(cap);
  const values = new Float32Array(3 * cap);
  let at = 0;
  for (const [r, e] of entries) {
    e.ids.forEach((id, j) => {
      rowOf[at] = r;
      ids[at] = id;
      values.set([e.bias[j]!, e.repetition[j]!, e.minus[j]!], 3 * at++);
    });
  }
  const out = await tf.tidy(() => {
    const logits = tf.tensor2d(x, [rows, vocab]);
    logitEditsInPlace(logits, tf.tensor1d(rowOf, 'int32'), tf.tensor1d(ids, 'int32'), tf.tensor1d(values));
    return logits;
  }).data();
  const want = Float32Array.from(x);
  const f = Math.fround;
  for (const [r, e] of entries) {
    e.ids.forEach((id, j) => {
      const x0 = x[r * vocab + id]!;
      if (!Number.isFinite(x0)) return; // kept as it is
      let v = f(x0 + e.bias[j]!);
      const rep = e.repetition[j]!;
      if (rep !== 1) v = v > 0 ? f(v / rep) : f(v * rep);
      want[r * vocab + id] = f(v - e.minus[j]!);
    });
  }
  for (let i = 0; i < want.length; i++) {
    if (Number.isNaN(want[i])) assert.ok(Number.isNaN(out[i]), `element ${i}`);
    else assert.ok(out[i] === want[i] || Math.abs(out[i]! - want[i]!) <= 1e-6 * Math.max(1, Math.abs(want[i]!)), `element ${i}: ${out[i]} vs ${want[i]}`);
  }
  // Row 0 as the host Sampler applies its steps 0–2 in float64 (a greedy draw reads them): the same to float32 rounding.
  const host = Float64Array.from(x.subarray(0, vocab), (v) => (Number.isNaN(v) ? -Infinity : v));
  for (const [id, bias] of [[9, 2.5], [9, -0.5], [299, -100]] as const) host[id]! += bias;
  for (const id of new Set(history.filter((i) => i < vocab))) host[id] = host[id]! > 0 ? host[id]! / 1.3 : host[id]! * 1.3;
  const counts = new Map<number, number>();
  for (const id of history.slice(2)) if (id < vocab) counts.set(id, (counts.get(id) ?? 0) + 1);
  for (const [id, n] of counts) host[id]! -= 0.4 * n + 0.25;
  for (let v = 0; v < vocab; v++) {
    if (v === 5) continue; // NaN stays NaN on the device, −∞ on the host: both are never chosen
    assert.ok(Math.abs(out[v]! - host[v]!) <= 1e-5 * Math.max(1, Math.abs(host[v]!)) || out[v] === host[v], `id ${v}: ${out[v]} vs ${host[v]}`);
  }
});
