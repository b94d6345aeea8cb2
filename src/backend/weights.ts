/**
 * Weights of x·W products as the backend stores them. The model code stores every such weight through
 * `storeWeight` and multiplies through `matmulW`, never knowing the layout: on most backends a weight is the plain
 * [in, out] tensor; with the wasm backend's native matmul it is a PackedWeight (16-column panels), which is not a
 * tf.Tensor, so no other TensorFlow.js op can be handed one by mistake.
 */
import * as tf from '@tensorflow/tfjs-core';
import { PackedWeight, packWeight } from './wasm/native-matmul.ts';

export type Weight = tf.Tensor2D | PackedWeight;

/** W [in, out] in the layout this thread's backend multiplies fastest; takes ownership of W. */
export function storeWeight(W: tf.Tensor2D): Weight {
  return packWeight(W);
}

/** x·W: x [M, in] → [M, out]. */
export function matmulW(x: tf.Tensor2D, W: Weight): tf.Tensor2D {
  return W instanceof PackedWeight ? W.matmul(x) : tf.matMul(x, W);
}

/** x·W + c, c broadcast to [M, out]: one fused product (tf.fused.matMul's bias) where W is a plain tensor. */
export function matmulWPlus(x: tf.Tensor2D, W: Weight, c: tf.Tensor): tf.Tensor2D {
  return W instanceof PackedWeight ? tf.add<tf.Tensor2D>(W.matmul(x), c) : tf.fused.matMul({ a: x, b: W, bias: c }) as tf.Tensor2D;
}

/** W + delta as a new weight in W's layout (delta [in, out], row-major, is not disposed; W is unchanged). */
export function addToWeight(W: Weight, delta: tf.Tensor2D): Weight {
  return W instanceof PackedWeight ? W.plus(delta) : tf.add<tf.Tensor2D>(W, delta);
}

/** Keeps W out of the enclosing tf.tidy scopes (as tf.keep). */
export function keepWeight<T extends Weight | tf.Tensor>(W: T): T {
  if (W instanceof PackedWeight) W.keep();
  else tf.keep(W);
  return W;
}

/** Whether W is stored in a layout other than row-major [in, out]. */
export const isLaidOut = (W: Weight): boolean => W instanceof PackedWeight;
