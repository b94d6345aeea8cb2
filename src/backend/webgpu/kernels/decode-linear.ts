import * as tf from '@tensorflow/tfjs-core';
import { runProgram, type WebGPUProgram } from './program.ts';

/** Rows up to which a product runs as this kernel (a decode step's rows); more rows go to tfjs's tiled matmul. */
export const DECODE_LINEAR_MAX_ROWS = 16;

/** The largest bank rank R the kernel folds in (its workgroup copy of every row's x·A); larger ranks go to lora-bgmv.ts. */
export const DECODE_LINEAR_MAX_RANK = 64;

/** Invocations of a workgroup: COLUMNS output columns × SLICES slices of the inner dimension. */
const WORKGROUP = 256;
/** Output columns of a workgroup, adjacent invocations on adjacent columns (coalesced reads of W's rows). */
const COLUMNS = 32;
/** Invocations sharing a column, each summing every SLICES-th element of the inner dimension. */
const SLICES = WORKGROUP / COLUMNS;
/** Floats of the workgroup's tile of x (rows × a block of the inner dimension); reused for the sums across slices. */
const X_TILE = 2048;

/** The activation of the gated MLP: SiLU (Llama's SwiGLU) or gelu's tanh approximation (Gemma's GeGLU). */
export type GatedActivation = 'silu' | 'gelu_tanh';

/** What one decode-linear dispatch folds in besides x·W (each a compile-time variant of the shader). */
export interface DecodeLinearParts {
  /** Added to x·W: a bias [out] or a full [N, out] tensor (the residual stream). */
  readonly addend?: tf.Tensor1D | tf.Tensor2D;
  /** The rows' unmerged LoRA delta: the bank's A [in, k·R] and B [k·R, out], rows' blocks `slots` (−1: none). */
  readonly lora?: { readonly A: tf.Tensor2D; readonly B: tf.Tensor2D; readonly slots: tf.Tensor1D; readonly rank: number };
  /** Rotates each head of the result (RoPE, rotate_half convention) at rows `rows` of the cos | sin table (rope.ts). */
  readonly rope?: { readonly table: tf.Tensor2D; readonly rows: tf.Tensor1D };
  /** act(x·W) · (x·up), the gated MLP's activation (without addend, LoRA or rope); act SiLU unless `activation`. */
  readonly up?: tf.Tensor2D;
  readonly activation?: GatedActivation;
}

type Variant = { addend: 'none' | 'bias' | 'full'; lora: boolean; rope: boolean; gated: GatedActivation | null };

/** The rows the shader is compiled for: N rounded up to a power of two (the padding rows' x are zeros). */
function rowBucket(rows: number): number {
  let r = 1;
  while (r < rows) r *= 2;
  return r;
}

