/**
 * The Engine alone, with a fake Executor (token t is always followed by (t + 1) % V), a fake Detokenizer
 * (token t is the letter 'A' + t) and a fake AdapterProvider whose loads the test finishes by hand: adapter
 * loads not blocking others, timeouts, OVERLOADED, draining, eos, stop sequences, executor failures.
 * No TensorFlow.js.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { checkLengths, Engine, type Detokenizer, type EngineOptions } from '../src/engine/engine.ts';
import type { DecodeItem, ExecAdapter, LogitEdits, LoraPlan, PickedToken, PrefillItem, StepExecutor, StepResult } from '../src/engine/executor.ts';
import { DEFAULT_SAMPLING, Sampler } from '../src/engine/sampling.ts';
import type { EngineMetrics, GenerateRequest, TokenInfo } from '../src/engine/types.ts';
import { fail, isServeError, type ServeError } from '../src/errors.ts';
import type { AdapterLease, AdapterProvider, MergeSpec } from '../src/lora/types.ts';
import { IncrementalDecoder } from '../src/text/tokenizer.ts';
import type { TokenConstraint } from '../src/engine/constraint/tokens.ts';
import { generate, request, type Outcome } from './helpers/runtime.ts';

const V = 32;
const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));
const next = (t: number) => (t + 1) % V;
/** The tokens the fake model generates after `last`. */
const chain = (last: number, n: number) => Array.from({ length: n }, (_, i) => (last + 1 + i) % V);
const letters = (ids: readonly number[]) => ids.map((i) => String.fromCharCode(65 + i)).join('');

function logitsRow(lastToken: number): Float32Array {
  const row = new Float32Array(V);
  row[next(lastToken)] = 10;
  return row;
}

type Kind = 'prefill' | 'decode';

/** A row with its edits applied in float32, as the device's LogitEditsProgram does. */
function editedRow(row: Float32Array, e: LogitEdits): Float32Array {
  const out = Float32Array.from(row);
  const f = Math.fround;
  e.ids.forEach((id, j) => {
    let v = f(out[id]! + e.bias[j]!);
    const rep = e.repetition[j]!;
    if (rep !== 1) v = v > 0 ? f(v / rep) : f(v * rep);
    out[id] = f(v - e.minus[j]!);
  });
  return out;
}

/** Executor fake: tracks which sequences it holds and checks the engine's calls against the contract. */
class FakeExecutor implements StepExecutor {
  readonly vocabSize = V;
  readonly decodeBatch = new Map<number, ExecAdapter | null>();
  readonly partial = new Set<number>();
  /** lora: the call's plan as none, unmerged or merged:<key>. */
  readonly calls: { kind: Kind; seqs: number[]; adapters: (string | null)[]; lora: string }[] = [];
  readonly released: number[] = [];
  /** Contract violations seen (a decode item missing, release during a call...). */
  readonly violations: string[] = [];
  delayMs = 0;
  /** Answer the rows that allow it (`pick`) with a picked token instead of logits, as an executor picking on the device. */
  picks = false;
  /** The id picked after `last` (default: the fake model's next token; −1 and −2 are the faults of PickedToken). */
  pickAfter: (last: number) => number = next;
  /** Per call, each sequence's `pick`. */
  readonly pickFlags: { kind: Kind; seq: number; pick: boolean }[] = [];
  /** Each sequence's prompt (its first chunk's tokens). */
  readonly prompts = new Map<number, readonly number[]>();
  /** Runs at the start of each call (may wait, may throw). */
  hook: ((kind: Kind, n: number) => void | Promise<void>) | null = null;
  private inFlight = false;
  private n = 0;

  get running(): number {
    return this.decodeBatch.size;
  }

  private async enter(kind: Kind, seqs: number[], adapters: (ExecAdapter | null)[], lora: LoraPlan): Promise<void> {
    if (this.inFlight) this.violations.push(`${kind} while another call is in flight`);
    this.inFlight = true;
    this.calls.push({ kind, seqs, adapters: adapters.map((a) => a?.id ?? null), lora: lora.kind === 'merged' ? `merged:${lora.key}` : lora.kind });
    try {
      await this.hook?.(kind, ++this.n);
      if (this.delayMs > 0) await sleep(this.delayMs);
    } catch (err) {
      this.inFlight = false;
      throw err;
    }
  }

  async prefill(items: readonly PrefillItem[], lora: LoraPlan): Promise<StepResult> {
    await this.enter('prefill', items.map((i) => i.seq), items.map((i) => i.adapter), lora);
    const logits = new Map<number, Float32Array>();
    const picked = new Map<number, PickedToken>();
    for (const it of items) {
      if (this.decodeBatch.has(it.seq)) this.violations.push(`prefill of running seq ${it.seq}`);
      if (it.start === 0) this.prompts.set(it.seq, it.tokens);
      this.pickFlags.push({ kind: 'prefill', seq: it.seq, pick: it.pick ?? false });
      if (it.pick && (!it.last || it.allLogits)) this.violations.push(`pick on a prefill item that needs logits (seq ${it.seq})`);
      if (it.last) {
        this.partial.delete(it.seq);
        this.decodeBatch.set(it.seq, it.adapter);
      } else {
        this.partial.add(it.seq);
      }
      if (this.picks && it.pick) {
        picked.set(it.seq, this.pick(it.tokens.at(-1)!, it.edits));
        continue;
      }
      const rows = it.allLogits ? it.tokens.length : it.last ? 1 : 0;
      if (rows === 0) continue;
      const out = new Float32Array(rows * V);
      const toks = it.tokens.slice(it.tokens.length - rows);
      toks.forEach((t, r) => out.set(logitsRow(t), r * V));
      logits.set(it.seq, out);
    }
    this.inFlight = false;
    return { logits, picked, passes: [{ mode: 'none', adapters: new Set(items.map((i) => i.adapter?.key ?? null)).size, rows: items.length }] };
  }

  /** The token picked after `last`, its logprob as the host's greedy choice gives it. */
  private pick(last: number, edits?: LogitEdits): PickedToken {
    if (edits) return new Sampler(DEFAULT_SAMPLING).sample(editedRow(logitsRow(last), edits), [], 0, undefined, true); // as a device would
    const id = this.pickAfter(last);
    return { id, logprob: id < 0 ? NaN : new Sampler(DEFAULT_SAMPLING).sample(logitsRow(last), []).logprob };
  }

