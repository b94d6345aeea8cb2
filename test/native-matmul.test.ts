/**
 * src/backend/wasm/addon/matmul.cc through src/backend/wasm/native-matmul.ts: products against plain float64 loops (every kernel path: one
 * row, row blocks with tails, packed panels, column tails, k blocks, batches, transposed B), rows that do not depend
 * on the rest of the batch (bit for bit), the tfjs kernel it replaces (same products, fallbacks, no leaked tensors).
 */
import { before, test } from 'node:test';
import assert from 'node:assert/strict';
import * as tf from '@tensorflow/tfjs-core';
import { initBackend } from '../src/backend/select.ts';
import { toDeviceLayout } from '../src/lora/adapter-file.ts';
import { nativeAddon, nativeMatmulUnavailable } from '../src/backend/wasm/addon/addon.ts';
import { installNativeMatmul, PackedWeight, packWeight, planOf } from '../src/backend/wasm/native-matmul.ts';
import { addToWeight, matmulW, storeWeight } from '../src/backend/weights.ts';
import { setupBackend } from './helpers/tf.ts';

const native = process.env.TEST_NATIVE_MATMUL !== '0';

before(async () => {
  await setupBackend();
});

/** Deterministic values in [-1, 1). */
function values(n: number, seed: number): Float32Array {
  const out = new Float32Array(n);
  let s = seed >>> 0 || 1;
  for (let i = 0; i < n; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    out[i] = s / 2 ** 31 - 1;
  }
  return out;
}

/** C[b] = A[b]·B[b] (B[b] given [N, K] when transposeB) in float64, and the bound Σ|a·b| per entry. */
function reference(A: Float32Array, B: Float32Array, batch: number, M: number, K: number, N: number, sa: number, sb: number, transposeB: boolean) {
  const C = new Float64Array(batch * M * N);
  const bound = new Float64Array(batch * M * N);
  for (let b = 0; b < batch; b++) {
    for (let i = 0; i < M; i++) {
      for (let j = 0; j < N; j++) {
        let acc = 0;
        let abs = 0;
        for (let k = 0; k < K; k++) {
          const p = A[b * sa + i * K + k]! * B[b * sb + (transposeB ? j * K + k : k * N + j)]!;
          acc += p;
          abs += Math.abs(p);
        }
        C[(b * M + i) * N + j] = acc;
        bound[(b * M + i) * N + j] = abs;
      }
    }
  }
  return { C, bound };
}

/** Runs the addon on operands laid out in one heap, as the wasm backend's are. */
function runAddon(A: Float32Array, B: Float32Array, batch: number, M: number, K: number, N: number, sa: number, sb: number, transposeB: boolean): Float32Array {
  const addon = nativeAddon()!;
  const heap = new Uint8Array(4 * (A.length + B.length + batch * M * N) + 64);
  const f = new Float32Array(heap.buffer);
  const aOff = 16; // a non-zero, 4-aligned (not 32-aligned) offset: the kernels use unaligned loads
  const bOff = aOff + 4 * A.length;
  const cOff = bOff + 4 * B.length;
  f.set(A, aOff / 4);
  f.set(B, bOff / 4);
  f.fill(Number.NaN, cOff / 4); // the first k block must overwrite, not accumulate
  addon.matmul(heap, aOff, bOff, cOff, batch, M, K, N, sa, sb, transposeB);
  return f.slice(cOff / 4, cOff / 4 + batch * M * N);
}

test('the native addon is built by npm ci and usable on this CPU', { skip: !native && 'TEST_NATIVE_MATMUL=0' }, () => {
  assert.ok(nativeAddon(), `native matmul unavailable: ${nativeMatmulUnavailable()}`);
  assert.equal(installNativeMatmul(), true);
});