/**
 * A decode step's projection of its few rows (N ≤ 16) as one matrix-vector kernel with what follows it folded in.
 * Each workgroup computes a block of 32 output columns for all N rows, so each element of W is read once per step:
 * its 256 invocations are 32 columns × 8 slices of the inner dimension; the rows' x are staged block by block in
 * workgroup memory, each invocation keeps one sum per row in registers over its slice (d ≡ slice mod 8) and the
 * slices' sums are added through workgroup memory. Adjacent invocations read adjacent columns of a row of W.
 * Its meaning as the unfused ops, y = x·W:
 * - addend c: `tf.add(y, c)`;
 * - LoRA (Punica's BGMV, as lora-bgmv.ts): `tf.add(y, tf.matMul(tf.mul(tf.matMul(x, A), mask), B))`, the workgroup
 *   computing every row's x·A[:, slot·R ..] (R ≤ DECODE_LINEAR_MAX_RANK) into workgroup memory;
 * - rope: rope.ts's `ropeGpu(y, table, rows)` (a workgroup's 32 columns are 16 rotation pairs (i, i + hd/2) of
 *   its heads, so each column's partner is in the workgroup);
 * - up: `tf.mul(act(y), tf.matMul(x, up))`, act silu `tf.mul(y, tf.sigmoid(y))` or gelu_tanh
 *   `0.5·y·(1 + tanh(√(2/π)·(y + 0.044715·y³)))`.
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
  readonly workgroupSize: [number, number, number] = [WORKGROUP, 1, 1];
  readonly uniforms = 'rank : i32,';
  private readonly rows: number;

  constructor(rows: number, out: number, private readonly v: Variant) {
    if (rows > DECODE_LINEAR_MAX_ROWS) throw new Error(`DecodeLinearProgram: ${rows} rows, over ${DECODE_LINEAR_MAX_ROWS}`);
    this.rows = rowBucket(rows);
    this.outputShape = [rows, out];
    this.dispatch = [Math.ceil(out / COLUMNS), 1, 1];
    this.variableNames = ['x', 'W',
      ...(v.gated ? ['U'] : []),
      ...(v.addend !== 'none' ? ['c'] : []),
      ...(v.lora ? ['A', 'B', 'slots'] : []),
      ...(v.rope ? ['ropeTable', 'ropeRows'] : [])];
    this.shaderKey = `loraServeDecodeLinear_${this.rows}_${v.addend}_${v.lora}_${v.rope}_${v.gated}`;
  }

  getUserCode(): string {
    const { addend, lora, rope, gated } = this.v;
    const RR = this.rows;
    const KT = X_TILE / RR; // a multiple of SLICES
    const HALF = COLUMNS / 2;
    return `
      var<workgroup> xs : array<f32, ${X_TILE}>;
      var<workgroup> ys : array<f32, ${RR * COLUMNS}>;
      ${gated ? `var<workgroup> us : array<f32, ${RR * COLUMNS}>;` : ''}
      ${lora ? `var<workgroup> lt : array<f32, ${RR * DECODE_LINEAR_MAX_RANK}>;` : ''}
      // The output column of the workgroup's column lc.
      fn column(block : i32, lc : i32) -> i32 {
        ${rope ? `
        let half = uniforms.ropeTableShape[1] / 4; // the table row is cos | sin of head_dim = 2·half each
        let p = block * ${HALF} + lc % ${HALF}; // rotation pair p: columns (i, i + half) of head p / half
        return (p / half) * 2 * half + p % half + select(0, half, lc >= ${HALF});` : `
        return block * ${COLUMNS} + lc;`}
      }
      fn main(index : i32) {
        let tid = i32(localId.x);
        let lc = tid % ${COLUMNS}; // the workgroup's column
        let s = tid / ${COLUMNS}; // the slice: inner indices d ≡ s (mod ${SLICES})
        let N = uniforms.outShape[0];
        let outF = uniforms.outShape[1];
        let inF = uniforms.xShape[1];
        let block = i32(workgroupId.x);
        let wc = min(column(block, lc), outF - 1); // past the last column: read a valid one, write nothing
        var acc : array<f32, ${RR}>;
        ${gated ? `var accU : array<f32, ${RR}>;` : ''}
        for (var k0 = 0; k0 < inF; k0 = k0 + ${KT}) {
          for (var e = tid; e < ${RR * KT}; e = e + ${WORKGROUP}) {
            let r = e / ${KT};
            let d = k0 + e % ${KT};
            var v = 0.0;
            if (r < N && d < inF) { v = x[r * inF + d]; } // x[r, d]
            xs[e] = v; // xs[r, d − k0]
          }
          workgroupBarrier();
          let kn = min(${KT}, inF - k0);
          for (var d = s; d < kn; d = d + ${SLICES}) {
            let w = W[(k0 + d) * outF + wc]; // W[k0 + d, col]
            ${gated ? 'let u = U[(k0 + d) * outF + wc]; // U[k0 + d, col]' : ''}
            for (var r = 0; r < ${RR}; r = r + 1) {
              acc[r] = fma(xs[r * ${KT} + d], w, acc[r]);
              ${gated ? `accU[r] = fma(xs[r * ${KT} + d], u, accU[r]);` : ''}
            }
          }
          workgroupBarrier();
        }
        ${sumSlices('acc', 'ys', RR)}
        ${gated ? sumSlices('accU', 'us', RR) : ''}
        ${lora ? shrink(RR) : ''}
        for (var e = tid; e < ${RR * COLUMNS}; e = e + ${WORKGROUP}) {
          let r = e / ${COLUMNS};
          let o = column(block, e % ${COLUMNS});
          if (r < N && o < outF) {
            var v = ys[e]; // y[r, o]
            ${addend === 'bias' ? 'v = v + c[o]; // c[o]' : ''}
            ${addend === 'full' ? 'v = v + c[r * outF + o]; // c[r, o]' : ''}
            ${lora ? `
            let slot = slots[r];
            if (slot >= 0) {
              for (var j = 0; j < R; j = j + 1) {
                v = fma(lt[r * R + j], B[(slot * R + j) * outF + o], v); // t[r, j] · B[slot·R + j, o]
              }
            }` : ''}
            ${gated === 'silu' ? 'v = v * (1.0 / (1.0 + exp(-v))) * us[e];' : ''}
            ${gated === 'gelu_tanh' ? `
            let z = (v + v * v * v * 0.044715) * ${Math.sqrt(2 / Math.PI)};
            let ez = exp(-2.0 * abs(z));
            let th = sign(z) * (1.0 - ez) / (1.0 + ez); // tanh(z), without overflow for large |z|
            v = v * 0.5 * (th + 1.0) * us[e];` : ''}
            ${rope ? 'ys[e] = v;' : 'result[r * outF + o] = v; // result[r, o]'}
          }
        }
        ${rope ? `
        workgroupBarrier();
        let hd = uniforms.ropeTableShape[1] / 2;
        for (var e = tid; e < ${RR * COLUMNS}; e = e + ${WORKGROUP}) {
          let r = e / ${COLUMNS};
          let cc = e % ${COLUMNS};
          let o = column(block, cc);
          if (r < N && o < outF) {
            let first = cc < ${HALF};
            let partner = ys[r * ${COLUMNS} + (cc + ${HALF}) % ${COLUMNS}]; // y[r, o ± hd/2]
            let rotated = select(partner, -partner, first);
            let at = ropeRows[r] * 2 * hd + o % hd; // ropeTable[ropeRows[r], i]: cos; [.., hd + i]: sin
            result[r * outF + o] = ys[e] * ropeTable[at] + rotated * ropeTable[at + hd]; // result[r, o]
          }
        }` : ''}
      }
    `;
  }
}

/**
 * WGSL: `dst[r, lc]` = the sum over the slices of each invocation's `acc[r]`, through xs (SLICES rows at a time:
 * xs[r − r0, s, lc]), in uniform control flow.
 */