  async decode(items: readonly DecodeItem[], lora: LoraPlan): Promise<StepResult> {
    const seqs = new Set(items.map((i) => i.seq));
    if (seqs.size !== this.decodeBatch.size || [...this.decodeBatch.keys()].some((s) => !seqs.has(s))) {
      this.violations.push(`decode items ${[...seqs]} != decode batch ${[...this.decodeBatch.keys()]}`);
    }
    await this.enter('decode', items.map((i) => i.seq), items.map((i) => i.adapter), lora);
    const logits = new Map<number, Float32Array>();
    const picked = new Map<number, PickedToken>();
    for (const it of items) {
      this.pickFlags.push({ kind: 'decode', seq: it.seq, pick: it.pick ?? false });
      if (this.picks && it.pick) picked.set(it.seq, this.pick(it.token, it.edits));
      else logits.set(it.seq, logitsRow(it.token));
    }
    this.inFlight = false;
    return { logits, picked, passes: [{ mode: 'none', adapters: new Set(items.map((i) => i.adapter?.key ?? null)).size, rows: items.length }] };
  }

  readonly forks: { seq: number; into: number[] }[] = [];
  /** Thrown by fork(). */
  forkError: Error | null = null;
  fork(seq: number, into: readonly number[]): void {
    if (this.forkError) throw this.forkError;
    if (this.inFlight) this.violations.push(`fork(${seq}) during an in-flight step`);
    if (!this.decodeBatch.has(seq)) this.violations.push(`fork of seq ${seq}, not in the decode batch`);
    if (this.calls.some((c) => c.kind === 'decode' && c.seqs.includes(seq))) this.violations.push(`fork of seq ${seq} after its first decode step`);
    for (const s of into) {
      this.decodeBatch.set(s, this.decodeBatch.get(seq)!);
      this.prompts.set(s, this.prompts.get(seq)!);
    }
    this.forks.push({ seq, into: [...into] });
  }

  release(seq: number): void {
    if (this.inFlight) this.violations.push(`release(${seq}) during an in-flight step`);
    this.released.push(seq);
    this.decodeBatch.delete(seq);
    this.partial.delete(seq);
  }

  /** Sequence ids that were prefilled with this adapter id. */
  seqsOf(adapterId: string | null): number[] {
    const out = new Set<number>();
    for (const c of this.calls) if (c.kind === 'prefill') c.seqs.forEach((s, i) => c.adapters[i] === adapterId && out.add(s));
    return [...out];
  }

  /** Resolves at the next call of this kind (after it is recorded, before it runs). */
  waitForCall(kind: Kind): Promise<void> {
    const seen = this.calls.filter((c) => c.kind === kind).length;
    return (async () => {
      while (this.calls.filter((c) => c.kind === kind).length === seen) await sleep(1);
    })();
  }
}

/** Token t is the letter 'A' + t; the eos ids are special (skipped in text). */
function fakeTokenizer(eos: readonly number[] = []): Detokenizer {
  const text = (id: number) => String.fromCharCode(65 + id);
  return {
    eosTokenIds: eos,
    tokenText: text,
    isSpecial: (id) => eos.includes(id),
    createDecoder: (opts) => new IncrementalDecoder((ids) => ids.filter((i) => !(opts?.skipSpecialTokens && eos.includes(i))).map(text).join(''), []),
  };
}

interface FakeLease { readonly id: string; released: boolean }

/** Adapters in `slow` resolve only when `finish(id)` is called; `missing` ones reject with ADAPTER_NOT_FOUND. */
class FakeProvider implements AdapterProvider {
  readonly leases: FakeLease[] = [];
  readonly slow = new Set<string>();
  readonly missing = new Set<string>();
  private readonly waiters = new Map<string, (() => void)[]>();

  /** Merged adapters are leased as `merged(<ids>)`. */
  acquireMerged(spec: MergeSpec): Promise<AdapterLease> {
    return this.acquire(`merged(${spec.ids.join(',')})`);
  }

  acquire(id: string): Promise<AdapterLease> {
    if (this.missing.has(id)) return Promise.reject(fail('ADAPTER_NOT_FOUND', `adapter "${id}" not found`));
    const make = (): AdapterLease => {
      const rec: FakeLease = { id, released: false };
      this.leases.push(rec);
      return {
        adapter: { id, key: `k-${id}` },
        version: `v-${id}`,
        release: () => {
          assert.equal(rec.released, false, `lease on ${id} released twice`);
          rec.released = true;
        },
      };
    };
    if (!this.slow.has(id)) return Promise.resolve(make());
    return new Promise((resolve) => {
      const list = this.waiters.get(id) ?? [];
      list.push(() => resolve(make()));
      this.waiters.set(id, list);
    });
  }

  finish(id: string): void {
    this.slow.delete(id);
    for (const w of this.waiters.get(id) ?? []) w();
    this.waiters.delete(id);
  }

  unreleased(): string[] {
    return this.leases.filter((l) => !l.released).map((l) => l.id);
  }
}

const OPTS: EngineOptions = {
  maxBatchSize: 8, maxBatchTokens: 256, prefillChunk: 16, loraMode: 'unmerged',
  maxQueue: 16, maxInputLength: 64, maxTotalTokens: 4096, maxPositions: 4096,
};

function setup(opts: Partial<EngineOptions> = {}, eos: readonly number[] = [], metrics?: EngineMetrics) {
  const ex = new FakeExecutor();
  const provider = new FakeProvider();
  const engine = new Engine(ex, fakeTokenizer(eos), provider, { ...OPTS, ...opts }, metrics);
  const finished: string[] = [];
  /** Submits a request; resolves with its outcome (the label is recorded in completion order). */
  const submit = (label: string, req: GenerateRequest, onToken?: (n: number) => void): Promise<Outcome> =>
    generate({ engine }, req, onToken).then((out) => {
      finished.push(label);
      return out;
    });
  return { ex, provider, engine, submit, finished };
}

const ids = (o: Outcome) => o.tokens.map((t) => t.id);

