/**
 * The long soak: many mixed requests (plain and streamed generations, streams the client abandons, uploads and
 * deletes, more adapters than the device tier holds) against one server, every answer compared with its solo
 * answer, and the server's memory, tensors and latency sampled at rest every so many requests.
 */
import { createRng } from '../../src/demo/index.ts';
import { adapterBytes, freshDir, placeAdapter, PROMPTS, rssBytes, SoakClient, SoloAnswers, startSoakServer, type Answer } from './harness.ts';
import { percentile, round, sleep, slope, Violations, type Scenario } from './scenario.ts';

const ADAPTERS = 12;
const DEVICE_TIER = 4;
const CONCURRENCY = 12;
/** Ids that are deleted and uploaded again during the run, each always with the files of `soak-0<i>`. */
const CHURNED = ['churn-0', 'churn-1'] as const;

type Kind = 'generate' | 'stream' | 'cancelled stream' | 'churned id' | 'upload/delete';

/** The request mix: cumulative shares. */
const MIX: readonly [Kind, number][] = [['upload/delete', 0.02], ['churned id', 0.10], ['cancelled stream', 0.18], ['stream', 0.40], ['generate', 1]];

interface Sample {
  readonly requests: number;
  readonly rss: number;
  readonly tensors: number;
  /** p95 of the plain generations of the chunk before the sample, seconds. */
  readonly p95: number;
}

/** RSS and p95 trends are judged from this many requests on (a shorter run reports them only). */
const JUDGED_FROM = 10_000;

/**
 * Live TensorFlow.js tensors with the device tier emptied: every adapter unloaded (POST /adapters/{id}/unload), so
 * that the count is the base model's and the executors' own, whatever adapters the traffic left resident.
 */
async function restingTensors(client: SoakClient): Promise<number> {
  const { adapters } = await client.json<{ adapters: { id: string }[] }>('/adapters');
  for (const a of adapters) await client.pool.request({ method: 'POST', path: `/adapters/${a.id}/unload` }).then((r) => r.body.dump());
  return client.metric('lora_serve_tfjs_tensors');
}

const adapterId = (i: number) => `soak-${String(i).padStart(2, '0')}`;

