/**
 * The TensorFlow.js executor: runs prefill and decode forward passes of the resident model over KV batches,
 * applying LoRA as each call's plan says (src/engine/scheduler.ts decides): per row from a bank of the pass's
 * adapters (unmerged), or merged into W. Merged weights of one adapter at a time are kept; the pristine W is
 * never modified. Adapters are uploaded here under their key and named by it in items.
 */
import * as tf from '@tensorflow/tfjs-core';
import {
  SHORTLIST_SIZE, type DecodeItem, type DeviceMemory, type LogitEdits, type ExecAdapter, type Executor, type LoraPlan, type PickedToken, type PrefillItem,
  type ResidentAdapter, type Shortlist, type ShortlistRequest, type StepPass, type StepResult,
} from '../engine/executor.ts';
import { greedyPickGpu } from '../backend/webgpu/kernels/greedy-pick.ts';
import { logitEditsInPlace } from '../backend/webgpu/kernels/logit-edits.ts';
import { shortlistGpu } from '../backend/webgpu/kernels/shortlist.ts';
import { DECODE_LINEAR_MAX_RANK, DECODE_LINEAR_MAX_ROWS } from '../backend/webgpu/kernels/decode-linear.ts';
import { fusedKernels } from '../backend/webgpu/kernels/program.ts';
import { countDecodeStep } from '../backend/webgpu/counters.ts';
import { canRecord, recordStep, stepInput, type PendingRecording, type Recording, type StepData } from '../backend/webgpu/recorded-step.ts';
import { batchSubmits } from '../backend/webgpu/submit.ts';
import type { AdapterWeights } from '../lora/adapter-file.ts';
import { buildBank, disposeAdapter, disposeBank, disposeStepLora, mergeWeights, slotData, stepLora, uploadAdapter, type DeviceAdapter, type LoraBank } from './lora-bank.ts';
import type { Weight } from '../backend/weights.ts';
import { profiler, type ProfileTotals } from '../obs/profile.ts';
import type { StepLora } from '../model/layers.ts';
import { newKV, type KVBatch } from './kv.ts';
import type { CausalLM } from '../model/model.ts';

export interface TfExecutorOptions {
  /** Cached banks (sets of adapters) kept on the device (default 4). */
  readonly maxBanks?: number;
  /**
   * Pick next tokens on the device for the rows that allow it (DecodeItem.pick), and make the shortlists of the rows
   * that ask for one (DecodeItem.shortlist), where the backend has the kernels (webgpu): such a row reads back
   * [id, logprob] or its shortlist instead of its logits (default true).
   */
  readonly devicePick?: boolean;
  /**
   * Record decode steps where the backend can (webgpu; src/backend/webgpu/recorded-step.ts) and replay the recording
   * while the batch, its LoRA plan and its KV caches stay as they were (default true).
   */
  readonly recordSteps?: boolean;
  /**
   * Keep the decode batch's rows in place when sequences leave (free rows, decoded with the others, their output
   * unused) and move joining sequences into free rows, so that the batch's tensors, and with them its recorded step,
   * outlive continuous batching's joins and leaves (webgpu's packed KV cache only; default: recordSteps). Free rows are
   * dropped once they are more than the running ones. Otherwise, and when a joining prompt is longer than the batch's
   * columns or no row is free, rows leave and join by re-gathering the KV cache, which a recording does not survive.
   */
  readonly slotRows?: boolean;
}

/** A recorded decode step and what it was recorded for (TfExecutor.stepKey). */
interface RecordedDecode {
  readonly key: string;
  readonly recording: Recording;
  readonly pass: StepPass;
}

/** What a logits row is read back as: its logits, its greedy token picked on the device, or its shortlist. */
type RowAnswer = 'logits' | 'pick' | ShortlistRequest;

/** What one forward pass read back, by logits row: a token picked on the device, a shortlist, or the row's logits. */
interface PassOutput {
  readonly picked: ReadonlyMap<number, PickedToken>;
  readonly shortlists: ReadonlyMap<number, Shortlist>;
  /** The other rows' logits, in row order: [rows answered with logits, vocab]. */
  readonly logits: Float32Array;
  /** Per logits row: its index among the rows answered with logits (−1: picked or shortlisted). */
  readonly logitsAt: Int32Array;
  /** The logits of rows with a fallback shortlist, by logits row, when they were read back with the rest. */
  readonly fallback: ReadonlyMap<number, Float32Array>;
  /** Reads the logits of rows with a fallback shortlist when they were not (a replay reads them on demand). */
  readonly readFallback?: (rows: readonly number[]) => Promise<Map<number, Float32Array>>;
}

interface Row {
  readonly seq: number;
  readonly adapter: DeviceAdapter | null;
}

export class TfExecutor implements Executor {
  readonly vocabSize: number;
  private readonly kv: KVBatch;
  /** The decode batch's rows in KV order; null: a free row (slotRows), decoded but unused. */
  private rows: (Row | null)[] = [];
  /** How each row was read back at the last decode step, by row (a free row is read back as it was: freeAnswer). */
  private lastAnswers: readonly RowAnswer[] = [];
  /** The key of the bank the last unmerged decode step used (cachedBank prefers it while it serves). */
  private decodeBank: string | null = null;
  private readonly prefilling = new Map<number, { kv: KVBatch; adapter: DeviceAdapter | null }>();
  /** Resident adapters by key (ExecAdapter.key). */
  private readonly adapters = new Map<string, DeviceAdapter>();
  private readonly banks = new Map<string, LoraBank>();
  private merged: { adapter: DeviceAdapter; weights: Map<string, Weight> } | null = null;
  private readonly maxBanks: number;
  private readonly devicePick: boolean;
  /** Whether rows that allow it are picked or shortlisted on the device (webgpu, devicePick). */
  get answersOnDevice(): boolean {
    return this.devicePick;
  }
  private readonly recordSteps: boolean;
  private readonly slotRows: boolean;
  private recorded: RecordedDecode | null = null;
  /** Decode steps replayed from a recording, recorded, and run through tfjs without one (tests and the bench read them). */
  readonly recordedSteps = { replayed: 0, recorded: 0, unrecorded: 0, lastRefusal: '' };

