/**
 * The engine: admission and queue, the step loop (schedule → executor → sample → events), cancellation,
 * timeouts and draining. It never touches a tensor: the executor does, behind its interface.
 */
import { fail, isServeError, ServeError, type ErrorCode } from '../errors.ts';
import { profiler } from '../obs/profile.ts';
import type { IncrementalDecoder } from '../text/tokenizer.ts';
import type { AdapterLease, AdapterProvider } from '../lora/types.ts';
import type { DecodeItem, LogitEdits, LoraPlan, PickedToken, PrefillItem, Shortlist, ShortlistRequest, StepExecutor, StepResult } from './executor.ts';
import type { ConstraintState } from './constraint/tokens.ts';
import { nucleusOnDevice, pickableOnDevice, pickedToken, Sampler, shortlistOnDevice, type SampledToken } from './sampling.ts';
import { INITIAL_LORA_STATE, schedule, type LoraState, type PrefillChunk, type SchedSeq, type SchedulerLimits } from './scheduler.ts';
import { StopMatcher } from './stop.ts';
import type {
  EngineApi, EngineLoad, EngineMetrics, EngineStats, FinishReason, GenerateRequest, GenerationResult, GenerationSink, LengthFields, LengthLimits, PrefillToken, TokenInfo,
} from './types.ts';

export interface EngineOptions extends SchedulerLimits {
  /** Requests waiting (queued or for their adapter) beyond which new ones get OVERLOADED. */
  readonly maxQueue: number;
  readonly maxInputLength: number;
  readonly maxTotalTokens: number;
  /** The model's position limit. */
  readonly maxPositions: number;
}

/** The tokenizer pieces the engine needs to turn ids into text. */
export interface Detokenizer {
  readonly eosTokenIds: readonly number[];
  tokenText(id: number): string;
  isSpecial(id: number): boolean;
  createDecoder(opts?: { skipSpecialTokens?: boolean }): IncrementalDecoder;
}

type SeqState = 'adapter' | 'waiting' | 'prefilling' | 'running' | 'done';

/** Requests sharing one prefill (GenerateRequest.prefixGroup): the one that prefills, and those waiting for it. */
interface Group {
  leader: Seq | null;
  /** Waiting for the leader's prefill (state 'waiting', in no queue). */
  readonly followers: Seq[];
  /** Closed once the leader has shared its prefill or ended: later members prefill on their own. */
  open: boolean;
}

interface Seq {
  readonly id: number;
  readonly req: GenerateRequest;
  readonly sink: GenerationSink;
  readonly sampler: Sampler;
  /** Its next tokens may be picked on the device (greedy on the logits after bias and penalties, no constraint): DecodeItem.pick. */
  readonly pick: boolean;
  /**
   * Its next tokens may come from a shortlist (top_k ≤ SHORTLIST_SIZE; top_p alone or plain sampling, `fallback`; greedy with
   * alternatives or a temperature; no constraint): DecodeItem.shortlist.
   */
  readonly shortlist: ShortlistRequest | undefined;
  /** A fallback sequence's (top_p alone, plain) recent share of undecided shortlists, and until which token it reads logits instead. */
  readonly nucleus: { misses: number; pausedUntil: number };
  readonly decoder: IncrementalDecoder;
  readonly stop: StopMatcher;
  /** Where the text stands in `req.constraint` (null without one). */
  constraint: ConstraintState | null;
  readonly submittedAt: number;
  readonly group: Group | null;
  state: SeqState;
  lease: AdapterLease | null;
  /** Counted in waitingForAdapter (until its adapter resolves or it ends). */
  awaitingAdapter: boolean;
  prefilled: number;
  readonly generated: number[];
  readonly tokens: TokenInfo[];
  readonly prefill: PrefillToken[];
  text: string;
  scheduledAt: number | null;
  firstTokenAt: number | null;
  lastTokenAt: number | null;
  /** Why it must end at the next opportunity (cancel, timeout, drain). */
  abort: ErrorCode | null;
  timer: NodeJS.Timeout | null;
  onAbort: (() => void) | null;
}

