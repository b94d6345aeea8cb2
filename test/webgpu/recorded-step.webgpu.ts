/**
 * Recorded decode steps (src/backend/webgpu/recorded-step.ts, TfExecutor's recordSteps): the same decode run through
 * two executors on one model, one replaying its recorded steps and one running every step through tfjs, gives the
 * same logits, device-picked tokens and shortlists bit for bit — with adapters (a bank, then merged), rows joining,
 * leaving, picked, shortlisted or read as logits, the KV cache growing, Gemma 2's windows and soft-caps, Phi-3's longrope switch — while most steps are
 * replays of as many dispatches as the steps through tfjs. A step reading host values nobody named is refused, and
 * nothing leaks. test/webgpu.test.ts runs this file with TEST_BACKEND=webgpu.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import * as tf from '@tensorflow/tfjs-core';
import { webgpuCounts } from '../../src/backend/webgpu/counters.ts';
import { recordStep, stepInput } from '../../src/backend/webgpu/recorded-step.ts';
import { TINY_GEMMA2, TINY_LLAMA, TINY_PHI3, writePeftAdapter, type CheckpointOptions } from '../../src/demo/index.ts';
import type { DecodeItem, ExecAdapter, LoraPlan, StepResult } from '../../src/engine/executor.ts';
import { DEFAULT_SAMPLING, Sampler, type SamplingParams } from '../../src/engine/sampling.ts';
import { TfExecutor } from '../../src/exec/tf-executor.ts';
import type { AdapterLease } from '../../src/lora/types.ts';
import { CausalLM } from '../../src/model/model.ts';
import { makeManager } from '../helpers/lora.ts';
import { argmax, fixtureCheckpoint, setupBackend, tempDir, testBackend } from '../helpers/tf.ts';

const tmp = tempDir();
before(async () => {
  assert.equal(testBackend(), 'webgpu', 'run with TEST_BACKEND=webgpu (test/webgpu.test.ts does)');
  await setupBackend();
});
after(tmp.cleanup);

/** One sequence of the script: its prompt, adapter, the step it joins at and leaves after, and whether its tokens are picked on the device. */
interface Seq {
  readonly prompt: number[];
  readonly adapter: number | null;
  readonly joins: number;
  readonly leaves: number;
  readonly pick: boolean;
  /** Sampled from a shortlist at this temperature. */
  readonly shortlist?: number;
  /** A fallback shortlist (top_p alone): its row is read too, with the step or through readLogits. */
  readonly fallback?: boolean;
  /** logit_bias and penalties: its rows are edited on the device before the pick or shortlist (DecodeItem.edits). */
  readonly sampling?: Partial<SamplingParams>;
}

/** What a run returned at each step, per sequence: the logits row or the picked [id, logprob]. */
type Trace = Map<number, number[]>[];

/** Rows read through StepResult.readLogits (a fallback shortlist's row not read with its step). */
let rowsRead = 0;
/** Per decode step of the last drive: the rows its pass reports (StepPass.rows) and the running sequences. */
let passRows: [number, number][] = [];

/**
 * Drives an executor through `steps` engine steps: sequences join (prefill) at their step and leave after theirs;
 * every running sequence decodes its greedy token. `plan(step)`: the LoRA plan of the step's decode.
 */
