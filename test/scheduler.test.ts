/**
 * Table tests of the pure `schedule()` (no TensorFlow.js): decode of every running sequence, FIFO admission,
 * the batch-size and token budgets, chunked prefill, the "fits the chunk but not the budget" rule, merged
 * mode's one-adapter-at-a-time admission, and the LoRA plan of each step (planLora: merged or unmerged).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import type { LoraPlan } from '../src/engine/executor.ts';
import {
  INITIAL_LORA_STATE, LORA_MODES, MERGE_AFTER, planLora, schedule, type LoraMode, type LoraState, type PrefillChunk, type SchedSeq, type SchedulerInput, type SchedulerLimits,
} from '../src/engine/scheduler.ts';

const LIMITS: SchedulerLimits = { maxBatchSize: 8, maxBatchTokens: 100, prefillChunk: 32, loraMode: 'unmerged' };

/** A sequence: id, prompt length, already prefilled, adapter. */
const s = (seq: number, promptLength: number, prefilled = 0, adapter: string | null = null): SchedSeq => ({ seq, adapter, promptLength, prefilled });
const run = (seq: number, adapter: string | null = null) => s(seq, 4, 4, adapter);
const pf = (seq: number, start: number, length: number, last: boolean): PrefillChunk => ({ seq, start, length, last });

interface Case {
  readonly name: string;
  readonly input: Partial<SchedulerInput>;
  readonly limits?: Partial<SchedulerLimits>;
  readonly decode: readonly number[];
  readonly prefill: readonly PrefillChunk[];
}