const now = (): number => performance.now() / 1000;

/**
 * A top_p-alone or plain sampling sequence whose shortlists keep failing to decide (a flat distribution: each miss costs a second
 * readback) reads its logits at once for NUCLEUS_PAUSE tokens, then tries shortlists again. The token is the same
 * either way (but at near-ties of a row with bias or penalties, edited in float32 on the device, in float64 on the
 * host): this only chooses what is read.
 */
const NUCLEUS_PAUSE = 32;

/** The shortlist a sequence's item asks for now (none while a fallback sequence is paused). */
function shortlistOf(seq: Seq): ShortlistRequest | undefined {
  return seq.shortlist?.fallback && seq.generated.length < seq.nucleus.pausedUntil ? undefined : seq.shortlist;
}

/** Counts a fallback sequence's token drawn from its shortlist (`missed`: its row had to be read); pauses shortlists when most miss. */
function noteNucleus(seq: Seq, missed: boolean): void {
  const n = seq.nucleus;
  n.misses = 0.8 * n.misses + (missed ? 0.2 : 0); // a moving share over the last few tokens
  if (n.misses > 0.5) {
    n.pausedUntil = seq.generated.length + 1 + NUCLEUS_PAUSE;
    n.misses = 0.25;
  }
}

/** log_softmax(row) in float64 at `id`, and its `k` largest entries best first (ties: lowest id). */
function logprobsOf(row: Float32Array, id: number, k: number): { logprob: number; top: { id: number; logprob: number }[] } {
  let max = -Infinity;
  for (let i = 0; i < row.length; i++) if (row[i]! > max) max = row[i]!;
  let sum = 0;
  for (let i = 0; i < row.length; i++) sum += Math.exp(row[i]! - max);
  const logZ = max + Math.log(sum);
  const top: number[] = [];
  for (let i = 0; i < row.length && k > 0; i++) {
    if (top.length === k && row[i]! <= row[top[k - 1]!]!) continue;
    let j = Math.min(top.length, k - 1);
    while (j > 0 && row[top[j - 1]!]! < row[i]!) j--;
    top.splice(j, 0, i);
    if (top.length > k) top.pop();
  }
  return { logprob: row[id]! - logZ, top: top.map((t) => ({ id: t, logprob: row[t]! - logZ })) };
}

/** Whether `b` can share `a`'s prefill: the same prompt on the same adapter, and prompt logprobs if `b` wants them. */
function sameInput(a: GenerateRequest, b: GenerateRequest): boolean {
  return a.adapterId === b.adapterId && (a.decoderInputDetails || !b.decoderInputDetails) &&
    a.inputIds.length === b.inputIds.length && a.inputIds.every((id, i) => id === b.inputIds[i]);
}

/**
 * Whether two sequences hold the same adapter content: choices of one request may not, when an upload or a new Hub
 * commit lands between their acquisitions (then each prefills on its own).
 */
function sameLease(a: Seq, b: Seq): boolean {
  return a.lease?.adapter.key === b.lease?.adapter.key && a.lease?.version === b.lease?.version;
}

/** The length fields' names when the caller gives none: TGI's. */
const TGI_FIELDS: LengthFields = { input: 'inputs', maxNewTokens: 'max_new_tokens' };

/**
 * The length rules, for every caller (HTTP routes, tests, benchmarks): a non-empty prompt of at most
 * maxInputLength tokens, a positive integer max-new-tokens, and the two together within maxTotalTokens.
 * Throws VALIDATION or INPUT_TOO_LONG naming the fields as `req.fields` does.
 */
export function checkLengths(req: Pick<GenerateRequest, 'inputIds' | 'maxNewTokens' | 'fields'>, limits: LengthLimits): void {
  const { input, maxNewTokens: maxNew } = req.fields ?? TGI_FIELDS;
  const n = req.inputIds.length;
  if (n === 0) throw fail('VALIDATION', `\`${input}\` must not be empty`);
  if (n > limits.maxInputLength) throw fail('INPUT_TOO_LONG', `\`${input}\` must have at most ${limits.maxInputLength} tokens. Given: ${n}`);
  if (!Number.isInteger(req.maxNewTokens) || req.maxNewTokens < 1) throw fail('VALIDATION', `\`${maxNew}\` must be a positive integer`);
  if (n + req.maxNewTokens > limits.maxTotalTokens) {
    throw fail('INPUT_TOO_LONG', `\`${input}\` tokens + \`${maxNew}\` must be <= ${limits.maxTotalTokens}. Given: ${n} \`${input}\` tokens and ${req.maxNewTokens} \`${maxNew}\``);
  }
}