async function drive(ex: TfExecutor, seqs: readonly Seq[], leases: readonly AdapterLease[], steps: number, plan: (step: number) => LoraPlan): Promise<Trace> {
  const trace: Trace = [];
  passRows = [];
  const last = new Map<number, { token: number; position: number }>();
  const generated = new Map<number, number[]>();
  const editsOf = (s: number) => {
    const p = seqs[s]!.sampling;
    return p ? new Sampler({ ...DEFAULT_SAMPLING, ...p }).edits(seqs[s]!.prompt, generated.get(s) ?? [], 0, ex.vocabSize) : undefined;
  };
  const take = async (s: number, res: StepResult, out: Map<number, number[]>) => {
    const p = res.picked?.get(s);
    const short = res.shortlists?.get(s);
    let l = res.logits.get(s);
    if (!l && short && seqs[s]!.fallback) {
      l = (await res.readLogits!([s])).get(s);
      rowsRead++;
    }
    out.set(s, p ? [p.id, p.logprob] : short ? [...short.ids, ...short.logits, short.logNorm, ...(l ?? [])] : Array.from(l!));
    const token = p ? p.id : short ? short.ids[0]! : argmax(l!);
    generated.set(s, [...generated.get(s) ?? [], token]);
    const prev = last.get(s);
    last.set(s, { token, position: prev ? prev.position + 1 : seqs[s]!.prompt.length });
  };
  for (let step = 0; step < steps; step++) {
    const out = new Map<number, number[]>();
    const running = [...last.keys()];
    if (running.length > 0) {
      const items: DecodeItem[] = running.map((s) => ({
        seq: s, token: last.get(s)!.token, position: last.get(s)!.position, adapter: seqs[s]!.adapter === null ? null : leases[seqs[s]!.adapter!]!.adapter, pick: seqs[s]!.pick,
        ...(seqs[s]!.shortlist ? { shortlist: { temperature: seqs[s]!.shortlist!, fallback: seqs[s]!.fallback } } : {}),
        edits: editsOf(s),
      }));
      const res = await ex.decode(items, plan(step));
      passRows.push([res.passes.reduce((n, p) => n + p.rows, 0), items.length]);
      for (const s of running) await take(s, res, out);
    }
    const joining = seqs.map((_, s) => s).filter((s) => seqs[s]!.joins === step);
    if (joining.length > 0) {
      const res = await ex.prefill(joining.map((s) => ({
        seq: s, tokens: seqs[s]!.prompt, start: 0, last: true, adapter: seqs[s]!.adapter === null ? null : leases[seqs[s]!.adapter!]!.adapter, allLogits: false, pick: seqs[s]!.pick,
        ...(seqs[s]!.shortlist ? { shortlist: { temperature: seqs[s]!.shortlist!, fallback: seqs[s]!.fallback } } : {}),
        edits: editsOf(s),
      })), { kind: 'unmerged' });
      for (const s of joining) await take(s, res, out);
    }
    for (const s of running) {
      if (seqs[s]!.leaves === step) {
        ex.release(s);
        last.delete(s);
      }
    }
    trace.push(out);
  }
  for (const s of last.keys()) ex.release(s);
  return trace;
}

/**
 * Writes PEFT adapters a0 … a(n−1) under root/adapters (every linear, alpha 8; `shapes[i]`: adapter i's seed and rank)
 * and acquires each on every executor: leases[k][i] is adapter i's on executors[k].
 */
async function adaptersOn(model: CausalLM, root: string, baseConfig: Parameters<typeof writePeftAdapter>[1]['baseConfig'], executors: readonly TfExecutor[],
  shapes: readonly { seed: number; r: number }[]): Promise<AdapterLease[][]> {
  const managers = executors.map((ex) => makeManager(model, join(root, 'adapters'), ex));
  const leases: AdapterLease[][] = executors.map(() => []);
  for (const [i, { seed, r }] of shapes.entries()) {
    await writePeftAdapter(join(root, 'adapters', `a${i}`), { baseConfig, seed, r, loraAlpha: 8, targetModules: 'all-linear' });
    for (const [k, manager] of managers.entries()) leases[k]!.push(await manager.acquire(`a${i}`));
  }
  return leases;
}

