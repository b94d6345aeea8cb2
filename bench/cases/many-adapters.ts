/**
 * Many adapters: 500 registered adapters, a device tier of 16, 64 concurrent clients choosing an
 * adapter by Zipf(1.0), against the same clients all on one adapter.
 */
import { ratioFigure, rateFigure, sideBySide, type BenchCase } from '../case.ts';
import { drive, metric, percentile, zipfSampler, type ApiClient, type Generation } from '../client.ts';
import { createRng } from '../../src/demo/index.ts';

const ADAPTERS = 500;
const DEVICE_TIER = 16;
const CLIENTS = 64;

/** Device-tier lookups as /metrics counts them: hits on the device, and loads (from the host tier or disk). */
async function lookups(api: ApiClient): Promise<{ hits: number; loads: number }> {
  const m = await api.metrics();
  const hits = metric(m, 'lora_serve_adapter_cache_hits_total', { tier: 'device' });
  return { hits, loads: metric(m, 'lora_serve_adapter_cache_hits_total', { tier: 'host' }) + metric(m, 'lora_serve_adapter_cache_misses_total') };
}

export const manyAdapters: BenchCase = {
  name: 'many-adapters',
  title: `Many adapters: ${ADAPTERS} registered, device tier ${DEVICE_TIER}, ${CLIENTS} clients, Zipf(1.0) vs all on one adapter`,
  adapters: ADAPTERS,
  run: (ctx) => ctx.withServer({ 'max-loaded-adapters': DEVICE_TIER }, async (api) => {
    const { sizes, adapters } = ctx;
    const rng = createRng(42);
    const zipf = zipfSampler(ADAPTERS, 1.0, () => rng.uniform());
    const run = (pick: () => string, maxNewTokens = sizes.newTokens) =>
      drive(Array.from({ length: CLIENTS }, (_, i) => () => api.generate(ctx.prompt(i), { adapter: pick(), maxNewTokens })), CLIENTS);
    await run(() => adapters.id(zipf()), 2); // warm the tiers with the popular adapters, and the kernels
    await run(() => adapters.id(0), 2);

    const latency: Record<'zipf' | 'one', Generation[]> = { zipf: [], one: [] };
    let hits = 0;
    let loads = 0;
    const r = await sideBySide(sizes.rounds, {
      zipf: async () => {
        const before = await lookups(api);
        const t = await run(() => adapters.id(zipf()));
        const after = await lookups(api);
        hits += after.hits - before.hits;
        loads += after.loads - before.loads;
        latency.zipf.push(...t.generations);
        return t;
      },
      one: async () => {
        const t = await run(() => adapters.id(0));
        latency.one.push(...t.generations);
        return t;
      },
    }, ctx.log);
    const p = (k: 'zipf' | 'one', q: number) => percentile(latency[k].map((g) => g.seconds * 1000), q);
    return [
      rateFigure('Zipf(1.0) over 500 adapters', r.zipf, { headline: true }),
      rateFigure('all on one adapter', r.one, { headline: true }),
      ratioFigure('Zipf ÷ one adapter', r.zipf, r.one, { target: { op: '>=', value: 0.7 } }),
      { label: 'device-tier hit rate (Zipf, from /metrics)', value: (100 * hits) / (hits + loads), unit: '%', headline: true },
      { label: 'request latency p50, Zipf', value: p('zipf', 50), unit: 'ms', headline: true },
      { label: 'request latency p95, Zipf', value: p('zipf', 95), unit: 'ms', headline: true },
      { label: 'request latency p50, one adapter', value: p('one', 50), unit: 'ms' },
      { label: 'request latency p95, one adapter', value: p('one', 95), unit: 'ms' },
    ];
  }),
};
