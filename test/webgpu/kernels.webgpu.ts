/**
 * The fused WebGPU kernels (src/backend/webgpu/kernels/) against the unfused TensorFlow.js ops they replace, on the
 * webgpu backend, on odd shapes: rows not a multiple of the 64-wide workgroup, widths not a multiple of it either,
 * GQA ratios other than 1, LoRA rank 1. test/webgpu.test.ts runs this file with TEST_BACKEND=webgpu.
 */
import { before, test } from 'node:test';
import assert from 'node:assert/strict';
import * as tf from '@tensorflow/tfjs-core';
import { webgpuCounts } from '../../src/backend/webgpu/counters.ts';
import { decodeLinearGpu } from '../../src/backend/webgpu/kernels/decode-linear.ts';
import { attentionGpu } from '../../src/backend/webgpu/kernels/attention.ts';
import { geluNewGpu } from '../../src/backend/webgpu/kernels/gelu-new.ts';
import { loraBgmvGpu } from '../../src/backend/webgpu/kernels/lora-bgmv.ts';
import { layerNormGpu } from '../../src/backend/webgpu/kernels/layer-norm.ts';
import { rmsNormGpu } from '../../src/backend/webgpu/kernels/rms-norm.ts';
import { ropeGpu } from '../../src/backend/webgpu/kernels/rope.ts';
import { siluMulGpu } from '../../src/backend/webgpu/kernels/silu-mul.ts';
import { matmulWPlus } from '../../src/backend/weights.ts';
import { ropeGpuTable, ropeTables, rotateHalfMatrix } from '../../src/model/layers.ts';
import { maxRelErr, setupBackend, testBackend } from '../helpers/tf.ts';

before(async () => {
  assert.equal(testBackend(), 'webgpu', 'run with TEST_BACKEND=webgpu (test/webgpu.test.ts does)');
  await setupBackend();
});

/** A seeded tensor of uniform values in [-scale, scale). */
function rand(shape: number[], seed: number, scale = 1): tf.Tensor {
  return tf.randomUniform(shape, -scale, scale, 'float32', seed);
}

/** Runs `fused` and `unfused`, checks the fused one is one dispatch (or `dispatches`), and returns max rel err. */
async function compare(fused: () => tf.Tensor, unfused: () => tf.Tensor, dispatches = 1): Promise<number> {
  const before = webgpuCounts()!.dispatch;
  const a = fused();
  assert.equal(webgpuCounts()!.dispatch - before, dispatches, 'dispatches of the fused kernel');
  const b = unfused();
  assert.deepEqual(a.shape, b.shape);
  const [av, bv] = [await a.data(), await b.data()];
  tf.dispose([a, b]);
  for (const v of av) assert.ok(Number.isFinite(v), 'finite');
  return maxRelErr(av, bv);
}

function leakCheck(): () => void {
  const baseline = tf.memory().numTensors;
  return () => assert.equal(tf.memory().numTensors, baseline, 'no tensor leaks');
}

test('fused RMSNorm equals mean(square), rsqrt, mul, mul', async () => {
  const done = leakCheck();
  for (const [rows, cols] of [[1, 8], [3, 50], [70, 200], [130, 64]] as const) {
    const x = rand([rows, cols], rows + cols, 3) as tf.Tensor2D;
    const w = rand([cols], 7) as tf.Tensor1D;
    const err = await compare(() => rmsNormGpu(x, w, 1e-5),
      () => tf.tidy(() => tf.mul(tf.mul(x, tf.rsqrt(tf.add(tf.mean(tf.square(x), -1, true), 1e-5))), w)));
    assert.ok(err < 1e-5, `[${rows}, ${cols}]: max rel err ${err}`);
    tf.dispose([x, w]);
  }
  done();
});

test('fused LayerNorm equals moments, sub, rsqrt, mul, add', async () => {
  const done = leakCheck();
  for (const [rows, cols] of [[1, 8], [3, 50], [70, 200], [130, 64]] as const) {
    const x = tf.tidy(() => tf.add(rand([rows, cols], rows * cols, 2), 5)) as tf.Tensor2D; // a mean far from 0
    const w = rand([cols], 3) as tf.Tensor1D;
    const b = rand([cols], 4) as tf.Tensor1D;
    const err = await compare(() => layerNormGpu(x, w, b, 1e-5), () => tf.tidy(() => {
      const { mean, variance } = tf.moments(x, -1, true);
      return tf.add(tf.mul(tf.mul(tf.sub(x, mean), tf.rsqrt(tf.add(variance, 1e-5))), w), b);
    }));
    assert.ok(err < 1e-5, `[${rows}, ${cols}]: max rel err ${err}`);
    tf.dispose([x, w, b]);
  }
  done();
});