export const mixedSoak: Scenario = {
  name: 'soak',
  criterion: `mixed requests (60 % plain, 22 % streamed, 8 % streams abandoned after the first event, 8 % on ids being deleted and uploaded again, 2 % those uploads and deletes) over ${ADAPTERS} adapters and the base with a device tier of ${DEVICE_TIER}, ${CONCURRENCY} at a time: 0 wrong answers against the solo answers, 0 errors but the 404 of a deleted id, no request left running; sampled at rest every 5 % of the run: TensorFlow.js tensors with the device tier emptied constant; from 10,000 requests on, RSS within 5 % after warm-up (the first 20 %; slope reported per 10k requests) and the p95 of the last third of the samples within 2× of the first third`,
  async run(ctx) {
    const v = new Violations();
    const total = ctx.soakRequests ?? (ctx.size === 'short' ? 600 : 50_000);
    const chunk = Math.max(100, Math.round(total / 20));
    const dir = await freshDir(ctx.workDir, 'soak');
    const files = await Promise.all(Array.from({ length: ADAPTERS }, (_, i) => adapterBytes(ctx.workDir, { seed: 900 + i })));
    for (const [i, f] of files.entries()) await placeAdapter(dir, adapterId(i), f);
    const server = await startSoakServer(ctx, 'soak', dir, { 'max-loaded-adapters': DEVICE_TIER });
    const client = new SoakClient(server.api.url, CONCURRENCY + 4);
    try {
      const solo = new SoloAnswers();
      const labels = ['base', ...files.map((_, i) => adapterId(i))];
      await solo.record(client, 'base', null);
      for (let i = 0; i < ADAPTERS; i++) await solo.record(client, adapterId(i), adapterId(i));
      for (const c of solo.collisions(labels)) v.add('indistinguishable solo answers', c);
      const tensorsBefore = await restingTensors(client);

      const rng = createRng(12345);
      const counts: Record<string, number> = {};
      const bump = (key: string) => void (counts[key] = (counts[key] ?? 0) + 1);
      const samples: Sample[] = [];
      let done = 0;
      const t0 = performance.now();

      /** One request of the mix, judged. Returns a plain generation's latency. */
      const one = async (k: number): Promise<number | undefined> => {
        const u = rng.uniform();
        const kind = MIX.find(([, share]) => u < share)![0];
        const prompt = PROMPTS[k % PROMPTS.length]!;
        if (kind === 'upload/delete') {
          const c = k % CHURNED.length;
          const a = k % 4 < 2 ? await client.remove(CHURNED[c]!) : await client.upload(CHURNED[c]!, files[c]!);
          bump(`admin ${a.status}${a.code ? ` ${a.code}` : ''}`);
          v.check(a.status === 200 || (a.status === 404 && a.code === 'ADAPTER_NOT_FOUND'), 'admin error', () => `${a.status} ${a.code ?? a.failure ?? ''}`);
          return undefined;
        }
        const churned = kind === 'churned id';
        const pick = Math.floor(rng.uniform() * (ADAPTERS + 1)) - 1;
        const adapter = churned ? CHURNED[k % CHURNED.length]! : pick < 0 ? null : adapterId(pick);
        const expected = churned ? adapterId(k % CHURNED.length) : adapter ?? 'base';
        const stream = kind === 'stream' || kind === 'cancelled stream' || (churned && k % 2 === 0);
        const a: Answer = await client.generate(prompt, adapter, { stream, cancelAfterFirst: kind === 'cancelled stream' });
        if (kind === 'cancelled stream' && a.failure === 'aborted') {
          bump('streams abandoned');
          return undefined;
        }
        if (churned && a.status === 404 && a.code === 'ADAPTER_NOT_FOUND') {
          bump('404 on a deleted id');
          return undefined;
        }
        if (a.status !== 200 || a.code !== undefined) {
          bump(a.status === 0 ? 'transport failures' : `errors ${a.status} ${a.code ?? '(no code)'}`);
          v.add(a.code === undefined ? 'non-coded error' : 'error', `${kind} on ${adapter ?? 'base'}: ${a.status} ${a.code ?? a.failure ?? a.text?.slice(0, 100) ?? ''}`);
          return undefined;
        }
        bump(stream ? 'streams answered' : 'plain answers');
        v.check(a.text === solo.get(expected, prompt), 'wrong answer', () => `${kind} on ${adapter ?? 'base'} "${prompt}": ${JSON.stringify(a.text)} is ${solo.labelsOf(prompt, a.text!).join(', ') || 'no solo answer'}`);
        return stream ? undefined : a.seconds;
      };

      while (done < total) {
        const n = Math.min(chunk, total - done);
        const latencies: number[] = [];
        let next = 0;
        await Promise.all(Array.from({ length: CONCURRENCY }, async () => {
          while (next < n) {
            const s = await one(done + next++);
            if (s !== undefined) latencies.push(s);
          }
        }));
        done += n;
        // At rest: abandoned streams must have been released.
        let running = await client.metric('lora_serve_requests_running');
        for (let i = 0; i < 20 && running > 0; i++) {
          await sleep(250);
          running = await client.metric('lora_serve_requests_running');
        }
        v.check(running === 0, 'requests left running', () => `${running} after ${done} requests`);
        samples.push({ requests: done, rss: rssBytes(server.pid), tensors: await restingTensors(client), p95: percentile(latencies, 95) });
        ctx.log(`soak: ${done}/${total} requests, RSS ${round(samples.at(-1)!.rss / 2 ** 20, 1)} MiB, tensors ${samples.at(-1)!.tensors}, p95 ${round(samples.at(-1)!.p95)} s`);
      }
      const seconds = (performance.now() - t0) / 1000;

      const tensors = [tensorsBefore, ...samples.map((s) => s.tensors)];
      v.check(Math.max(...tensors) === Math.min(...tensors), 'tensor count not constant', () => tensors.join(', '));
      const warm = samples.filter((s) => s.requests > 0.2 * total);
      const rssGrowth = warm.at(-1)!.rss / warm[0]!.rss - 1;
      const third = Math.max(1, Math.floor(warm.length / 3));
      const mean = (xs: number[]) => xs.reduce((a, b) => a + b, 0) / xs.length;
      const p95First = mean(warm.slice(0, third).map((s) => s.p95));
      const p95Last = mean(warm.slice(-third).map((s) => s.p95));
      const notes: string[] = [];
      if (total >= JUDGED_FROM) {
        v.check(rssGrowth <= 0.05, 'RSS growth', () => `${round(100 * rssGrowth, 1)} % from ${warm[0]!.requests} to ${total} requests`);
        v.check(p95Last <= 2 * p95First, 'p95 not stable', () => `${round(p95Last)} s in the last third vs ${round(p95First)} s in the first`);
      } else {
        notes.push(`RSS and p95 are reported but not judged below ${JUDGED_FROM} requests (too few for a trend).`);
      }
      const evictions = await client.metric('lora_serve_adapter_evictions_total');
      return v.result(this, {
        requests: total, 'requests per second': round(total / seconds, 1), samples: samples.length, ...counts,
        'adapter evictions': evictions,
        'RSS at warm-up MiB': round(warm[0]!.rss / 2 ** 20, 1), 'RSS at the end MiB': round(warm.at(-1)!.rss / 2 ** 20, 1),
        'RSS slope MiB per 10k requests': round((slope(warm.map((s) => [s.requests, s.rss])) * 10_000) / 2 ** 20, 2),
        'RSS growth after warm-up %': round(100 * rssGrowth, 1),
        'tfjs tensors at rest, device tier emptied: min': Math.min(...tensors), 'max': Math.max(...tensors),
        'tfjs tensors slope per 10k requests': round(slope(samples.map((s) => [s.requests, s.tensors])) * 10_000, 2),
        'p95 first third s': round(p95First), 'p95 last third s': round(p95Last),
      }, [...notes, 'RSS is read from /proc/<pid>/status, tensors from lora_serve_tfjs_tensors (GET /metrics), both at rest between chunks; p95 is timed on the machine of the run.']);
    } finally {
      await client.close();
      await server.stop();
    }
  },
};