  constructor(readonly model: CausalLM, opts: TfExecutorOptions = {}) {
    this.vocabSize = model.config.vocabSize;
    this.kv = newKV(model.config);
    this.maxBanks = opts.maxBanks ?? 4;
    this.devicePick = (opts.devicePick ?? true) && fusedKernels();
    this.recordSteps = (opts.recordSteps ?? true) && canRecord();
    this.slotRows = (opts.slotRows ?? this.recordSteps) && this.kv.packed;
  }

  get running(): number {
    return this.live().length;
  }

  /** The running rows, with their index in the batch. */
  private live(): { row: Row; b: number }[] {
    const out: { row: Row; b: number }[] = [];
    this.rows.forEach((row, b) => row && out.push({ row, b }));
    return out;
  }

  /**
   * Start-up warm-up: one base-model prefill and decode (first-call costs of the kernels are paid here, not by the
   * first request), then `heapBytes` allocated and freed on the backend. On wasm the first write to heap memory
   * costs a page fault per 4 KiB: a fresh server would pay that in its first adapter uploads and forwards, a server
   * that has run pays it never again, as the heap is reused.
   */
  warmUp(heapBytes = 0): void {
    const c = this.model.config;
    const T = Math.min(16, c.maxPositions - 1);
    const kv = newKV(c);
    const profiling = profiler.enabled; // not a step: it stays out of the profile
    profiler.enabled = false;
    try {
      kv.addEmptyRows(2);
      const tokens = new Int32Array(2 * T); // token 0: every vocabulary has it
      const positions = Int32Array.from({ length: 2 * T }, (_, i) => i % T);
      this.model.forward({ kv, tokens, positions, T, pad: [0, 0], logitRows: Int32Array.of(T - 1, 2 * T - 1) }).dispose();
      const logits = this.model.forward({ kv, tokens: new Int32Array(2), positions: Int32Array.of(T, T), T: 1, logitRows: Int32Array.of(0, 1) });
      if (this.devicePick) {
        greedyPickGpu(logits).dispose();
        tf.tidy(() => shortlistGpu(logits, tf.ones([2]) as tf.Tensor1D, SHORTLIST_SIZE)).dispose();
        tf.tidy(() => logitEditsInPlace(logits, tf.tensor1d([0], 'int32'), tf.tensor1d([0], 'int32'), tf.tensor1d([0, 1, 0])));
      }
      logits.dispose();
    } finally {
      kv.dispose();
      profiler.enabled = profiling;
    }
    if (heapBytes >= 4) tf.zeros([Math.floor(heapBytes / 4)]).dispose(); // zeros writes every element
  }

  prefill(items: readonly PrefillItem[], lora: LoraPlan): Promise<StepResult> {
    return profiler.timeAsync('executor', () => this.prefillAll(items, lora));
  }

  private async prefillAll(items: readonly PrefillItem[], lora: LoraPlan): Promise<StepResult> {
    const out = { logits: new Map<number, Float32Array>(), picked: new Map<number, PickedToken>(), shortlists: new Map<number, Shortlist>() };
    const passes: StepPass[] = [];
    // Whole prompts in one chunk run together (left-padded); chunks of long prompts run one by one.
    const whole = items.filter((i) => i.start === 0 && i.last && !this.prefilling.has(i.seq));
    const chunks = items.filter((i) => !whole.includes(i));
    if (whole.length > 0) passes.push(await this.prefillPass(whole, lora, out));
    for (const item of chunks) passes.push(await this.prefillPass([item], lora, out));
    return { ...out, passes };
  }

