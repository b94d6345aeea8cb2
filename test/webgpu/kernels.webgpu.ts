/**
 * The fused WebGPU kernels (src/backend/webgpu/kernels/) against the unfused TensorFlow.js ops they replace, on the
 * webgpu backend, on odd shapes: rows not a multiple of the 64-wide workgroup, widths not a multiple of it either,
 * GQA ratios other than 1, LoRA rank 1. test/webgpu.test.ts runs this file with TEST_BACKEND=webgpu.
 */
import { before, test } from 'node:test';
import assert from 'node:assert/strict';
import * as tf from '@tensorflow/tfjs-core';
import { webgpuCounts } from '../../src/backend/webgpu/counters.ts';
import { layerNormGpu } from '../../src/backend/webgpu/kernels/layer-norm.ts';
import { rmsNormGpu } from '../../src/backend/webgpu/kernels/rms-norm.ts';
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