test('products match float64 loops on every kernel path', { skip: !native && 'TEST_NATIVE_MATMUL=0' }, () => {
  // M: one row (8-vector kernel), row-block tails 1..5, full blocks, > 32 rows (packed panels).
  // K: 1, odd, one k block (256), two blocks with a short second one. N: < 8 (scalar tail), 8/16 blocks, mixes, ≥ 64.
  const shapes: [number, number, number][] = [];
  for (const M of [1, 2, 5, 6, 7, 13, 40]) for (const K of [1, 7, 256, 300]) for (const N of [1, 7, 8, 17, 24, 64, 75]) shapes.push([M, K, N]);
  let seed = 1;
  for (const [M, K, N] of shapes) {
    for (const transposeB of [false, true]) {
      const A = values(M * K, seed++);
      const B = values(K * N, seed++);
      const got = runAddon(A, B, 1, M, K, N, 0, 0, transposeB);
      const { C, bound } = reference(A, B, 1, M, K, N, 0, 0, transposeB);
      for (let i = 0; i < C.length; i++) {
        // float32 accumulation over K terms: |error| ≤ K·ε·Σ|a·b| (loose, but catches any wrong or missing term).
        assert.ok(Math.abs(got[i]! - C[i]!) <= 1e-6 * K * bound[i]! + 1e-30, `M=${M} K=${K} N=${N} tB=${transposeB} entry ${i}: ${got[i]} vs ${C[i]}`);
      }
    }
  }
});

test('batched products: per-entry operands, and one B shared by every entry', { skip: !native && 'TEST_NATIVE_MATMUL=0' }, () => {
  const [batch, M, K, N] = [3, 5, 19, 21];
  for (const [sa, sb] of [[M * K, K * N], [M * K, 0], [0, K * N]] as const) {
    for (const transposeB of [false, true]) {
      const A = values((sa ? batch : 1) * M * K, 7);
      const B = values((sb ? batch : 1) * K * N, 8);
      const got = runAddon(A, B, batch, M, K, N, sa, sb, transposeB);
      const { C, bound } = reference(A, B, batch, M, K, N, sa, sb, transposeB);
      for (let i = 0; i < C.length; i++) assert.ok(Math.abs(got[i]! - C[i]!) <= 1e-6 * K * bound[i]!, `sa=${sa} sb=${sb} tB=${transposeB} entry ${i}`);
    }
  }
});

test('a row\'s result does not depend on the other rows of the call (bit for bit)', { skip: !native && 'TEST_NATIVE_MATMUL=0' }, () => {
  for (const [K, N] of [[300, 75], [768, 128]] as const) {
    const B = values(K * N, 3);
    const A = values(48 * K, 4);
    const all = runAddon(A, B, 1, 48, K, N, 0, 0, false); // 48 rows: packed panels
    for (const M of [1, 3, 6, 16]) {
      const part = runAddon(A.subarray(0, M * K), B, 1, M, K, N, 0, 0, false);
      assert.deepEqual(part, all.subarray(0, M * N), `the first ${M} rows alone, K=${K} N=${N}`);
    }
    const last = runAddon(A.subarray(47 * K), B, 1, 1, K, N, 0, 0, false);
    assert.deepEqual(last, all.subarray(47 * N), 'the last row alone');
  }
});

test('bad calls throw a coded error instead of touching memory outside the heap', { skip: !native && 'TEST_NATIVE_MATMUL=0' }, () => {
  const addon = nativeAddon()!;
  const heap = new Uint8Array(1024);
  assert.throws(() => addon.matmul(heap, 0, 512, 772, 1, 8, 8, 8, 0, 0, false), (e: Error & { code?: string }) => e.code === 'NATIVE_MATMUL' && /outside the heap/.test(e.message));
  assert.throws(() => addon.matmul(heap, 2, 0, 0, 1, 1, 1, 1, 0, 0, false), /aligned/);
  assert.throws(() => addon.matmul(heap, -4, 0, 0, 1, 1, 1, 1, 0, 0, false), /non-negative integers/);
  assert.throws(() => (addon.matmul as (...a: unknown[]) => void)(new Float32Array(4), 0, 0, 0, 1, 1, 1, 1, 0, 0, false), /Uint8Array/);
});