test('fused RoPE equals gather of cos/sin, rotate-half matmul, mul, mul, add (two table sets, odd token counts)', async () => {
  const done = leakCheck();
  const hd = 10;
  const maxPositions = 40;
  const freqs = (base: number) => Array.from({ length: hd / 2 }, (_, i) => 1 / base ** ((2 * i) / hd));
  const sets = [freqs(10000), freqs(500)];
  const { cos, sin } = ropeTables(maxPositions, sets, 1.3); // [80, hd]
  const table = ropeGpuTable(maxPositions, sets, 1.3); // [80, 2·hd]
  const R = rotateHalfMatrix(hd);
  for (const [N, H] of [[1, 3], [5, 2], [67, 4]] as const) {
    const x = rand([N, H * hd], N * H) as tf.Tensor2D;
    const rows = tf.tensor1d(Array.from({ length: N }, (_, n) => (n * 7) % (2 * maxPositions)), 'int32'); // both sets
    const err = await compare(() => ropeGpu(x, table, rows), () => tf.tidy(() => {
      const c = tf.reshape(tf.gather(cos, rows), [N, 1, hd]);
      const s = tf.reshape(tf.gather(sin, rows), [N, 1, hd]);
      const x3 = tf.reshape(x, [N, H, hd]);
      const rotated = tf.reshape(tf.matMul(tf.reshape(x3, [N * H, hd]), R), [N, H, hd]);
      return tf.reshape(tf.add(tf.mul(x3, c), tf.mul(rotated, s)), [N, H * hd]);
    }));
    assert.ok(err < 1e-6, `[${N}, ${H}·${hd}]: max rel err ${err}`);
    tf.dispose([x, rows]);
  }
  tf.dispose([cos, sin, table, R]);
  done();
});

test('fused silu(gate)·up equals mul(gate, sigmoid(gate)), mul', async () => {
  const done = leakCheck();
  for (const [rows, cols] of [[1, 7], [3, 130], [65, 33]] as const) {
    const gate = rand([rows, cols], rows, 8) as tf.Tensor2D; // far into both tails of the sigmoid
    const up = rand([rows, cols], cols, 2) as tf.Tensor2D;
    const err = await compare(() => siluMulGpu(gate, up), () => tf.tidy(() => tf.mul(tf.mul(gate, tf.sigmoid(gate)), up)));
    assert.ok(err < 1e-6, `[${rows}, ${cols}]: max rel err ${err}`);
    tf.dispose([gate, up]);
  }
  done();
});

test('fused gelu_new equals its tanh formula as separate ops, large inputs included', async () => {
  const done = leakCheck();
  for (const [rows, cols] of [[1, 7], [3, 130], [65, 33]] as const) {
    const x = rand([rows, cols], rows + 1, 30) as tf.Tensor2D; // tanh saturates: must not overflow
    const err = await compare(() => geluNewGpu(x), () => tf.tidy(() => {
      const inner = tf.mul(tf.add(x, tf.mul(tf.pow(x, 3), 0.044715)), Math.sqrt(2 / Math.PI));
      return tf.mul(tf.mul(x, 0.5), tf.add(tf.tanh(inner), 1));
    }));
    assert.ok(err < 1e-5, `[${rows}, ${cols}]: max rel err ${err}`);
    tf.dispose(x);
  }
  done();
});

/** k, v [B, kvH, C, hd] packed as KVBatch packs them on webgpu: [B, kvH, C + spare, 2·hd], the spare columns NaN (never to be read). */
function packKV(k: tf.Tensor4D, v: tf.Tensor4D, spare: number): tf.Tensor4D {
  return tf.tidy(() => tf.pad(tf.concat4d([k, v], 3), [[0, 0], [0, 0], [0, spare], [0, 0]], NaN));
}

