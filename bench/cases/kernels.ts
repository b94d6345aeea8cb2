/**
 * Kernels: the wasm backend's matrix products through tfjs's own wasm kernel and through the native AVX2/FMA addon
 * (src/native-matmul.ts), side by side in this process (no server), on the linear layers of the bench model: every
 * layer's projections (q, k, v, o, gate, up, down; distinct weights per layer, as in the model, so one row is bound by
 * reading them from memory) for 1 row (one request decoding), 16 rows (a worker's share of 32 concurrent decodes) and
 * 512 rows (a prefill). Same inputs, same backend; only the kernel differs.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import * as tf from '@tensorflow/tfjs-core';
import { median } from '../client.ts';
import type { BenchCase, Figure } from '../case.ts';
import { initBackend } from '../../src/backend.ts';
import { nativeMatmulUnavailable } from '../../src/native/addon.ts';
import { installNativeMatmul } from '../../src/native-matmul.ts';

const ROWS = [1, 16, 512];

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
    const c = JSON.parse(readFileSync(join(ctx.modelDir, 'config.json'), 'utf8')) as Record<string, number>;
    const d = c.hidden_size!;
    const headDim = c.head_dim ?? d / c.num_attention_heads!;
    const q = c.num_attention_heads! * headDim;
    const kv = (c.num_key_value_heads ?? c.num_attention_heads!) * headDim;
    const I = c.intermediate_size!;
    const layerShapes: [number, number][] = [[d, q], [d, kv], [d, kv], [q, d], [d, I], [d, I], [I, d]];
    const shapes = Array.from({ length: c.num_hidden_layers! }, () => layerShapes).flat();
    const weights = shapes.map(([i, o], n) => tf.randomUniform([i, o], -0.05, 0.05, 'float32', n) as tf.Tensor2D);
    const backend = tf.backend();
    /** Milliseconds for every layer's projections of `rows` rows through `kernel`. */
    const forward = (kernel: tf.KernelFunc, x: tf.Tensor2D[]) => {
      const t0 = performance.now();
      for (let i = 0; i < weights.length; i++) {
        const out = kernel({ inputs: { a: x[i]!, b: weights[i]! }, backend, attrs: { transposeA: false, transposeB: false } }) as tf.TensorInfo;
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
      for (let r = 0; r < ctx.sizes.rounds * 2 + 1; r++) {
        // Alternate which kernel goes first; the first round of each warms up and is dropped.
        const order = r % 2 === 0 ? [[wasmKernel, wasm], [nativeKernel, native]] as const : [[nativeKernel, native], [wasmKernel, wasm]] as const;
        for (const [kernel, out] of order) {
          let ms = 0;
          for (let i = 0; i < reps; i++) ms += forward(kernel, x);
          if (r > 0) out.push(ms / reps);
        }
      }
      x.forEach((t) => t.dispose());
      const ratios = wasm.map((w, i) => w / native[i]!);
      const gflops = (ms: number) => flops / ms / 1e6;
      ctx.log(`${rows} rows: wasm ${median(wasm).toFixed(3)} ms, native ${median(native).toFixed(3)} ms`);
      figures.push(
        { label: `${rows} row(s), all ${c.num_hidden_layers} layers' projections: wasm kernel`, value: median(wasm), unit: 'ms', values: wasm },
        { label: `${rows} row(s): native kernel`, value: median(native), unit: 'ms', values: native },
        { label: `${rows} row(s): native speed-up (GFLOP/s ${gflops(median(wasm)).toFixed(1)} → ${gflops(median(native)).toFixed(1)})`, value: median(ratios), unit: '×', values: ratios },
      );
    }
    weights.forEach((w) => w.dispose());
    return figures;
  },
};