const MODELS: [string, CheckpointOptions][] = [
  ['llama (GQA)', TINY_LLAMA],
  ['gemma2 (sliding window 7 on even layers, soft-caps)', { ...TINY_GEMMA2, numLayers: 3, seed: 35, configExtra: { ...TINY_GEMMA2.configExtra, sliding_window: 7 } }],
  ['phi3 longrope (switches to the long factors while decoding)', {
    ...TINY_PHI3, seed: 12, configExtra: { original_max_position_embeddings: 12 },
    ropeScaling: { rope_type: 'longrope', short_factor: [1, 1.2, 1.5, 2], long_factor: [1, 2.5, 4, 9] },
  }],
];

for (const [name, opts] of MODELS) {
  test(`replayed decode steps equal steps through tfjs bit for bit: ${name}, adapters, joins, leaves, picks, KV growth`, async () => {
    const root = join(tmp.dir, name.split(' ')[0]!);
    const { dir, config } = await fixtureCheckpoint(join(root, 'model'), opts);
    const model = CausalLM.load(dir);
    const baseline = tf.memory().numTensors;
    // Its rows as the recording executor's (a leaving row stays free, a joining one moves into it: slotRows), so that
    // the logits can be equal bit for bit.
    const plain = new TfExecutor(model, { recordSteps: false, slotRows: true });
    const recorded = new TfExecutor(model);
    const [leases, plainLeases] = await adaptersOn(model, root, config, [recorded, plain], [{ seed: 60, r: 4 }, { seed: 61, r: 4 }]) as [AdapterLease[], AdapterLease[]];
    // A bank of both adapters and base rows until step 20; steps 22–26 merge adapter 0, the only one left running.
    // Rows answered with logits, greedy picks and shortlists (their first candidate taken as the next token).
    const script: Seq[] = [
      { prompt: [5, 17, 42, 99, 3], adapter: 0, joins: 0, leaves: 30, pick: false },
      { prompt: [11, 12], adapter: null, joins: 0, leaves: 12, pick: true },
      { prompt: [200, 201, 202], adapter: 1, joins: 6, leaves: 20, pick: true },
      { prompt: [7, 8, 9, 10], adapter: 0, joins: 18, leaves: 30, pick: false, shortlist: 0.7 },
      { prompt: [40, 41], adapter: null, joins: 2, leaves: 9, pick: false, shortlist: 1.2 },
      { prompt: [60, 61, 62], adapter: 0, joins: 4, leaves: 28, pick: false, shortlist: 0.9, fallback: true },
      // Edits growing past 64 entries (60 biased ids and the repeated ones): their inputs' size doubles once.
      { prompt: [70, 71, 72, 73], adapter: 0, joins: 3, leaves: 28, pick: true, sampling: {
        repetitionPenalty: 1.4, frequencyPenalty: 0.2, logitBias: Array.from({ length: 60 }, (_, i) => [100 + i, (i % 7) - 3] as [number, number]),
      } },
    ];
    const plan = (l: readonly AdapterLease[]) => (step: number): LoraPlan => (step >= 22 && step <= 26 ? { kind: 'merged', key: l[0]!.adapter.key } : { kind: 'unmerged' });
    const before = webgpuCounts()!;
    rowsRead = 0;
    const a = await drive(plain, script, plainLeases, 31, plan(plainLeases));
    assert.equal(rowsRead, 0, 'steps through tfjs read the fallback rows with the rest');
    const mid = webgpuCounts()!;
    const b = await drive(recorded, script, leases, 31, plan(leases));
    const end = webgpuCounts()!;
    const reads = rowsRead;
    assert.ok(reads >= 10, `replays read the fallback rows on demand (${reads})`);
    assert.equal(a.length, b.length);
    a.forEach((step, i) => {
      assert.deepEqual([...b[i]!.keys()], [...step.keys()], `step ${i}: the same sequences answered`);
      for (const [s, values] of step) assert.deepEqual(b[i]!.get(s), values, `step ${i}, sequence ${s}: the same ${values.length === 2 ? 'picked token' : 'logits'}`);
    });
    const st = recorded.recordedSteps;
    assert.equal(plain.recordedSteps.replayed + plain.recordedSteps.recorded, 0, 'recordSteps false never records');
    assert.ok(st.replayed >= 15, `most decode steps are replays (${st.replayed} replayed, ${st.recorded} recorded, ${st.unrecorded} through tfjs: ${st.lastRefusal})`);
    assert.ok(st.recorded >= 3, `re-recorded after joins, leaves, plan changes and KV growth (${st.recorded})`);
    assert.equal(st.unrecorded, 0, `every step was recorded or replayed, KV growths included (reserved before the step): ${st.lastRefusal}`);
    // lora_serve_webgpu_decode_steps_total's counts: every decode step of the plain executor through tfjs; the
    // recording one's as many steps, by path.
    const delta = (from: typeof before, to: typeof before) => Object.fromEntries(Object.entries(to.decodeSteps).map(([k, n]) => [k, n - from.decodeSteps[k as 'tfjs']]));
    const plainSteps = delta(before, mid);
    const recordedSteps = delta(mid, end);
    assert.deepEqual({ replayed: plainSteps.replayed, recorded: plainSteps.recorded }, { replayed: 0, recorded: 0 });
    assert.deepEqual(recordedSteps, { replayed: st.replayed, recorded: st.recorded, tfjs: st.unrecorded });
    assert.equal(st.replayed + st.recorded + st.unrecorded, plainSteps.tfjs, 'as many decode steps');
    // A replay runs as many dispatches as the step through tfjs, in one submit.
    assert.equal(end.dispatch - mid.dispatch, mid.dispatch - before.dispatch, 'the same dispatches in all');
    // Submits: one per step on both paths, plus at most one per recording (what tfjs queued before it, such as a KV
    // cache's growth, is submitted when the recording is checked instead of with the step), plus one per row read later.
    const extra = (end.submit - mid.submit) - (mid.submit - before.submit);
    assert.ok(extra <= st.recorded + reads, `${extra} more submits than through tfjs, with ${st.recorded} recordings and ${reads} rows read later`);
    leases.forEach((l) => l.release());
    plainLeases.forEach((l) => l.release());
    recorded.dispose();
    plain.dispose();
    assert.equal(tf.memory().numTensors, baseline, 'no tensor leaks');
    model.dispose();
  });
}