const CASES: readonly Case[] = [
  // --- decode and FIFO admission
  { name: 'nothing to do', input: {}, decode: [], prefill: [] },
  { name: 'every running sequence decodes, in order', input: { running: [run(3), run(1), run(2, 'a')] }, decode: [3, 1, 2], prefill: [] },
  {
    name: 'waiting sequences are admitted in arrival order, whole prompts',
    input: { running: [run(1)], waiting: [s(7, 5), s(4, 3), s(9, 10)] },
    decode: [1], prefill: [pf(7, 0, 5, true), pf(4, 0, 3, true), pf(9, 0, 10, true)],
  },
  {
    name: 'FIFO across adapters: arrival order, not grouped by adapter',
    input: { waiting: [s(1, 2, 0, 'a'), s(2, 2, 0, 'b'), s(3, 2, 0, 'a'), s(4, 2, 0, null)] },
    decode: [], prefill: [pf(1, 0, 2, true), pf(2, 0, 2, true), pf(3, 0, 2, true), pf(4, 0, 2, true)],
  },

  // --- maxBatchSize
  {
    name: 'maxBatchSize counts running + prefilling; the rest wait (FIFO head first)',
    input: { running: [run(1), run(2)], prefilling: [s(3, 80, 32)], waiting: [s(4, 2), s(5, 2), s(6, 2)] },
    limits: { maxBatchSize: 4, maxBatchTokens: 1000 },
    decode: [1, 2], prefill: [pf(3, 32, 32, false), pf(4, 0, 2, true)],
  },
  {
    name: 'a full batch admits nobody; running still decode',
    input: { running: [run(1), run(2)], waiting: [s(3, 1)] },
    limits: { maxBatchSize: 2 },
    decode: [1, 2], prefill: [],
  },
  {
    name: 'decode of all running sequences even beyond maxBatchSize (never dropped)',
    input: { running: [run(1), run(2), run(3)], waiting: [s(4, 1)] },
    limits: { maxBatchSize: 2 },
    decode: [1, 2, 3], prefill: [],
  },

  // --- maxBatchTokens
  {
    name: 'token budget = decode rows + prefill tokens: a prompt that does not fit waits',
    input: { running: [run(1), run(2)], waiting: [s(3, 5), s(4, 4), s(5, 1)] },
    limits: { maxBatchTokens: 10, prefillChunk: 32 },
    // 2 decode + 5 = 7; 4 more does not fit (8 left → 3) and 4 <= chunk: waits; 5 is behind it (FIFO, no overtaking).
    decode: [1, 2], prefill: [pf(3, 0, 5, true)],
  },
  {
    name: 'budget exactly used up',
    input: { running: [run(1)], waiting: [s(2, 4), s(3, 5)] },
    limits: { maxBatchTokens: 10 },
    decode: [1], prefill: [pf(2, 0, 4, true), pf(3, 0, 5, true)],
  },
  {
    name: 'running sequences alone exhaust the budget: nothing is prefilled',
    input: { running: [run(1), run(2), run(3)], prefilling: [s(4, 40, 8)], waiting: [s(5, 1)] },
    limits: { maxBatchTokens: 3 },
    decode: [1, 2, 3], prefill: [],
  },

  // --- chunking
  {
    name: 'a long prompt is prefilled one chunk per step: first chunk',
    input: { waiting: [s(1, 70)] },
    decode: [], prefill: [pf(1, 0, 32, false)],
  },
  {
    name: 'a long prompt: middle chunk continues where it stopped',
    input: { prefilling: [s(1, 70, 32)] },
    decode: [], prefill: [pf(1, 32, 32, false)],
  },
  {
    name: 'a long prompt: the final chunk is marked last',
    input: { prefilling: [s(1, 70, 64)] },
    decode: [], prefill: [pf(1, 64, 6, true)],
  },
  {
    name: 'a prompt of exactly one chunk is a single last chunk',
    input: { waiting: [s(1, 32)] },
    decode: [], prefill: [pf(1, 0, 32, true)],
  },
  {
    name: 'continuing prefills go before new admissions, oldest first',
    input: { running: [run(9)], prefilling: [s(2, 100, 32), s(3, 50, 32)], waiting: [s(4, 3)] },
    limits: { maxBatchTokens: 1000 },
    decode: [9], prefill: [pf(2, 32, 32, false), pf(3, 32, 18, true), pf(4, 0, 3, true)],
  },
  {
    name: 'continuing prefills take the budget first: a waiting prompt gets none',
    input: { prefilling: [s(2, 100, 0)], waiting: [s(4, 3)] },
    limits: { maxBatchTokens: 33 },
    // 32 for the chunk, 1 left: the 3-token prompt fits a chunk but not the budget, and is not the only prefill.
    decode: [], prefill: [pf(2, 0, 32, false)],
  },
  {
    name: 'a continuing chunk is cut to what is left of the budget',
    input: { running: [run(1), run(2)], prefilling: [s(3, 100, 10)] },
    limits: { maxBatchTokens: 12 },
    decode: [1, 2], prefill: [pf(3, 10, 10, false)],
  },
  {
    name: 'a long waiting prompt is admitted with a partial first chunk after others (it never fits whole anyway)',
    input: { waiting: [s(1, 10), s(2, 200)] },
    limits: { maxBatchTokens: 25 },
    decode: [], prefill: [pf(1, 0, 10, true), pf(2, 0, 15, false)],
  },

  // --- fits the chunk size but not the remaining budget
  {
    name: 'a short prompt that does not fit the remaining budget waits, not split',
    input: { running: [run(1)], waiting: [s(2, 6), s(3, 6)] },
    limits: { maxBatchTokens: 10 },
    decode: [1], prefill: [pf(2, 0, 6, true)],
  },
  {
    name: '...unless it is the only prefill of the step: then it is chunked to fit',
    input: { running: [run(1), run(2), run(3), run(4)], waiting: [s(5, 9)] },
    limits: { maxBatchTokens: 10 },
    decode: [1, 2, 3, 4], prefill: [pf(5, 0, 6, false)],
  },
  {
    name: 'the rest of such a split prompt continues next step as a prefilling sequence',
    input: { running: [run(1), run(2), run(3), run(4)], prefilling: [s(5, 9, 6)] },
    limits: { maxBatchTokens: 10 },
    decode: [1, 2, 3, 4], prefill: [pf(5, 6, 3, true)],
  },
  {
    name: 'a waiting prompt behind a continuing prefill is not split even when the budget has room for part of it',
    input: { prefilling: [s(1, 40, 32)], waiting: [s(2, 20)] },
    limits: { maxBatchTokens: 20 },
    decode: [], prefill: [pf(1, 32, 8, true)],
  },

  // --- merged mode
  {
    name: 'merged: an empty batch admits the head whatever its adapter, then only the same adapter',
    input: { waiting: [s(1, 3, 0, 'b'), s(2, 3, 0, 'b'), s(3, 3, 0, 'a'), s(4, 3, 0, 'b')] },
    limits: { loraMode: 'merged' },
    // 3 (adapter a) blocks 4 behind it: head of line.
    decode: [], prefill: [pf(1, 0, 3, true), pf(2, 0, 3, true)],
  },
  {
    name: 'merged: a different adapter waits while the batch runs another one (head of line)',
    input: { running: [run(1, 'a')], waiting: [s(2, 3, 0, 'b'), s(3, 3, 0, 'a')] },
    limits: { loraMode: 'merged' },
    decode: [1], prefill: [],
  },
  {
    name: 'merged: same adapter as the running batch is admitted',
    input: { running: [run(1, 'a')], waiting: [s(2, 3, 0, 'a'), s(3, 3, 0, 'a')] },
    limits: { loraMode: 'merged' },
    decode: [1], prefill: [pf(2, 0, 3, true), pf(3, 0, 3, true)],
  },
  {
    name: 'merged: the base model (null) counts as its own "adapter"',
    input: { running: [run(1, null)], waiting: [s(2, 3, 0, 'a'), s(3, 3, 0, null)] },
    limits: { loraMode: 'merged' },
    decode: [1], prefill: [],
  },
  {
    name: 'merged: a prefilling sequence of another adapter also blocks',
    input: { prefilling: [s(1, 50, 32, 'a')], waiting: [s(2, 3, 0, 'b')] },
    limits: { loraMode: 'merged' },
    decode: [], prefill: [pf(1, 32, 18, true)],
  },
  {
    name: 'merged: the batch drained → the waiting head with another adapter starts',
    input: { waiting: [s(2, 3, 0, 'b'), s(3, 3, 0, 'a')] },
    limits: { loraMode: 'merged' },
    decode: [], prefill: [pf(2, 0, 3, true)],
  },
  {
    name: 'unmerged: different adapters share a batch',
    input: { running: [run(1, 'a')], waiting: [s(2, 3, 0, 'b'), s(3, 3, 0, 'c')] },
    limits: { loraMode: 'unmerged' },
    decode: [1], prefill: [pf(2, 0, 3, true), pf(3, 0, 3, true)],
  },
  {
    name: 'auto: different adapters share a batch (the LoRA plan decides merged/unmerged per call)',
    input: { running: [run(1, 'a')], waiting: [s(2, 3, 0, 'b')] },
    limits: { loraMode: 'auto' },
    decode: [1], prefill: [pf(2, 0, 3, true)],
  },
];