/** `p`, or a failure after `ms` (a regression must fail the test, not hang the suite). */
function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const t = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: not done after ${ms} ms`)), ms);
  });
  return Promise.race([p, t]).finally(() => clearTimeout(timer));
}

test('length rules: empty, too long, max-new-tokens, total within the model positions; fields name the messages', () => {
  const { engine, ex } = setup({ maxInputLength: 8, maxTotalTokens: 16, maxPositions: 12 });
  assert.deepEqual(engine.limits, { maxInputLength: 8, maxTotalTokens: 12 });
  const sink = { onToken() {}, onDone() {}, onError() {} };
  const cases: [GenerateRequest, string, string][] = [
    [request([]), 'VALIDATION', '`inputs` must not be empty'],
    [request(Array(9).fill(1)), 'INPUT_TOO_LONG', '`inputs` must have at most 8 tokens. Given: 9'],
    [request([1], { maxNewTokens: 0 }), 'VALIDATION', '`max_new_tokens` must be a positive integer'],
    [request([1], { maxNewTokens: 1.5 }), 'VALIDATION', '`max_new_tokens` must be a positive integer'],
    [request([1, 2], { maxNewTokens: 11 }), 'INPUT_TOO_LONG', '`inputs` tokens + `max_new_tokens` must be <= 12. Given: 2 `inputs` tokens and 11 `max_new_tokens`'],
    [request([1, 2], { maxNewTokens: 11, fields: { input: 'prompt', maxNewTokens: 'max_tokens' } }), 'INPUT_TOO_LONG',
      '`prompt` tokens + `max_tokens` must be <= 12. Given: 2 `prompt` tokens and 11 `max_tokens`'],
  ];
  for (const [req, code, message] of cases) {
    assert.throws(() => engine.generate(req, sink), { code, message });
    assert.throws(() => checkLengths(req, engine.limits), { code, message });
  }
  checkLengths(request([1, 2], { maxNewTokens: 10 }), engine.limits);
  assert.equal(ex.calls.length, 0);
});

test('a request whose adapter is loading blocks nobody; it runs once the adapter is resident', async () => {
  const { ex, provider, engine, submit, finished } = setup();
  provider.slow.add('slow');
  const a = submit('slow', request([5], { adapterId: 'slow', maxNewTokens: 4 }));
  const b = submit('fast', request([10, 11], { adapterId: 'fast', maxNewTokens: 4 }));
  const c = submit('base', request([20], { maxNewTokens: 3 }));
  const [ob, oc] = await Promise.all([b, c]);
  assert.deepEqual(ids(ob), chain(11, 4));
  assert.equal(ob.result?.finishReason, 'length');
  assert.deepEqual(ids(oc), chain(20, 3));
  assert.deepEqual(finished.sort(), ['base', 'fast']);
  assert.deepEqual(engine.stats(), { running: 0, waiting: 0, waitingForAdapter: 1 });
  assert.equal(ex.seqsOf('slow').length, 0, 'nothing of the loading adapter reached the executor');

  provider.finish('slow');
  const oa = await a;
  assert.deepEqual(finished.at(-1), 'slow');
  assert.deepEqual(ids(oa), chain(5, 4));
  assert.equal(oa.result?.adapterId, 'slow');
  assert.equal(oa.text, letters(chain(5, 4)));
  assert.deepEqual(provider.unreleased(), []);
  assert.deepEqual(engine.stats(), { running: 0, waiting: 0, waitingForAdapter: 0 });
  assert.deepEqual(ex.violations, []);
});

test('queueDepth: waiting counts requests queued and those waiting for their adapter', async () => {
  let depth = { running: -1, waiting: -1 };
  const noop = () => {};
  const metrics: EngineMetrics = {
    step: noop, requestQueued: noop, firstToken: noop, interToken: noop, requestFinished: noop,
    queueDepth: (running, waiting) => { depth = { running, waiting }; },
  };
  const { provider, submit } = setup({}, [], metrics);
  provider.slow.add('slow');
  const a = submit('slow-1', request([5], { adapterId: 'slow', maxNewTokens: 2 }));
  const b = submit('slow-2', request([6], { adapterId: 'slow', maxNewTokens: 2 }));
  assert.deepEqual(depth, { running: 0, waiting: 2 });
  const c = submit('base', request([20], { maxNewTokens: 2 }));
  assert.deepEqual(depth, { running: 0, waiting: 3 });
  await c;
  assert.deepEqual(depth, { running: 0, waiting: 2 }, 'the two still waiting for their adapter');
  provider.finish('slow');
  await Promise.all([a, b]);
  assert.deepEqual(depth, { running: 0, waiting: 0 });
});

test('every executor call carries the scheduler\'s LoRA plan: auto merges a sole adapter after mergeAfter steps', async () => {
  const { ex, submit } = setup({ loraMode: 'auto', mergeAfter: 2 });
  await submit('x', request([5], { adapterId: 'x', maxNewTokens: 4 }));
  const base = await submit('base', request([7], { maxNewTokens: 2 }));
  assert.deepEqual(ids(base), chain(7, 2));
  assert.deepEqual(ex.calls.map((c) => `${c.kind} ${c.lora}`), [
    'prefill unmerged', 'decode merged:k-x', 'decode merged:k-x', 'decode merged:k-x', 'prefill none', 'decode none',
  ]);
  assert.deepEqual(ex.violations, []);
});

test('an unknown adapter fails with ADAPTER_NOT_FOUND and never reaches the executor', async () => {
  const { ex, provider, submit } = setup();
  provider.missing.add('nope');
  const o = await submit('x', request([1], { adapterId: 'nope' }));
  assert.equal(o.error?.code, 'ADAPTER_NOT_FOUND');
  assert.equal(o.tokens.length, 0);
  assert.equal(ex.calls.length, 0);
});

test('a request with a merge acquires the merged adapter (acquireMerged), runs on it and releases it', async () => {
  const { ex, provider, submit } = setup();
  const merge = { ids: ['a', 'b'], weights: [1, 0.5], strategy: 'linear', density: 1, majoritySignMethod: 'total', seed: 0 } as const;
  const o = await submit('m', request([1, 2], { adapterId: 'merge:x', merge, maxNewTokens: 2 }));
  assert.equal(o.error, undefined);
  assert.deepEqual(provider.leases.map((l) => l.id), ['merged(a,b)']);
  assert.deepEqual(provider.unreleased(), []);
  assert.ok(ex.calls.some((c) => c.adapters.includes('merged(a,b)')));
});

test('timeoutMs ends a running request with TIMEOUT and releases its KV cache and adapter pin', async () => {
  const { ex, provider, engine, submit } = setup();
  ex.delayMs = 10;
  const t0 = performance.now();
  const o = await within(submit('t', request([3], { adapterId: 'fast', maxNewTokens: 1000, ignoreEos: true, timeoutMs: 100 })), 5000, 'timeout');
  const elapsed = performance.now() - t0;
  assert.equal(o.error?.code, 'TIMEOUT');
  assert.ok(o.tokens.length >= 1 && o.tokens.length < 1000, `${o.tokens.length} tokens`);
  assert.ok(elapsed >= 95 && elapsed < 2000, `ended after ${elapsed} ms`);
  const [seq] = ex.seqsOf('fast');
  assert.ok(ex.released.includes(seq!), 'executor.release was called for the timed-out sequence');
  assert.equal(ex.running, 0);
  assert.deepEqual(provider.unreleased(), []);
  assert.deepEqual(engine.stats(), { running: 0, waiting: 0, waitingForAdapter: 0 });
  assert.deepEqual(ex.violations, []);
});

test('timeoutMs while the adapter is still loading: TIMEOUT, and the late lease is released at once', async () => {
  const { ex, provider, submit } = setup();
  provider.slow.add('slow');
  const o = await within(submit('t', request([3], { adapterId: 'slow', timeoutMs: 30 })), 5000, 'timeout');
  assert.equal(o.error?.code, 'TIMEOUT');
  provider.finish('slow');
  await sleep(5);
  assert.equal(provider.leases.length, 1);
  assert.deepEqual(provider.unreleased(), []);
  assert.equal(ex.calls.length, 0);
});

test('a request that timed out while its adapter loads no longer counts toward maxQueue', async () => {
  const { provider, engine, submit } = setup({ maxQueue: 1 });
  provider.slow.add('slow');
  try {
    const o = await submit('t', request([1], { adapterId: 'slow', timeoutMs: 20 }));
    assert.equal(o.error?.code, 'TIMEOUT');
    assert.equal(engine.stats().waitingForAdapter, 0);
    const next = await submit('n', request([2], { maxNewTokens: 1 }));
    assert.equal(next.result?.generatedTokens, 1);
  } finally {
    provider.finish('slow');
  }
});

test('a full queue throws OVERLOADED synchronously with details.retryAfter; the queue frees up', async () => {
  const { provider, engine, submit } = setup({ maxQueue: 3 });
  provider.slow.add('slow');
  // Two waiting for their adapter and one queued count toward maxQueue (the step loop starts asynchronously).
  const waiting = [submit('s1', request([1], { adapterId: 'slow', maxNewTokens: 2 })), submit('s2', request([2], { adapterId: 'slow', maxNewTokens: 2 }))];
  const queued = submit('q', request([3], { maxNewTokens: 2 }));
  let sinkCalled = false;
  const sink = { onToken() { sinkCalled = true; }, onDone() { sinkCalled = true; }, onError() { sinkCalled = true; } };
  assert.throws(() => engine.generate(request([4]), sink), (err: unknown) => {
    assert.ok(isServeError(err));
    assert.equal(err.code, 'OVERLOADED');
    assert.equal(err.status, 429);
    assert.ok(typeof err.details?.retryAfter === 'number' && err.details.retryAfter > 0, JSON.stringify(err.details));
    return true;
  });
  assert.equal((await queued).result?.finishReason, 'length');
  // The queued one has left; the two still waiting for their adapter keep the queue at 2 of 3: one more fits, not two.
  const extra = submit('e', request([5], { maxNewTokens: 1 }));
  assert.throws(() => engine.generate(request([6]), sink), { code: 'OVERLOADED' });
  assert.equal((await extra).result?.generatedTokens, 1);
  provider.finish('slow');
  for (const o of await Promise.all(waiting)) assert.equal(o.result?.finishReason, 'length');
  assert.equal(sinkCalled, false, 'a refused request gets no events');
  assert.equal((await submit('after', request([7], { maxNewTokens: 1 }))).result?.generatedTokens, 1);
});

test('drain: running requests finish, new ones are refused with SHUTTING_DOWN, drain resolves when idle', async () => {
  const { ex, engine, submit } = setup();
  ex.delayMs = 5;
  let draining: Promise<void> | undefined;
  const t0 = performance.now();
  const o = await within(submit('r', request([1], { maxNewTokens: 12, ignoreEos: true }), (n) => {
    if (n === 2) draining = engine.drain(10_000);
  }), 5000, 'request');
  assert.ok(draining);
  assert.throws(() => engine.generate(request([2]), { onToken() {}, onDone() {}, onError() {} }), { code: 'SHUTTING_DOWN' });
  await within(draining!, 5000, 'drain');
  assert.ok(performance.now() - t0 < 5000, 'drain did not wait for the grace period');
  assert.equal(o.result?.finishReason, 'length');
  assert.deepEqual(ids(o), chain(1, 12));
  assert.deepEqual(ex.violations, []);
});

test('drain: what is left after the grace period is cancelled with SHUTTING_DOWN and freed', async () => {
  const { ex, provider, engine, submit } = setup();
  ex.delayMs = 5;
  provider.slow.add('slow');
  const pendingAdapter = submit('a', request([9], { adapterId: 'slow' }));
  let draining: Promise<void> | undefined;
  let t0 = 0;
  const long = submit('r', request([1], { adapterId: 'fast', maxNewTokens: 3000, ignoreEos: true }), (n) => {
    if (n === 2) {
      t0 = performance.now();
      draining = engine.drain(150);
    }
  });
  const [ol, oa] = await within(Promise.all([long, pendingAdapter]), 5000, 'requests after the grace period');
  await within(draining!, 1000, 'drain');
  const elapsed = performance.now() - t0;
  assert.ok(elapsed >= 140 && elapsed < 3000, `drain took ${elapsed} ms`);
  assert.equal(ol.error?.code, 'SHUTTING_DOWN');
  assert.ok(ol.tokens.length > 2 && ol.tokens.length < 3000, `${ol.tokens.length} tokens`);
  assert.equal(oa.error?.code, 'SHUTTING_DOWN');
  assert.ok(ex.released.includes(ex.seqsOf('fast')[0]!));
  assert.equal(ex.running, 0);
  provider.finish('slow');
  await sleep(5);
  assert.deepEqual(provider.unreleased(), []);
  assert.deepEqual(engine.stats(), { running: 0, waiting: 0, waitingForAdapter: 0 });
  assert.deepEqual(ex.violations, []);
});

test('eos ends with eos_token; the eos token is counted but not in the text; ignoreEos runs on', async () => {
  const { ex, submit } = setup({}, [9]);
  const o = await submit('e', request([5], { maxNewTokens: 10 }));
  assert.equal(o.result?.finishReason, 'eos_token');
  assert.deepEqual(ids(o), [6, 7, 8, 9]);
  assert.equal(o.result?.generatedTokens, 4);
  assert.equal(o.tokens.at(-1)?.special, true);
  assert.equal(o.result?.text, 'GHI');
  assert.equal(o.text, 'GHI');
  assert.equal(ex.running, 0);

  const ig = await submit('i', request([5], { maxNewTokens: 6, ignoreEos: true }));
  assert.equal(ig.result?.finishReason, 'length');
  assert.deepEqual(ids(ig), [6, 7, 8, 9, 10, 11]);
  assert.equal(ig.result?.text, 'GHIKL');
});

test('stop sequences end with stop_sequence (kept by default, cut with includeStop: false)', async () => {
  const { ex, submit } = setup();
  // Prompt [0] generates B C D E F ...
  const kept = await submit('k', request([0], { maxNewTokens: 20, stop: ['DE'] }));
  assert.equal(kept.result?.finishReason, 'stop_sequence');
  assert.equal(kept.result?.generatedTokens, 4);
  assert.equal(kept.result?.text, 'BCDE');
  assert.equal(kept.text, 'BCDE', 'streamed text adds up to the result');

  const cut = await submit('c', request([0], { maxNewTokens: 20, stop: ['XYZ', 'DE'], includeStop: false }));
  assert.equal(cut.result?.finishReason, 'stop_sequence');
  assert.equal(cut.result?.text, 'BC');
  assert.equal(cut.text, 'BC');

  const none = await submit('n', request([0], { maxNewTokens: 5, stop: ['DF'] }));
  assert.equal(none.result?.finishReason, 'length');
  assert.equal(none.result?.text, 'BCDEF');
  assert.equal(ex.running, 0);
});

test('an executor that throws fails the sequences it held with GENERATION; the engine keeps serving', async () => {
  const { ex, provider, engine, submit } = setup({ maxBatchSize: 2 });
  ex.delayMs = 2;
  const boom = new Error('device lost');
  ex.hook = (kind, n) => {
    if (kind === 'decode' && n === 3) throw boom; // prefill(r1, r2), decode, decode → throws
  };
  const r1 = submit('r1', request([1], { adapterId: 'fast', maxNewTokens: 10 }));
  while (engine.stats().waitingForAdapter > 0) await Promise.resolve(); // r1 queued first (the loop starts on setImmediate)
  const r2 = submit('r2', request([2], { maxNewTokens: 10 }));
  const r3 = submit('r3', request([3], { maxNewTokens: 4 })); // no slot: waits, survives the failure
  const [o1, o2, o3] = await within(Promise.all([r1, r2, r3]), 5000, 'requests');
  for (const o of [o1, o2]) {
    assert.equal(o.error?.code, 'GENERATION');
    assert.equal((o.error as ServeError & { cause?: unknown }).cause, boom);
    assert.equal(o.tokens.length, 2);
  }
  assert.deepEqual(ex.calls[0]!.seqs.length, 2, 'r1 and r2 share the first batch');
  assert.deepEqual(ids(o3), chain(3, 4));
  assert.equal(o3.result?.finishReason, 'length');
  const failed = [...ex.seqsOf('fast'), ...ex.calls[0]!.seqs];
  for (const s of failed) assert.ok(ex.released.includes(s), `seq ${s} released`);
  assert.deepEqual(provider.unreleased(), []);

  // A prefill failure too, then normal service.
  ex.hook = (kind) => {
    if (kind === 'prefill') throw new Error('prefill failed');
  };
  const o4 = await within(submit('r4', request([4], { maxNewTokens: 3 })), 5000, 'r4');
  assert.equal(o4.error?.code, 'GENERATION');
  ex.hook = null;
  const o5 = await within(submit('r5', request([5], { maxNewTokens: 3 })), 5000, 'r5');
  assert.deepEqual(ids(o5), chain(5, 3));
  assert.equal(ex.running, 0);
  assert.deepEqual(engine.stats(), { running: 0, waiting: 0, waitingForAdapter: 0 });
  assert.deepEqual(ex.violations, []);
});

test('cancelling a queued request while a step is in flight does not disturb the running batch', async () => {
  const { ex, engine, submit } = setup();
  let openPrefill!: () => void;
  const prefillGate = new Promise<void>((r) => (openPrefill = r));
  const ac = new AbortController();
  ex.hook = async (kind, n) => {
    if (kind === 'prefill' && n === 1) await prefillGate;
    // The plan of this step holds decode [r1] and prefill [r2]; r2 is cancelled while the decode runs.
    if (kind === 'decode' && n === 2) ac.abort();
  };
  const r1 = submit('r1', request([1], { maxNewTokens: 5 }));
  await ex.waitForCall('prefill');
  const r2 = submit('r2', request([2], { maxNewTokens: 5, signal: ac.signal }));
  openPrefill();
  const [o1, o2] = await within(Promise.all([r1, r2]), 5000, 'requests');
  assert.equal(o2.error?.code, 'CANCELLED');
  assert.equal(o1.error, undefined, `running request failed: ${o1.error?.code} ${String((o1.error as { cause?: unknown } | undefined)?.cause)}`);
  assert.deepEqual(ids(o1), chain(1, 5));
  assert.deepEqual(engine.stats(), { running: 0, waiting: 0, waitingForAdapter: 0 });
});

test('a cancellation during an in-flight step never calls executor.release mid-step', async () => {
  const { ex, provider, submit } = setup();
  provider.slow.add('slow');
  const acRunning = new AbortController();
  const acLoading = new AbortController();
  ex.hook = (kind, n) => {
    if (kind === 'decode' && n === 3) {
      acRunning.abort(); // deferred: r1 is held by the executor
      acLoading.abort(); // r2 waits for its adapter: reaped at once... and r1 with it
    }
  };
  const r1 = submit('r1', request([1], { maxNewTokens: 50, ignoreEos: true, signal: acRunning.signal }));
  const r2 = submit('r2', request([2], { adapterId: 'slow', signal: acLoading.signal }));
  const [o1, o2] = await within(Promise.all([r1, r2]), 5000, 'requests');
  provider.finish('slow');
  assert.equal(o1.error?.code, 'CANCELLED');
  assert.equal(o2.error?.code, 'CANCELLED');
  assert.deepEqual(ex.violations, []);
});

test('load(): KV tokens held and the adapters of running and waiting requests, as the scale-out gauges read them', async () => {
  const { ex, provider, engine, submit } = setup({ maxBatchSize: 2, maxTotalTokens: 100 });
  provider.slow.add('slow');
  const seen: ReturnType<Engine['load']>[] = [];
  ex.hook = (kind) => {
    if (kind === 'decode') seen.push(engine.load());
  };
  const a = submit('slow', request([5], { adapterId: 'slow', maxNewTokens: 2 }));
  await submit('fast', request([1, 2, 3], { adapterId: 'fast', maxNewTokens: 3 }));
  // Decode steps see 3 prompt tokens plus the generated tokens already fed back (1, then 2).
  assert.deepEqual(seen, [
    { kvTokens: 3, kvCapacityTokens: 200, runningAdapters: ['fast'], waitingAdapters: ['slow'] },
    { kvTokens: 4, kvCapacityTokens: 200, runningAdapters: ['fast'], waitingAdapters: ['slow'] },
  ]);
  provider.finish('slow');
  await a;
  assert.deepEqual(engine.load(), { kvTokens: 0, kvCapacityTokens: 200, runningAdapters: [], waitingAdapters: [] });
});

test('a constraint: only its allowed ids are sampled, in its row alone; a grammar with nothing left fails that request alone', async () => {
  const { ex, submit } = setup({}, [9]);
  /** Allows only even ids (EOS 9 never), and nothing once `dieAfter` tokens were taken. */
  const evens = (dieAfter: number): TokenConstraint => ({
    start: () => ({ dfa: 0, cp: 0, need: 0, len: 0 }),
    allowed: (s) => (s.dfa >= dieAfter ? null : Uint8Array.from({ length: V }, (_, i) => (i % 2 === 0 ? 1 : 0))),
    advance: (s, id) => {
      assert.equal(id % 2, 0, 'a masked id was sampled');
      return { ...s, dfa: s.dfa + 1 };
    },
    complete: () => false,
    isEos: (id) => id === 9,
  });
  const [free, constrained, dying] = await Promise.all([
    submit('f', request([0], { maxNewTokens: 5 })),
    submit('c', request([0], { maxNewTokens: 5, constraint: evens(100) })),
    submit('d', request([0], { maxNewTokens: 5, constraint: evens(2) })),
  ]);
  assert.deepEqual(ids(free), [1, 2, 3, 4, 5], 'the unconstrained row follows the model');
  // the fake model puts all weight on t + 1 (odd after an even): the mask leaves the lowest even id, 0
  assert.ok(ids(constrained).every((t) => t % 2 === 0));
  assert.equal(constrained.result?.finishReason, 'length');
  assert.equal(dying.error?.code, 'GRAMMAR_INVALID');
  assert.equal(ids(dying).length, 2);
  assert.equal(ex.running, 0);
});

test('a prefix group prefills once: the others copy the leader\'s KV cache (fork) before its first decode step', async () => {
  const { ex, submit } = setup();
  const group = {};
  const outs = await Promise.all([0, 1, 2].map((i) => submit(`g${i}`, request([3, 4, 5], { prefixGroup: group, maxNewTokens: 3 + i }))));
  assert.deepEqual(outs.map(ids), [chain(5, 3), chain(5, 4), chain(5, 5)]);
  const prefills = ex.calls.filter((c) => c.kind === 'prefill');
  assert.equal(prefills.length, 1);
  assert.equal(prefills[0]!.seqs.length, 1, 'one prefill for the three');
  assert.deepEqual(ex.forks, [{ seq: prefills[0]!.seqs[0]!, into: ex.forks[0]!.into }]);
  assert.equal(ex.forks[0]!.into.length, 2);
  assert.deepEqual(ex.violations, []);
  assert.equal(ex.running, 0);
  assert.equal(ex.released.length, 3);
});

test('a prefix group: a leader that ends at its first token still shares; no room in the batch or a different prompt prefills alone', async () => {
  const { ex, submit } = setup({ maxBatchSize: 2 });
  const group = {};
  const outs = await Promise.all([
    submit('leader', request([7], { prefixGroup: group, maxNewTokens: 1 })),
    submit('copy', request([7], { prefixGroup: group, maxNewTokens: 2 })),
    submit('no room', request([7], { prefixGroup: group, maxNewTokens: 2 })),
  ]);
  assert.deepEqual(outs.map(ids), [chain(7, 1), chain(7, 2), chain(7, 2)]);
  assert.equal(ex.forks.length, 1);
  assert.equal(ex.forks[0]!.into.length, 1, 'the batch had room for one copy beside the leader');
  assert.equal(ex.calls.filter((c) => c.kind === 'prefill').flatMap((c) => c.seqs).length, 2);
  assert.deepEqual(ex.violations, []);
  assert.equal(ex.running, 0);

  const other = setup();
  const group2 = {};
  const two = await Promise.all([other.submit('p', request([4], { prefixGroup: group2, maxNewTokens: 2 })), other.submit('q', request([9], { prefixGroup: group2, maxNewTokens: 2 }))]);
  assert.deepEqual(two.map(ids), [chain(4, 2), chain(9, 2)]);
  assert.deepEqual(other.ex.forks, [], 'a different prompt is not shared');
  assert.deepEqual(other.ex.violations, []);
});

test('a prefix group whose leader is cancelled before its prefill: the others prefill on their own', async () => {
  const { ex, engine, submit } = setup();
  const group = {};
  const ac = new AbortController();
  const leader = submit('leader', request([2], { prefixGroup: group, signal: ac.signal }));
  const others = [submit('a', request([2], { prefixGroup: group, maxNewTokens: 2 })), submit('b', request([2], { prefixGroup: group, maxNewTokens: 2 }))];
  assert.equal(engine.stats().waiting, 3, 'the two waiting for the leader count as waiting');
  ac.abort();
  assert.equal((await leader).error?.code, 'CANCELLED');
  assert.deepEqual((await Promise.all(others)).map(ids), [chain(2, 2), chain(2, 2)]);
  assert.deepEqual(ex.forks, []);
  assert.deepEqual(ex.violations, []);
  assert.equal(engine.stats().waiting, 0);
});

test('a prefix group whose fork fails: every member ends with the step\'s error, none hangs; the engine keeps serving', async () => {
  const { ex, engine, submit } = setup();
  ex.forkError = new Error('device lost');
  const group = {};
  const outs = await within(Promise.all([0, 1, 2].map((i) => submit(`f${i}`, request([6], { prefixGroup: group, maxNewTokens: 3 })))), 5000, 'group');
  assert.deepEqual(outs.map((o) => o.error?.code), ['GENERATION', 'GENERATION', 'GENERATION']);
  assert.equal(ex.running, 0);
  assert.deepEqual(engine.stats(), { running: 0, waiting: 0, waitingForAdapter: 0 });
  ex.forkError = null;
  assert.deepEqual(ids(await submit('after', request([6], { maxNewTokens: 2 }))), chain(6, 2));
});

test('a prefix group under a grammar: each member starts at the grammar\'s start and advances its own state, the first token (sampled from the leader\'s logits) included', async () => {
  const { ex, submit } = setup({}, [9]);
  /** Token k of a text must be id 2k + 2 (never what the fake model prefers), and nothing is allowed after 3 tokens. */
  const steps: TokenConstraint = {
    start: () => ({ dfa: 0, cp: 0, need: 0, len: 0 }),
    allowed: (s) => (s.dfa >= 3 ? null : Uint8Array.from({ length: V }, (_, i) => (i === 2 * s.dfa + 2 ? 1 : 0))),
    advance: (s, id) => {
      assert.equal(id, 2 * s.dfa + 2, 'a masked id was sampled');
      return { ...s, dfa: s.dfa + 1 };
    },
    complete: () => false,
    isEos: (id) => id === 9,
  };
  const group = {};
  const outs = await Promise.all([0, 1, 2].map((i) => submit(`c${i}`, request([3, 4], { prefixGroup: group, constraint: steps, maxNewTokens: 5 }))));
  assert.equal(ex.forks.length, 1, 'the three shared one prefill');
  assert.equal(ex.forks[0]!.into.length, 2);
  for (const o of outs) {
    assert.deepEqual(ids(o), [2, 4, 6], 'each choice walks the grammar from its start');
    assert.equal(o.error?.code, 'GRAMMAR_INVALID', 'and fails alone once its grammar allows nothing');
  }
  assert.deepEqual(ex.violations, []);
  assert.equal(ex.running, 0);
});

test('tokens the executor picks are taken as sampled ones, and only rows the host would take greedily from the logits after bias and penalties are offered (with their edits)', async () => {
  const run = async (picks: boolean) => {
    const { ex, submit } = setup({ maxBatchSize: 16 }, [9]); // room for every choice to copy the leader's prefill
    ex.picks = picks;
    const group = {};
    const outs = await Promise.all([
      submit('greedy', request([0], { maxNewTokens: 5 })),
      submit('stop', request([2], { maxNewTokens: 8, stop: ['F'] })),
      submit('eos', request([7], { maxNewTokens: 5 })),
      submit('details', request([1, 2], { maxNewTokens: 3, decoderInputDetails: true })),
      ...[0, 1, 2].map((i) => submit(`choice${i}`, request([5, 6], { prefixGroup: group, maxNewTokens: 2 + i }))),
      submit('sampled', request([3], { maxNewTokens: 3, sampling: { doSample: true, seed: 1 } })),
      submit('biased', request([8], { maxNewTokens: 3, sampling: { logitBias: [[0, 11]] } })),
      submit('penalised', request([10], { maxNewTokens: 3, sampling: { repetitionPenalty: 1.2, frequencyPenalty: 3 } })),
      submit('alternatives', request([4], { maxNewTokens: 3, sampling: { topNTokens: 2 } })),
    ]);
    assert.deepEqual(ex.violations, []);
    return { ex, outs };
  };
  const host = await run(false);
  const device = await run(true);
  // Logprobs of edited rows to float32 rounding (the device edits in float32, the host in float64).
  const rounded = (t: TokenInfo) => ({ ...t, logprob: Math.round(t.logprob * 1e5) / 1e5 });
  const timeless = (o: Outcome) => ({
    ...o, tokens: o.tokens.map(rounded),
    result: o.result && { ...o.result, queueTimeS: 0, inferenceTimeS: 0, timeToFirstTokenS: 0, tokens: o.result.tokens.map(rounded) },
  });
  assert.deepEqual(device.outs.map(timeless), host.outs.map(timeless), 'the same tokens, text, logprobs, details and finish reasons');
  // The bias makes id 0 the greedy choice (the fake model's next token has logit 10).
  assert.deepEqual(host.outs[8]!.tokens.map((t) => t.id), [0, 0, 0]);
  assert.deepEqual(host.outs.slice(0, 3).map((o) => o.result?.finishReason), ['length', 'stop_sequence', 'eos_token']);
  const { pickFlags, prompts } = device.ex;
  const offered = (kind: 'prefill' | 'decode') => new Set(pickFlags.filter((f) => f.kind === kind && f.pick).map((f) => prompts.get(f.seq)!.join()));
  const never = ['3', '4']; // sampled, alternatives
  // Prefill: not with prompt logprobs ([1, 2]), nor a group's leader ([5, 6]), whose followers sample from its logits.
  assert.deepEqual([...offered('prefill')].sort(), ['0', '10', '2', '7', '8']);
  assert.deepEqual([...offered('decode')].sort(), ['0', '1,2', '10', '2', '5,6', '7', '8']);
  for (const f of pickFlags) if (never.includes(prompts.get(f.seq)!.join())) assert.equal(f.pick, false);
  assert.ok(pickFlags.some((f) => f.kind === 'decode' && !f.pick), 'the host-sampled rows were in the decode batches');
});

test('a picked token without a finite logit or with +inf fails its sequence alone, as the host sampler does', async () => {
  const { ex, submit } = setup();
  ex.picks = true;
  ex.pickAfter = (last) => (last === 2 ? -1 : last === 12 ? -2 : next(last));
  const [masked, infinite, fine] = await Promise.all([
    submit('masked', request([1], { maxNewTokens: 5 })),
    submit('infinite', request([11], { maxNewTokens: 5 })),
    submit('fine', request([20], { maxNewTokens: 5 })),
  ]);
  assert.equal(masked.error?.code, 'GENERATION');
  assert.equal(masked.error?.message, 'every logit is -inf or NaN');
  assert.deepEqual(ids(masked), [2]);
  assert.equal(infinite.error?.code, 'GENERATION');
  assert.equal(infinite.error?.message, 'the logits contain +inf');
  assert.deepEqual(ids(infinite), [12]);
  assert.deepEqual(ids(fine), chain(20, 5));
  assert.equal(ex.running, 0);
});

/**
 * An executor answering top_p-alone rows with shortlists (ShortlistRequest.fallback) of a fixed row per step, and
 * their logits through readLogits; other rows with logits. Records, per step, which sequences asked for a shortlist.
 */
class ShortlistExecutor implements StepExecutor {
  readonly vocabSize = 200;
  private readonly batch = new Set<number>();
  readonly asked: boolean[] = [];
  rowsRead = 0;
  private step = 0;
  /** The step whose readLogits rejects. */
  failReadAt = -1;

  constructor(private readonly rowAt: (step: number) => Float32Array) {}

  get running(): number {
    return this.batch.size;
  }

  /** Steps so far. */
  get steps(): number {
    return this.step;
  }

  private answer(items: readonly { seq: number; shortlist?: { fallback?: boolean } }[]): StepResult {
    const k = this.step++;
    const row = this.rowAt(k);
    const ids = Array.from({ length: row.length }, (_, i) => i).sort((a, b) => row[b]! - row[a]! || a - b).slice(0, 64);
    let sum = 0;
    for (const x of row) sum += Math.exp(x - row[ids[0]!]!);
    const shortlist = { ids: Int32Array.from(ids), logits: Float32Array.from(ids, (i) => row[i]!), logNorm: Math.fround(Math.log(sum)) };
    const logits = new Map<number, Float32Array>();
    const shortlists = new Map<number, typeof shortlist>();
    for (const it of items) {
      this.asked.push(it.shortlist?.fallback === true);
      if (it.shortlist) shortlists.set(it.seq, shortlist);
      else logits.set(it.seq, row);
    }
    const readLogits = async (seqs: readonly number[]) => {
      if (k === this.failReadAt) throw new Error('device lost');
      this.rowsRead += seqs.length;
      return new Map(seqs.map((s) => [s, row]));
    };
    return { logits, shortlists, readLogits, passes: [{ mode: 'none', adapters: 1, rows: items.length }] };
  }

  async prefill(items: readonly PrefillItem[]): Promise<StepResult> {
    for (const it of items) if (it.last) this.batch.add(it.seq);
    return this.answer(items);
  }

  async decode(items: readonly DecodeItem[]): Promise<StepResult> {
    return this.answer(items);
  }

  release(seq: number): void {
    this.batch.delete(seq);
  }

  fork(): void {
    throw new Error('no forks');
  }
}

test('top_p alone: tokens from shortlists, or from the row read after the step when the nucleus reaches past them; mostly flat rows pause shortlists', async () => {
  let s = 3;
  const rand = () => ((s = (Math.imul(s, 1664525) + 1013904223) >>> 0) / 2 ** 32);
  // Peaked rows (one id far above: the nucleus is one id) at steps 0–19 and from 60 on, flat ones between (the
  // nucleus is most of the 200 ids).
  const rows = Array.from({ length: 120 }, (_, step) => {
    const flat = step >= 20 && step < 60;
    const row = Float32Array.from({ length: 200 }, () => rand() * (flat ? 0.5 : 1));
    if (!flat) row[Math.floor(rand() * 200)] = 12;
    return row;
  });
  const ex = new ShortlistExecutor((step) => rows[step]!);
  const engine = new Engine(ex, fakeTokenizer(), null, OPTS);
  const sampling = { doSample: true, topP: 0.9, seed: 77 };
  const out = await generate({ engine }, request([1, 2, 3], { maxNewTokens: 100, ignoreEos: true, sampling }));
  assert.equal(out.error, undefined);
  // The same tokens as the host sampler on each step's whole row.
  const host = new Sampler({ ...DEFAULT_SAMPLING, ...sampling });
  assert.deepEqual(out.tokens.map((t) => t.id), rows.slice(0, 100).map((r) => host.sample(r, []).id));
  // Peaked steps decide from the shortlist. Flat steps: a few rows are read, then shortlists pause for 32 tokens,
  // then are tried again.
  assert.deepEqual(ex.asked.slice(0, 24), new Array(24).fill(true));
  assert.ok(ex.asked.slice(24, 56).every((a) => !a), `paused after four undecided shortlists: ${ex.asked.slice(20, 60).map(Number).join('')}`);
  assert.ok(ex.asked.slice(60).some((a) => a), 'tried again after the pause');
  assert.ok(ex.rowsRead >= 4 && ex.rowsRead <= 8, `rows read after their step: ${ex.rowsRead}`);
});

test('a failed read of an undecided shortlist\'s row fails that sequence alone; the others go on', async () => {
  const flat = Float32Array.from({ length: 200 }, (_, i) => (i % 7) * 0.01);
  const ex = new ShortlistExecutor(() => flat);
  const engine = new Engine(ex, fakeTokenizer(), null, OPTS);
  // In the pair's prefill step, then in its third decode step.
  for (const failAt of [0, 3]) {
    ex.failReadAt = ex.steps + failAt;
    const [nucleus, topK] = await Promise.all([
      generate({ engine }, request([1, 2], { maxNewTokens: 5, ignoreEos: true, sampling: { doSample: true, topP: 0.9, seed: 1 } })),
      generate({ engine }, request([3, 4], { maxNewTokens: 5, ignoreEos: true, sampling: { doSample: true, topK: 5, seed: 2 } })),
    ]);
    assert.equal(nucleus.error?.code, 'GENERATION', `read failing at step ${failAt}`);
    assert.equal(nucleus.tokens.length, failAt === 0 ? 0 : 3);
    assert.equal(topK.error, undefined);
    assert.equal(topK.tokens.length, 5);
  }
  // the engine serves on: the next top_p request reads its rows
  const again = await generate({ engine }, request([1, 2], { maxNewTokens: 3, ignoreEos: true, sampling: { doSample: true, topP: 0.9, seed: 1 } }));
  assert.equal(again.error, undefined);
  assert.equal(again.tokens.length, 3);
  assert.ok(ex.rowsRead >= 3);
});
