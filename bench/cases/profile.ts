/**
 * Profile: where a step's time goes (`--profile`, src/obs/profile.ts), for the two workloads of the batching case:
 * 32 concurrent requests on 32 adapters, and requests one at a time. Per decode (and prefill) step: the main
 * thread's wall time split into engine JavaScript, sampling and waiting for the workers, and the executor's
 * time split into base matmuls, LoRA deltas, attention, KV cache, LM head, other kernels, LoRA setup, logits
 * download and executor JavaScript (summed over the workers: thread time, not wall time).
 */
import type { BenchCase, CaseContext, Figure } from '../case.ts';
import { drive, metric, type ApiClient } from '../client.ts';
import { PHASES, STEP_KINDS, type Phase, type StepKind } from '../../src/obs/profile.ts';

const N = 32;
const MAIN: readonly Phase[] = ['engine', 'sampling', 'executor_wait'];

interface Snapshot {
  /** Seconds per `${kind}/${phase}`. */
  readonly seconds: Map<string, number>;
  readonly steps: Map<StepKind, number>;
}

async function snapshot(api: ApiClient): Promise<Snapshot> {
  const m = await api.metrics();
  const seconds = new Map<string, number>();
  const steps = new Map<StepKind, number>();
  for (const kind of STEP_KINDS) {
    steps.set(kind, metric(m, 'lora_serve_step_duration_seconds_count', { kind })); // engine steps (steps_total counts passes)
    for (const phase of Object.keys(PHASES) as Phase[]) seconds.set(`${kind}/${phase}`, metric(m, 'lora_serve_profile_seconds_total', { kind, phase }));
  }
  return { seconds, steps };
}

/** Figures for one workload: ms per step of each phase (executor phases summed over the workers). */
function figures(name: string, before: Snapshot, after: Snapshot, workers: number, kinds: readonly StepKind[]): Figure[] {
  const out: Figure[] = [];
  for (const kind of kinds) {
    const steps = (after.steps.get(kind) ?? 0) - (before.steps.get(kind) ?? 0);
    if (steps === 0) continue;
    const ms = (phase: Phase) => (1000 * ((after.seconds.get(`${kind}/${phase}`) ?? 0) - (before.seconds.get(`${kind}/${phase}`) ?? 0))) / steps;
    // In-process (one worker) the executor runs on the main thread; with workers, its phases are summed over them.
    const exec = (Object.keys(PHASES) as Phase[]).filter((p) => !MAIN.includes(p));
    const execTotal = exec.reduce((s, p) => s + ms(p), 0);
    const main = MAIN.reduce((s, p) => s + ms(p), 0) + (workers > 1 ? 0 : execTotal);
    out.push({ label: `${name}, ${kind}: main thread ms/step (${steps} steps)`, key: `${name}/${kind}/main`, value: main, unit: 'ms', headline: true });
    for (const p of MAIN) out.push({ label: `${name}, ${kind}: ${p}`, value: ms(p), unit: 'ms/step' });
    out.push({ label: `${name}, ${kind}: executor ms/step${workers > 1 ? `, summed over ${workers} workers` : ''}`, key: `${name}/${kind}/executor`, value: execTotal, unit: 'ms', headline: true });
    for (const p of [...exec].sort((a, b) => ms(b) - ms(a))) {
      out.push({ label: `${name}, ${kind}: ${p} (${((100 * ms(p)) / execTotal).toFixed(1)} %)`, value: ms(p), unit: 'ms/step' });
    }
  }
  return out;
}

async function profiled(api: ApiClient, ctx: CaseContext, workers: number, name: string, kinds: readonly StepKind[], work: () => Promise<unknown>): Promise<Figure[]> {
  const before = await snapshot(api);
  await work();
  const after = await snapshot(api);
  if ([...after.seconds.values()].every((v) => v === 0)) throw new Error('the server reported no profile (was it started with --profile?)');
  ctx.log(`${name}: profiled`);
  return figures(name, before, after, workers, kinds);
}

export const profile: BenchCase = {
  name: 'profile',
  title: `Profile (--profile): per-step time by phase, ${N} concurrent requests on ${N} adapters and one at a time`,
  adapters: N,
  run: (ctx) => ctx.withServer({ profile: 'true' }, async (api, server) => {
    const { sizes, adapters } = ctx;
    const run = (count: number, concurrency: number, maxNewTokens = sizes.newTokens) =>
      drive(Array.from({ length: count }, (_, i) => () => api.generate(ctx.prompt(i), { adapter: adapters.id(i), maxNewTokens })), concurrency);
    await run(N, N, 2); // load the adapters, warm the kernels
    return [
      ...await profiled(api, ctx, server.workers, `${N} adapters`, STEP_KINDS, () => run(N, N)),
      ...await profiled(api, ctx, server.workers, 'one at a time', ['decode'], () => run(sizes.sequential, 1)),
    ];
  }, { 'max-loaded-adapters': N, 'max-batch-size': N }),
};