for (const kind of ['picked', 'shortlisted'] as const) {
  test(`continuous batching (${kind} rows): sequences leaving free their rows and joining ones move into them in place, so one recording replays through the churn; tokens equal a batch that re-gathers its rows`, async () => {
    const { dir } = await fixtureCheckpoint(join(tmp.dir, `churn-${kind}`), TINY_LLAMA);
    const model = CausalLM.load(dir);
    const baseline = tf.memory().numTensors;
    const slots = new TfExecutor(model); // the default on webgpu: recorded steps, rows kept in place
    const regathered = new TfExecutor(model, { recordSteps: false, slotRows: false });
    const recordedRegathered = new TfExecutor(model, { slotRows: false }); // recorded steps, rows re-gathered at each join and leave
    // Four running sequences; from step 3 on one leaves every third step and a new one joins at the next, with a prompt
    // shorter than the batch's columns (it fits the free row). Steps 40–47: every sequence leaves, none joins, and the
    // free rows are dropped once they outnumber the running ones.
    const script: Seq[] = [];
    const prompt = (n: number, len: number) => Array.from({ length: len }, (_, t) => (n * 37 + t * 11) % 250);
    // Shortlisted rows: a free row is read back as its last sequence's was, so the joiner's row keeps the recording's key.
    const answer = kind === 'picked' ? { pick: true } : { pick: false, shortlist: 0.8 };
    for (let n = 0; n < 4; n++) script.push({ prompt: prompt(n, 6 + n), adapter: null, joins: 0, leaves: 40 + 2 * n, ...answer });
    for (let step = 3, n = 4; step < 36; step += 3, n++) {
      const leaver = script.findIndex((q) => q.joins <= step && q.leaves > step && q.leaves >= 40);
      script[leaver] = { ...script[leaver]!, leaves: step };
      script.push({ prompt: prompt(n, 3 + (n % 4)), adapter: null, joins: step + 1, leaves: 40 + (n % 4) * 2, ...answer });
    }
    const a = await drive(regathered, script, [], 48, () => ({ kind: 'none' }));
    for (const ex of [recordedRegathered, slots]) { // slots last: passRows below are its
      const b = await drive(ex, script, [], 48, () => ({ kind: 'none' }));
      a.forEach((step, i) => {
        assert.deepEqual([...b[i]!.keys()], [...step.keys()], `step ${i}: the same sequences answered`);
        for (const [s, [id, logprob]] of step) {
          const [id2, logprob2] = b[i]!.get(s)!;
          // [id, logprob] picked, or a shortlist's first two ids
          assert.equal(id2, id, `step ${i}, sequence ${s}: the same token`);
          assert.ok(Math.abs(logprob2! - logprob!) < 1e-5, `step ${i}, sequence ${s}: ${logprob2} against ${logprob}`);
        }
      });
    }
    // Free rows are no sequences: a step's pass (lora_serve_batch_size) counts the running ones, replayed or not.
    for (const [i, [rows, running]] of passRows.entries()) assert.equal(rows, running, `decode step ${i}: rows of its pass`);
    const st = slots.recordedSteps;
    const other = recordedRegathered.recordedSteps;
    // 11 leaves and 11 joins: with rows re-gathered each one changes the batch's KV tensors and is recorded anew; with
    // free rows, only the KV cache's growths and trims (copies of every layer) and the drop of the free rows at the end are.
    assert.ok(other.recorded >= 22, `rows re-gathered: recorded ${other.recorded} times (${other.replayed} replays)`);
    assert.ok(st.recorded <= other.recorded - 15, `free rows: recorded ${st.recorded} times (${st.replayed} replays), against ${other.recorded}`);
    assert.equal(st.replayed + st.recorded + st.unrecorded, other.replayed + other.recorded + other.unrecorded, 'as many decode steps');
    // Every decode step was replayed or recorded (a KV growth is made before its step).
    assert.equal(st.unrecorded, 0, `steps neither recorded nor replayed: ${st.lastRefusal}`);
    assert.equal(regathered.recordedSteps.replayed + regathered.recordedSteps.recorded, 0);
    slots.dispose();
    regathered.dispose();
    recordedRegathered.dispose();
    assert.equal(tf.memory().numTensors, baseline, 'no tensor leaks');
    model.dispose();
  });
}

