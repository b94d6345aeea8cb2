/**
 * Scale-out: three replicas behind HAProxy with the shipped deploy/haproxy/haproxy.cfg (consistent hash on the
 * adapter) against the same file balancing round robin. 48 concurrent clients pick an adapter by Zipf(1.0) over 96;
 * each replica holds 8 on its device. With affinity each adapter lives on one replica, so the three device tiers
 * hold different adapters; round robin makes every replica load every popular adapter. Reports tokens/s through
 * each proxy and the device-tier hit rate summed over the replicas. The replicas share the machine's cores: the
 * figures compare routing, not the speed-up of adding machines. Not run (NaN, with a note) without haproxy.
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { ratioFigure, rateFigure, sideBySide, type BenchCase, type Figure } from '../case.ts';
import { ApiClient, drive, metric, zipfSampler } from '../client.ts';
import { installed, renderHaproxyConfig, startProxy, type Proxy } from '../proxy.ts';
import { freePort } from '../server.ts';
import { createRng } from '../../src/demo/index.ts';

const REPLICAS = 3;
const ADAPTERS = 96;
const DEVICE_TIER = 8;
const CLIENTS = 48;

/** Device-tier hits and loads (host-tier hits and disk reads) summed over the replicas' /metrics. */
async function lookups(apis: readonly ApiClient[]): Promise<{ hits: number; loads: number }> {
  let hits = 0;
  let loads = 0;
  for (const api of apis) {
    const m = await api.metrics();
    hits += metric(m, 'lora_serve_adapter_cache_hits_total', { tier: 'device' });
    loads += metric(m, 'lora_serve_adapter_cache_hits_total', { tier: 'host' }) + metric(m, 'lora_serve_adapter_cache_misses_total');
  }
  return { hits, loads };
}

const LABELS = {
  affinity: 'through HAProxy, consistent hash on the adapter',
  roundRobin: 'through HAProxy, round robin',
};

export const scaleOut: BenchCase = {
  name: 'scale-out',
  title: `Scale-out: ${REPLICAS} replicas (device tier ${DEVICE_TIER} each) behind HAProxy, ${CLIENTS} clients, Zipf(1.0) over ${ADAPTERS} adapters: adapter affinity vs round robin`,
  adapters: ADAPTERS,
  async run(ctx) {
    if (!installed('haproxy')) {
      const note = 'haproxy is not installed (apt-get install haproxy)';
      return [
        { label: `tokens/s ${LABELS.affinity}`, value: NaN, unit: 'tok/s', note },
        { label: `tokens/s ${LABELS.roundRobin}`, value: NaN, unit: 'tok/s', note },
      ];
    }
    // One model copy per replica: the replicas share this machine's cores, as the workers of one server would.
    return ctx.withServers(REPLICAS, { 'max-loaded-adapters': DEVICE_TIER, workers: 1 }, async (apis) => {
      const dir = resolve('.cache/bench-logs');
      mkdirSync(dir, { recursive: true });
      const replicas = apis.map((a) => new URL(a.url).host);
      const proxies: Proxy[] = [];
      const through: Record<keyof typeof LABELS, ApiClient> = {} as Record<keyof typeof LABELS, ApiClient>;
      try {
        for (const [k, balance] of [['affinity', undefined], ['roundRobin', 'roundrobin']] as const) {
          const port = await freePort();
          const file = join(dir, `scale-out-${k}.cfg`);
          writeFileSync(file, renderHaproxyConfig(port, replicas, balance));
          proxies.push(await startProxy('haproxy', ['-f', file, '-db'], port));
          through[k] = new ApiClient(`http://127.0.0.1:${port}`);
        }
        const { sizes, adapters } = ctx;
        const rng = createRng(7);
        const zipf = zipfSampler(ADAPTERS, 1.0, () => rng.uniform());
        const run = (api: ApiClient, maxNewTokens = sizes.newTokens) =>
          drive(Array.from({ length: CLIENTS }, (_, i) => () => api.generate(ctx.prompt(i), { adapter: adapters.id(zipf()), maxNewTokens })), CLIENTS);
        const counts = { affinity: { hits: 0, loads: 0 }, roundRobin: { hits: 0, loads: 0 } };
        const calls = { affinity: 0, roundRobin: 0 };
        const measured = (k: keyof typeof LABELS) => async () => {
          const timed = calls[k]++ > 0; // sideBySide's first call of each is its warm-up
          const before = await lookups(apis);
          const t = await run(through[k]);
          const after = await lookups(apis);
          if (timed) {
            counts[k].hits += after.hits - before.hits;
            counts[k].loads += after.loads - before.loads;
          }
          return t;
        };
        const r = await sideBySide(sizes.rounds, { affinity: measured('affinity'), roundRobin: measured('roundRobin') }, ctx.log);
        const hitRate = (k: keyof typeof LABELS) => (100 * counts[k].hits) / (counts[k].hits + counts[k].loads);
        const figures: Figure[] = [
          rateFigure(`tokens/s ${LABELS.affinity}`, r.affinity, { headline: true, key: 'affinity-rate' }),
          rateFigure(`tokens/s ${LABELS.roundRobin}`, r.roundRobin, { key: 'round-robin-rate' }),
          ratioFigure('affinity ÷ round robin', r.affinity, r.roundRobin, { headline: true, key: 'affinity-gain' }),
          { label: `device-tier hit rate, ${LABELS.affinity}`, value: hitRate('affinity'), unit: '%', headline: true, key: 'affinity-hit-rate' },
          { label: `device-tier hit rate, ${LABELS.roundRobin}`, value: hitRate('roundRobin'), unit: '%', key: 'round-robin-hit-rate' },
          { label: 'adapter loads per round, affinity', value: counts.affinity.loads / sizes.rounds, unit: 'loads', key: 'affinity-loads' },
          { label: 'adapter loads per round, round robin', value: counts.roundRobin.loads / sizes.rounds, unit: 'loads', key: 'round-robin-loads' },
        ];
        return figures;
      } finally {
        for (const p of proxies) p.stop();
        await Promise.all(Object.values(through).map((a) => a.close()));
      }
    });
  },
};
