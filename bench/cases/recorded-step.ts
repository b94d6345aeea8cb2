/**
 * Recorded decode steps (`--backend webgpu` only; in the harness, no server): the bench model's greedy decode through
 * TfExecutor with its default, recorded steps (src/backend/webgpu/recorded-step.ts: each step replayed from a
 * recording while the batch and its KV caches stay the same) against every step through tfjs (`recordSteps: false`),
 * side by side (the two executors alternate, each round decoding `newTokens` steps from a fresh prefill, so KV
 * growths and re-recordings happen as in serving), for one sequence and for 8. Per decode step: the main thread's own
 * time (the profiler's phases but the wait for the readback: tfjs's per-op work, or the replay's input writes,
 * encoding and submit) — what bounds a decode step on a GPU, where the kernels take microseconds — and the wall time
 * (on lavapipe the shaders run on the CPU, so it is mostly theirs). Dispatches per step are the same on both paths.
 * Then continuous batching's churn: CHURN_ROWS sequences decoding, each leaving after its own answer length
 * (CHURN_LENGTHS) and a new one joining (prefilled) at once, through three executors: every step through tfjs, recorded
 * steps with the rows re-gathered at each join and leave (`slotRows: false`), and the default (recorded steps, free
 * rows kept in place and joiners moved into them): per decode step the main thread's own time and which steps were
 * replays.
 */
import * as tf from '@tensorflow/tfjs-core';
import { median } from '../client.ts';
import type { BenchCase, Figure } from '../case.ts';
import { harnessOnWebGPU } from './decode-linear.ts';
import { webgpuCounts } from '../../src/backend/webgpu/counters.ts';
import type { DecodeItem, StepResult } from '../../src/engine/executor.ts';
import { TfExecutor } from '../../src/exec/tf-executor.ts';
import { CausalLM } from '../../src/model/model.ts';
import { profiler } from '../../src/obs/profile.ts';

const ROWS = [1, 8];
/** The churn workload: rows, and the answer lengths its sequences cycle through (a leave every 1–3 steps). */
const CHURN_ROWS = 8;
const CHURN_LENGTHS = [5, 9, 13, 17, 7, 11, 15, 19];

/** What a decode step of the default executor was. */
type StepKind = 'replay' | 'recording' | 'tfjs';

/**
 * One decode step of the base model with the profiler on: its result and the main thread's own ms (the profile's
 * phases but the readback's wait).
 */
async function profiledDecode(ex: TfExecutor, items: DecodeItem[]): Promise<{ res: StepResult; ms: number }> {
  profiler.reset();
  profiler.enabled = true;
  try {
    const res = await ex.decode(items, { kind: 'none' });
    const decode = profiler.snapshot().decode ?? {};
    const all = Object.values(decode).reduce((a, b) => a + (b ?? 0), 0);
    return { res, ms: (all - (decode.logits_download ?? 0)) * 1000 };
  } finally {
    profiler.enabled = false;
  }
}

