/**
 * WebGPU device operations per decode step (`--backend webgpu` only): compute dispatches, command-buffer submits,
 * host-to-device uploads and device-to-host readbacks, from the server's lora_serve_webgpu_operations_total, and the
 * bytes read back (lora_serve_webgpu_readback_bytes_total), for one greedy request alone (its token picked on the
 * device), for N concurrent greedy requests on N adapters (unmerged LoRA), for one sampled request (plain sampling: its
 * shortlist is read back, and its logits row after the step when the draw falls past the shortlist), for one request
 * sampled with top_k 40 (its shortlist is read back), for one sampled with top_p 0.9 alone (its shortlist, and its
 * logits row after the step when the nucleus reaches past the shortlist), for one greedy request with repetition_penalty 1.1 (its logits are edited on
 * the device, then its token picked), and for N requests of which one is sampled. Each workload runs twice, with 1 and with 1 + newTokens new
 * tokens (ignore_eos): the difference is newTokens decode steps, the prefill being the same.
 * Each dispatch costs CPU time in tfjs and Dawn (about 0.1 ms) whatever the GPU, so dispatches per step bound a
 * decode step's time from below.
 */
import type { BenchCase, Figure } from '../case.ts';
import { metric, type ApiClient } from '../client.ts';
import { WEBGPU_OPS, type WebGPUOp } from '../../src/backend/webgpu/counters.ts';

const N = 8;
type Counted = WebGPUOp | 'readbackBytes';
const COUNTED: readonly Counted[] = [...WEBGPU_OPS, 'readbackBytes'];
const PLURAL: Record<Counted, string> = { dispatch: 'dispatches', submit: 'submits', upload: 'uploads', readback: 'readbacks', readbackBytes: 'bytes read back' };

async function ops(api: ApiClient): Promise<Record<Counted, number>> {
  const m = await api.metrics();
  const counts = Object.fromEntries(WEBGPU_OPS.map((op) => [op, metric(m, 'lora_serve_webgpu_operations_total', { op })])) as Record<Counted, number>;
  counts.readbackBytes = metric(m, 'lora_serve_webgpu_readback_bytes_total');
  return counts;
}

/**
 * greedy: every request greedy; sampled: every request sampled (plain sampling); shortlisted:
 * every request sampled with top_k 40 (its shortlist is read back); nucleus: every request sampled with top_p 0.9
 * alone; penalized: every request greedy with repetition_penalty 1.1; mixed: request 0 sampled, the others greedy.
 */
type Workload = 'greedy' | 'sampled' | 'shortlisted' | 'nucleus' | 'penalized' | 'mixed';

export const dispatches: BenchCase = {
  name: 'dispatches',
  title: `WebGPU: dispatches, submits, uploads, readbacks and bytes read back per decode step, one request and ${N} on ${N} adapters (--backend webgpu)`,
  adapters: N,
  backend: 'webgpu',
  run: (ctx) => ctx.withServer({ 'lora-mode': 'unmerged', 'max-loaded-adapters': N, 'max-batch-size': N }, async (api) => {
    const info = await api.json('GET', '/info') as { backend: string };
    if (info.backend !== 'webgpu') throw new Error(`the server runs ${info.backend}: this case needs --backend webgpu`);
    const steps = ctx.sizes.newTokens;
    const sampled = (i: number, maxNewTokens: number, warper: Record<string, number> = {}, doSample = true) => api.json('POST', '/generate', {
      inputs: ctx.prompt(i), parameters: { max_new_tokens: maxNewTokens, ignore_eos: true, do_sample: doSample, seed: 1 + i, ...warper },
    });
    const greedy = (i: number, count: number, maxNewTokens: number) => api.generate(ctx.prompt(i), { adapter: count === 1 ? null : ctx.adapters.id(i), maxNewTokens });
    const run = (count: number, maxNewTokens: number, workload: Workload = 'greedy'): Promise<unknown> => Promise.all(Array.from({ length: count },
      (_, i) => (workload === 'shortlisted' ? sampled(i, maxNewTokens, { top_k: 40 }) : workload === 'nucleus' ? sampled(i, maxNewTokens, { top_p: 0.9 })
        : workload === 'penalized' ? sampled(i, maxNewTokens, { repetition_penalty: 1.1 }, false)
        : workload === 'sampled' || (workload === 'mixed' && i === 0) ? sampled(i, maxNewTokens) : greedy(i, count, maxNewTokens))));
    /** Operations of one run of the workload. */
    const measure = async (count: number, maxNewTokens: number, workload: Workload) => {
      const before = await ops(api);
      await run(count, maxNewTokens, workload);
      const after = await ops(api);
      return Object.fromEntries(COUNTED.map((op) => [op, after[op] - before[op]])) as Record<Counted, number>;
    };
    await run(N, 2); // load the adapters, compile the kernels
    await run(1, 2);
    await run(1, 2, 'sampled');
    const out: Figure[] = [];
    const workloads = [
      ['one request, base model', 1, 'greedy'], [`${N} requests on ${N} adapters`, N, 'greedy'], ['one sampled request, base model', 1, 'sampled'],
      ['one request sampled with top_k 40, base model', 1, 'shortlisted'], ['one request sampled with top_p 0.9, base model', 1, 'nucleus'],
      ['one greedy request with repetition_penalty 1.1, base model', 1, 'penalized'],
      [`${N} requests, one of them sampled`, N, 'mixed'],
    ] as const;
    for (const [name, count, workload] of workloads) {
      const short = await measure(count, 1, workload);
      const long = await measure(count, 1 + steps, workload);
      ctx.log(`${name}: ${JSON.stringify(short)} (prefill) vs ${JSON.stringify(long)} (prefill + ${steps} decode steps)`);
      for (const op of COUNTED) out.push({ label: `${name}: ${PLURAL[op]} per decode step`, value: (long[op] - short[op]) / steps, unit: op === 'readbackBytes' ? 'B' : '' });
      out.push({ label: `${name}: dispatches of the prefill step`, value: short.dispatch, unit: '' });
    }
    return out;
  }),
};
