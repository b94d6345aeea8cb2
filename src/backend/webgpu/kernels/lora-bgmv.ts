import * as tf from '@tensorflow/tfjs-core';
import { ROW_WORKGROUP, WORKGROUP_REDUCE, runProgram, type WebGPUProgram } from './program.ts';

/** The largest bank rank R the kernel takes (its workgroup copy of one row's x·A). */
export const LORA_BGMV_MAX_RANK = 256;

/**
 * The unmerged multi-adapter LoRA delta of one linear, added to its base output, in one dispatch (Punica's BGMV:
 * each row gathers its own adapter's A and B from the stacked bank through a per-row index). One workgroup per row n
 * with adapter slot s = slots[n] computes t = x[n]·A[:, s·R .. s·R+R] (shrink, a workgroup reduction per rank
 * column), then y[n] + t·B[s·R .. s·R+R, :] (expand); a row with slot −1 (base model) gets y[n] unchanged.
 * The bank layout is src/exec/lora-bank.ts's: A [in, k·R] (adapter a's Aᵀ in columns a·R …), B [k·R, out] (its s·Bᵀ
 * in rows a·R …; ranks below R are zero-padded). Its meaning as the unfused ops, with mask [N, k·R] one on row n's
 * block: `tf.add(y, tf.matMul(tf.mul(tf.matMul(x, A), mask), B))`.
 * x: [N, in]; A: [in, k·R]; B: [k·R, out]; y: [N, out]; slots: int32 [N].
 */
export class LoraBgmvProgram implements WebGPUProgram {
  readonly variableNames = ['x', 'A', 'B', 'y', 'slots'];
  readonly outputShape: number[];
  readonly shaderKey = 'loraServeLoraBgmv';
  readonly dispatchLayout = { x: [0, 1] };
  readonly dispatch: [number, number, number];
  readonly workgroupSize: [number, number, number] = [ROW_WORKGROUP, 1, 1];
  readonly uniforms = 'rank : i32,';

  constructor(rows: number, out: number) {
    this.outputShape = [rows, out];
    this.dispatch = [rows, 1, 1];
  }

  getUserCode(): string {
    const W = ROW_WORKGROUP;
    return `
      ${WORKGROUP_REDUCE}
      var<workgroup> t : array<f32, ${LORA_BGMV_MAX_RANK}>;
      fn main(index : i32) {
        let tid = i32(localId.x);
        let rows = uniforms.outShape[0];
        let outF = uniforms.outShape[1];
        let inF = uniforms.xShape[1];
        let K = uniforms.aShape[1];
        let R = uniforms.rank;
        let n = min(index / ${W}, rows - 1);
        let slot = slots[n];
        let on = select(0.0, 1.0, slot >= 0);
        let col0 = max(slot, 0) * R; // A[:, slot·R], B[slot·R, :]
        for (var r = 0; r < R; r = r + 1) {
          var partial = 0.0;
          for (var i = tid; i < inF; i = i + ${W}) {
            partial = partial + x[n * inF + i] * A[i * K + col0 + r]; // x[n, i] · A[i, slot·R + r]
          }
          let total = reduceSum(partial);
          if (tid == 0) { t[r] = total * on; }
        }
        workgroupBarrier();
        if (index / ${W} >= rows) { return; }
        for (var o = tid; o < outF; o = o + ${W}) {
          var delta = 0.0;
          for (var r = 0; r < R; r = r + 1) {
            delta = delta + t[r] * B[(col0 + r) * outF + o]; // t[r] · B[slot·R + r, o]
          }
          result[n * outF + o] = y[n * outF + o] + delta; // y[n, o] + delta
        }
      }
    `;
  }
}

/**
 * y + the LoRA delta of each row's adapter (BGMV) on the webgpu backend. x [N, in]; A [in, k·R]; B [k·R, out];
 * y [N, out]; slots int32 [N] (−1: no adapter); R at most LORA_BGMV_MAX_RANK. Returns [N, out].
 */
export function loraBgmvGpu(x: tf.Tensor2D, A: tf.Tensor2D, B: tf.Tensor2D, y: tf.Tensor2D, slots: tf.Tensor1D, R: number): tf.Tensor2D {
  const [N, inF] = x.shape;
  const [K, outF] = B.shape;
  if (A.shape[0] !== inF || A.shape[1] !== K || K % R !== 0 || y.shape[0] !== N || y.shape[1] !== outF || slots.shape[0] !== N) {
    throw new Error(`loraBgmv: x [${x.shape}], A [${A.shape}], B [${B.shape}], y [${y.shape}], slots [${slots.shape}] with rank ${R} do not fit`);
  }
  if (R > LORA_BGMV_MAX_RANK) throw new Error(`loraBgmv: rank ${R} is over ${LORA_BGMV_MAX_RANK}`);
  return runProgram(new LoraBgmvProgram(N, outF), [x, A, B, y, slots], [{ type: 'int32', data: [R] }]);
}