test('fused attention of a decode step equals scores, mask, softmax and weighted sum over the packed cache (GQA, padding, long caches, spare columns)', async () => {
  const done = leakCheck();
  // [B, kvH, G, C, hd]: GQA ratios 1, 3 and 4; caches shorter than, not a multiple of and longer than the 64-wide block.
  for (const [B, kvH, G, C, hd] of [[1, 1, 1, 1, 8], [3, 2, 3, 37, 10], [2, 1, 4, 150, 64], [1, 2, 1, 65, 130]] as const) {
    const H = kvH * G;
    const q = rand([B, H * hd], C, 2) as tf.Tensor2D;
    const k = rand([B, kvH, C, hd], C + 1, 2) as tf.Tensor4D;
    const v = rand([B, kvH, C, hd], C + 2) as tf.Tensor4D;
    // Row b is left-padded by b·5 columns (its first valid column in the KV state; KVBatch.mask hides the ones before), never all of them.
    const starts = Array.from({ length: B }, (_, b) => Math.min(b * 5, C - 1));
    const state = tf.tensor1d([C - 1, ...starts], 'int32');
    const maskData = new Float32Array(B * G * C).map((_, i) => (i % C < starts[Math.floor(i / (G * C))]! ? -1e9 : 0));
    const mask = tf.tensor4d(maskData, [B, 1, G, C]);
    const scale = 1 / Math.sqrt(hd);
    const cache = packKV(k, v, (C * 7) % 20);
    const err = await compare(() => attentionGpu(q, cache, C, state, H, scale), () => tf.tidy(() => {
      const q4 = tf.reshape(q, [B, kvH, G, hd]); // one token: query rows (t, g) = g
      const scores = tf.add(tf.matMul(tf.mul(q4, scale), k, false, true), mask); // [B, kvH, G, C]
      return tf.reshape(tf.matMul(tf.softmax(scores), v), [B, H * hd]);
    }));
    assert.ok(err < 1e-5, `B ${B}, kvH ${kvH}, G ${G}, C ${C}, hd ${hd}: max rel err ${err}`);
    tf.dispose([q, k, v, cache, mask, state]);
  }
  done();
});

test('fused attention of a decode step soft-caps the scaled scores before the mask and honours a sliding-window band', async () => {
  const done = leakCheck();
  // [B, kvH, G, C, hd, window, cap]: a window that hides whole 64-wide blocks of the cache, a window wider than the
  // cache (it hides nothing), and Gemma 2's caps; row b starts at column b·30 (so the later of its start and the band wins).
  for (const [B, kvH, G, C, hd, window, cap] of [[2, 1, 2, 150, 16, 20, 50], [1, 2, 1, 37, 8, 5, 1], [3, 1, 1, 70, 12, null, 2], [3, 1, 2, 70, 8, 50, 3], [1, 1, 1, 9, 8, 64, 5]] as const) {
    const H = kvH * G;
    const q = rand([B, H * hd], C, 4) as tf.Tensor2D;
    const k = rand([B, kvH, C, hd], C + 1, 4) as tf.Tensor4D;
    const v = rand([B, kvH, C, hd], C + 2) as tf.Tensor4D;
    // The new token is column C − 1; a window W lets it see columns C − W .. C − 1 (KVBatch.mask's band).
    const starts = Array.from({ length: B }, (_, b) => Math.min(b * 30, C - 1));
    const first = starts.map((start) => (window === null ? start : Math.max(start, C - window)));
    const state = tf.tensor1d([C - 1, ...starts], 'int32');
    const mask = tf.tensor4d(new Float32Array(B * G * C).map((_, i) => (i % C < first[Math.floor(i / (G * C))]! ? -1e9 : 0)), [B, 1, G, C]);
    const scale = 0.3;
    const cache = packKV(k, v, 3);
    const err = await compare(() => attentionGpu(q, cache, C, state, H, scale, cap, window), () => tf.tidy(() => {
      const q4 = tf.reshape(q, [B, kvH, G, hd]); // one token: query rows (t, g) = g
      const raw = tf.matMul(tf.mul(q4, scale), k, false, true); // [B, kvH, G, C]
      const scores = tf.add(tf.mul(tf.tanh(tf.div(raw, cap)), cap), mask);
      return tf.reshape(tf.matMul(tf.softmax(scores), v), [B, H * hd]);
    }));
    assert.ok(err < 1e-5, `B ${B}, C ${C}, window ${window}, cap ${cap}: max rel err ${err}`);
    tf.dispose([q, k, v, cache, mask, state]);
  }
  done();
});