  private async prefillPass(items: readonly PrefillItem[], lora: LoraPlan,
    out: { logits: Map<number, Float32Array>; picked: Map<number, PickedToken>; shortlists: Map<number, Shortlist> }): Promise<StepPass> {
    const T = Math.max(...items.map((i) => i.tokens.length));
    const B = items.length;
    let kv: KVBatch;
    const cont = B === 1 ? this.prefilling.get(items[0]!.seq) : undefined;
    if (cont) {
      kv = cont.kv;
    } else {
      kv = newKV(this.model.config);
      kv.addEmptyRows(B);
    }
    const tokens = new Int32Array(B * T);
    const positions = new Int32Array(B * T);
    const pad: number[] = [];
    const logitRows: number[] = [];
    const rowsOf: { seq: number; from: number; count: number }[] = [];
    items.forEach((item, b) => {
      const p = T - item.tokens.length;
      pad.push(p);
      for (let t = 0; t < item.tokens.length; t++) {
        tokens[b * T + p + t] = item.tokens[t]!;
        positions[b * T + p + t] = item.start + t;
      }
      const from = logitRows.length;
      if (item.allLogits) for (let t = p; t < T; t++) logitRows.push(b * T + t);
      else if (item.last) logitRows.push(b * T + T - 1);
      rowsOf.push({ seq: item.seq, from, count: logitRows.length - from });
    });
    const itemAdapters = items.map((i) => this.resolve(i.adapter));
    const rowAdapters = itemAdapters.flatMap((a) => new Array<DeviceAdapter | null>(T).fill(a));
    const answers = items.flatMap((item, i) => new Array<RowAnswer>(rowsOf[i]!.count).fill(item.last && !item.allLogits ? this.answerOf(item) : 'logits'));
    const edits = items.flatMap((item, i) => new Array<LogitEdits | undefined>(rowsOf[i]!.count).fill(item.last && !item.allLogits ? item.edits : undefined));
    const asked = answerInputs(answers, answers.length, edits);
    let result: Awaited<ReturnType<TfExecutor['forward']>>;
    try {
      result = await this.forward(kv, tokens, positions, T, cont ? undefined : pad, rowAdapters, lora, logitRows, B, answers, asked);
    } catch (err) {
      if (!cont) kv.dispose(); // a continued prompt's KV is released with its sequence
      throw err;
    }
    const { output, pass } = result;
    const V = this.vocabSize;
    for (const r of rowsOf) {
      if (r.count === 0) continue;
      const picked = output.picked.get(r.from); // a picked or shortlisted item has one row: its last
      const shortlist = output.shortlists.get(r.from);
      const at = output.logitsAt[r.from]!; // the item's rows are consecutive among those answered with logits
      const row = output.fallback.get(r.from); // read with the rest: prefill steps run through tfjs
      if (picked) out.picked.set(r.seq, picked);
      else if (shortlist) out.shortlists.set(r.seq, shortlist);
      else out.logits.set(r.seq, output.logits.subarray(at * V, (at + r.count) * V));
      if (row) out.logits.set(r.seq, row);
    }

    // Sequences whose prompt is complete join the decode batch; others keep their own KV for the next chunk.
    if (items.every((i) => i.last)) {
      this.prefilling.delete(items[0]!.seq);
      this.join(kv, items.map((item, b) => ({ seq: item.seq, adapter: itemAdapters[b]! })));
    } else if (!cont) {
      this.prefilling.set(items[0]!.seq, { kv, adapter: itemAdapters[0]! });
    }
    return pass;
  }

  /**
   * Sequences whose prompt is complete join the decode batch with their KV rows (`kv`, row i holding rows[i]'s): into
   * free rows in place where they fit (slotRows), the others appended (the batch's KV tensors then change, so the free
   * rows left are dropped first: the batch never holds more rows than it has had running at once). Disposes `kv`.
   */
  private join(kv: KVBatch, rows: readonly Row[]): void {
    const appended: number[] = [];
    rows.forEach((row, i) => {
      const free = this.slotRows ? this.rows.indexOf(null) : -1;
      if (free >= 0 && this.kv.fits(kv, i)) {
        this.kv.place(free, kv, i);
        this.rows[free] = row;
      } else {
        appended.push(i);
      }
    });
    if (appended.length < rows.length) kv.keepRows(appended); // the rows placed are copied: the others join by append
    if (appended.length > 0) this.dropFreeRows();
    this.kv.append(kv);
    for (const i of appended) this.rows.push(rows[i]!);
  }

  /**
   * Drops the free rows (slotRows) before a decode step when they outnumber the running ones, or when without them the
   * batch would be few enough rows for the fused decode projections (DECODE_LINEAR_MAX_ROWS): they cost a step's work
   * for nothing. The batch's KV tensors change (its recording is re-made).
   */
  private compact(): void {
    const live = this.live();
    const few = live.length <= DECODE_LINEAR_MAX_ROWS && this.rows.length > DECODE_LINEAR_MAX_ROWS;
    if (live.length * 2 >= this.rows.length && !few) return;
    this.dropFreeRows();
  }

  /** Drops the free rows, if any (the running rows' KV is re-gathered: the recording is re-made). */
  private dropFreeRows(): void {
    const live = this.live();
    if (live.length === this.rows.length) return;
    this.dropRecording();
    this.kv.keepRows(live.map((l) => l.b));
    this.rows = live.map((l) => l.row);
  }

  decode(items: readonly DecodeItem[], lora: LoraPlan): Promise<StepResult> {
    return profiler.timeAsync('executor', () => this.decodeAll(items, lora));
  }