for (const c of CASES) {
  test(`schedule: ${c.name}`, () => {
    const input: SchedulerInput = { running: [], prefilling: [], waiting: [], ...c.input };
    const out = schedule(input, { ...LIMITS, ...c.limits });
    assert.deepEqual(out.decode, c.decode, 'decode');
    assert.deepEqual(out.prefill, c.prefill, 'prefill');
    assert.equal(out.tokens, c.decode.length + c.prefill.reduce((n, p) => n + p.length, 0), 'tokens');
  });
}

test('schedule: invariants over random inputs (budgets respected, FIFO prefix, chunk bounds, no duplicates)', () => {
  let state = 12345;
  const rand = (n: number) => {
    state = (state * 1103515245 + 12345) % 2 ** 31;
    return state % n;
  };
  const adapters = ['a', 'b', null] as const;
  for (let iter = 0; iter < 2000; iter++) {
    let id = 0;
    const mk = (prefilled: (len: number) => number) => {
      const len = 1 + rand(120);
      return s(++id, len, prefilled(len), adapters[rand(3)]!);
    };
    const limits: SchedulerLimits = {
      maxBatchSize: 1 + rand(8), maxBatchTokens: 1 + rand(150), prefillChunk: 1 + rand(40),
      loraMode: LORA_MODES[rand(3)]!,
    };
    const running = Array.from({ length: rand(5) }, () => mk((len) => len));
    const prefilling = Array.from({ length: rand(3) }, () => mk((len) => rand(len)));
    const waiting = Array.from({ length: rand(6) }, () => mk(() => 0));
    const out = schedule({ running, prefilling, waiting }, limits);
    const ctx = JSON.stringify({ limits, running, prefilling, waiting, out });

    assert.deepEqual(out.decode, running.map((x) => x.seq), ctx);
    const prefillTokens = out.prefill.reduce((n, p) => n + p.length, 0);
    assert.equal(out.tokens, running.length + prefillTokens, ctx);
    // The budget binds prefill tokens (decode rows are never dropped).
    assert.ok(prefillTokens <= Math.max(0, limits.maxBatchTokens - running.length), ctx);
    assert.equal(new Set(out.prefill.map((p) => p.seq)).size, out.prefill.length, ctx);
    const all = new Map([...prefilling, ...waiting].map((x) => [x.seq, x]));
    for (const p of out.prefill) {
      const x = all.get(p.seq)!;
      assert.ok(x, ctx);
      assert.equal(p.start, x.prefilled, ctx);
      assert.ok(p.length >= 1 && p.length <= limits.prefillChunk, ctx);
      assert.equal(p.last, p.start + p.length === x.promptLength, ctx);
    }
    // Admitted waiting sequences are a prefix of the waiting list (FIFO, no overtaking).
    const admitted = out.prefill.filter((p) => waiting.some((w) => w.seq === p.seq)).map((p) => p.seq);
    assert.deepEqual(admitted, waiting.slice(0, admitted.length).map((w) => w.seq), ctx);
    // New admissions respect maxBatchSize.
    if (admitted.length > 0) assert.ok(running.length + prefilling.length + admitted.length <= limits.maxBatchSize, ctx);
    // Merged mode: after this step, at most one adapter in the batch (when it started with at most one).
    if (limits.loraMode === 'merged') {
      const before = new Set([...running, ...prefilling].map((x) => x.adapter));
      if (before.size <= 1) {
        const after = new Set([...before, ...admitted.map((seq) => all.get(seq)!.adapter)]);
        assert.ok(after.size <= 1, ctx);
      }
    }
    // The LoRA plan of each call fits its rows: none without adapter rows, merged only when every row uses that adapter.
    const calls = [[out.lora.decode, running.map((x) => x.adapter)], [out.lora.prefill, out.prefill.map((p) => all.get(p.seq)!.adapter)]] as const;
    for (const [plan, keys] of calls) {
      assert.equal(plan.kind === 'none', keys.every((k) => k === null), ctx);
      if (plan.kind === 'merged') assert.ok(keys.every((k) => k === plan.key) && limits.loraMode !== 'unmerged', ctx);
    }
  }
});