/**
 * Attention as a plain float64 loop over host arrays: q [B·T, H·hd] (rows (b, t)), k and v [B, kvH, C, hd]; row b's
 * token t is column at + t (at = C − T) and sees the columns j with first[b] ≤ j ≤ at + t and, with a window W,
 * j > at + t − W; scores are scaled, then soft-capped (c·tanh(s/c)) when `cap` is given. A token that sees no column
 * gets zeros (the kernel's convention for a first forward's left pads).
 */
function attentionLoop(q: Float32Array, k: Float32Array, v: Float32Array, dims: { B: number; T: number; H: number; kvH: number; hd: number; C: number },
  first: readonly number[], scale: number, window: number | null, cap: number | null): Float64Array {
  const { B, T, H, kvH, hd, C } = dims;
  const G = H / kvH;
  const out = new Float64Array(B * T * H * hd);
  for (let b = 0; b < B; b++) {
    for (let t = 0; t < T; t++) {
      const i = C - T + t;
      const lo = window === null ? first[b]! : Math.max(first[b]!, i - window + 1);
      for (let h = 0; h < H; h++) {
        const kvAt = (b * kvH + Math.floor(h / G)) * C;
        const qAt = ((b * T + t) * H + h) * hd;
        const scores: number[] = [];
        for (let j = lo; j <= i; j++) {
          let dot = 0;
          for (let d = 0; d < hd; d++) dot += q[qAt + d]! * scale * k[(kvAt + j) * hd + d]!;
          scores.push(cap === null ? dot : cap * Math.tanh(dot / cap));
        }
        if (scores.length === 0) continue;
        const m = Math.max(...scores);
        const w = scores.map((x) => Math.exp(x - m));
        const sum = w.reduce((a, x) => a + x, 0);
        for (let d = 0; d < hd; d++) {
          let acc = 0;
          w.forEach((x, n) => (acc += x * v[(kvAt + lo + n) * hd + d]!));
          out[qAt + d] = acc / sum;
        }
      }
    }
  }
  return out;
}

test('fused attention of a prompt chunk (T tokens per row) equals a plain loop: causal within the chunk, left pads, cached columns, windows, soft-caps, GQA', async () => {
  const done = leakCheck();
  // [B, kvH, G, T, cached, hd, window, cap]: a first forward (no cached columns) whose rows are left-padded (row b by
  // b·3 tokens, some by the whole chunk but one token), a chunk after cached columns, chunks longer than the 64-wide block,
  // a window narrower than the chunk, a soft-cap; head dims under, at and over the 64-wide workgroup.
  const cases = [[1, 1, 1, 2, 0, 8, null, null], [3, 2, 3, 7, 0, 10, null, null], [2, 1, 4, 70, 0, 16, null, null], [1, 2, 2, 19, 50, 64, null, null],
    [2, 1, 2, 33, 40, 8, 20, 30], [1, 1, 1, 5, 0, 130, 3, null], [3, 1, 1, 9, 0, 12, null, 2]] as const;
  for (const [B, kvH, G, T, cached, hd, window, cap] of cases) {
    const H = kvH * G;
    const C = cached + T;
    const q = rand([B * T, H * hd], C + T, 2) as tf.Tensor2D;
    const k = rand([B, kvH, C, hd], C + 1, 2) as tf.Tensor4D;
    const v = rand([B, kvH, C, hd], C + 2) as tf.Tensor4D;
    // First forward: row b's first valid column is its left padding (at most T − 1); after cached columns, its start.
    const first = Array.from({ length: B }, (_, b) => Math.min(b * (cached === 0 ? 3 : 11), (cached === 0 ? T : C) - 1));
    const state = tf.tensor1d([cached, ...first], 'int32');
    const scale = 1 / Math.sqrt(hd);
    const cache = packKV(k, v, 5);
    const before = webgpuCounts()!.dispatch;
    const out = attentionGpu(q, cache, C, state, H, scale, cap, window);
    assert.equal(webgpuCounts()!.dispatch - before, 1, 'one dispatch');
    assert.deepEqual(out.shape, [B * T, H * hd]);
    const got = await out.data();
    const want = attentionLoop(await q.data() as Float32Array, await k.data() as Float32Array, await v.data() as Float32Array,
      { B, T, H, kvH, hd, C }, first, scale, window, cap);
    const err = maxRelErr(got, want);
    assert.ok(err < 1e-5, `B ${B}, kvH ${kvH}, G ${G}, T ${T}, cached ${cached}, hd ${hd}, window ${window}, cap ${cap}: max rel err ${err}`);
    tf.dispose([q, k, v, cache, state, out]);
  }
  done();
});

