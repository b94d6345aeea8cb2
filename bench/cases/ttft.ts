/**
 * Time to first token on an idle server: one streamed request at a time, timed to its first event.
 * (Under mixed-adapter load it is measured by the batching case.)
 */
import type { BenchCase } from '../case.ts';
import { percentile } from '../client.ts';

export const ttft: BenchCase = {
  name: 'ttft',
  title: 'Time to first token, idle server (/generate_stream, first event)',
  adapters: 1,
  run: (ctx) => ctx.withServer({}, async (api) => {
    const first = (i: number) => api.generate(ctx.prompt(i), { adapter: ctx.adapters.id(0), maxNewTokens: 1, stream: true });
    await first(0); // load the adapter, warm the kernels
    const ms: number[] = [];
    for (let i = 0; i < ctx.sizes.ttftIdle; i++) ms.push((await first(i)).ttft! * 1000);
    return [
      { label: `idle, p50 (${ms.length} requests)`, key: 'p50', value: percentile(ms, 50), unit: 'ms', values: ms, headline: true },
      { label: 'idle, p95', value: percentile(ms, 95), unit: 'ms', headline: true },
    ];
  }),
};
