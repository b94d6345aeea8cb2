import * as tf from '@tensorflow/tfjs-core';
import { LORA_BGMV_MAX_RANK } from './lora-bgmv.ts';
import { ROW_WORKGROUP, WORKGROUP_REDUCE, runProgram, type WebGPUProgram } from './program.ts';

/** Rows up to which a product runs as this kernel (a decode step's rows); more rows go to tfjs's tiled matmul. */
export const DECODE_LINEAR_MAX_ROWS = 16;

/** What one decode-linear dispatch folds in besides x·W (each a compile-time variant of the shader). */
export interface DecodeLinearParts {
  /** Added to x·W: a bias [out] or a full [N, out] tensor (the residual stream). */
  readonly addend?: tf.Tensor1D | tf.Tensor2D;
  /** The rows' unmerged LoRA delta: the bank's A [in, k·R] and B [k·R, out], rows' blocks `slots` (−1: none). */
  readonly lora?: { readonly A: tf.Tensor2D; readonly B: tf.Tensor2D; readonly slots: tf.Tensor1D; readonly rank: number };
  /** Rotates each head of the result (RoPE, rotate_half convention) at rows `rows` of the cos | sin table (rope.ts). */
  readonly rope?: { readonly table: tf.Tensor2D; readonly rows: tf.Tensor1D };
  /** silu(x·W) · (x·up), the gated MLP's activation (without addend, LoRA or rope). */
  readonly up?: tf.Tensor2D;
}

type Variant = { addend: 'none' | 'bias' | 'full'; lora: boolean; rope: boolean; gated: boolean };

/**
 * A decode step's projection of a few rows as one matrix-vector kernel with what follows it folded in. One
 * workgroup per (row n, block of 64 output columns); each invocation computes its column o over the whole input row.
 * Its meaning as the unfused ops, y = x·W:
 * - addend c: `tf.add(y, c)`;
 * - LoRA (Punica's BGMV, as lora-bgmv.ts): `tf.add(y, tf.matMul(tf.mul(tf.matMul(x, A), mask), B))`, the workgroup
 *   computing its row's x·A[:, slot·R ..] once, into workgroup memory;
 * - rope: rope.ts's `ropeGpu(y, table, rows)` (the invocation also computes the partner column o ± hd/2);
 * - up: `tf.mul(tf.mul(y, tf.sigmoid(y)), tf.matMul(x, up))`.
 * The addend and LoRA delta are added before the rotation, as linear() then applyRope() do.
 * x: [N, in]; W (and up): [in, out]; result [N, out]. WebGPU binds at most 8 storage buffers per kernel (7 inputs):
 * rope with both LoRA and an addend is refused.
 */
export class DecodeLinearProgram implements WebGPUProgram {
  readonly variableNames: string[];
  readonly outputShape: number[];
  readonly shaderKey: string;
  readonly dispatchLayout = { x: [0, 1] };
  readonly dispatch: [number, number, number];
  readonly workgroupSize: [number, number, number] = [ROW_WORKGROUP, 1, 1];
  readonly uniforms = 'rank : i32,';

  constructor(rows: number, out: number, private readonly v: Variant) {
    this.outputShape = [rows, out];
    this.dispatch = [rows * Math.ceil(out / ROW_WORKGROUP), 1, 1];
    this.variableNames = ['x', 'W',
      ...(v.gated ? ['U'] : []),
      ...(v.addend !== 'none' ? ['c'] : []),
      ...(v.lora ? ['A', 'B', 'slots'] : []),
      ...(v.rope ? ['ropeTable', 'ropeRows'] : [])];
    this.shaderKey = `loraServeDecodeLinear_${v.addend}_${v.lora}_${v.rope}_${v.gated}`;
  }