  private async decodeAll(items: readonly DecodeItem[], lora: LoraPlan): Promise<StepResult> {
    const bySeq = new Map(items.map((i) => [i.seq, i]));
    const running = this.live();
    if (bySeq.size !== running.length || running.some((r) => !bySeq.has(r.row.seq))) {
      throw new Error(`decode: expected one item for each of the ${running.length} running sequences`);
    }
    this.compact();
    const B = this.rows.length;
    // A free row decodes token 0 at position 0 on the base model, its token picked on the device and dropped.
    const tokens = new Int32Array(B);
    const positions = new Int32Array(B);
    this.rows.forEach((r, b) => {
      if (!r) return;
      const it = bySeq.get(r.seq)!;
      tokens[b] = it.token;
      positions[b] = it.position;
    });
    const logitRows = Array.from({ length: B }, (_, i) => i);
    const answers = this.rows.map((r, b) => (r ? this.answerOf(bySeq.get(r.seq)!) : freeAnswer(this.lastAnswers[b], this.devicePick)));
    this.lastAnswers = answers;
    const asked = answerInputs(answers, B, this.rows.map((r) => (r ? bySeq.get(r.seq)!.edits : undefined)));
    // A free row takes the merged adapter under a merged plan (every row's weights are), else the base model.
    const free = lora.kind === 'merged' ? this.adapters.get(lora.key) ?? null : null;
    const rowAdapters = this.rows.map((r) => (r ? r.adapter : free));
    this.kv.reserve(1); // a growth now, not inside the step: the step can then be recorded
    // The bank is chosen once for the step: its key, its slots and its LoRA must agree (null: one is built for it).
    const bank = lora.kind === 'unmerged' ? this.cachedBank(rowAdapters, this.decodeBank) : null;
    const bankName = bank?.key ?? bankKey(rowAdapters); // the bank used, or the one built for the step
    if (lora.kind === 'unmerged') this.decodeBank = bankName;
    const key = this.stepKey(lora, answers, asked, bankName ?? '');
    // Rows with adapters and no cached bank (evicted by other passes' banks, maxBanks): a recording of this key would
    // bind a bank that is gone, or a single adapter's own tensors without its slots: recorded anew with a new bank.
    const bankless = lora.kind === 'unmerged' && !bank && rowAdapters.some((a) => a !== null);
    const { output, pass: ran } = (await this.replay(bankless ? null : key, tokens, positions, rowAdapters, bank, answers, asked))
      ?? await this.forward(this.kv, tokens, positions, 1, undefined, rowAdapters, lora, logitRows, B, answers, asked, key, bank);
    // What ran, counted over the running rows (a replay's pass is its recording's; free rows are no sequences).
    const adapters = distinctAdapters(running.map((r) => r.row.adapter)).length;
    const pass: StepPass = { ...ran, rows: running.length, adapters: ran.mode === 'unmerged' ? adapters : ran.adapters };
    if (key === null) countDecodeStep('tfjs'); // steps are not recorded (--recorded-steps false); counted on webgpu only
    const V = this.vocabSize;
    const logits = new Map<number, Float32Array>();
    const picked = new Map<number, PickedToken>();
    const shortlists = new Map<number, Shortlist>();
    const rowOf = new Map<number, number>();
    this.rows.forEach((r, b) => {
      if (!r) return;
      const p = output.picked.get(b);
      const s = output.shortlists.get(b);
      const at = output.logitsAt[b]!;
      rowOf.set(r.seq, b);
      if (p) picked.set(r.seq, p);
      else if (s) shortlists.set(r.seq, s);
      else logits.set(r.seq, output.logits.subarray(at * V, (at + 1) * V));
      const row = output.fallback.get(b);
      if (row) logits.set(r.seq, row);
    });
    const read = output.readFallback;
    const readLogits = read && (async (seqs: readonly number[]) => {
      const rows = await profiler.timeAsync('logits_download', () => read(seqs.map((q) => {
        const b = rowOf.get(q);
        if (b === undefined) throw new Error(`readLogits: sequence ${q} was not in the step`);
        return b;
      })));
      return new Map(seqs.map((q) => [q, rows.get(rowOf.get(q)!)!]));
    });
    return { logits, picked, shortlists, passes: [pass], ...(readLogits ? { readLogits } : {}) };
  }

  /** How an item's logits row is read back: picked or shortlisted on the device when it allows it and the backend can. */
  private answerOf(item: { readonly pick?: boolean; readonly shortlist?: ShortlistRequest }): RowAnswer {
    if (!this.devicePick) return 'logits';
    return item.pick ? 'pick' : item.shortlist ?? 'logits';
  }

  release(seq: number): void {
    const p = this.prefilling.get(seq);
    if (p) {
      p.kv.dispose();
      this.prefilling.delete(seq);
    }
    const idx = this.rows.findIndex((r) => r?.seq === seq);
    if (idx < 0) return;
    const others = this.rows.some((r, b) => r && b !== idx);
    if (this.slotRows && others) {
      this.rows[idx] = null; // the row stays, free: the batch's tensors, and its recording, stay as they are
      this.kv.retire(idx);
      return;
    }
    this.dropRecording(); // the batch changes: its buffers (a step's intermediates) go back to the pool now
    const keep = others ? this.rows.map((_, i) => i).filter((i) => i !== idx) : []; // the last running row: free rows go too
    this.kv.keepRows(keep);
    this.rows.splice(0, this.rows.length, ...keep.map((i) => this.rows[i]!)); // slotRows: the last running row takes the free ones
  }

  fork(seq: number, into: readonly number[]): void {
    const idx = this.rows.findIndex((r) => r?.seq === seq);
    if (idx < 0) throw new Error(`fork: sequence ${seq} is not running`);
    // Rows 0..B-1 stay; each new sequence gets a copy of row idx, appended.
    this.kv.keepRows([...this.rows.keys(), ...into.map(() => idx)]);
    for (const s of into) this.rows.push({ seq: s, adapter: this.rows[idx]!.adapter });
  }

  /** The wasm backend copies a new tensor's values into its heap at once; the cpu backend keeps the array. */
  get copiesOnUpload(): boolean {
    return tf.getBackend() === 'wasm';
  }

  /** Uploads under `key`; a key already resident is kept as it is. */
  async loadAdapter(weights: AdapterWeights, key: string): Promise<ResidentAdapter> {
    let a = this.adapters.get(key);
    if (!a) this.adapters.set(key, (a = uploadAdapter(weights, key)));
    return { id: a.id, key: a.key, rank: a.rank, bytes: a.bytes };
  }

