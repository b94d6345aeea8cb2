/**
 * WebGPU device operations per decode step (`--backend webgpu` only): compute dispatches, command-buffer submits,
 * host-to-device uploads and device-to-host readbacks, from the server's lora_serve_webgpu_operations_total, for one
 * request alone and for N concurrent requests on N adapters (unmerged LoRA). Each workload runs twice, with 1 and
 * with 1 + newTokens new tokens (ignore_eos): the difference is newTokens decode steps, the prefill being the same.
 * Each dispatch costs CPU time in tfjs and Dawn (about 0.1 ms) whatever the GPU, so dispatches per step bound a
 * decode step's time from below.
 */
import type { BenchCase, Figure } from '../case.ts';
import { drive, metric, type ApiClient } from '../client.ts';
import { WEBGPU_OPS, type WebGPUOp } from '../../src/backend/webgpu/counters.ts';

const N = 8;
const PLURAL: Record<WebGPUOp, string> = { dispatch: 'dispatches', submit: 'submits', upload: 'uploads', readback: 'readbacks' };

async function ops(api: ApiClient): Promise<Record<WebGPUOp, number>> {
  const m = await api.metrics();
  return Object.fromEntries(WEBGPU_OPS.map((op) => [op, metric(m, 'lora_serve_webgpu_operations_total', { op })])) as Record<WebGPUOp, number>;
}

export const dispatches: BenchCase = {
  name: 'dispatches',
  title: `WebGPU: dispatches, submits, uploads and readbacks per decode step, one request and ${N} on ${N} adapters (--backend webgpu)`,
  adapters: N,
  backend: 'webgpu',
  run: (ctx) => ctx.withServer({ 'lora-mode': 'unmerged', 'max-loaded-adapters': N, 'max-batch-size': N }, async (api) => {
    const info = await api.json('GET', '/info') as { backend: string };
    if (info.backend !== 'webgpu') throw new Error(`the server runs ${info.backend}: this case needs --backend webgpu`);
    const steps = ctx.sizes.newTokens;
    const run = (count: number, maxNewTokens: number) =>
      drive(Array.from({ length: count }, (_, i) => () => api.generate(ctx.prompt(i), { adapter: count === 1 ? null : ctx.adapters.id(i), maxNewTokens })), count);
    /** Operations of one run of the workload. */
    const measure = async (count: number, maxNewTokens: number) => {
      const before = await ops(api);
      await run(count, maxNewTokens);
      const after = await ops(api);
      return Object.fromEntries(WEBGPU_OPS.map((op) => [op, after[op] - before[op]])) as Record<WebGPUOp, number>;
    };
    await run(N, 2); // load the adapters, compile the kernels
    await run(1, 2);
    const out: Figure[] = [];
    for (const [name, count] of [['one request, base model', 1], [`${N} requests on ${N} adapters`, N]] as const) {
      const short = await measure(count, 1);
      const long = await measure(count, 1 + steps);
      ctx.log(`${name}: ${JSON.stringify(short)} (prefill) vs ${JSON.stringify(long)} (prefill + ${steps} decode steps)`);
      for (const op of WEBGPU_OPS) out.push({ label: `${name}: ${PLURAL[op]} per decode step`, value: (long[op] - short[op]) / steps, unit: '' });
      out.push({ label: `${name}: dispatches of the prefill step`, value: short.dispatch, unit: '' });
    }
    return out;
  }),
};