test('tf.matMul on wasm runs through the addon, matches the wasm kernel, and falls back for what it does not cover', { skip: !native && 'TEST_NATIVE_MATMUL=0' }, () => {
  assert.equal(tf.getBackend(), 'wasm');
  const before = tf.memory().numTensors;
  const cases: { a: number[]; b: number[]; tA?: boolean; tB?: boolean }[] = [
    { a: [16, 96], b: [96, 40] },
    { a: [2, 3, 5, 24], b: [2, 3, 9, 24], tB: true }, // attention scores: batched, transposed B
    { a: [2, 3, 5, 9], b: [2, 3, 9, 24] }, // attention output: batched
    { a: [4, 7, 24], b: [24, 10] }, // B broadcast over A's batch
    { a: [24, 10], b: [4, 10, 7] }, // A broadcast over B's batch
    { a: [24, 10], b: [24, 7], tA: true }, // transposeA: the wasm kernel
  ];
  const original = tf.getKernel(tf.BatchMatMul, 'wasm')!;
  for (const c of cases) {
    tf.tidy(() => {
      const a = tf.tensor(values(c.a.reduce((x, y) => x * y), 11), c.a);
      const b = tf.tensor(values(c.b.reduce((x, y) => x * y), 12), c.b);
      const got = tf.matMul(a, b, c.tA ?? false, c.tB ?? false);
      const plan = planOf(a, b, c.tA ?? false, c.tB ?? false);
      assert.equal(plan === null, c.tA === true, `${JSON.stringify(c)}: native unless transposeA`);
      // The wasm kernel the addon replaced, called directly, on the same inputs.
      const info = original.kernelFunc({ inputs: { a, b }, backend: tf.backend(), attrs: { transposeA: c.tA ?? false, transposeB: c.tB ?? false } }) as tf.TensorInfo;
      const want = tf.engine().makeTensorFromTensorInfo(info);
      assert.deepEqual(got.shape, want.shape, JSON.stringify(c));
      const g = got.dataSync();
      const w = want.dataSync();
      for (let i = 0; i < w.length; i++) assert.ok(Math.abs(g[i]! - w[i]!) <= 1e-5 * Math.max(1, Math.abs(w[i]!)), `${JSON.stringify(c)} entry ${i}: ${g[i]} vs ${w[i]}`);
    });
  }
  assert.equal(tf.memory().numTensors, before, 'no tensor outlives the products');
  assert.throws(() => tf.matMul(tf.zeros([2, 3]), tf.zeros([4, 5])), /inner shapes/, 'a shape mismatch still gets tfjs\'s error');
});

test('planOf: output shapes and strides for the shapes the model uses', () => {
  const t = (shape: number[]) => ({ dataId: {}, shape, dtype: 'float32' as const });
  assert.deepEqual(planOf(t([16, 768]), t([768, 2048]), false, false), { outShape: [16, 2048], batch: 1, M: 16, K: 768, N: 2048, aStride: 0, bStride: 0 });
  assert.deepEqual(planOf(t([2, 4, 3, 64]), t([2, 4, 9, 64]), false, true), { outShape: [2, 4, 3, 9], batch: 8, M: 3, K: 64, N: 9, aStride: 192, bStride: 576 });
  assert.deepEqual(planOf(t([5, 2, 8]), t([8, 3]), false, false), { outShape: [5, 2, 3], batch: 5, M: 2, K: 8, N: 3, aStride: 16, bStride: 0 });
  assert.equal(planOf(t([2, 3, 4]), t([3, 4, 5]), false, false), null, 'mismatched batches: the wasm kernel broadcasts or reports');
  assert.equal(planOf(t([2, 3]), t([3, 4]), true, false), null);
  assert.equal(planOf({ ...t([2, 3]), dtype: 'int32' }, t([3, 4]), false, false), null);
});