test('fused BGMV LoRA delta equals x·A, mask, ·B, add (rank 1 and padded ranks, base rows, one and many adapters)', async () => {
  const done = leakCheck();
  // [N, in, out, k, R]: the row slots cycle through the k adapters and −1 (base).
  for (const [N, inF, outF, k, R] of [[1, 5, 3, 1, 1], [3, 70, 33, 2, 1], [9, 130, 65, 3, 8], [70, 48, 96, 8, 4]] as const) {
    const x = rand([N, inF], N + inF) as tf.Tensor2D;
    const A = rand([inF, k * R], inF) as tf.Tensor2D;
    const B = rand([k * R, outF], outF) as tf.Tensor2D;
    const y = rand([N, outF], N * 3) as tf.Tensor2D;
    const rowSlots = Array.from({ length: N }, (_, n) => ((n + 1) % (k + 1)) - 1); // −1, 0, 1, …, k−1, −1, …
    const slots = tf.tensor1d(rowSlots, 'int32');
    const maskData = new Float32Array(N * k * R);
    rowSlots.forEach((slot, n) => { if (slot >= 0) maskData.fill(1, n * k * R + slot * R, n * k * R + (slot + 1) * R); });
    const mask = tf.tensor2d(maskData, [N, k * R]);
    const err = await compare(() => loraBgmvGpu(x, A, B, y, slots, R),
      () => tf.tidy(() => tf.add(y, tf.matMul(tf.mul(tf.matMul(x, A), mask), B))));
    assert.ok(err < 1e-5, `N ${N}, in ${inF}, out ${outF}, k ${k}, R ${R}: max rel err ${err}`);
    const base = rowSlots.indexOf(-1);
    if (base >= 0) {
      const [row, yRow] = tf.tidy(() => {
        const out = loraBgmvGpu(x, A, B, y, slots, R);
        return [tf.slice(out, [base, 0], [1, outF]), tf.slice(y, [base, 0], [1, outF])];
      });
      assert.deepEqual(await row.data(), await yRow.data(), 'a base row is y unchanged');
      tf.dispose([row, yRow]);
    }
    tf.dispose([x, A, B, y, slots, mask]);
  }
  done();
});

/** A LoRA bank of k adapters of rank R for [inF → outF] and N rows cycling through −1 (base), 0, …, k−1. */
function bank(N: number, inF: number, outF: number, k: number, R: number, seed: number) {
  const rowSlots = Array.from({ length: N }, (_, n) => ((n + 1) % (k + 1)) - 1);
  const maskData = new Float32Array(N * k * R);
  rowSlots.forEach((slot, n) => { if (slot >= 0) maskData.fill(1, n * k * R + slot * R, n * k * R + (slot + 1) * R); });
  return {
    A: rand([inF, k * R], seed) as tf.Tensor2D, B: rand([k * R, outF], seed + 1) as tf.Tensor2D,
    slots: tf.tensor1d(rowSlots, 'int32'), mask: tf.tensor2d(maskData, [N, k * R]), rank: R,
  };
}