  getUserCode(): string {
    const { addend, lora, rope, gated } = this.v;
    const W = ROW_WORKGROUP;
    return `
      ${lora ? WORKGROUP_REDUCE : ''}
      ${lora ? `var<workgroup> t : array<f32, ${LORA_BGMV_MAX_RANK}>;` : ''}
      // Σ_d x[n, d] · M[d, col] for M = W${gated ? ' or U' : ''}.
      fn matvec(n : i32, col : i32, up : bool) -> f32 {
        let inF = uniforms.xShape[1];
        let outF = uniforms.outShape[1];
        var acc = 0.0;
        for (var d = 0; d < inF; d = d + 1) {
          ${gated ? 'let m = select(W[d * outF + col], U[d * outF + col], up);' : 'let m = W[d * outF + col];'} // M[d, col]
          acc = acc + x[n * inF + d] * m; // x[n, d]
        }
        return acc;
      }
      // Column col of row n before any rotation: x·W + addend + LoRA delta.
      fn column(n : i32, col : i32, col0 : i32) -> f32 {
        let outF = uniforms.outShape[1];
        var v = matvec(n, col, false);
        ${addend === 'bias' ? 'v = v + c[col]; // c[col]' : ''}
        ${addend === 'full' ? 'v = v + c[n * outF + col]; // c[n, col]' : ''}
        ${lora ? `for (var r = 0; r < uniforms.rank; r = r + 1) {
          v = v + t[r] * B[(col0 + r) * outF + col]; // t[r] · B[slot·R + r, col]
        }` : ''}
        return v;
      }
      fn main(index : i32) {
        let tid = i32(localId.x);
        let rows = uniforms.outShape[0];
        let outF = uniforms.outShape[1];
        let blocks = (outF + ${W - 1}) / ${W};
        let wg = min(index / ${W}, rows * blocks - 1);
        let n = wg / blocks; // all of a workgroup's invocations share the row
        let o = (wg % blocks) * ${W} + tid;
        var col0 = 0;
        ${lora ? `
        let inF = uniforms.xShape[1];
        let K = uniforms.aShape[1];
        let R = uniforms.rank;
        let slot = slots[n];
        let on = select(0.0, 1.0, slot >= 0);
        col0 = max(slot, 0) * R; // A[:, slot·R], B[slot·R, :]
        for (var r = 0; r < R; r = r + 1) {
          var partial = 0.0;
          for (var i = tid; i < inF; i = i + ${W}) {
            partial = partial + x[n * inF + i] * A[i * K + col0 + r]; // x[n, i] · A[i, slot·R + r]
          }
          let total = reduceSum(partial);
          if (tid == 0) { t[r] = total * on; }
        }
        workgroupBarrier();` : ''}
        if (index / ${W} >= rows * blocks || o >= outF) { return; }
        ${gated ? `
        let g = matvec(n, o, false);
        let value = g * (1.0 / (1.0 + exp(-g))) * matvec(n, o, true);` : rope ? `
        let hd = uniforms.ropeTableShape[1] / 2;
        let half = hd / 2;
        let i = o % hd; // column i of its head
        let first = i < half;
        let partner = column(n, select(o - half, o + half, first), col0); // y[n, o ± half]
        let rotated = select(partner, -partner, first);
        let at = ropeRows[n] * 2 * hd + i; // ropeTable[ropeRows[n], i]: cos; [.., hd + i]: sin
        let value = column(n, o, col0) * ropeTable[at] + rotated * ropeTable[at + hd];` : `
        let value = column(n, o, col0);`}
        result[n * outF + o] = value;
      }
    `;
  }
}

/** x·W with `parts` folded in (see DecodeLinearProgram), on the webgpu backend: [N, out]. */
export function decodeLinearGpu(x: tf.Tensor2D, W: tf.Tensor2D, parts: DecodeLinearParts = {}): tf.Tensor2D {
  const [N, inF] = x.shape;
  const [wIn, outF] = W.shape;
  const { addend, lora, rope, up } = parts;
  const fail = (why: string) => new Error(`decodeLinear: ${why} (x [${x.shape}], W [${W.shape}])`);
  if (wIn !== inF) throw fail('inner dimensions differ');
  if (up && (addend || lora || rope || up.shape[0] !== inF || up.shape[1] !== outF)) throw fail('up takes no addend, LoRA or rope, and has W\'s shape');
  if (addend && addend.shape.at(-1) !== outF) throw fail(`addend [${addend.shape}] does not end in ${outF}`);
  if (addend?.rank === 2 && addend.shape[0] !== N) throw fail(`addend [${addend.shape}] has not ${N} rows`);
  if (lora && (lora.A.shape[0] !== inF || lora.B.shape[1] !== outF || lora.rank > LORA_BGMV_MAX_RANK)) throw fail('LoRA bank does not fit');
  if (rope && outF % (rope.table.shape[1] / 2) !== 0) throw fail(`width is not a multiple of head_dim ${rope.table.shape[1] / 2}`);
  if (rope && lora && addend) throw fail('rope with both LoRA and an addend needs more than 8 storage buffers');
  const variant: Variant = { addend: !addend ? 'none' : addend.rank === 1 ? 'bias' : 'full', lora: !!lora, rope: !!rope, gated: !!up };
  const inputs: tf.Tensor[] = [x, W, ...(up ? [up] : []), ...(addend ? [addend] : []),
    ...(lora ? [lora.A, lora.B, lora.slots] : []), ...(rope ? [rope.table, rope.rows] : [])];
  return runProgram(new DecodeLinearProgram(N, outF, variant), inputs, [{ type: 'int32', data: [lora?.rank ?? 0] }]);
}
