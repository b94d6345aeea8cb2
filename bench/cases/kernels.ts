/**
 * Kernels: the wasm backend's matrix products through tfjs's own wasm kernel and through the native AVX2/FMA addon
 * (src/backend/wasm/native-matmul.ts), side by side in this process (no server), on the linear layers of the bench model: every
 * layer's projections (q, k, v, o, gate, up, down; distinct weights per layer, as in the model, so one row is bound by
 * reading them from memory) for 1 row (one request decoding), 16 rows (a worker's share of 32 concurrent decodes) and
 * 512 rows (a prefill). Same inputs, same backend; only the kernel differs, and for the native kernel the weights'
 * layout: row-major, or packed in 16-column panels as the server stores them (PackedWeight).
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import * as tf from '@tensorflow/tfjs-core';
import { median } from '../client.ts';
import type { BenchCase, Figure } from '../case.ts';
import { initBackend } from '../../src/backend/select.ts';
import { nativeMatmulUnavailable } from '../../src/backend/wasm/addon/addon.ts';
import { installNativeMatmul, PackedWeight } from '../../src/backend/wasm/native-matmul.ts';

const ROWS = [1, 16, 512];

/** The bench model's config and its projections' widths: hidden d, all query heads q, all KV heads kv, MLP I. */
export function projectionWidths(modelDir: string): { c: Record<string, number>; d: number; q: number; kv: number; I: number } {
  const c = JSON.parse(readFileSync(join(modelDir, 'config.json'), 'utf8')) as Record<string, number>;
  const d = c.hidden_size!;
  const headDim = c.head_dim ?? d / c.num_attention_heads!;
  return { c, d, q: c.num_attention_heads! * headDim, kv: (c.num_key_value_heads ?? c.num_attention_heads!) * headDim, I: c.intermediate_size! };
}

export const kernels: BenchCase = {
  name: 'kernels',
  title: 'Kernels: the model\'s linear projections, tfjs wasm matmul vs the native AVX2/FMA addon (in the harness, no server)',
  adapters: 0,
  async run(ctx) {
    const info = await initBackend('wasm', { nativeMatmul: false });
    if (info.name !== 'wasm') throw new Error(`the harness runs ${info.name}, not wasm`);
    const wasmKernel = tf.getKernel(tf.BatchMatMul, 'wasm')!.kernelFunc;
    if (!installNativeMatmul()) throw new Error(`native matmul unavailable: ${nativeMatmulUnavailable()}`);
    const nativeKernel = tf.getKernel(tf.BatchMatMul, 'wasm')!.kernelFunc;
    const { c, d, q, kv, I } = projectionWidths(ctx.modelDir);
    const layerShapes: [number, number][] = [[d, q], [d, kv], [d, kv], [q, d], [d, I], [d, I], [I, d]];
    const shapes = Array.from({ length: c.num_hidden_layers! }, () => layerShapes).flat();
    const weights = shapes.map(([i, o], n) => tf.randomUniform([i, o], -0.05, 0.05, 'float32', n) as tf.Tensor2D);
    const packedWeights = weights.map((w) => PackedWeight.pack(w.clone()));
    const packed = packedWeights.map(PackedWeight.kernelInput);
    const backend = tf.backend();
    /** Milliseconds for every layer's projections of `rows` rows through `kernel`. */
    const forward = (kernel: tf.KernelFunc, x: tf.Tensor2D[], ws: readonly tf.TensorInfo[]) => {
      const t0 = performance.now();
      for (let i = 0; i < ws.length; i++) {
        const out = kernel({ inputs: { a: x[i]!, b: ws[i]! }, backend, attrs: { transposeA: false, transposeB: false } }) as tf.TensorInfo;
        backend.disposeData(out.dataId);
      }
      return performance.now() - t0;
    };
    const figures: Figure[] = [];
    for (const rows of ROWS) {
      const x = shapes.map(([i], n) => tf.randomUniform([rows, i], -1, 1, 'float32', rows + n) as tf.Tensor2D);
      const flops = 2 * rows * shapes.reduce((n, [i, o]) => n + i * o, 0);
      const reps = Math.max(1, Math.round(2e9 / flops)); // ~2 GFLOP per timing
      const wasm: number[] = [];
      const native: number[] = [];
      const nativePacked: number[] = [];
      const configs = [[wasmKernel, weights, wasm], [nativeKernel, weights, native], [nativeKernel, packed, nativePacked]] as const;
      for (let r = 0; r < ctx.sizes.rounds * 3 + 1; r++) {
        // Rotate which configuration goes first; the first round warms up and is dropped.
        for (let n = 0; n < configs.length; n++) {
          const [kernel, ws, out] = configs[(r + n) % configs.length]!;
          let ms = 0;
          for (let i = 0; i < reps; i++) ms += forward(kernel, x, ws);
          if (r > 0) out.push(ms / reps);
        }
      }
      x.forEach((t) => t.dispose());
      const ratios = wasm.map((w, i) => w / native[i]!);
      const packedRatios = native.map((w, i) => w / nativePacked[i]!);
      const gflops = (ms: number) => flops / ms / 1e6;
      ctx.log(`${rows} rows: wasm ${median(wasm).toFixed(3)} ms, native ${median(native).toFixed(3)} ms, native packed ${median(nativePacked).toFixed(3)} ms`);
      figures.push(
        { label: `${rows} row(s), all ${c.num_hidden_layers} layers' projections: wasm kernel`, value: median(wasm), unit: 'ms', values: wasm },
        { label: `${rows} row(s): native kernel, row-major weights`, value: median(native), unit: 'ms', values: native },
        { label: `${rows} row(s): native ÷ wasm kernel, row-major weights (GFLOP/s ${gflops(median(wasm)).toFixed(1)} → ${gflops(median(native)).toFixed(1)})`, key: `${rows}/native`, value: median(ratios), unit: '×', values: ratios, headline: true },
        { label: `${rows} row(s): native kernel, packed weights (as served)`, value: median(nativePacked), unit: 'ms', values: nativePacked },
        { label: `${rows} row(s): packed ÷ row-major weights, native kernel (GFLOP/s → ${gflops(median(nativePacked)).toFixed(1)})`, key: `${rows}/packed`, value: median(packedRatios), unit: '×', values: packedRatios, headline: true },
      );
    }
    weights.forEach((w) => w.dispose());
    packedWeights.forEach((w) => w.dispose());
    return figures;
  },
};