  /** Frees the adapter and what was derived from it (merged weights, banks); unknown keys are ignored. */
  offloadAdapter(adapter: ExecAdapter): void {
    const a = this.adapters.get(adapter.key);
    if (!a) return;
    this.dropRecording();
    if (this.merged?.adapter.key === a.key) this.dropMerged();
    for (const [key, bank] of this.banks) {
      if (bank.adapters.some((b) => b.key === a.key)) {
        disposeBank(bank);
        this.banks.delete(key);
      }
    }
    disposeAdapter(a);
    this.adapters.delete(a.key);
  }

  /** The device tensors of a resident adapter (tests look at them). */
  resident(key: string): DeviceAdapter | undefined {
    return this.adapters.get(key);
  }

  async deviceMemory(): Promise<DeviceMemory> {
    const m = tf.memory();
    return { numTensors: m.numTensors, numBytes: m.numBytes };
  }

  /** Never: it runs in this thread, which is alive when asked. */
  broken(): null {
    return null;
  }

  /** Nothing: in-process, the executor's phases are recorded in this thread's profiler, with the engine's. */
  profile(): ProfileTotals {
    return {};
  }

  /** Frees everything it holds but the model (which tests share between executors): KV caches, banks, merged weights, adapters. */
  dispose(): void {
    this.dropRecording();
    for (const seq of [...this.prefilling.keys()]) this.release(seq);
    this.kv.dispose();
    this.rows = [];
    for (const bank of this.banks.values()) disposeBank(bank);
    this.banks.clear();
    this.dropMerged();
    for (const a of this.adapters.values()) disposeAdapter(a);
    this.adapters.clear();
  }

  /** dispose(), and the model. */
  async close(): Promise<void> {
    this.dispose();
    this.model.dispose();
  }

  private resolve(a: ExecAdapter | null): DeviceAdapter | null {
    if (!a) return null;
    const d = this.adapters.get(a.key);
    if (!d) throw new Error(`executor: adapter ${a.id} (upload ${a.key}) is not loaded`);
    return d;
  }

  private dropRecording(): void {
    this.recorded?.recording.dispose();
    this.recorded = null;
  }

  /**
   * What a decode step's recording must match to be replayed, besides its buffers (Recording.valid, which a change of
   * the batch's rows fails through their KV tensors): the number of rows, the adapters' bank (`bank`, its key; each
   * row's slot in it is a step input), the LoRA plan, which rows are picked or shortlisted on the device (the
   * temperatures are step inputs) and the edit inputs' size. Which sequence a row holds is not part of it: a sequence
   * moved into a free row in place (slotRows) replays the same recording. null: steps are not recorded.
   */
  private stepKey(plan: LoraPlan, answers: readonly RowAnswer[], asked: ReadonlyMap<string, StepData>, bank: string): string | null {
    if (!this.recordSteps) return null;
    const capacity = asked.get('edit.ids')?.length ?? 0; // the edit inputs' size
    if (plan.kind !== 'unmerged') bank = '';
    return `${this.rows.length}|${bank}|${plan.kind}:${plan.kind === 'merged' ? plan.key : ''}|${answers.map((a) => (a === 'logits' ? 'l' : a === 'pick' ? 'p' : a.fallback ? 'f' : 's')).join('')}|${capacity}`;
  }

  /**
   * The decode step replayed from its recording, or null when there is none for this step: no recording for these
   * rows, plan and picks, or a tensor it binds replaced (a KV cache grown, trimmed or re-gathered; a bank or merged
   * weights rebuilt). The KV cache has room for the step's column (reserved before). `key`: the step's stepKey; `bank`:
   * the cached bank its unmerged LoRA uses (null: none).
   */
  private async replay(key: string | null, tokens: Int32Array, positions: Int32Array, rowAdapters: readonly (DeviceAdapter | null)[],
    bank: { key: string; bank: LoraBank } | null, answers: readonly RowAnswer[], asked: ReadonlyMap<string, StepData>): Promise<{ output: PassOutput; pass: StepPass } | null> {
    const r = this.recorded;
    if (!r || r.key !== key || !r.recording.valid() || this.kv.capacity <= this.kv.cols) {
      if (r) this.dropRecording();
      return null;
    }
    const B = this.rows.length;
    const inputs = new Map<string, StepData>([...this.model.stepInputs(tokens, positions, B, 1), ['kv.state', this.kv.stateData()]]);
    if (bank) {
      this.touchBank(bank.key, bank.bank);
      inputs.set('lora.slots', slotData(slotsIn(bank.bank, rowAdapters)));
    }
    for (const [name, data] of asked) inputs.set(name, data);
    let read: { data: Float32Array; replay: number };
    const V = this.vocabSize;
    const head = headLength(answers, B, V);
    try {
      this.model.checkInputs(tokens, positions);
      const reading = profiler.time('executor', () => r.recording.replay(inputs, 4 * head)); // writes the inputs, encodes and submits
      read = await profiler.timeAsync('logits_download', () => reading);
    } catch (err) {
      this.dropRecording();
      throw err;
    }
    this.kv.commit(1);
    this.recordedSteps.replayed++;
    countDecodeStep('replayed');
    const recording = r.recording;
    const fallback = rowsAnswered(answers, B, 'fallback');
    // The fallback rows' logits stay in the recording's output until its next replay: read the rows asked for.
    const readFallback = async (rows: readonly number[]): Promise<Map<number, Float32Array>> => {
      const at = rows.map((row) => fallback.indexOf(row));
      if (at.some((i) => i < 0)) throw new Error('readLogits: a row without a fallback shortlist');
      const data = await recording.readOutput(at.map((i) => [4 * (head + i * V), 4 * V] as const), read.replay);
      return new Map(rows.map((row, i) => [row, data.subarray(i * V, (i + 1) * V)]));
    };
    return { output: { ...parseOutput(read.data, B, V, answers), ...(fallback.length > 0 ? { readFallback } : {}) }, pass: r.pass };
  }