function sumSlices(acc: string, dst: string, RR: number): string {
  return `
        for (var r0 = 0; r0 < ${RR}; r0 = r0 + ${SLICES}) {
          for (var r = 0; r < ${Math.min(SLICES, RR)}; r = r + 1) {
            xs[(r * ${SLICES} + s) * ${COLUMNS} + lc] = ${acc}[r0 + r]; // xs[r, s, lc]
          }
          workgroupBarrier();
          if (r0 + s < ${RR}) { // invocation (s, lc) adds up row r0 + s
            var sum = 0.0;
            for (var j = 0; j < ${SLICES}; j = j + 1) { sum = sum + xs[(s * ${SLICES} + j) * ${COLUMNS} + lc]; }
            ${dst}[(r0 + s) * ${COLUMNS} + lc] = sum; // ${dst}[r0 + s, lc]
          }
          workgroupBarrier();
        }`;
}

/**
 * WGSL: lt[r, j] = x[r]·A[:, slot_r·R + j] for the RR·R pairs (r, j) (0 for a row without adapter), each pair's
 * inner dimension split across WORKGROUP / (RR·R) invocations when there are that many to spare.
 */
function shrink(RR: number): string {
  return `
        let R = uniforms.rank;
        let K = uniforms.aShape[1];
        let P = ${RR} * R;
        let SS = max(1, ${WORKGROUP} / max(P, 1)); // invocations per pair
        for (var e = tid; e < P * SS; e = e + ${WORKGROUP}) {
          let p = e % P;
          let r = p / R;
          var t = 0.0;
          if (r < N) {
            let slot = slots[r];
            if (slot >= 0) {
              let a = slot * R + p % R; // A[:, slot·R + j]
              for (var d = e / P; d < inF; d = d + SS) { t = fma(x[r * inF + d], A[d * K + a], t); } // x[r, d] · A[d, a]
            }
          }
          xs[e] = t; // xs[slice, p]
        }
        workgroupBarrier();
        for (var p = tid; p < P; p = p + ${WORKGROUP}) {
          var t = 0.0;
          for (var sl = 0; sl < SS; sl = sl + 1) { t = t + xs[sl * P + p]; }
          lt[p] = t;
        }
        workgroupBarrier();`;
}

/** x·W with `parts` folded in (see DecodeLinearProgram), on the webgpu backend: [N, out]. */
export function decodeLinearGpu(x: tf.Tensor2D, W: tf.Tensor2D, parts: DecodeLinearParts = {}): tf.Tensor2D {
  const [N, inF] = x.shape;
  const [wIn, outF] = W.shape;
  const { addend, lora, rope, up } = parts;
  const fail = (why: string) => new Error(`decodeLinear: ${why} (x [${x.shape}], W [${W.shape}])`);
  if (N > DECODE_LINEAR_MAX_ROWS) throw fail(`more than ${DECODE_LINEAR_MAX_ROWS} rows`);
  if (wIn !== inF) throw fail('inner dimensions differ');
  if (up && (addend || lora || rope || up.shape[0] !== inF || up.shape[1] !== outF)) throw fail('up takes no addend, LoRA or rope, and has W\'s shape');
  if (parts.activation && !up) throw fail('an activation without up');
  if (addend && addend.shape.at(-1) !== outF) throw fail(`addend [${addend.shape}] does not end in ${outF}`);
  if (addend?.rank === 2 && addend.shape[0] !== N) throw fail(`addend [${addend.shape}] has not ${N} rows`);
  if (lora && (lora.A.shape[0] !== inF || lora.B.shape[1] !== outF || lora.rank > DECODE_LINEAR_MAX_RANK)) throw fail('LoRA bank does not fit');
  if (rope && outF % (rope.table.shape[1] / 2) !== 0) throw fail(`width is not a multiple of head_dim ${rope.table.shape[1] / 2}`);
  if (rope && lora && addend) throw fail('rope with both LoRA and an addend needs more than 8 storage buffers');
  const variant: Variant = { addend: !addend ? 'none' : addend.rank === 1 ? 'bias' : 'full', lora: !!lora, rope: !!rope,
    gated: up ? parts.activation ?? 'silu' : null };
  const inputs: tf.Tensor[] = [x, W, ...(up ? [up] : []), ...(addend ? [addend] : []),
    ...(lora ? [lora.A, lora.B, lora.slots] : []), ...(rope ? [rope.table, rope.rows] : [])];
  return runProgram(new DecodeLinearProgram(N, outF, variant), inputs, [{ type: 'int32', data: [lora?.rank ?? 0] }]);
}