export class Engine implements EngineApi {
  /** The length limits requests must fit (`checkLengths`): maxTotalTokens within the model's positions. */
  readonly limits: LengthLimits;
  private nextId = 1;
  private readonly seqs = new Map<number, Seq>();
  private readonly waiting: Seq[] = [];
  private readonly prefilling: Seq[] = [];
  private readonly running: Seq[] = [];
  private waitingForAdapter = 0;
  private readonly groups = new WeakMap<object, Group>();
  /** Sequences waiting for a group leader's prefill. */
  private parked = 0;
  private looping = false;
  private accepting = true;
  private idleWaiters: (() => void)[] = [];
  /** The scheduler's LoRA hysteresis state after the last step (schedule() returns the next one). */
  private loraState: LoraState = INITIAL_LORA_STATE;

  constructor(
    private readonly executor: StepExecutor,
    private readonly tokenizer: Detokenizer,
    private readonly adapters: AdapterProvider | null,
    private readonly opts: EngineOptions,
    private readonly metrics?: EngineMetrics,
  ) {
    this.limits = { maxInputLength: opts.maxInputLength, maxTotalTokens: Math.min(opts.maxTotalTokens, opts.maxPositions) };
  }

  stats(): EngineStats {
    return { running: this.running.length + this.prefilling.length, waiting: this.waiting.length + this.parked, waitingForAdapter: this.waitingForAdapter };
  }

  load(): EngineLoad {
    let kvTokens = 0;
    const running = new Set<string>();
    const waiting = new Set<string>();
    for (const s of this.seqs.values()) {
      const id = s.req.adapterId;
      if (s.state === 'prefilling' || s.state === 'running') {
        // The newest sampled token enters the cache with the next decode step.
        kvTokens += s.prefilled + Math.max(0, s.generated.length - 1);
        if (id !== null) running.add(id);
      } else if (s.state !== 'done' && id !== null) {
        waiting.add(id);
      }
    }
    return {
      kvTokens, kvCapacityTokens: this.opts.maxBatchSize * this.limits.maxTotalTokens,
      runningAdapters: [...running].sort(), waitingAdapters: [...waiting].sort(),
    };
  }

