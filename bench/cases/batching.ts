/**
 * Batching: 32 concurrent requests on 32 distinct adapters against the same 32 all on one adapter
 * (mixed-adapter batching), against the base model, and against the same requests one at a time
 * (batching gain). All four are measured side by side in every round, streamed, so the mixed run
 * also gives the time to first token under mixed-adapter load.
 */
import { ratioFigure, rateFigure, sideBySide, type BenchCase } from '../case.ts';
import { drive, percentile } from '../client.ts';

const N = 32;

export const batching: BenchCase = {
  name: 'batching',
  title: `Batching: ${N} concurrent requests on ${N} adapters vs one adapter vs the base model vs one at a time`,
  adapters: N,
  // Tuned: the device tier holds all 32 adapters at once, so they can share a batch.
  run: (ctx) => ctx.withServer({}, async (api) => {
    const { sizes, adapters } = ctx;
    const run = (count: number, concurrency: number, adapter: (i: number) => string | null, maxNewTokens = sizes.newTokens) =>
      drive(Array.from({ length: count }, (_, i) => () => api.generate(ctx.prompt(i), { adapter: adapter(i), maxNewTokens, stream: true })), concurrency);
    await run(N, N, (i) => adapters.id(i), 2); // load the 32 adapters, warm the kernels
    await run(N, N, () => adapters.id(0), 2);
    const ttft: number[] = [];
    const r = await sideBySide(sizes.rounds, {
      mixed: async () => {
        const t = await run(N, N, (i) => adapters.id(i));
        ttft.push(...t.generations.map((g) => g.ttft! * 1000));
        return t;
      },
      one: () => run(N, N, () => adapters.id(0)),
      base: () => run(N, N, () => null),
      sequential: () => run(sizes.sequential, 1, (i) => adapters.id(i)),
    }, ctx.log);
    return [
      rateFigure(`one at a time (${sizes.sequential} requests, distinct adapters)`, r.sequential, { key: 'sequential', headline: true }),
      rateFigure(`${N} concurrent, base model`, r.base, { key: 'base', headline: true }),
      rateFigure(`${N} concurrent, one adapter`, r.one, { key: 'one', headline: true }),
      rateFigure(`${N} concurrent, ${N} adapters`, r.mixed, { key: 'mixed', headline: true }),
      ratioFigure(`mixed-adapter batching: ${N} adapters ÷ one adapter`, r.mixed, r.one, { key: 'mixed-ratio', target: { op: '>=', value: 0.85 } }),
      ratioFigure(`batching gain: ${N} concurrent ÷ one at a time`, r.mixed, r.sequential, { key: 'gain', target: { op: '>=', value: 4 } }),
      { label: `time to first token, ${N} concurrent on ${N} adapters, p50`, key: 'ttft-p50', value: percentile(ttft, 50), unit: 'ms', headline: true },
      { label: `time to first token, ${N} concurrent on ${N} adapters, p95`, key: 'ttft-p95', value: percentile(ttft, 95), unit: 'ms', headline: true },
    ];
  }, { 'max-loaded-adapters': N, 'max-batch-size': N }),
};
