/**
 * Command-buffer submits of the webgpu backend. tfjs-backend-webgpu records dispatches into one command encoder and
 * submits it every WEBGPU_DEFERRED_SUBMIT_BATCH_SIZE dispatches (15 by default) and at each readback or buffer copy.
 * A tensor disposed before the submit that follows its last use keeps its buffer until then (tfjs then returns it to
 * its pool of buffers by size, which it never shrinks), so the longer the batch, the more of a step's intermediates
 * are held at once.
 */
import * as tf from '@tensorflow/tfjs-core';

const FLAG = 'WEBGPU_DEFERRED_SUBMIT_BATCH_SIZE';

/** tfjs-backend-webgpu's default batch: a submit every 15 dispatches. */
export const TFJS_SUBMIT_BATCH = 15;

/** The batch size in force before the first whole-step batch (a value the user set is kept). */
let saved: number | null = null;

/**
 * How the dispatches from now on are batched into submits (call only on the webgpu backend). `wholeStep`, for a
 * decode step's forward and readback: no submit before the step's readback, so the step is one submit, holding its
 * intermediates (a few [rows, width] activations per layer, and on the steps after the KV cache grew the old caches
 * whose copies tfjs had not submitted yet) until it; otherwise the batch size in force before (tfjs's default of 15 unless set), which a prefill
 * keeps since its intermediates (every layer's [rows, heads, T, C] attention scores among them) would all be held at
 * once, and which the executor restores after each step's readback.
 */
export function batchSubmits(wholeStep: boolean): void {
  if (wholeStep) {
    saved ??= tf.env().getNumber(FLAG);
    tf.env().set(FLAG, Number.POSITIVE_INFINITY);
  } else {
    tf.env().set(FLAG, saved ?? tf.env().getNumber(FLAG));
  }
}