test('initBackend records whether the matmuls run natively (TEST_NATIVE_MATMUL=0 runs the suite on the wasm kernels)', async () => {
  // initBackend runs once per process: the choice is recorded on the first call, so ask what it recorded.
  const info = await initBackend((process.env.TEST_BACKEND as 'wasm' | 'cpu' | undefined) ?? 'wasm', { nativeMatmul: native });
  assert.equal(info.nativeMatmul, native && info.name === 'wasm');
});

test('the addon\'s adapter layout equals toDeviceLayout bit for bit, and reports non-finite values', { skip: !native && 'TEST_NATIVE_MATMUL=0' }, () => {
  const addon = nativeAddon()!;
  for (const [r, inF, outF, s] of [[8, 768, 256, 2], [3, 5, 7, 0.7071067811865476], [1, 1, 1, 16 / 3]] as const) {
    const A = values(r * inF, r + 1);
    const B = values(outF * r, r + 2);
    const jsAt = new Float32Array(inF * r);
    const jsBt = new Float32Array(r * outF);
    const nAt = new Float32Array(inF * r);
    const nBt = new Float32Array(r * outF);
    assert.equal(toDeviceLayout(A, B, r, inF, outF, s, jsAt, jsBt), true);
    assert.equal(addon.layout(A, B, r, inF, outF, s, nAt, nBt), true);
    assert.deepEqual(nAt, jsAt, `At, r=${r}`);
    assert.deepEqual(nBt, jsBt, `Bt, r=${r} s=${s}`);
    for (const bad of [Number.NaN, Number.POSITIVE_INFINITY]) {
      const B2 = B.slice();
      B2[B2.length - 1] = bad;
      assert.equal(addon.layout(A, B2, r, inF, outF, s, nAt, nBt), false);
      assert.equal(toDeviceLayout(A, B2, r, inF, outF, s, jsAt, jsBt), false);
    }
  }
  assert.throws(() => addon.layout(new Float32Array(4), new Float32Array(4), 2, 2, 3, 1, new Float32Array(4), new Float32Array(6)), /lengths/);
  assert.throws(() => (addon.layout as (...a: unknown[]) => boolean)(new Float64Array(4), new Float32Array(4), 2, 2, 2, 1, new Float32Array(4), new Float32Array(4)), /Float32Arrays/);
});

/** B [K, N] row-major in the addon's packed panel layout, by plain loops. */
function packedLayout(B: Float32Array, K: number, N: number): Float32Array {
  const P = new Float32Array(K * N);
  for (let j = 0; j < N; j += 16) for (let k = 0; k < K; k++) for (let c = 0; c < 16; c++) P[j * K + k * 16 + c] = B[k * N + j + c]!;
  return P;
}