  generate(req: GenerateRequest, sink: GenerationSink): void {
    if (!this.accepting) throw fail('SHUTTING_DOWN', 'the server is shutting down');
    checkLengths(req, this.limits);
    if (this.waiting.length + this.parked + this.waitingForAdapter >= this.opts.maxQueue) {
      throw fail('OVERLOADED', `the queue is full (${this.opts.maxQueue} requests waiting); retry later`, { retryAfter: 1 });
    }
    if (req.adapterId !== null && !this.adapters) throw fail('ADAPTER_NOT_FOUND', `adapter "${req.adapterId}" not found`);
    if (req.signal?.aborted) throw fail('CANCELLED', 'the request was cancelled');

    const seq: Seq = {
      id: this.nextId++, req, sink,
      sampler: new Sampler(req.sampling), pick: pickableOnDevice(req.sampling) && !req.constraint,
      shortlist: req.constraint ? undefined : shortlistOnDevice(req.sampling) ? { temperature: req.sampling.temperature }
        : nucleusOnDevice(req.sampling) ? { temperature: req.sampling.temperature, fallback: true } : undefined,
      nucleus: { misses: 0, pausedUntil: 0 },
      decoder: this.tokenizer.createDecoder({ skipSpecialTokens: true }),
      stop: new StopMatcher([...req.stop], { includeStop: req.includeStop ?? true }),
      constraint: req.constraint?.start() ?? null,
      submittedAt: now(), group: req.prefixGroup ? this.groupOf(req.prefixGroup) : null, state: 'adapter', lease: null, awaitingAdapter: false, prefilled: 0,
      generated: [], tokens: [], prefill: [], text: '',
      scheduledAt: null, firstTokenAt: null, lastTokenAt: null, abort: null, timer: null, onAbort: null,
    };
    this.seqs.set(seq.id, seq);
    if (req.signal) {
      seq.onAbort = () => this.abort(seq, 'CANCELLED');
      req.signal.addEventListener('abort', seq.onAbort, { once: true });
    }
    if (req.timeoutMs && req.timeoutMs > 0) seq.timer = setTimeout(() => this.abort(seq, 'TIMEOUT'), req.timeoutMs);

    if (req.adapterId === null) {
      this.enqueue(seq);
      return;
    }
    this.waitingForAdapter++;
    seq.awaitingAdapter = true;
    this.reportDepth();
    const acquiring = req.merge
      ? this.adapters!.acquireMerged(req.merge, req.signal, req.adapterSource)
      : this.adapters!.acquire(req.adapterId, req.signal, req.adapterSource);
    acquiring.then(
      (lease) => {
        if (seq.state === 'done') return lease.release();
        this.stopAwaitingAdapter(seq);
        seq.lease = lease;
        this.enqueue(seq);
      },
      (err: unknown) => {
        if (seq.state !== 'done') this.finishWithError(seq, err);
      },
    );
  }

  async drain(graceMs: number): Promise<void> {
    this.accepting = false;
    if (this.seqs.size > 0) {
      await Promise.race([
        new Promise<void>((resolve) => this.idleWaiters.push(resolve)),
        new Promise<void>((resolve) => setTimeout(resolve, graceMs).unref()),
      ]);
    }
    for (const seq of [...this.seqs.values()]) this.abort(seq, 'SHUTTING_DOWN');
    while (this.looping) await new Promise((r) => setTimeout(r, 5));
  }

  private stopAwaitingAdapter(seq: Seq): void {
    if (!seq.awaitingAdapter) return;
    seq.awaitingAdapter = false;
    this.waitingForAdapter--;
    this.reportDepth();
  }

  /** Running: prefilling or decoding; waiting: queued or waiting for their adapter (as stats() counts them). */
  private reportDepth(): void {
    const s = this.stats();
    this.metrics?.queueDepth(s.running, s.waiting + s.waitingForAdapter);
  }

  private groupOf(key: object): Group {
    let g = this.groups.get(key);
    if (!g) this.groups.set(key, (g = { leader: null, followers: [], open: true }));
    return g;
  }

  /** Queues a sequence for its prefill, or parks it to share its group leader's. */
  private enqueue(seq: Seq): void {
    seq.state = 'waiting';
    const g = seq.group;
    if (g?.open && g.leader === null) g.leader = seq;
    if (g?.open && g.leader !== seq && sameInput(g.leader!.req, seq.req) && sameLease(g.leader!, seq)) {
      g.followers.push(seq);
      this.parked++;
    } else {
      this.waiting.push(seq);
    }
    this.reportDepth();
    this.kick();
  }

  /**
   * A group leader has just been prefilled (before its first decode step: its KV cache holds the prompt alone):
   * its followers copy its cache, as many as the batch has room for, and sample their first token from `logits`;
   * the others queue for their own prefill. The group closes.
   */
  private shareOut(leader: Seq, logits: Float32Array, t: number): void {
    const g = leader.group!;
    g.open = false;
    const followers = g.followers.splice(0);
    this.parked -= followers.length;
    const room = Math.max(0, this.opts.maxBatchSize - this.running.length - this.prefilling.length);
    const sharing = followers.slice(0, room);
    for (const f of followers.slice(room)) this.enqueue(f);
    if (sharing.length === 0) return;
    // Running before the fork: if it throws, the step's failure ends them with the other running sequences.
    for (const f of sharing) {
      f.state = 'running';
      f.prefilled = f.req.inputIds.length;
      f.scheduledAt = t;
      this.metrics?.requestQueued(t - f.submittedAt);
      this.running.push(f);
    }
    this.executor.fork(leader.id, sharing.map((f) => f.id));
    for (const f of sharing) {
      if (f.req.decoderInputDetails) {
        f.prefill.push(...leader.prefill);
        this.emitPrefill(f);
      }
      this.accept(f, logits);
    }
  }