test('a sequence leaving the only row of its adapter keeps the batch\'s bank (the last decode step\'s bank serves while it holds every running adapter), so the recording replays on', async () => {
  const root = join(tmp.dir, 'superset');
  const { dir, config } = await fixtureCheckpoint(join(root, 'model'), TINY_LLAMA);
  const model = CausalLM.load(dir);
  const baseline = tf.memory().numTensors;
  const executors = [new TfExecutor(model), new TfExecutor(model, { recordSteps: false, slotRows: true }), new TfExecutor(model, { recordSteps: false, slotRows: false })];
  const [recorded, plain, regathered] = executors as [TfExecutor, TfExecutor, TfExecutor];
  const leases = await adaptersOn(model, root, config, executors, [0, 1, 2].map((i) => ({ seed: 80 + i, r: 2 + 2 * i })));
  // Adapter 0 and a base row from step 0; adapter 1 joins at step 1 (a bank of adapters 0 and 1) and leaves after step
  // 4; adapter 2 joins its free row at step 6 (a bank of adapters 0 and 2) and leaves after step 10. After each leave
  // the bank of the step before still serves, though a bank of adapter 0 alone is cached too (its prefill's).
  const script: Seq[] = [
    { prompt: [5, 17, 42, 99, 3], adapter: 0, joins: 0, leaves: 20, pick: true },
    { prompt: [200, 201], adapter: null, joins: 0, leaves: 20, pick: false },
    { prompt: [11, 12, 13], adapter: 1, joins: 1, leaves: 4, pick: true },
    { prompt: [30, 31], adapter: 2, joins: 6, leaves: 10, pick: true },
  ];
  const traces = [];
  for (const [k, ex] of executors.entries()) traces.push(await drive(ex, script, leases[k]!, 21, () => ({ kind: 'unmerged' })));
  const [b, a, c] = traces as [Trace, Trace, Trace];
  a.forEach((step, i) => {
    for (const [s, values] of step) {
      assert.deepEqual(b[i]!.get(s), values, `step ${i}, sequence ${s}: the same ${values.length === 2 ? 'picked token' : 'logits'} as through tfjs`);
      // against rows re-gathered, whose steps use the banks of exactly their adapters
      const other = c[i]!.get(s)!;
      if (values.length === 2) assert.equal(other[0], values[0], `step ${i}, sequence ${s}: the same token with exact banks`);
      assert.ok(values.every((v, j) => Math.abs(v - other[j]!) < 1e-5), `step ${i}, sequence ${s}: within 1e-5 of exact banks`);
    }
  });
  const st = recorded.recordedSteps;
  // 20 decode steps: recorded at the first, when adapter 1's row is appended, when adapter 2 brings a new bank, and at
  // the KV cache's growth past 16 columns; not when adapter 1 or 2 leaves.
  assert.ok(st.recorded <= 4, `recorded ${st.recorded} times (${st.replayed} replays)`);
  assert.equal(st.replayed + st.recorded, 20);
  for (const l of leases.flat()) l.release();
  for (const ex of executors) ex.dispose();
  assert.equal(tf.memory().numTensors, baseline, 'no tensor leaks');
  model.dispose();
});

