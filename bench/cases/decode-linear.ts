/**
 * Decode linear (`--backend webgpu` only): a decode step's projections on the webgpu backend, side by side in this
 * process (no server), on the bench model's shapes: every layer's q, k, v, o and down as x·W and gate·up as one gated
 * kernel (distinct weights per layer, as in the model), for 1, 8 and 16 rows, then one readback (the queue is in
 * order, so the read waits for every dispatch). Three configurations:
 * - previous: the kernel before the rewrite (copied below: one workgroup per row and 64 columns, each invocation
 *   walking the whole input row, so W is read once per row), with tfjs's default submit every 15 dispatches;
 * - split: decode-linear.ts (a workgroup per 32 columns for all rows, W read once per step, the inner dimension
 *   split in 8 slices), with tfjs's default submit every 15 dispatches;
 * - split, one submit: the same, the step being one submit (as the server runs decode steps, src/backend/webgpu/submit.ts).
 * Also the main thread's share: the time from the first dispatch to the readback's call (tfjs recording the
 * dispatches, and submitting them). On a software adapter (lavapipe) the shaders run on the CPU, so the times reflect
 * the reads of W and the invocations' work, not a GPU's.
 */
import * as tf from '@tensorflow/tfjs-core';
import { median } from '../client.ts';
import type { BenchCase, CaseContext, Figure } from '../case.ts';
import { projectionWidths } from './kernels.ts';
import { initBackend } from '../../src/backend/select.ts';
import { webgpuCounts } from '../../src/backend/webgpu/counters.ts';
import { decodeLinearGpu } from '../../src/backend/webgpu/kernels/decode-linear.ts';
import { runProgram, type WebGPUProgram } from '../../src/backend/webgpu/kernels/program.ts';
import { batchSubmits } from '../../src/backend/webgpu/submit.ts';

const ROWS = [1, 8, 16];

/** The decode-linear kernel as of commit 789f703 (its plain and SiLU-gated variants): the baseline. */
class PreviousDecodeLinearProgram implements WebGPUProgram {
  readonly variableNames: string[];
  readonly outputShape: number[];
  readonly shaderKey: string;
  readonly dispatchLayout = { x: [0, 1] };
  readonly dispatch: [number, number, number];
  readonly workgroupSize: [number, number, number] = [64, 1, 1];

  constructor(rows: number, out: number, private readonly gated: boolean) {
    this.outputShape = [rows, out];
    this.dispatch = [rows * Math.ceil(out / 64), 1, 1];
    this.variableNames = gated ? ['x', 'W', 'U'] : ['x', 'W'];
    this.shaderKey = `benchPreviousDecodeLinear_${gated}`;
  }

  getUserCode(): string {
    return `
      fn matvec(n : i32, col : i32, up : bool) -> f32 {
        let inF = uniforms.xShape[1];
        let outF = uniforms.outShape[1];
        var acc = 0.0;
        for (var d = 0; d < inF; d = d + 1) {
          ${this.gated ? 'let m = select(W[d * outF + col], U[d * outF + col], up);' : 'let m = W[d * outF + col];'} // M[d, col]
          acc = acc + x[n * inF + d] * m; // x[n, d]
        }
        return acc;
      }
      fn main(index : i32) {
        let tid = i32(localId.x);
        let rows = uniforms.outShape[0];
        let outF = uniforms.outShape[1];
        let blocks = (outF + 63) / 64;
        let wg = min(index / 64, rows * blocks - 1);
        let n = wg / blocks;
        let o = (wg % blocks) * 64 + tid;
        if (index / 64 >= rows * blocks || o >= outF) { return; }
        ${this.gated ? `
        let g = matvec(n, o, false);
        result[n * outF + o] = g * (1.0 / (1.0 + exp(-g))) * matvec(n, o, true);` : `
        result[n * outF + o] = matvec(n, o, false);`}
      }
    `;
  }
}

function previous(x: tf.Tensor2D, W: tf.Tensor2D, up?: tf.Tensor2D): tf.Tensor2D {
  return runProgram(new PreviousDecodeLinearProgram(x.shape[0], W.shape[1], !!up), up ? [x, W, up] : [x, W]);
}

type Kernel = (x: tf.Tensor2D, W: tf.Tensor2D, up?: tf.Tensor2D) => tf.Tensor2D;

/** Starts the webgpu backend in the harness itself (cases that run no server) and logs its adapter. */
export async function harnessOnWebGPU(ctx: CaseContext): Promise<void> {
  const info = await initBackend('webgpu');
  if (info.name !== 'webgpu') throw new Error(`the harness runs ${info.name}, not webgpu`);
  ctx.log(`adapter: ${info.adapter ? `${info.adapter.vendor} ${info.adapter.description}` : '?'}`);
}