  private abort(seq: Seq, code: ErrorCode): void {
    if (seq.state === 'done' || seq.abort) return;
    seq.abort = code;
    // A sequence the executor does not hold yet ends at once (a step in flight skips it); one it holds ends at
    // the next step boundary, never while a prefill/decode call is running.
    if (seq.state === 'adapter' || seq.state === 'waiting') this.finishAborted(seq);
    else if (!this.looping) this.reap();
    else this.kick();
  }

  private finishAborted(seq: Seq): void {
    const code = seq.abort!;
    const msg = code === 'TIMEOUT' ? 'the request timed out' : code === 'SHUTTING_DOWN' ? 'the server is shutting down' : 'the request was cancelled';
    this.finishWithError(seq, new ServeError(code, msg));
  }

  private kick(): void {
    if (this.looping) return;
    this.looping = true;
    setImmediate(() => void this.loop());
  }

  /** Ends every sequence marked for abort, releasing its KV cache and adapter pin. */
  private reap(): void {
    for (const seq of [...this.seqs.values()]) if (seq.abort && seq.state !== 'done') this.finishAborted(seq);
  }

  private async loop(): Promise<void> {
    try {
      for (;;) {
        this.reap();
        const plan = schedule({
          running: this.running.map(this.schedView),
          prefilling: this.prefilling.map(this.schedView),
          waiting: this.waiting.map(this.schedView),
          lora: this.loraState,
        }, this.opts);
        if (plan.decode.length === 0 && plan.prefill.length === 0) break;
        this.loraState = plan.lora.state;
        if (plan.decode.length > 0) await profiler.step('decode', 'engine', () => this.decodeStep(plan.lora.decode));
        if (plan.prefill.length > 0) await profiler.step('prefill', 'engine', () => this.prefillStep(plan.prefill, plan.lora.prefill));
        this.reportDepth();
        // Let the event loop deliver responses and accept requests between steps.
        await new Promise((r) => setImmediate(r));
      }
    } catch (err) {
      // An executor failure fails the sequences it held; the engine keeps serving.
      for (const seq of [...this.running, ...this.prefilling]) this.finishWithError(seq, err);
    } finally {
      this.looping = false;
      if (this.waiting.length > 0 || this.running.length > 0 || this.prefilling.length > 0) this.kick();
      if (this.seqs.size === 0) this.idleWaiters.splice(0).forEach((f) => f());
    }
  }

  private schedView = (s: Seq): SchedSeq => ({
    seq: s.id, adapter: s.lease?.adapter.key ?? null, promptLength: s.req.inputIds.length, prefilled: s.prefilled,
  });

  private async decodeStep(lora: LoraPlan): Promise<void> {
    const items: DecodeItem[] = this.running.map((s) => ({
      seq: s.id, token: s.generated.at(-1)!, position: s.req.inputIds.length + s.generated.length - 1, adapter: s.lease?.adapter ?? null, pick: s.pick, shortlist: shortlistOf(s), edits: this.editsOf(s),
    }));
    const t0 = now();
    const res = await this.executor.decode(items, lora);
    const rows = await this.undecidedRows(res);
    this.stepMetrics('decode', res, now() - t0);
    for (const seq of [...this.running]) this.accept(seq, res.picked?.get(seq.id) ?? res.shortlists?.get(seq.id) ?? res.logits.get(seq.id)!, rows.get(seq.id));
  }

