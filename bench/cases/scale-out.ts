/**
 * Scale-out: replicas behind HAProxy with the shipped deploy/haproxy/haproxy.cfg (consistent hash on the adapter)
 * against the same file balancing round robin. 48 concurrent clients pick an adapter by Zipf(1.0) over 300; each
 * replica holds 32 on its device. With affinity each adapter lives on one replica, so the three device tiers hold
 * different adapters; round robin makes every replica load every popular adapter. Each policy has its own three
 * replicas (started side by side, driven in alternation), so one policy's traffic never warms the other's tiers.
 *
 * Reported: tokens/s and p95 latency through each proxy (aggregate and per replica: the replicas share this
 * machine's cores, so adding replicas here cannot add throughput), device-tier hit rate and adapter loads per 1000
 * requests summed over the replicas' /metrics, the ceiling any routing has for this workload (the share of requests
 * the 96 most popular adapters take), a replica killed (SIGKILL) mid-run, answers through the balancer against a
 * single server's, and a replay of the same kind of stream for 1–16 replicas on separate machines
 * (bench/scale-sim.ts, with its assumptions). Not run (NaN, with a note) without haproxy.
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { ratioFigure, rateFigure, sideBySide, type BenchCase, type Figure, type ServerRun } from '../case.ts';
import { ApiClient, metric, percentile, zipfSampler, type Generation, type Throughput } from '../client.ts';
import { installed, renderHaproxyConfig, startProxy, type Proxy } from '../proxy.ts';
import { fitCost, replay, zipfTopShare } from '../scale-sim.ts';
import { freePort } from '../server.ts';
import { createRng } from '../../src/demo/index.ts';

const REPLICAS = 3;
const ADAPTERS = 300;
const ZIPF = 1.0;
const DEVICE_TIER = 32;
const CLIENTS = 48;
/** Requests per measured run (and per warm-up run, which fills the tiers), and new tokens each. */
const REQUESTS = 300;
const NEW_TOKENS = 8;
/** Requests of the killed-replica run; the kill comes after a third of them. */
const KILL_REQUESTS = 240;
/** (adapter, prompt) pairs whose answers through the balancer are compared with a single server's. */
const SAME_ANSWER_PAIRS = 24;
/** Replica counts of the replay, and its stream (after a warm-up of the same length). */
const SIM_REPLICAS = [1, 2, 3, 4, 6, 8, 12, 16];
const SIM_REQUESTS = 200_000;

type Policy = 'affinity' | 'roundRobin';
const LABELS: Record<Policy, string> = {
  affinity: 'through HAProxy, consistent hash on the adapter',
  roundRobin: 'through HAProxy, round robin',
};

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

/** Requests in flight on one replica (running and waiting), from its /metrics. */
async function inFlight(api: ApiClient): Promise<number> {
  const m = await api.metrics();
  return metric(m, 'lora_serve_requests_running') + metric(m, 'lora_serve_requests_waiting');
}

/** Like drive(), but a failed request is counted instead of ending the run; `after(done)` runs after each answer. */
async function driveCounting(jobs: readonly (() => Promise<Generation>)[], concurrency: number, after: (done: number) => void = () => {}):
  Promise<{ ok: Generation[]; failed: string[]; order: ('ok' | 'failed')[] }> {
  const ok: Generation[] = [];
  const failed: string[] = [];
  const order: ('ok' | 'failed')[] = [];
  let next = 0;
  const worker = async () => {
    while (next < jobs.length) {
      const job = jobs[next++]!;
      try {
        ok.push(await job());
        order.push('ok');
      } catch (err) {
        failed.push((err as Error).message.slice(0, 200));
        order.push('failed');
      }
      after(ok.length + failed.length);
    }
  };
  await Promise.all(Array.from({ length: Math.min(concurrency, jobs.length) }, worker));
  return { ok, failed, order };
}