// --- the LoRA plan (planLora): which calls run merged, with explicit hysteresis state

/** A plan as a short string: none, unmerged, merged:<key>. */
const show = (p: LoraPlan) => (p.kind === 'merged' ? `merged:${p.key}` : p.kind);

interface LoraStepCase {
  /** Adapter key per decode row / per prefill chunk (null: base); absent: no rows. */
  readonly d?: readonly (string | null)[];
  readonly p?: readonly (string | null)[];
  /** Expected [decode plan, prefill plan]. */
  readonly want: readonly [string, string];
}

interface LoraCase {
  readonly name: string;
  readonly mode: LoraMode;
  readonly start?: LoraState;
  readonly steps: readonly LoraStepCase[];
}

const repeat = <T>(n: number, x: T): T[] => Array.from({ length: n }, () => x);
const U = ['unmerged', 'none'] as const;
const MA = ['merged:a', 'none'] as const;

/** mergeAfter is 3 in these cases. */
const LORA_CASES: readonly LoraCase[] = [
  {
    name: 'auto: the sole adapter merges at its 3rd consecutive step and stays merged',
    mode: 'auto', steps: [{ d: ['a', 'a'], want: U }, { d: ['a', 'a'], want: U }, { d: ['a', 'a'], want: MA }, { d: ['a'], want: MA }],
  },
  {
    name: 'auto: a step with two adapters resets the streak',
    mode: 'auto', steps: [{ d: ['a'], want: U }, { d: ['a'], want: U }, { d: ['a', 'b'], want: U }, { d: ['a'], want: U }, { d: ['a'], want: U }, { d: ['a'], want: MA }],
  },
  {
    name: 'auto: a base-only step resets the streak',
    mode: 'auto', steps: [{ d: ['a'], want: U }, { d: ['a'], want: U }, { d: [null], want: ['none', 'none'] }, { d: ['a'], want: U }, { d: ['a'], want: U }, { d: ['a'], want: MA }],
  },
  {
    name: 'auto: a base row next to the adapter resets the streak and runs unmerged',
    mode: 'auto', steps: [{ d: ['a'], want: U }, { d: ['a'], want: U }, { d: ['a', null], want: U }, { d: ['a'], want: U }],
  },
  {
    name: 'auto: the already merged adapter runs merged at once, after mixed steps too',
    mode: 'auto', start: { merged: 'a', sole: null },
    steps: [{ d: ['a'], want: MA }, { d: ['a', 'b'], want: U }, { d: ['a'], want: MA }, { d: ['b'], want: U }],
  },
  {
    name: 'auto: another adapter merging replaces the merged one',
    mode: 'auto', start: { merged: 'a', sole: null },
    steps: [{ d: ['b'], want: U }, { d: ['b'], want: U }, { d: ['b'], want: ['merged:b', 'none'] }, { d: ['a'], want: U }],
  },
  {
    name: 'auto: decode and prefill of the same adapter count as one step, both merge together',
    mode: 'auto', steps: [{ d: ['a'], p: ['a'], want: ['unmerged', 'unmerged'] }, { d: ['a'], p: ['a'], want: ['unmerged', 'unmerged'] }, { d: ['a'], p: ['a'], want: ['merged:a', 'merged:a'] }],
  },
  {
    name: 'auto: prefill-only steps count',
    mode: 'auto', steps: [{ p: ['a'], want: ['none', 'unmerged'] }, { p: ['a', 'a'], want: ['none', 'unmerged'] }, { p: ['a'], want: ['none', 'merged:a'] }],
  },
  {
    name: 'auto: decode of the merged adapter stays merged while the prefill of another runs unmerged (and resets the streak)',
    mode: 'auto', start: { merged: 'a', sole: { key: 'a', steps: 9 } },
    steps: [{ d: ['a'], p: ['b'], want: ['merged:a', 'unmerged'] }, { d: ['a'], p: [null], want: ['merged:a', 'none'] }, { d: ['b'], want: U }],
  },
  {
    name: 'merged: the sole adapter of a call merges at once',
    mode: 'merged', steps: [{ d: ['a'], want: MA }, { d: ['a'], p: ['a'], want: ['merged:a', 'merged:a'] }, { p: ['b'], want: ['none', 'merged:b'] }, { d: [null], want: ['none', 'none'] }],
  },
  {
    name: 'merged: a call with two adapters or a base row runs unmerged',
    mode: 'merged', steps: [{ d: ['a', 'b'], want: U }, { d: ['a', null], want: U }],
  },
  {
    name: 'unmerged: never merges, however long the streak or whatever was merged',
    mode: 'unmerged', start: { merged: 'a', sole: null }, steps: [...repeat(6, { d: ['a'], p: ['a'], want: ['unmerged', 'unmerged'] as const }), { d: [null], want: ['none', 'none'] }],
  },
];