  /**
   * The result's logits rows, with those of the sequences whose shortlist does not decide their token (a nucleus or
   * a plain draw reaching past it) read from the executor where the result does not hold them (StepResult.readLogits). A failed
   * read fails those sequences.
   */
  private async undecidedRows(res: StepResult): Promise<ReadonlyMap<number, Float32Array>> {
    const V = this.executor.vocabSize;
    const need: number[] = [];
    for (const [id, s] of res.shortlists ?? []) {
      const seq = this.seqs.get(id);
      if (seq?.shortlist?.fallback && !res.logits.has(id) && !seq.sampler.shortlistDecides(s, V)) need.push(id);
    }
    if (need.length === 0) return res.logits;
    if (!res.readLogits) throw new Error('executor: a fallback shortlist came without its row or readLogits');
    try {
      return new Map([...res.logits, ...await res.readLogits(need)]);
    } catch (err) {
      // those sequences alone fail; the others' tokens are decided
      for (const id of need) this.finishWithError(this.seqs.get(id)!, err);
      return res.logits;
    }
  }

  /** The edits of a sequence's next row when the device may pick or shortlist it: its logit_bias and penalties. */
  private editsOf(seq: Seq): LogitEdits | undefined {
    if ((!seq.pick && !shortlistOf(seq)) || this.executor.answersOnDevice === false) return undefined;
    const { req } = seq;
    return seq.sampler.edits(req.inputIds, seq.generated, req.penalizeGeneratedOnly ? req.inputIds.length : 0, this.executor.vocabSize);
  }

  /** `lora` holds for any subset of the planned chunks (a sequence cancelled meanwhile is left out). */
  private async prefillStep(chunks: readonly PrefillChunk[], lora: LoraPlan): Promise<void> {
    const t = now();
    // A waiting sequence planned for this step may have been cancelled during its decode half.
    const live = chunks.filter((c) => this.seqs.get(c.seq)?.state === 'waiting' || this.seqs.get(c.seq)?.state === 'prefilling');
    if (live.length === 0) return;
    const items: PrefillItem[] = live.map((c) => {
      const seq = this.seqs.get(c.seq)!;
      if (seq.state === 'waiting') {
        this.waiting.splice(this.waiting.indexOf(seq), 1);
        this.prefilling.push(seq);
        seq.state = 'prefilling';
        seq.scheduledAt = t;
        this.metrics?.requestQueued(t - seq.submittedAt);
      }
      // A group leader's followers sample their first token from its logits.
      const sharing = seq.group?.open === true && seq.group.leader === seq;
      return {
        seq: seq.id, tokens: seq.req.inputIds.slice(c.start, c.start + c.length), start: c.start, last: c.last,
        adapter: seq.lease?.adapter ?? null, allLogits: seq.req.decoderInputDetails,
        pick: seq.pick && c.last && !seq.req.decoderInputDetails && !sharing,
        shortlist: c.last && !seq.req.decoderInputDetails && !sharing ? shortlistOf(seq) : undefined,
        edits: c.last && !seq.req.decoderInputDetails && !sharing ? this.editsOf(seq) : undefined,
      };
    });
    const res = await this.executor.prefill(items, lora);
    const rows = await this.undecidedRows(res);
    this.stepMetrics('prefill', res, now() - t);
    const V = this.executor.vocabSize;
    for (const item of items) {
      const seq = this.seqs.get(item.seq);
      if (!seq) continue; // failed: its row could not be read
      seq.prefilled += item.tokens.length;
      const logits = res.logits.get(seq.id);
      if (seq.req.decoderInputDetails && logits) this.promptLogprobs(seq, item, logits);
      if (!item.last) continue;
      this.prefilling.splice(this.prefilling.indexOf(seq), 1);
      this.running.push(seq);
      seq.state = 'running';
      if (seq.req.decoderInputDetails) this.emitPrefill(seq);
      const last = logits?.subarray(logits.length - V); // absent when the token was picked or shortlisted on the device
      // Before the leader's own token: a leader that ends at once would free the cache its followers copy.
      if (seq.group?.open && seq.group.leader === seq) this.shareOut(seq, last!, t); // a leader's item asks for neither
      this.accept(seq, res.picked?.get(seq.id) ?? res.shortlists?.get(seq.id) ?? last!, rows.get(seq.id)?.subarray(-V));
    }
  }