export const recordedStep: BenchCase = {
  name: 'recorded-step',
  title: 'WebGPU: decode steps replayed from a recording (the default) vs run through tfjs, main thread\'s time and wall time per step (in the harness, no server)',
  adapters: 0,
  backend: 'webgpu',
  async run(ctx) {
    await harnessOnWebGPU(ctx);
    const model = CausalLM.load(ctx.modelDir);
    const V = model.config.vocabSize;
    const steps = ctx.sizes.newTokens;
    const configs = [['through tfjs', new TfExecutor(model, { recordSteps: false })], ['recorded (default)', new TfExecutor(model)]] as const;
    /**
     * One round: prefill `rows` prompts of 32 tokens, decode `steps` greedy steps. Per step: the main thread's ms and
     * what the step was (a replay, a recording, or a step through tfjs without one); per round: wall ms per step and
     * dispatches per step.
     */
    const round = async (ex: TfExecutor, rows: number, seed: number) => {
      const prompts = Array.from({ length: rows }, (_, r) => Array.from({ length: 32 }, (_, t) => (seed * 31 + r * 17 + t * 7) % V));
      await ex.prefill(prompts.map((tokens, seq) => ({ seq, tokens, start: 0, last: true, adapter: null, allLogits: false, pick: true })), { kind: 'none' });
      const token = prompts.map(() => 1);
      const perStep: { ms: number; kind: StepKind }[] = [];
      const d0 = webgpuCounts()!.dispatch;
      const t0 = performance.now();
      for (let s = 0; s < steps; s++) {
        const before = { ...ex.recordedSteps };
        const { res, ms } = await profiledDecode(ex, prompts.map((p, seq) => ({ seq, token: token[seq]!, position: p.length + s, adapter: null, pick: true })));
        const kind: StepKind = ex.recordedSteps.replayed > before.replayed ? 'replay' : ex.recordedSteps.recorded > before.recorded ? 'recording' : 'tfjs';
        perStep.push({ ms, kind });
        prompts.forEach((_, seq) => (token[seq] = res.picked?.get(seq)?.id ?? 0));
      }
      const wall = performance.now() - t0;
      const dispatches = webgpuCounts()!.dispatch - d0;
      prompts.forEach((_, seq) => ex.release(seq));
      return { perStep, wall: wall / steps, dispatches: dispatches / steps };
    };
    const figures: Figure[] = [];
    const mean = (xs: readonly number[]) => xs.reduce((a, b) => a + b, 0) / xs.length;
    try {
      for (const rows of ROWS) {
        const main: number[][] = configs.map(() => []); // per round: mean main-thread ms per step
        const wall: number[][] = configs.map(() => []);
        const byKind: Record<StepKind, number[]> = { replay: [], recording: [], tfjs: [] }; // per step, the default executor
        const plainSteps: number[] = []; // per step, every step through tfjs
        const dispatches: number[] = configs.map(() => 0);
        for (let r = 0; r <= ctx.sizes.rounds; r++) {
          // Alternate which goes first; round 0 compiles the shaders and is dropped.
          for (let k = 0; k < configs.length; k++) {
            const n = (r + k) % configs.length;
            const m = await round(configs[n]![1], rows, r);
            if (r === 0) continue;
            main[n]!.push(mean(m.perStep.map((x) => x.ms)));
            wall[n]!.push(m.wall);
            dispatches[n] = m.dispatches;
            for (const x of m.perStep) (n === 0 ? plainSteps : byKind[x.kind]).push(x.ms);
          }
        }
        const count = (kind: StepKind) => `${byKind[kind].length} ${kind === 'tfjs' ? 'through tfjs' : kind === 'replay' ? 'replays' : 'recordings'}`;
        ctx.log(`${rows} row(s): main thread per step (mean) ${configs.map(([name], n) => `${name} ${median(main[n]!).toFixed(2)} ms`).join(', ')}; ` +
          `median step: through tfjs ${median(plainSteps).toFixed(2)} ms, replay ${median(byKind.replay).toFixed(2)} ms, recording ${median(byKind.recording).toFixed(2)} ms ` +
          `(${count('replay')}, ${count('recording')}, ${count('tfjs')}: ${configs[1][1].recordedSteps.lastRefusal || '-'}); ` +
          `wall ${configs.map(([name], n) => `${name} ${median(wall[n]!).toFixed(2)} ms`).join(', ')}; dispatches per step ${dispatches.join(' / ')}`);
        const ratio = (a: number[], b: number[]) => a.map((x, i) => x / b[i]!);
        figures.push(
          { label: `${rows} row(s): main thread's time per decode step (mean of a ${steps}-token answer), through tfjs`, key: `${rows}/main-tfjs`, value: median(main[0]!), unit: 'ms', values: main[0] },
          { label: `${rows} row(s): the same, recorded steps (default)`, key: `${rows}/main-recorded`, value: median(main[1]!), unit: 'ms', values: main[1] },
          { label: `${rows} row(s): main thread's time per decode step, through tfjs ÷ recorded (default)`, key: `${rows}/main-ratio`, value: median(ratio(main[0]!, main[1]!)), unit: '×', values: ratio(main[0]!, main[1]!), headline: true },
          { label: `${rows} row(s): main thread's time of a step through tfjs (median step)`, key: `${rows}/step-tfjs`, value: median(plainSteps), unit: 'ms' },
          { label: `${rows} row(s): main thread's time of a replayed step (median step; ${byKind.replay.length} of ${byKind.replay.length + byKind.recording.length + byKind.tfjs.length} steps)`, key: `${rows}/step-replay`, value: median(byKind.replay), unit: 'ms' },
          { label: `${rows} row(s): main thread's time of a recording step (median step; ${byKind.recording.length} steps)`, key: `${rows}/step-recording`, value: median(byKind.recording), unit: 'ms' },
          { label: `${rows} row(s): wall time per decode step, through tfjs`, key: `${rows}/wall-tfjs`, value: median(wall[0]!), unit: 'ms', values: wall[0] },
          { label: `${rows} row(s): wall time per decode step, recorded (default)`, key: `${rows}/wall-recorded`, value: median(wall[1]!), unit: 'ms', values: wall[1] },
          { label: `${rows} row(s): dispatches per decode step, recorded (default)`, key: `${rows}/dispatches`, value: dispatches[1]!, unit: '', note: `through tfjs: ${dispatches[0]}` },
        );
      }
      figures.push(...await churn(ctx, model, steps));
    } finally {
      for (const [, ex] of configs) ex.dispose();
      model.dispose();
      tf.disposeVariables();
    }
    return figures;
  },
};

/**
 * The churn workload (see the file's comment) through three executors, alternating which goes first; each round runs
 * `steps` decode steps from a fresh batch, and the first round, which compiles the shaders, is dropped.
 */