test('packed B: pack writes the panel layout, and products on it equal the row-major ones bit for bit', { skip: !native && 'TEST_NATIVE_MATMUL=0' }, () => {
  const addon = nativeAddon()!;
  for (const [K, N] of [[1, 16], [17, 48], [300, 32], [513, 64]] as const) {
    const B = values(K * N, K + N);
    const heap = new Uint8Array(8 * K * N + 32);
    const f = new Float32Array(heap.buffer);
    f.set(B, 4);
    addon.pack(heap, 16, 16 + 4 * K * N, K, N);
    assert.deepEqual(f.slice(4 + K * N, 4 + 2 * K * N), packedLayout(B, K, N), `pack ${K}×${N}`);
    for (const M of [1, 2, 3, 4, 5, 6, 7, 16, 33, 40]) {
      const A = values(M * K, M * 7 + K);
      const rowMajor = runAddon(A, B, 1, M, K, N, 0, 0, false);
      const heap2 = new Uint8Array(4 * (A.length + B.length + M * N) + 64);
      const g = new Float32Array(heap2.buffer);
      const aOff = 16;
      const bOff = aOff + 4 * A.length;
      const cOff = bOff + 4 * B.length;
      g.set(A, aOff / 4);
      g.set(packedLayout(B, K, N), bOff / 4);
      g.fill(Number.NaN, cOff / 4);
      addon.matmul(heap2, aOff, bOff, cOff, 1, M, K, N, 0, 0, false, true);
      const got = g.slice(cOff / 4, cOff / 4 + M * N);
      assert.ok(got.every((v, i) => Object.is(v, rowMajor[i])), `M ${M}, K ${K}, N ${N}: packed differs from row-major`);
    }
  }
  const heap = new Uint8Array(4096);
  assert.throws(() => addon.pack(heap, 0, 1024, 4, 8), /multiple of 16/);
  assert.throws(() => addon.pack(heap, 0, 128, 4, 16), /overlap/);
  assert.throws(() => addon.pack(heap, 0, 2048, 40, 16), /outside the heap/);
  assert.throws(() => addon.matmul(heap, 0, 0, 512, 1, 1, 4, 16, 0, 0, true, true), /never transposed/);
  assert.throws(() => addon.matmul(heap, 0, 0, 512, 1, 1, 4, 8, 0, 0, false, true), /multiple of 16/);
});

test('PackedWeight: its products equal the row-major ones bit for bit; other ops cannot take it, and the kernel refuses its tensor anywhere but as b', { skip: !native && 'TEST_NATIVE_MATMUL=0' }, () => {
  const before = tf.memory();
  const W = tf.tensor2d(values(96 * 48, 5), [96, 48]);
  const rowMajor = W.clone();
  const P = storeWeight(W);
  assert.ok(P instanceof PackedWeight && W.isDisposed, 'a PackedWeight; the row-major tensor disposed');
  assert.deepEqual(P.shape, [96, 48]);
  const delta = tf.tensor2d(values(96 * 48, 9), [96, 48]);
  const merged = addToWeight(P, delta);
  assert.ok(merged instanceof PackedWeight, 'W + delta stays packed (merged LoRA weights)');
  for (const rows of [1, 3, 16, 40]) {
    tf.tidy(() => {
      const x = tf.tensor2d(values(rows * 96, rows), [rows, 96]);
      const want = tf.matMul(x, rowMajor).dataSync();
      assert.ok(matmulW(x, P).dataSync().every((v, i) => Object.is(v, want[i])), `${rows} rows`);
      const wantMerged = tf.matMul(x, tf.add(rowMajor, delta)).dataSync();
      assert.ok(matmulW(x, merged).dataSync().every((v, i) => Object.is(v, wantMerged[i])), `${rows} rows, merged`);
    });
  }
  // Any TensorFlow.js op is a type error on a PackedWeight (the lines below would not compile without the directive) …
  // @ts-expect-error a PackedWeight is not a tf.Tensor
  assert.throws(() => tf.slice(P, [0, 0], [1, 1]));
  // … and the kernel refuses the packed tensor in any other place of a product.
  const t = PackedWeight.kernelInput(P) as tf.Tensor2D;
  assert.throws(() => tf.tidy(() => tf.matMul(tf.ones([2, 48]), t, false, true)), /packed weight/, 'transposed');
  assert.throws(() => tf.tidy(() => tf.matMul(t, tf.ones([48, 2]))), /packed weight/, 'as the a operand');
  const odd = tf.ones([8, 24]) as tf.Tensor2D;
  assert.equal(packWeight(odd), odd, 'N not a multiple of 16: left row-major');
  assert.throws(() => PackedWeight.pack(odd), /cannot pack/);
  odd.dispose();
  for (const w of [P, merged, delta, rowMajor]) w.dispose();
  const after = tf.memory();
  assert.deepEqual([after.numTensors, after.numBytes], [before.numTensors, before.numBytes], 'nothing leaked');
});