  /** Row t of a chunk's logits predicts prompt token start+t+1: its logprob given the ones before, and the top alternatives. */
  private promptLogprobs(seq: Seq, item: PrefillItem, logits: Float32Array): void {
    const V = this.executor.vocabSize;
    const prompt = seq.req.inputIds;
    const k = seq.req.sampling.topNTokens;
    const token = (id: number) => ({ id, text: this.tokenizer.tokenText(id), special: this.tokenizer.isSpecial(id) });
    if (item.start === 0) seq.prefill.push({ id: prompt[0]!, text: this.tokenizer.tokenText(prompt[0]!), logprob: null });
    for (let t = 0; t < item.tokens.length; t++) {
      const next = item.start + t + 1;
      if (next >= prompt.length) break;
      const id = prompt[next]!;
      const lp = logprobsOf(logits.subarray(t * V, (t + 1) * V), id, k);
      seq.prefill.push({
        id, text: this.tokenizer.tokenText(id), logprob: lp.logprob,
        ...(k > 0 ? { top: lp.top.map((x) => ({ ...token(x.id), logprob: x.logprob })) } : {}),
      });
    }
  }

  private emitPrefill(seq: Seq): void {
    try {
      seq.sink.onPrefill?.(seq.prefill);
    } catch {
      seq.abort = 'CANCELLED'; // as a broken onToken
    }
  }

  private stepMetrics(kind: 'prefill' | 'decode', res: StepResult, seconds: number): void {
    this.metrics?.step({ kind, seconds, passes: res.passes });
  }

  /**
   * Samples the next token from `logits` (among the ids the request's grammar allows, if it has one), or takes the
   * token the executor picked on the device, emits it, and finishes the sequence when it should end. A grammar
   * that allows no token at all fails the sequence alone.
   */
  private accept(seq: Seq, next: Float32Array | PickedToken | Shortlist, row?: Float32Array): void {
    if (seq.state === 'done') return;
    const { req } = seq;
    const constraint = req.constraint;
    let sampled: SampledToken;
    try {
      if (next instanceof Float32Array) {
        let allowed: Uint8Array | undefined;
        if (constraint) {
          const mask = profiler.time('constraint', () => constraint.allowed(seq.constraint!));
          if (!mask) throw fail('GRAMMAR_INVALID', 'the grammar allows no token after the text generated so far');
          allowed = mask;
        }
        sampled = profiler.time('sampling', () => seq.sampler.sample(next, [...req.inputIds, ...seq.generated], req.penalizeGeneratedOnly ? req.inputIds.length : 0, allowed));
      } else if ('ids' in next) {
        // only where seq.shortlist: no constraint; `row` when the shortlist does not decide the token
        sampled = profiler.time('sampling', () => {
          const s = seq.sampler.sampleShortlist(next, this.executor.vocabSize);
          if (seq.shortlist?.fallback) noteNucleus(seq, s === null);
          if (s) return s;
          if (!row) throw new Error('executor: the row of an undecided shortlist is missing');
          return seq.sampler.sample(row, [...req.inputIds, ...seq.generated], req.penalizeGeneratedOnly ? req.inputIds.length : 0); // never edited
        });
      } else {
        sampled = pickedToken(next); // only where seq.pick: no constraint
      }
      if (constraint && !constraint.isEos(sampled.id)) seq.constraint = profiler.time('constraint', () => constraint.advance(seq.constraint!, sampled.id));
    } catch (err) {
      // this sequence alone fails (a grammar too large to go on, logits all NaN); the batch goes on
      return this.finishWithError(seq, err);
    }
    const id = sampled.id;
    seq.generated.push(id);
    const t = now();
    if (seq.firstTokenAt === null) {
      seq.firstTokenAt = t;
      this.metrics?.firstToken(t - seq.submittedAt);
    } else {
      this.metrics?.interToken(t - seq.lastTokenAt!);
    }
    seq.lastTokenAt = t;
    const token: TokenInfo = {
      id, text: this.tokenizer.tokenText(id), logprob: sampled.logprob, special: this.tokenizer.isSpecial(id),
      ...(sampled.top ? { top: sampled.top.map((x) => ({ ...x, text: this.tokenizer.tokenText(x.id), special: this.tokenizer.isSpecial(x.id) })) } : {}),
    };
    seq.tokens.push(token);

    let finish: FinishReason | null = null;
    let text: string;
    if (!req.ignoreEos && this.tokenizer.eosTokenIds.includes(id)) {
      finish = 'eos_token';
      text = seq.stop.push(seq.decoder.flush()).emit;
    } else {
      const r = seq.stop.push(seq.decoder.push(id));
      text = r.emit;
      if (r.stopped) finish = 'stop_sequence';
    }
    if (!finish && seq.generated.length >= req.maxNewTokens) finish = 'length';
    if (finish && finish !== 'stop_sequence') {
      if (finish === 'length') text += seq.stop.push(seq.decoder.flush()).emit;
      if (!seq.stop.stopped) text += seq.stop.flush();
    }
    seq.text += text;
    try {
      seq.sink.onToken(token, text);
    } catch {
      // A broken sink (client gone) must not stop the batch.
      seq.abort = 'CANCELLED';
    }
    if (finish) this.finish(seq, finish);
  }