test('free rows: a joiner that fits moves into one; one too long is appended and the free rows are dropped, so the batch holds no more rows than ran at once', async () => {
  const { dir } = await fixtureCheckpoint(join(tmp.dir, 'free-rows'), TINY_LLAMA);
  const model = CausalLM.load(dir);
  const baseline = tf.memory().numTensors;
  const ex = new TfExecutor(model);
  const rows = () => (ex as unknown as { rows: unknown[] }).rows.length; // the batch's rows, free ones included
  const item = (seq: number, length: number) => ({ seq, tokens: Array.from({ length }, (_, t) => (seq * 13 + t * 5) % 250), start: 0, last: true, adapter: null, allLogits: false, pick: true });
  /** One decode step of `seqs` at `positions` (each the sequence's next). */
  const decode = async (seqs: number[], positions: number[]) => {
    const res = await ex.decode(seqs.map((seq, i) => ({ seq, token: 1, position: positions[i]!, adapter: null, pick: true })), { kind: 'none' });
    assert.deepEqual([...res.picked!.keys()].sort(), [...seqs].sort(), 'each running sequence picked, no free row');
  };
  await ex.prefill([item(0, 4), item(1, 4)], { kind: 'none' });
  await decode([0, 1], [4, 4]);
  ex.release(1);
  assert.deepEqual([rows(), ex.running], [2, 1], 'the row stays, free');
  await ex.prefill([item(2, 3)], { kind: 'none' }); // 3 columns fit the batch's 5: moved into the free row
  assert.deepEqual([rows(), ex.running], [2, 2]);
  await decode([0, 2], [5, 3]);
  ex.release(2);
  await ex.prefill([item(3, 30)], { kind: 'none' }); // 30 columns do not fit 6: appended, the free row dropped
  assert.deepEqual([rows(), ex.running], [2, 2]);
  await decode([0, 3], [6, 30]);
  ex.release(0);
  ex.release(3);
  assert.deepEqual([rows(), ex.running], [0, 0], 'the last running row takes the free ones with it');
  ex.dispose();
  assert.equal(tf.memory().numTensors, baseline, 'no tensor leaks');
  model.dispose();
});