  /**
   * The cached bank a step of these rows uses: on webgpu the bank `prefer` (the last decode step's) while it holds
   * all their adapters, so that a sequence leaving the only row of its adapter keeps the bank and the recording; else
   * the bank of exactly their adapters; else, on webgpu, the smallest cached bank holding all of them (ties by key).
   * A bank with more adapters than the rows use serves only on webgpu, with ranks up to 64 and no linear that none of
   * the rows' adapters targets (the fused kernels read each row's block through its slot, so the others cost nothing
   * but the bank's rank, and a linear with a delta would lose the fused gate·up kernel). Null: none cached, or no row
   * has an adapter.
   */
  private cachedBank(rowAdapters: readonly (DeviceAdapter | null)[], prefer: string | null = null): { key: string; bank: LoraBank } | null {
    const key = bankKey(rowAdapters);
    if (key === null) return null;
    const need = distinctAdapters(rowAdapters);
    const serves = (bank: LoraBank): boolean => {
      if (!fusedKernels() || bank.R > DECODE_LINEAR_MAX_RANK) return false; // the unfused delta multiplies by every adapter
      const held = new Set(bank.adapters.map((a) => a.key));
      if (!need.every((a) => held.has(a.key))) return false;
      return [...bank.linears.keys()].every((k) => need.some((a) => a.modules.has(this.model.linears.get(k)!.module.key)));
    };
    const preferred = prefer !== null && prefer !== key ? this.banks.get(prefer) : undefined;
    if (preferred && serves(preferred)) return { key: prefer!, bank: preferred };
    const exact = this.banks.get(key);
    if (exact) return { key, bank: exact };
    let best: { key: string; bank: LoraBank } | null = null;
    for (const [k, bank] of this.banks) {
      const smaller = !best || bank.adapters.length < best.bank.adapters.length || (bank.adapters.length === best.bank.adapters.length && k < best.key);
      if (smaller && serves(bank)) best = { key: k, bank };
    }
    return best;
  }

  /** Puts a bank last in the banks' LRU order (the cache's most recently used), adding it when new. */
  private touchBank(key: string, bank: LoraBank): void {
    this.banks.delete(key);
    this.banks.set(key, bank);
  }

  private dropMerged(): void {
    if (!this.merged) return;
    for (const w of this.merged.weights.values()) w.dispose();
    this.merged = null;
  }

  /**
   * Builds one pass's StepLora as the plan says (merging, or building a bank when not cached). `chosen`: a decode
   * step's bank, as its key was made with (cachedBank); null: the cached bank of these rows, or a new one.
   */
  private loraFor(rowAdapters: readonly (DeviceAdapter | null)[], plan: LoraPlan, chosen: { key: string; bank: LoraBank } | null = null): { lora?: StepLora; applied: Omit<StepPass, 'rows'>; owned: boolean } {
    const distinct = distinctAdapters(rowAdapters);
    if (distinct.length === 0) return { applied: { mode: 'none', adapters: 0 }, owned: false };
    if (plan.kind === 'none') throw new Error('executor: rows use adapters under a LoRA plan of none');
    if (plan.kind === 'merged') {
      if (rowAdapters.some((a) => a?.key !== plan.key)) throw new Error(`executor: merged plan for adapter upload ${plan.key}, but not every row uses it`);
      if (this.merged?.adapter.key !== plan.key) {
        this.dropMerged();
        this.merged = { adapter: distinct[0]!, weights: mergeWeights(this.model.linears, distinct[0]!) };
      }
      return { lora: { merged: this.merged!.weights }, applied: { mode: 'merged', adapters: 1 }, owned: false };
    }
    const found = chosen ?? this.cachedBank(rowAdapters);
    const key = found?.key ?? bankKey(rowAdapters)!;
    let bank = found?.bank;
    if (!bank) {
      bank = buildBank(this.model.linears.values(), distinct);
      while (this.banks.size >= this.maxBanks) {
        const [oldKey, old] = this.banks.entries().next().value!;
        disposeBank(old);
        this.banks.delete(oldKey);
      }
    }
    this.touchBank(key, bank);
    return { lora: stepLora(bank, slotsIn(bank, rowAdapters)), applied: { mode: 'unmerged', adapters: distinct.length }, owned: true };
  }

  /**
   * One forward pass over `kv` for `seqs` sequences, and what it was, with its logits rows read back as `answers`
   * says (per logits row: its logits, its greedy token picked on the device, or its shortlist).
   * `record` (a decode step's stepKey): the pass is recorded for replay when the backend can record it.
   */
  private async forward(kv: KVBatch, tokens: Int32Array, positions: Int32Array, T: number, pad: number[] | undefined,
    rowAdapters: readonly (DeviceAdapter | null)[], plan: LoraPlan, logitRows: number[], seqs: number, answers: readonly RowAnswer[],
    asked: ReadonlyMap<string, StepData>, record: string | null = null, bank: { key: string; bank: LoraBank } | null = null): Promise<{ output: PassOutput; pass: StepPass }> {
    const choice = profiler.time('lora_setup', () => this.loraFor(rowAdapters, plan, bank));
    let logits: tf.Tensor2D | null = null;
    let out: tf.Tensor | null = null;
    const build = (): tf.Tensor => {
      logits = this.model.forward({ kv, tokens, positions, T, pad, lora: choice.lora, logitRows: Int32Array.from(logitRows) });
      return passOutput(logits, answers, asked);
    };
    // A step that grows the KV cache (a fallback: decode steps reserve their column before) reads the old one, which
    // is gone after it: not worth recording.
    let pending: PendingRecording<tf.Tensor> | null = null;
    let data: Float32Array;
    try {
      pending = record !== null && kv.capacity > kv.cols ? recordStep(build) : null;
      out = pending ? pending.output : build();
      data = await profiler.timeAsync('logits_download', () => out!.data() as Promise<Float32Array>);
    } finally {
      if (fusedKernels()) batchSubmits(false); // what follows the step (merges, banks, joins) submits as usual
      if (out !== logits) out?.dispose();
      (logits as tf.Tensor2D | null)?.dispose();
      if (choice.owned && choice.lora) disposeStepLora(choice.lora);
    }
    const pass = { rows: seqs, ...choice.applied };
    if (record !== null) this.keepRecording(record, pending?.finish() ?? 'the step grows the KV cache', pass);
    return { output: parseOutput(data, logitRows.length, this.vocabSize, answers), pass };
  }