test('fused decode linear equals matmul, bias or residual add, LoRA delta, RoPE and the gated activations', async () => {
  const done = leakCheck();
  const hd = 10;
  const freqs = Array.from({ length: hd / 2 }, (_, i) => 1 / 10000 ** ((2 * i) / hd));
  const { cos, sin } = ropeTables(50, [freqs], 1);
  const table = ropeGpuTable(50, [freqs], 1);
  const R = rotateHalfMatrix(hd);
  const gelu = (g: tf.Tensor) => tf.mul(tf.mul(g, 0.5), tf.add(tf.tanh(tf.mul(tf.add(g, tf.mul(tf.pow(g, 3), 0.044715)), Math.sqrt(2 / Math.PI))), 1));
  // [N, in, heads, rank]: 1, 3, 9 and 16 rows (padded to 1, 4, 16 and 16 in the shader); widths 10 to 330, not
  // multiples of the 32-column block; inner sizes below, across and over the x tile (2048 / rows: 2048, 512, 128);
  // LoRA ranks 1 to DECODE_LINEAR_MAX_RANK.
  for (const [N, inF, heads, rank] of [[1, 5, 1, 1], [3, 70, 13, 4], [9, 130, 7, 8], [16, 300, 33, 64], [1, 2100, 4, 16], [3, 515, 3, 2]] as const) {
    const outF = heads * hd;
    const x = rand([N, inF], N + inF) as tf.Tensor2D;
    const W = rand([inF, outF], inF * 2, 0.3) as tf.Tensor2D;
    const U = rand([inF, outF], inF * 3, 0.3) as tf.Tensor2D;
    const b = rand([outF], 11) as tf.Tensor1D;
    const res = rand([N, outF], 12) as tf.Tensor2D;
    const rows = tf.tensor1d(Array.from({ length: N }, (_, n) => (n * 11) % 50), 'int32');
    const lora = bank(N, inF, outF, 3, rank, N);
    const delta = () => tf.matMul(tf.mul(tf.matMul(x, lora.A), lora.mask), lora.B);
    const rope = (y: tf.Tensor2D) => {
      const c = tf.reshape(tf.gather(cos, rows), [N, 1, hd]);
      const s = tf.reshape(tf.gather(sin, rows), [N, 1, hd]);
      const y3 = tf.reshape(y, [N, heads, hd]);
      const rotated = tf.reshape(tf.matMul(tf.reshape(y3, [N * heads, hd]), R), [N, heads, hd]);
      return tf.reshape(tf.add(tf.mul(y3, c), tf.mul(rotated, s)), [N, outF]) as tf.Tensor2D;
    };
    const cases: [string, () => tf.Tensor, () => tf.Tensor][] = [
      ['x·W', () => decodeLinearGpu(x, W), () => tf.matMul(x, W)],
      ['x·W + b', () => decodeLinearGpu(x, W, { addend: b }), () => tf.add(tf.matMul(x, W), b)],
      ['residual + x·W', () => decodeLinearGpu(x, W, { addend: res }), () => tf.add(tf.matMul(x, W), res)],
      ['x·W + LoRA', () => decodeLinearGpu(x, W, { lora }), () => tf.add(tf.matMul(x, W), delta())],
      ['residual + x·W + LoRA', () => decodeLinearGpu(x, W, { addend: res, lora }), () => tf.add(tf.add(tf.matMul(x, W), delta()), res)],
      ['rope(x·W + LoRA)', () => decodeLinearGpu(x, W, { lora, rope: { table, rows } }), () => rope(tf.add(tf.matMul(x, W), delta()))],
      ['rope(x·W + b)', () => decodeLinearGpu(x, W, { addend: b, rope: { table, rows } }), () => rope(tf.add(tf.matMul(x, W), b))],
      ['rope(x·W)', () => decodeLinearGpu(x, W, { rope: { table, rows } }), () => rope(tf.matMul(x, W))],
      ['silu(x·W)·(x·U)', () => decodeLinearGpu(x, W, { up: U }), () => { const g = tf.matMul(x, W); return tf.mul(tf.mul(g, tf.sigmoid(g)), tf.matMul(x, U)); }],
      ['gelu_tanh(x·W)·(x·U)', () => decodeLinearGpu(x, W, { up: U, activation: 'gelu_tanh' }), () => tf.mul(gelu(tf.matMul(x, W)), tf.matMul(x, U))],
    ];
    for (const [name, fused, unfused] of cases) {
      const err = await compare(fused, () => tf.tidy(unfused));
      assert.ok(err < 1e-5, `${name}, N ${N}, in ${inF}, out ${outF}, rank ${rank}: max rel err ${err}`);
    }
    tf.dispose([x, W, U, b, res, rows, lora.A, lora.B, lora.slots, lora.mask]);
  }
  tf.dispose([cos, sin, table, R]);
  done();
});

test('the residual as the fused matmul\'s addend equals matmul then add (rows past the decode kernel\'s)', async () => {
  const done = leakCheck();
  for (const [N, inF, outF] of [[17, 33, 70], [70, 64, 130]] as const) {
    const x = rand([N, inF], N) as tf.Tensor2D;
    const W = rand([inF, outF], inF) as tf.Tensor2D;
    const res = rand([N, outF], outF) as tf.Tensor2D;
    const err = await compare(() => matmulWPlus(x, W, res), () => tf.tidy(() => tf.add(res, tf.matMul(x, W))));
    assert.ok(err < 1e-5, `[${N}, ${inF}]·[${inF}, ${outF}]: max rel err ${err}`);
    tf.dispose([x, W, res]);
  }
  done();
});