for (const c of LORA_CASES) {
  test(`planLora: ${c.name}`, () => {
    let state = c.start ?? INITIAL_LORA_STATE;
    c.steps.forEach((st, i) => {
      const out = planLora(state, { decode: st.d ?? [], prefill: st.p ?? [] }, { loraMode: c.mode, mergeAfter: 3 });
      assert.deepEqual([show(out.decode), show(out.prefill)], st.want, `step ${i + 1}`);
      state = out.state;
    });
  });
}

test('planLora: the default mergeAfter is MERGE_AFTER steps', () => {
  let state = INITIAL_LORA_STATE;
  const plans: string[] = [];
  for (let i = 0; i < MERGE_AFTER; i++) {
    const out = planLora(state, { decode: ['a'], prefill: [] }, { loraMode: 'auto' });
    plans.push(show(out.decode));
    state = out.state;
  }
  assert.deepEqual(plans, [...repeat(MERGE_AFTER - 1, 'unmerged'), 'merged:a']);
  assert.deepEqual(state, { merged: 'a', sole: { key: 'a', steps: MERGE_AFTER } });
});

test('schedule: plans the step\'s LoRA from the adapters of its decode rows and prefill chunks, state in and out', () => {
  const limits: SchedulerLimits = { ...LIMITS, loraMode: 'auto', mergeAfter: 2 };
  // Step 1: running a decodes, waiting a (and b, which does not fit the batch) → one a chunk.
  const first = schedule({ running: [run(1, 'a')], prefilling: [], waiting: [s(2, 3, 0, 'a'), s(3, 3, 0, 'b')] }, { ...limits, maxBatchSize: 2 });
  assert.deepEqual(first.prefill.map((c) => c.seq), [2]);
  assert.deepEqual([show(first.lora.decode), show(first.lora.prefill)], ['unmerged', 'unmerged']);
  assert.deepEqual(first.lora.state, { merged: null, sole: { key: 'a', steps: 1 } });
  // Step 2: both a decode; the state carried in makes it the second sole-a step.
  const second = schedule({ running: [run(1, 'a'), run(2, 'a')], prefilling: [], waiting: [], lora: first.lora.state }, limits);
  assert.deepEqual([show(second.lora.decode), show(second.lora.prefill)], ['merged:a', 'none']);
  // Step 3: b's prefill joins: a stays merged for the decode, b's chunk runs unmerged, the streak resets.
  const third = schedule({ running: [run(1, 'a'), run(2, 'a')], prefilling: [], waiting: [s(3, 3, 0, 'b')], lora: second.lora.state }, limits);
  assert.deepEqual([show(third.lora.decode), show(third.lora.prefill)], ['merged:a', 'unmerged']);
  assert.deepEqual(third.lora.state, { merged: 'a', sole: null });
});