  private keepRecording(key: string, result: Recording | string, pass: StepPass): void {
    this.dropRecording();
    if (typeof result !== 'string' && result.valid()) { // a trim at the step's end replaced the caches it wrote
      this.recorded = { key, recording: result, pass };
      this.recordedSteps.recorded++;
      countDecodeStep('recorded');
      return;
    }
    if (typeof result !== 'string') result.dispose();
    this.recordedSteps.unrecorded++;
    countDecodeStep('tfjs');
    this.recordedSteps.lastRefusal = typeof result === 'string' ? result : 'the KV caches were replaced at the step\'s end';
  }
}

/**
 * How a free row is read back, from `last`, how the row was read back at the last decode step (by its last sequence,
 * or free already: the answer is the same again, so the recording's key stays): a shortlist at temperature 1 when that
 * was a shortlist; else (a pick, a row read as logits, whole rows a step, or a row not yet decoded) picked, or read as
 * logits when the executor picks nothing on the device.
 */
function freeAnswer(last: RowAnswer | undefined, devicePick: boolean): RowAnswer {
  if (typeof last === 'object') return { temperature: 1, ...(last.fallback ? { fallback: true } : {}) };
  return devicePick ? 'pick' : 'logits';
}

/** The rows' adapters, each once (by upload key), in row order. */
function distinctAdapters(rowAdapters: readonly (DeviceAdapter | null)[]): DeviceAdapter[] {
  return [...new Map(rowAdapters.filter((a): a is DeviceAdapter => a !== null).map((a) => [a.key, a])).values()];
}

/** The cache key of the bank of the rows' adapters (their distinct upload keys, sorted), or null when no row has one. */
function bankKey(rowAdapters: readonly (DeviceAdapter | null)[]): string | null {
  const keys = distinctAdapters(rowAdapters).map((a) => a.key);
  return keys.length === 0 ? null : keys.sort().join(',');
}

/** Each row's index among `bank`'s adapters (null: the base model), as stepLora takes them. */
function slotsIn(bank: LoraBank, rowAdapters: readonly (DeviceAdapter | null)[]): (number | null)[] {
  const slot = new Map(bank.adapters.map((a, i) => [a.key, i]));
  return rowAdapters.map((a) => (a ? slot.get(a.key)! : null));
}

/**
 * Of `rows` logits rows, those answered as `kind` (logits, picks, or shortlists), in order; 'fallback': the shortlisted
 * rows whose logits are read too when the host needs them (ShortlistRequest.fallback).
 */
function rowsAnswered(answers: readonly RowAnswer[], rows: number, kind: 'logits' | 'pick' | 'shortlist' | 'fallback'): Int32Array {
  const of = (a: RowAnswer | undefined) => (a === undefined || a === 'logits' ? 'logits' : a === 'pick' ? 'pick' : 'shortlist');
  const all = Int32Array.from({ length: rows }, (_, r) => r);
  if (kind === 'fallback') return all.filter((r) => typeof answers[r] === 'object' && (answers[r] as ShortlistRequest).fallback === true);
  return all.filter((r) => of(answers[r]) === kind);
}

/**
 * The host values passOutput uploads for `answers` (named step inputs): the rows answered with logits (`pick.keep`,
 * when some rows are not), the shortlisted rows and their inverse temperatures (`shortlist.rows`, `shortlist.invTemp`),
 * and those of them whose logits follow (`shortlist.full`).
 */
function answerInputs(answers: readonly RowAnswer[], rows: number, edits: readonly (LogitEdits | undefined)[] = []): Map<string, Int32Array | Float32Array> {
  const out = new Map<string, Int32Array | Float32Array>();
  const keep = rowsAnswered(answers, rows, 'logits');
  if (keep.length > 0 && keep.length < rows) out.set('pick.keep', keep);
  const short = rowsAnswered(answers, rows, 'shortlist');
  if (short.length > 0) {
    out.set('shortlist.rows', short);
    out.set('shortlist.invTemp', Float32Array.from(short, (r) => 1 / (answers[r] as ShortlistRequest).temperature));
  }
  const full = rowsAnswered(answers, rows, 'fallback');
  if (full.length > 0) out.set('shortlist.full', full);
  // Edits of the rows picked or shortlisted (rows answered with logits are never edited): each entry's row, id and
  // [bias, repetition, minus], padded (row −1) to a power of two (≥ 64) so that a recording's inputs keep their size
  // while histories grow.
  const edited = (r: number) => (answers[r] !== undefined && answers[r] !== 'logits' ? edits[r] : undefined);
  let total = 0;
  for (let r = 0; r < rows; r++) total += edited(r)?.ids.length ?? 0;
  if (total > 0) {
    const capacity = Math.max(64, 2 ** Math.ceil(Math.log2(total)));
    const rowOf = new Int32Array(capacity).fill(-1);
    const ids = new Int32Array(capacity);
    const values = new Float32Array(3 * capacity);
    let at = 0;
    for (let r = 0; r < rows; r++) {
      const e = edited(r);
      if (!e) continue;
      rowOf.fill(r, at, at + e.ids.length);
      ids.set(e.ids, at);
      for (let j = 0; j < e.ids.length; j++, at++) {
        values[3 * at] = e.bias[j]!;
        values[3 * at + 1] = e.repetition[j]!;
        values[3 * at + 2] = e.minus[j]!;
      }
    }
    out.set('edit.rows', rowOf);
    out.set('edit.ids', ids);
    out.set('edit.values', values);
  }
  return out;
}