async function churn(ctx: Parameters<BenchCase['run']>[0], model: CausalLM, steps: number): Promise<Figure[]> {
  const V = model.config.vocabSize;
  const configs = [
    ['through tfjs', new TfExecutor(model, { recordSteps: false })],
    ['recorded, rows re-gathered', new TfExecutor(model, { slotRows: false })],
    ['recorded, free rows (default)', new TfExecutor(model)],
  ] as const;
  const round = async (ex: TfExecutor, seed: number) => {
    let next = 0;
    const live = new Map<number, { position: number; left: number; token: number }>();
    const join = async (n: number) => {
      const items = Array.from({ length: n }, () => {
        const seq = next++;
        const tokens = Array.from({ length: 20 + ((seq * 7 + seed) % 13) }, (_, t) => (seed * 31 + seq * 17 + t * 7) % V);
        live.set(seq, { position: tokens.length, left: CHURN_LENGTHS[seq % CHURN_LENGTHS.length]!, token: 0 });
        return { seq, tokens, start: 0, last: true, adapter: null, allLogits: false, pick: true };
      });
      const res = await ex.prefill(items, { kind: 'none' });
      for (const it of items) live.get(it.seq)!.token = res.picked?.get(it.seq)?.id ?? 0;
    };
    await join(CHURN_ROWS);
    const before = { ...ex.recordedSteps };
    const main: number[] = [];
    let wall = 0;
    for (let s = 0; s < steps; s++) {
      const t0 = performance.now();
      const { res, ms } = await profiledDecode(ex, [...live].map(([seq, x]) => ({ seq, token: x.token, position: x.position, adapter: null, pick: true })));
      wall += performance.now() - t0;
      main.push(ms);
      let left = 0;
      for (const [seq, x] of live) {
        x.token = res.picked?.get(seq)?.id ?? 0;
        x.position++;
        if (--x.left > 0) continue;
        ex.release(seq);
        live.delete(seq);
        left++;
      }
      if (left > 0) await join(left);
    }
    for (const seq of live.keys()) ex.release(seq);
    const replayed = ex.recordedSteps.replayed - before.replayed;
    return { main: main.reduce((a, b) => a + b, 0) / steps, wall: wall / steps, replayed: replayed / steps, joins: next - CHURN_ROWS };
  };
  const main: number[][] = configs.map(() => []);
  const wall: number[][] = configs.map(() => []);
  const replayed: number[][] = configs.map(() => []);
  let joins = 0;
  try {
    for (let r = 0; r <= ctx.sizes.rounds; r++) {
      for (let k = 0; k < configs.length; k++) {
        const n = (r + k) % configs.length;
        const m = await round(configs[n]![1], r);
        if (r === 0) continue; // compiles the shaders
        main[n]!.push(m.main);
        wall[n]!.push(m.wall);
        replayed[n]!.push(m.replayed);
        joins = m.joins;
      }
    }
  } finally {
    for (const [, ex] of configs) ex.dispose();
  }
  const ratio = (a: number[], b: number[]) => a.map((x, i) => x / b[i]!);
  const what = `churn, ${CHURN_ROWS} rows, ${joins} joins in ${steps} steps`;
  ctx.log(`${what}: main thread per step (mean) ${configs.map(([name], n) => `${name} ${median(main[n]!).toFixed(2)} ms`).join(', ')}; ` +
    `replayed ${configs.map(([name], n) => `${name} ${(100 * median(replayed[n]!)).toFixed(0)} %`).join(', ')}; wall ${configs.map(([name], n) => `${name} ${median(wall[n]!).toFixed(1)} ms`).join(', ')}`);
  return [
    ...configs.map(([name], n): Figure => ({ label: `${what}: main thread's time per decode step (mean), ${name}`, key: `churn/main-${n}`, value: median(main[n]!), unit: 'ms', values: main[n] })),
    ...configs.slice(1).map(([name], i): Figure => ({ label: `${what}: share of decode steps replayed, ${name}`, key: `churn/replayed-${i + 1}`, value: median(replayed[i + 1]!), unit: '', values: replayed[i + 1] })),
    { label: `${what}: main thread's time per decode step, rows re-gathered ÷ free rows (default)`, key: 'churn/main-ratio', value: median(ratio(main[1]!, main[2]!)), unit: '×', values: ratio(main[1]!, main[2]!), headline: true },
    { label: `${what}: main thread's time per decode step, through tfjs ÷ free rows (default)`, key: 'churn/main-ratio-tfjs', value: median(ratio(main[0]!, main[2]!)), unit: '×', values: ratio(main[0]!, main[2]!) },
    ...configs.map(([name], n): Figure => ({ label: `${what}: wall time per decode step, ${name}`, key: `churn/wall-${n}`, value: median(wall[n]!), unit: 'ms', values: wall[n] })),
  ];
}