export const scaleOut: BenchCase = {
  name: 'scale-out',
  title: `Scale-out: ${REPLICAS} replicas (device tier ${DEVICE_TIER} each) behind HAProxy, ${CLIENTS} clients, Zipf(${ZIPF}) over ${ADAPTERS} adapters: adapter affinity vs round robin`,
  adapters: ADAPTERS,
  async run(ctx) {
    if (!installed('haproxy')) {
      const note = 'haproxy is not installed (apt-get install haproxy)';
      return [
        { label: `tokens/s ${LABELS.affinity}`, key: 'affinity-rate', value: NaN, unit: 'tok/s', note },
        { label: `tokens/s ${LABELS.roundRobin}`, key: 'round-robin-rate', value: NaN, unit: 'tok/s', note },
      ];
    }
    // Six replicas, three per policy, on the server's defaults but for the device tier. `--workers auto` runs the
    // executor in worker threads here, which keeps each replica's HTTP thread free to answer HAProxy's health checks
    // during long prefill steps (with --workers 1 the executor computes in the HTTP thread: see docs/scale-out.md).
    return ctx.withServers(2 * REPLICAS, { 'max-loaded-adapters': DEVICE_TIER }, async (allApis, allRuns) => {
      const dir = resolve('.cache/bench-logs');
      mkdirSync(dir, { recursive: true });
      const sets: Record<Policy, { apis: ApiClient[]; runs: ServerRun[] }> = {
        affinity: { apis: allApis.slice(0, REPLICAS), runs: allRuns.slice(0, REPLICAS) },
        roundRobin: { apis: allApis.slice(REPLICAS), runs: allRuns.slice(REPLICAS) },
      };
      const proxies: [Policy, Proxy][] = [];
      const through = {} as Record<Policy, ApiClient>;
      try {
        for (const [k, balance] of [['affinity', undefined], ['roundRobin', 'roundrobin']] as const) {
          const port = await freePort();
          const file = join(dir, `scale-out-${k}.cfg`);
          writeFileSync(file, renderHaproxyConfig(port, sets[k].runs.map((r) => r.address), balance));
          proxies.push([k, await startProxy('haproxy', ['-f', file, '-db'], port)]);
          through[k] = new ApiClient(`http://127.0.0.1:${port}`);
        }
        const { adapters } = ctx;
        const rng = createRng(7);
        const zipf = zipfSampler(ADAPTERS, ZIPF, () => rng.uniform());
        const job = (api: ApiClient, adapter: number, i: number) => () => api.generate(ctx.prompt(i), { adapter: adapters.id(adapter), maxNewTokens: NEW_TOKENS });

        // --- affinity vs round robin, side by side ---
        const counts: Record<Policy, { hits: number; loads: number; requests: number; latencies: number[]; seconds: number }> = {
          affinity: { hits: 0, loads: 0, requests: 0, latencies: [], seconds: 0 },
          roundRobin: { hits: 0, loads: 0, requests: 0, latencies: [], seconds: 0 },
        };
        const calls: Record<Policy, number> = { affinity: 0, roundRobin: 0 };
        const measured = (k: Policy) => async (): Promise<Throughput> => {
          const timed = calls[k]++ > 0; // sideBySide's first call of each is its warm-up, which fills the tiers
          const before = await lookups(sets[k].apis);
          const jobs = Array.from({ length: REQUESTS }, (_, i) => job(through[k], zipf(), i));
          const t0 = performance.now();
          const r = await driveCounting(jobs, CLIENTS);
          const seconds = (performance.now() - t0) / 1000;
          if (r.failed.length) throw new Error(`${r.failed.length} requests failed through the ${k} proxy, first: ${r.failed[0]}`);
          const after = await lookups(sets[k].apis);
          if (timed) {
            const c = counts[k];
            c.hits += after.hits - before.hits;
            c.loads += after.loads - before.loads;
            c.requests += r.ok.length;
            c.latencies.push(...r.ok.map((g) => g.seconds));
            c.seconds += seconds;
          }
          const tokens = r.ok.reduce((s, g) => s + g.tokens, 0);
          return { tokens, seconds, tokensPerSecond: tokens / seconds, generations: r.ok };
        };
        const r = await sideBySide(ctx.sizes.rounds, { affinity: measured('affinity'), roundRobin: measured('roundRobin') }, ctx.log);
        const hitRate = (k: Policy) => counts[k].hits / (counts[k].hits + counts[k].loads);
        const loadsPer1000 = (k: Policy) => (1000 * counts[k].loads) / counts[k].requests;
        const ceiling = zipfTopShare(ADAPTERS, ZIPF, REPLICAS * DEVICE_TIER);

        // --- one answer through the balancer = one single server's answer ---
        const single = sets.roundRobin.apis[0]!;
        let different = 0;
        for (let i = 0; i < SAME_ANSWER_PAIRS; i++) {
          const adapter = (i * 37) % ADAPTERS;
          const [a, b] = [await job(through.affinity, adapter, i)(), await job(single, adapter, i)()];
          if (a.text !== b.text) different++;
        }

        // --- a replica killed mid-run (affinity) ---
        const victim = 1;
        const victimName = `replica${victim + 1}`; // the cfg's server names, in the order of the addresses
        const victimApi = sets.affinity.apis[victim]!;
        let inFlightAtKill = NaN;
        let killing: Promise<void> | null = null;
        const kill = async () => {
          inFlightAtKill = await inFlight(victimApi);
          sets.affinity.runs[victim]!.kill();
          ctx.log(`killed ${victimName} (SIGKILL) with ${inFlightAtKill} requests in flight on it`);
        };
        const killRun = await driveCounting(
          Array.from({ length: KILL_REQUESTS }, (_, i) => job(through.affinity, zipf(), i)), CLIENTS,
          (done) => { if (done === Math.floor(KILL_REQUESTS / 3)) killing ??= kill(); },
        );
        await killing;
        // A second run after the kill (HAProxy's health check, 2 s × 2, has marked the replica down by then): every
        // request must succeed on the two replicas left, the killed replica's adapters moved to them.
        const afterRun = await driveCounting(Array.from({ length: REQUESTS / 2 }, (_, i) => job(through.affinity, zipf(), i)), CLIENTS);
        const servedByVictimAfter = afterRun.ok.filter((g) => g.servedBy === victimName).length;

        // --- 1–16 replicas on separate machines: a replay, with a cost model fitted to the measurement ---
        const simRng = createRng(11);
        const simZipf = zipfSampler(ADAPTERS, ZIPF, () => simRng.uniform());
        const stream = Array.from({ length: 2 * SIM_REQUESTS }, () => simZipf());
        const perReplica = (k: Policy) => counts[k].requests / counts[k].seconds / REPLICAS; // requests/s per replica
        const cost = fitCost(
          { missRate: 1 - hitRate('affinity'), rate: perReplica('affinity') },
          { missRate: 1 - hitRate('roundRobin'), rate: perReplica('roundRobin') },
        );
        const sim3 = { affinity: replay(stream, REPLICAS, DEVICE_TIER, 'affinity'), roundRobin: replay(stream, REPLICAS, DEVICE_TIER, 'round-robin') };
        ctx.log(`replay of ${REPLICAS} replicas: hit rate affinity ${(100 * sim3.affinity.hitRate).toFixed(1)} % (measured ${(100 * hitRate('affinity')).toFixed(1)} %), ` +
          `round robin ${(100 * sim3.roundRobin.hitRate).toFixed(1)} % (measured ${(100 * hitRate('roundRobin')).toFixed(1)} %); ` +
          `cost model: ${(1000 * cost.base).toFixed(1)} ms per request + ${(1000 * cost.perLoad).toFixed(1)} ms per load, per replica`);
        const simFigures: Figure[] = [];
        for (const n of SIM_REPLICAS) {
          for (const [k, routing] of [['affinity', 'affinity'], ['roundRobin', 'round-robin']] as const) {
            const sim = replay(stream.slice(SIM_REQUESTS), n, DEVICE_TIER, routing);
            // tokens/s of n machines, each as fast as one replica measured here, load spread evenly
            const rate = (n / (cost.base + (1 - sim.hitRate) * cost.perLoad)) * NEW_TOKENS;
            const tag = `${n}-${routing}`;
            simFigures.push(
              { label: `replay, ${n} replicas, ${routing}: device-tier hit rate`, key: `sim-hit-${tag}`, value: 100 * sim.hitRate, unit: '%' },
              { label: `replay, ${n} replicas, ${routing}: adapter loads per 1000 requests`, key: `sim-loads-${tag}`, value: sim.loadsPer1000, unit: 'loads' },
              { label: `replay, ${n} replicas, ${routing}: busiest replica's share ÷ mean share`, key: `sim-share-${tag}`, value: sim.maxShare, unit: '×' },
              { label: `replay, ${n} replicas, ${routing}: estimated tokens/s (cost model, even load)`, key: `sim-rate-${tag}`, value: rate, unit: 'tok/s' },
            );
          }
        }
        const p95 = (k: Policy) => 1000 * percentile(counts[k].latencies, 95);

        const figures: Figure[] = [
          rateFigure(`tokens/s ${LABELS.affinity}`, r.affinity, { headline: true, key: 'affinity-rate' }),
          rateFigure(`tokens/s ${LABELS.roundRobin}`, r.roundRobin, { key: 'round-robin-rate' }),
          ratioFigure('affinity ÷ round robin, tokens/s', r.affinity, r.roundRobin, { headline: true, key: 'affinity-gain' }),
          { label: `tokens/s per replica, affinity (${REPLICAS} replicas sharing this machine's cores)`, key: 'affinity-rate-per-replica', value: (counts.affinity.requests * NEW_TOKENS) / counts.affinity.seconds / REPLICAS, unit: 'tok/s' },
          { label: `tokens/s per replica, round robin (${REPLICAS} replicas sharing this machine's cores)`, key: 'round-robin-rate-per-replica', value: (counts.roundRobin.requests * NEW_TOKENS) / counts.roundRobin.seconds / REPLICAS, unit: 'tok/s' },
          { label: `p95 latency ${LABELS.affinity}`, key: 'affinity-p95', value: p95('affinity'), unit: 'ms' },
          { label: `p95 latency ${LABELS.roundRobin}`, key: 'round-robin-p95', value: p95('roundRobin'), unit: 'ms' },
          { label: `device-tier hit rate, ${LABELS.affinity}`, value: 100 * hitRate('affinity'), unit: '%', headline: true, key: 'affinity-hit-rate', target: { op: '>=', value: 90 } },
          { label: `device-tier hit rate, ${LABELS.roundRobin}`, value: 100 * hitRate('roundRobin'), unit: '%', headline: true, key: 'round-robin-hit-rate' },
          { label: `ceiling for any routing: share of requests on the ${REPLICAS * DEVICE_TIER} most popular adapters`, value: 100 * ceiling, unit: '%', headline: true, key: 'hit-rate-ceiling' },
          { label: 'adapter loads per 1000 requests, affinity', value: loadsPer1000('affinity'), unit: 'loads', key: 'affinity-loads' },
          { label: 'adapter loads per 1000 requests, round robin', value: loadsPer1000('roundRobin'), unit: 'loads', key: 'round-robin-loads' },
          { label: 'adapter loads, round robin ÷ affinity', value: loadsPer1000('roundRobin') / loadsPer1000('affinity'), unit: '×', headline: true, key: 'loads-ratio', target: { op: '>=', value: 2 } },
          { label: `answers through the balancer unlike a single server's (of ${SAME_ANSWER_PAIRS})`, value: different, unit: '', headline: true, key: 'different-answers', target: { op: '<=', value: 0 } },
          { label: 'replica killed mid-run: requests in flight on it at the kill', value: inFlightAtKill, unit: '', key: 'kill-in-flight' },
          { label: `replica killed mid-run: failed requests (of ${KILL_REQUESTS}), at most those in flight on it`, value: killRun.failed.length, unit: '', headline: true, key: 'kill-failed', target: { op: '<=', value: inFlightAtKill } },
          { label: `after the kill: failed requests (of ${REQUESTS / 2})`, value: afterRun.failed.length, unit: '', headline: true, key: 'after-kill-failed', target: { op: '<=', value: 0 } },
          { label: 'after the kill: answers served by the killed replica', value: servedByVictimAfter, unit: '', key: 'after-kill-victim', target: { op: '<=', value: 0 } },
          ...simFigures,
        ];
        if (killRun.failed.length) ctx.log(`killed-replica run: ${killRun.failed.length} failed, first: ${killRun.failed[0]}`);
        return figures;
      } finally {
        for (const [k, p] of proxies) {
          p.stop();
          writeFileSync(join(dir, `scale-out-${k}-haproxy.log`), p.output()); // one line per request (option httplog)
        }
        await Promise.all(Object.values(through).map((a) => a.close()));
      }
    });
  },
};