/** Floats of passOutput's tensor before the fallback rows' logits (all of it without them). */
function headLength(answers: readonly RowAnswer[], rows: number, V: number): number {
  const keep = rowsAnswered(answers, rows, 'logits').length;
  if (rows === 0 || keep === rows) return rows * V;
  const picks = rowsAnswered(answers, rows, 'pick').length > 0 ? 2 * rows : 0;
  return picks + rowsAnswered(answers, rows, 'shortlist').length * (2 * SHORTLIST_SIZE + 1) + keep * V;
}

/**
 * The tensor a pass reads back for logits [rows, vocab]: the logits when every row is answered with its logits; else,
 * concatenated (picks and shortlists of the logits after the rows' edits, written in place after the rows read as
 * logits are gathered: LogitEditsProgram, when a row has some),
 * every row's greedy pick [rows·2] (id, logprob: GreedyPickProgram) when a row is picked, the shortlisted
 * rows' shortlists [s·(2·SHORTLIST_SIZE + 1)] (shortlist.ts: two dispatches), the rows answered with logits
 * [keep·vocab], then the logits of the rows with a fallback shortlist [f·vocab] (headLength: where they start).
 */
function passOutput(logits: tf.Tensor2D, answers: readonly RowAnswer[], inputs: ReadonlyMap<string, StepData>): tf.Tensor {
  const rows = logits.shape[0];
  const keep = rowsAnswered(answers, rows, 'logits');
  if (rows === 0 || keep.length === rows) return logits;
  const upload = (name: string, dtype: 'int32' | 'float32') => tf.tensor1d(stepInput(name, inputs.get(name)!), dtype);
  return tf.tidy(() => {
    // Rows read back as logits are gathered before the edits (logit_bias, penalties) are written into the logits in
    // place: picks and shortlists read the edited logits, rows read as logits are never edited.
    const kept = keep.length > 0 ? tf.reshape(tf.gather(logits, upload('pick.keep', 'int32')), [-1]) : null;
    const full = inputs.has('shortlist.full') ? tf.reshape(tf.gather(logits, upload('shortlist.full', 'int32')), [-1]) : null;
    if (inputs.has('edit.ids')) logitEditsInPlace(logits, upload('edit.rows', 'int32'), upload('edit.ids', 'int32'), upload('edit.values', 'float32'));
    const parts: tf.Tensor[] = [];
    if (rowsAnswered(answers, rows, 'pick').length > 0) parts.push(tf.reshape(greedyPickGpu(logits), [-1]));
    if (inputs.has('shortlist.rows')) {
      const short = tf.gather(logits, upload('shortlist.rows', 'int32'));
      parts.push(tf.reshape(shortlistGpu(short, upload('shortlist.invTemp', 'float32'), SHORTLIST_SIZE), [-1]));
    }
    if (kept) parts.push(kept);
    if (full) parts.push(full);
    return parts.length === 1 ? parts[0]! : tf.concat(parts);
  });
}

/** What passOutput's tensor says, read back as `data` (all of it, or its first headLength floats). */
function parseOutput(data: Float32Array, rows: number, V: number, answers: readonly RowAnswer[]): PassOutput {
  const keep = rowsAnswered(answers, rows, 'logits');
  const logitsAt = new Int32Array(rows).fill(-1);
  keep.forEach((r, i) => (logitsAt[r] = i));
  const picked = new Map<number, PickedToken>();
  const shortlists = new Map<number, Shortlist>();
  const fallback = new Map<number, Float32Array>();
  if (rows === 0 || keep.length === rows) return { picked, shortlists, logits: data, logitsAt, fallback };
  const head = headLength(answers, rows, V);
  if (data.length > head) rowsAnswered(answers, rows, 'fallback').forEach((r, i) => fallback.set(r, data.subarray(head + i * V, head + (i + 1) * V)));
  let at = 0;
  const picks = rowsAnswered(answers, rows, 'pick');
  if (picks.length > 0) {
    for (const r of picks) picked.set(r, { id: data[2 * r]!, logprob: data[2 * r + 1]! });
    at = 2 * rows;
  }
  const S = SHORTLIST_SIZE;
  for (const r of rowsAnswered(answers, rows, 'shortlist')) {
    shortlists.set(r, { ids: Int32Array.from(data.subarray(at, at + S)), logits: data.slice(at + S, at + 2 * S), logNorm: data[at + 2 * S]! });
    at += 2 * S + 1;
  }
  return { picked, shortlists, logits: data.subarray(at, at + keep.length * V), logitsAt, fallback };
}