test('a decode step whose bank a prefill evicted (maxBanks) is recorded anew, not replayed without its adapters\' slots', async () => {
  const root = join(tmp.dir, 'evicted-bank');
  const { dir, config } = await fixtureCheckpoint(join(root, 'model'), TINY_LLAMA);
  const model = CausalLM.load(dir);
  const baseline = tf.memory().numTensors;
  const ex = new TfExecutor(model, { maxBanks: 1 });
  const [leases] = await adaptersOn(model, root, config, [ex], [{ seed: 90, r: 4 }, { seed: 91, r: 4 }]) as [AdapterLease[]];
  const [a0, a1] = leases.map((l) => l.adapter) as [ExecAdapter, ExecAdapter];
  await ex.prefill([{ seq: 0, tokens: [5, 17, 42], start: 0, last: true, adapter: a0, allLogits: false, pick: true }], { kind: 'unmerged' });
  const step = (position: number) => ex.decode([{ seq: 0, token: 1, position, adapter: a0, pick: true }], { kind: 'unmerged' });
  await step(3);
  await step(4);
  assert.equal(ex.recordedSteps.replayed, 1);
  // The first chunk of a prompt on adapter 1: its bank takes the only place, adapter 0's goes.
  await ex.prefill([{ seq: 1, tokens: [7, 8, 9], start: 0, last: false, adapter: a1, allLogits: false, pick: false }], { kind: 'unmerged' });
  const res = await step(5);
  assert.ok(res.picked?.has(0), 'the step ran');
  assert.equal(ex.recordedSteps.recorded, 2, 'recorded anew with a new bank');
  ex.release(0);
  ex.release(1);
  leases.forEach((l) => l.release());
  ex.dispose();
  assert.equal(tf.memory().numTensors, baseline, 'no tensor leaks');
  model.dispose();
});

test('a step that uploads host values nobody named is not recorded; a named one is replayed with new values; no leaks', async () => {
  const baseline = tf.memory().numTensors;
  const forward = tf.env().getBool('WEBGPU_CPU_FORWARD');
  tf.env().set('WEBGPU_CPU_FORWARD', false); // else tfjs adds these small host tensors on the CPU
  const w = tf.tensor1d([1, 2, 3, 4]);
  const unnamed = recordStep(() => tf.tidy(() => tf.add(w, tf.tensor1d([10, 20, 30, 40]))));
  await unnamed.output.data();
  unnamed.output.dispose();
  assert.match(String(unnamed.finish()), /not a named step input/);
  // (x + w)·w with x named: the replay writes the new x.
  const x = new Float32Array([5, 6, 7, 8]);
  const named = recordStep(() => tf.tidy(() => tf.mul(tf.add(tf.tensor1d(stepInput('x', x)), w), w)));
  assert.deepEqual(Array.from(await named.output.data()), [6, 16, 30, 48]);
  named.output.dispose();
  const rec = named.finish();
  assert.ok(typeof rec !== 'string', String(rec));
  assert.deepEqual(rec.inputNames, ['x']);
  assert.equal(rec.dispatches, 2);
  assert.ok(rec.valid());
  const first = await rec.replay(new Map([['x', new Float32Array([1, 1, 1, 1])]]));
  assert.deepEqual(Array.from(first.data), [2, 6, 12, 20]);
  // A part of the output, now or later (until the next replay).
  const half = await rec.replay(new Map([['x', new Float32Array([2, 2, 2, 2])]]), 8);
  assert.deepEqual(Array.from(half.data), [3, 8]);
  assert.deepEqual(Array.from(await rec.readOutput([[8, 8]], half.replay)), [15, 24]);
  assert.deepEqual(Array.from(await rec.readOutput([[12, 4], [0, 4]], half.replay)), [24, 3], 'ranges concatenated');
  await assert.rejects(rec.readOutput([[8, 8]], first.replay), /overwritten or freed/);
  await assert.rejects(rec.readOutput([[8, 12]], half.replay), /not within/);
  await assert.rejects(rec.replay(new Map([['x', new Float32Array(3)]])), /input "x" is missing or not 16 bytes/);
  // The weight it binds is gone: the recording is no longer valid.
  w.dispose();
  assert.equal(rec.valid(), false);
  rec.dispose();
  tf.env().set('WEBGPU_CPU_FORWARD', forward);
  assert.equal(tf.memory().numTensors, baseline, 'no tensor leaks');
});