export const decodeLinear: BenchCase = {
  name: 'decode-linear',
  title: 'WebGPU: a decode step\'s projections, the previous decode-linear kernel vs the split one, and one submit per step (in the harness, no server)',
  adapters: 0,
  backend: 'webgpu',
  async run(ctx) {
    await harnessOnWebGPU(ctx);
    const { c, d, q, kv, I } = projectionWidths(ctx.modelDir);
    // [in, out, gated] of a layer's products: q, k, v, o, gate·up, down.
    const layerShapes: [number, number, boolean][] = [[d, q, false], [d, kv, false], [d, kv, false], [q, d, false], [d, I, true], [I, d, false]];
    const shapes = Array.from({ length: c.num_hidden_layers! }, () => layerShapes).flat();
    const weights = shapes.map(([i, o, gated], n) => ({
      W: tf.randomUniform([i, o], -0.05, 0.05, 'float32', n) as tf.Tensor2D,
      U: gated ? tf.randomUniform([i, o], -0.05, 0.05, 'float32', n + 10_000) as tf.Tensor2D : undefined,
    }));
    const newKernel: Kernel = (x, W, up) => decodeLinearGpu(x, W, up ? { up } : {});
    /**
     * Milliseconds for every layer's products of `x` through `kernel` and the readback of the last one, and of them
     * the main thread's time recording the dispatches (and submitting them) before the readback.
     */
    const step = async (kernel: Kernel, oneSubmit: boolean, x: tf.Tensor2D[]) => {
      batchSubmits(oneSubmit);
      const t0 = performance.now();
      let last: tf.Tensor2D | null = null;
      for (let i = 0; i < shapes.length; i++) {
        last?.dispose();
        last = kernel(x[i]!, weights[i]!.W, weights[i]!.U);
      }
      const recorded = performance.now() - t0;
      await last!.data();
      const ms = performance.now() - t0;
      last!.dispose();
      batchSubmits(false);
      return { ms, recorded };
    };
    const configs = [['previous', previous, false], ['split', newKernel, false], ['split, one submit', newKernel, true]] as const;
    const figures: Figure[] = [];
    for (const rows of ROWS) {
      const x = shapes.map(([i], n) => tf.randomUniform([rows, i], -1, 1, 'float32', rows + n) as tf.Tensor2D);
      const times: number[][] = configs.map(() => []);
      const recording: number[][] = configs.map(() => []);
      const submits: number[] = configs.map(() => 0);
      const reps = ctx.sizes.rounds * 3;
      for (let r = 0; r <= reps; r++) {
        // Rotate which configuration goes first; the first round compiles the shaders and is dropped.
        for (let k = 0; k < configs.length; k++) {
          const n = (r + k) % configs.length;
          const [, kernel, oneSubmit] = configs[n]!;
          const before = webgpuCounts()!.submit;
          const { ms, recorded } = await step(kernel, oneSubmit, x);
          if (r > 0) times[n]!.push(ms);
          if (r > 0) recording[n]!.push(recorded);
          submits[n] = webgpuCounts()!.submit - before;
        }
      }
      x.forEach((t) => t.dispose());
      const [prev, split, one] = times.map(median) as [number, number, number];
      ctx.log(`${rows} row(s): previous ${prev.toFixed(1)} ms (${submits[0]} submits), split ${split.toFixed(1)} ms (${submits[1]} submits), ` +
        `split with one submit ${one.toFixed(1)} ms (${submits[2]} submit)`);
      const ratio = (a: number, b: number) => times[a]!.map((t, i) => t / times[b]![i]!);
      figures.push(
        { label: `${rows} row(s), all ${c.num_hidden_layers} layers' projections (${shapes.length} dispatches): previous kernel`, key: `${rows}/previous`, value: prev, unit: 'ms', values: times[0] },
        { label: `${rows} row(s): split kernel, a submit every 15 dispatches (${submits[1]} submits)`, key: `${rows}/split`, value: split, unit: 'ms', values: times[1] },
        { label: `${rows} row(s): split kernel, one submit`, key: `${rows}/one-submit`, value: one, unit: 'ms', values: times[2] },
        { label: `${rows} row(s): main thread's time recording and submitting the dispatches, split kernel, a submit every 15`, key: `${rows}/record-split`, value: median(recording[1]!), unit: 'ms', values: recording[1] },
        { label: `${rows} row(s): the same with one submit`, key: `${rows}/record-one-submit`, value: median(recording[2]!), unit: 'ms', values: recording[2] },
        { label: `${rows} row(s): previous ÷ split kernel (both a submit every 15 dispatches)`, key: `${rows}/kernel`, value: median(ratio(0, 1)), unit: '×', values: ratio(0, 1) },
        { label: `${rows} row(s): previous ÷ split kernel with one submit (before ÷ after)`, key: `${rows}/speedup`, value: median(ratio(0, 2)), unit: '×', values: ratio(0, 2), headline: true },
      );
    }
    for (const w of weights) tf.dispose([w.W, ...(w.U ? [w.U] : [])]);
    return figures;
  },
};