  private release(seq: Seq): void {
    if (seq.state === 'prefilling' || seq.state === 'running') this.executor.release(seq.id);
    for (const list of [this.waiting, this.prefilling, this.running]) {
      const i = list.indexOf(seq);
      if (i >= 0) list.splice(i, 1);
    }
    this.stopAwaitingAdapter(seq);
    this.leaveGroup(seq);
    seq.state = 'done';
    seq.lease?.release();
    seq.lease = null;
    if (seq.timer) clearTimeout(seq.timer);
    if (seq.onAbort) seq.req.signal?.removeEventListener('abort', seq.onAbort);
    this.seqs.delete(seq.id);
    this.reportDepth();
    if (this.seqs.size === 0) this.idleWaiters.splice(0).forEach((f) => f());
  }

  /** A follower that ends stops waiting; a leader that ends before sharing sends its followers to their own prefill. */
  private leaveGroup(seq: Seq): void {
    const g = seq.group;
    if (!g?.open) return;
    const i = g.followers.indexOf(seq);
    if (i >= 0) {
      g.followers.splice(i, 1);
      this.parked--;
    } else if (g.leader === seq) {
      g.open = false;
      const followers = g.followers.splice(0);
      this.parked -= followers.length;
      for (const f of followers) this.enqueue(f);
    }
  }

  private finish(seq: Seq, reason: FinishReason): void {
    this.release(seq);
    const end = now();
    const start = seq.scheduledAt ?? end;
    const result: GenerationResult = {
      text: seq.text, finishReason: reason, promptTokens: seq.req.inputIds.length, generatedTokens: seq.generated.length,
      seed: seq.req.sampling.doSample ? seq.req.sampling.seed : null, prefill: seq.prefill, tokens: seq.tokens,
      adapterId: seq.req.adapterId, queueTimeS: start - seq.submittedAt, inferenceTimeS: end - start,
      timeToFirstTokenS: (seq.firstTokenAt ?? end) - seq.submittedAt,
    };
    this.metrics?.requestFinished({ promptTokens: result.promptTokens, generatedTokens: result.generatedTokens, seconds: end - seq.submittedAt, outcome: reason });
    try {
      seq.sink.onDone(result);
    } catch {
      // ignore a broken sink
    }
  }

  private finishWithError(seq: Seq, err: unknown): void {
    if (seq.state === 'done') return;
    this.release(seq);
    const e = isServeError(err) ? err : new ServeError('GENERATION', 'generation failed', undefined, { cause: err });
    const outcome = e.code === 'CANCELLED' ? 'cancelled' : e.code === 'TIMEOUT' ? 'timeout' : 'error';
    this.metrics?.requestFinished({ promptTokens: seq.req.inputIds.length, generatedTokens: seq.generated.length, seconds: now() - seq.submittedAt, outcome });
    try {
      seq.sink.onError(e);
    } catch {
      // ignore a broken sink
    }
  }
}