/** Buffers tfjs's pool has handed out (tensors' and recordings'), after submitting what is queued (which frees the disposed ones). */
function usedBuffers(): number {
  const b = tf.backend() as unknown as { commandEncoder: unknown; endComputePassEncoder(): void; submitQueue(): void; bufferManager: { numUsedBuffers: number } };
  if (b.commandEncoder) {
    b.endComputePassEncoder();
    b.submitQueue();
  }
  return b.bufferManager.numUsedBuffers;
}

test('a recorded step that fails leaks nothing and restores the submit batching; offloading an adapter drops the recording; buffers return to the pool', async () => {
  const root = join(tmp.dir, 'failing');
  const { dir, config } = await fixtureCheckpoint(join(root, 'model'), TINY_LLAMA);
  const model = CausalLM.load(dir);
  const tensors = tf.memory().numTensors;
  const warm = new TfExecutor(model, { recordSteps: false });
  warm.warmUp(); // tfjs keeps a few buffers of its own from its first steps on: not the recordings'
  warm.dispose();
  const buffers = usedBuffers();
  const ex = new TfExecutor(model);
  const manager = makeManager(model, join(root, 'adapters'), ex);
  await writePeftAdapter(join(root, 'adapters', 'a'), { baseConfig: config, seed: 5, r: 4, loraAlpha: 8, targetModules: 'all-linear' });
  const lease = await manager.acquire('a');
  const adapter = lease.adapter;
  const unmerged: LoraPlan = { kind: 'unmerged' };
  await ex.prefill([{ seq: 0, tokens: [3, 4, 5], start: 0, last: true, adapter, allLogits: false }], unmerged);
  const step = (token: number, position: number) => ex.decode([{ seq: 0, token, position, adapter }], unmerged);
  await step(1, 3); // recorded
  await step(2, 4); // replayed
  assert.equal(ex.recordedSteps.replayed, 1);
  const held = tf.memory().numTensors;
  // A token outside the vocabulary: refused on the replay path and (next) on the path that records.
  await assert.rejects(step(model.config.vocabSize, 5), /outside the vocabulary/);
  await assert.rejects(step(model.config.vocabSize, 5), /outside the vocabulary/);
  assert.equal(tf.memory().numTensors, held, 'the failed steps left no tensor behind');
  assert.equal(tf.env().getNumber('WEBGPU_DEFERRED_SUBMIT_BATCH_SIZE'), 15, 'tfjs\'s submit batching is restored');
  await step(3, 5);
  await step(4, 6);
  assert.ok(ex.recordedSteps.replayed >= 2, 'steps are recorded and replayed again');
  // Offloading the adapter (its bank with it) drops the recording; the row's next step would need the adapter again.
  ex.offloadAdapter(adapter);
  assert.equal((ex as unknown as { recorded: unknown }).recorded, null, 'the recording is dropped with the adapter');
  ex.release(0);
  lease.release();
  ex.dispose();
  assert.equal(tf.memory().numTensors, tensors, 'no tensor leaks');
  assert.equal(usedBuffers(), buffers, 'every buffer a recording took is back in tfjs\'s pool');
  model.dispose();
});
