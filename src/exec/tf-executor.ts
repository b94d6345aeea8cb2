/**
 * The TensorFlow.js executor: runs prefill and decode forward passes of the resident model over KV batches,
 * applying LoRA as each call's plan says (src/engine/scheduler.ts decides): per row from a bank of the pass's
 * adapters (unmerged), or merged into W. Merged weights of one adapter at a time are kept; the pristine W is
 * never modified. Adapters are uploaded here under their key and named by it in items.
 */
import * as tf from '@tensorflow/tfjs-core';
import type {
  DecodeItem, DeviceMemory, ExecAdapter, Executor, LoraPlan, PickedToken, PrefillItem, ResidentAdapter, StepPass, StepResult,
} from '../engine/executor.ts';
import { greedyPickGpu } from '../backend/webgpu/kernels/greedy-pick.ts';
import { fusedKernels } from '../backend/webgpu/kernels/program.ts';
import { batchSubmits } from '../backend/webgpu/submit.ts';
import type { AdapterWeights } from '../lora/adapter-file.ts';
import { buildBank, disposeAdapter, disposeBank, disposeStepLora, mergeWeights, stepLora, uploadAdapter, type DeviceAdapter, type LoraBank } from './lora-bank.ts';
import type { Weight } from '../backend/weights.ts';
import { profiler, type ProfileTotals } from '../obs/profile.ts';
import type { StepLora } from '../model/layers.ts';
import { newKV, type KVBatch } from './kv.ts';
import type { CausalLM } from '../model/model.ts';

export interface TfExecutorOptions {
  /** Cached banks (sets of adapters) kept on the device (default 4). */
  readonly maxBanks?: number;
  /**
   * Pick next tokens on the device for the rows that allow it (DecodeItem.pick) where the backend has the kernel
   * (webgpu): such a row reads back [id, logprob] instead of its logits (default true).
   */
  readonly devicePick?: boolean;
}

/** What one forward pass read back, by logits row: a token picked on the device, or the row's logits. */
interface PassOutput {
  readonly picked: ReadonlyMap<number, PickedToken>;
  /** The other rows' logits, in row order: [rows not picked, vocab]. */
  readonly logits: Float32Array;
  /** Per logits row: its index among the rows not picked (−1: picked). */
  readonly logitsAt: Int32Array;
}

interface Row {
  readonly seq: number;
  readonly adapter: DeviceAdapter | null;
}

export class TfExecutor implements Executor {
  readonly vocabSize: number;
  private readonly kv: KVBatch;
  private rows: Row[] = [];
  private readonly prefilling = new Map<number, { kv: KVBatch; adapter: DeviceAdapter | null }>();
  /** Resident adapters by key (ExecAdapter.key). */
  private readonly adapters = new Map<string, DeviceAdapter>();
  private readonly banks = new Map<string, LoraBank>();
  private merged: { adapter: DeviceAdapter; weights: Map<string, Weight> } | null = null;
  private readonly maxBanks: number;
  private readonly devicePick: boolean;

  constructor(readonly model: CausalLM, opts: TfExecutorOptions = {}) {
    this.vocabSize = model.config.vocabSize;
    this.kv = newKV(model.config);
    this.maxBanks = opts.maxBanks ?? 4;
    this.devicePick = (opts.devicePick ?? true) && fusedKernels();
  }

  get running(): number {
    return this.rows.length;
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
      if (this.devicePick) greedyPickGpu(logits).dispose();
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
    const out = { logits: new Map<number, Float32Array>(), picked: new Map<number, PickedToken>() };
    const passes: StepPass[] = [];
    // Whole prompts in one chunk run together (left-padded); chunks of long prompts run one by one.
    const whole = items.filter((i) => i.start === 0 && i.last && !this.prefilling.has(i.seq));
    const chunks = items.filter((i) => !whole.includes(i));
    if (whole.length > 0) passes.push(await this.prefillPass(whole, lora, out));
    for (const item of chunks) passes.push(await this.prefillPass([item], lora, out));
    return { ...out, passes };
  }

  private async prefillPass(items: readonly PrefillItem[], lora: LoraPlan, out: { logits: Map<number, Float32Array>; picked: Map<number, PickedToken> }): Promise<StepPass> {
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
    const pickRows = items.flatMap((item, i) => new Array<boolean>(rowsOf[i]!.count).fill(!!item.pick && item.last && !item.allLogits));
    let result: Awaited<ReturnType<TfExecutor['forward']>>;
    try {
      result = await this.forward(kv, tokens, positions, T, cont ? undefined : pad, rowAdapters, lora, logitRows, B, pickRows);
    } catch (err) {
      if (!cont) kv.dispose(); // a continued prompt's KV is released with its sequence
      throw err;
    }
    const { output, pass } = result;
    const V = this.vocabSize;
    for (const r of rowsOf) {
      if (r.count === 0) continue;
      const picked = output.picked.get(r.from); // a picked item has one row: its last
      const at = output.logitsAt[r.from]!; // the item's rows are consecutive among those not picked
      if (picked) out.picked.set(r.seq, picked);
      else out.logits.set(r.seq, output.logits.subarray(at * V, (at + r.count) * V));
    }

    // Sequences whose prompt is complete join the decode batch; others keep their own KV for the next chunk.
    if (items.every((i) => i.last)) {
      this.prefilling.delete(items[0]!.seq);
      this.kv.append(kv);
      items.forEach((item, b) => this.rows.push({ seq: item.seq, adapter: itemAdapters[b]! }));
    } else if (!cont) {
      this.prefilling.set(items[0]!.seq, { kv, adapter: itemAdapters[0]! });
    }
    return pass;
  }

  decode(items: readonly DecodeItem[], lora: LoraPlan): Promise<StepResult> {
    return profiler.timeAsync('executor', () => this.decodeAll(items, lora));
  }

  private async decodeAll(items: readonly DecodeItem[], lora: LoraPlan): Promise<StepResult> {
    const bySeq = new Map(items.map((i) => [i.seq, i]));
    if (bySeq.size !== this.rows.length || this.rows.some((r) => !bySeq.has(r.seq))) {
      throw new Error(`decode: expected one item for each of the ${this.rows.length} running sequences`);
    }
    const B = this.rows.length;
    const tokens = new Int32Array(B);
    const positions = new Int32Array(B);
    this.rows.forEach((r, b) => {
      const it = bySeq.get(r.seq)!;
      tokens[b] = it.token;
      positions[b] = it.position;
    });
    const logitRows = Array.from({ length: B }, (_, i) => i);
    const pickRows = this.rows.map((r) => !!bySeq.get(r.seq)!.pick);
    const { output, pass } = await this.forward(this.kv, tokens, positions, 1, undefined, this.rows.map((r) => r.adapter), lora, logitRows, B, pickRows);
    const V = this.vocabSize;
    const logits = new Map<number, Float32Array>();
    const picked = new Map<number, PickedToken>();
    this.rows.forEach((r, b) => {
      const p = output.picked.get(b);
      const at = output.logitsAt[b]!;
      if (p) picked.set(r.seq, p);
      else logits.set(r.seq, output.logits.subarray(at * V, (at + 1) * V));
    });
    return { logits, picked, passes: [pass] };
  }

  release(seq: number): void {
    const p = this.prefilling.get(seq);
    if (p) {
      p.kv.dispose();
      this.prefilling.delete(seq);
    }
    const idx = this.rows.findIndex((r) => r.seq === seq);
    if (idx >= 0) {
      const keep = this.rows.map((_, i) => i).filter((i) => i !== idx);
      this.kv.keepRows(keep);
      this.rows.splice(idx, 1);
    }
  }

  fork(seq: number, into: readonly number[]): void {
    const idx = this.rows.findIndex((r) => r.seq === seq);
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

  private dropMerged(): void {
    if (!this.merged) return;
    for (const w of this.merged.weights.values()) w.dispose();
    this.merged = null;
  }

  /** Builds one pass's StepLora as the plan says (merging or building a bank when not cached). */
  private loraFor(rowAdapters: readonly (DeviceAdapter | null)[], plan: LoraPlan): { lora?: StepLora; applied: Omit<StepPass, 'rows'>; owned: boolean } {
    const distinct = [...new Map(rowAdapters.filter((a): a is DeviceAdapter => a !== null).map((a) => [a.key, a])).values()];
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
    const key = distinct.map((a) => a.key).sort().join(',');
    let bank = this.banks.get(key);
    if (bank) {
      this.banks.delete(key); // refresh LRU position
    } else {
      bank = buildBank(this.model.linears.values(), distinct);
      while (this.banks.size >= this.maxBanks) {
        const [oldKey, old] = this.banks.entries().next().value!;
        disposeBank(old);
        this.banks.delete(oldKey);
      }
    }
    this.banks.set(key, bank);
    const slot = new Map(bank.adapters.map((a, i) => [a.key, i]));
    return {
      lora: stepLora(bank, rowAdapters.map((a) => (a ? slot.get(a.key)! : null))), applied: { mode: 'unmerged', adapters: distinct.length }, owned: true,
    };
  }

  /**
   * One forward pass over `kv` for `seqs` sequences, and what it was, with its logits rows read back: with device
   * picking on, the rows that allow it (`pickRows`, per logits row) as their greedy tokens picked on the device.
   */
  private async forward(kv: KVBatch, tokens: Int32Array, positions: Int32Array, T: number, pad: number[] | undefined,
    rowAdapters: readonly (DeviceAdapter | null)[], plan: LoraPlan, logitRows: number[], seqs: number, pickRows: readonly boolean[]): Promise<{ output: PassOutput; pass: StepPass }> {
    const choice = profiler.time('lora_setup', () => this.loraFor(rowAdapters, plan));
    let logits: tf.Tensor2D | null = null;
    try {
      logits = this.model.forward({ kv, tokens, positions, T, pad, lora: choice.lora, logitRows: Int32Array.from(logitRows) });
      const output = await profiler.timeAsync('logits_download', () => this.readBack(logits!, this.devicePick ? pickRows : []));
      return { output, pass: { rows: seqs, ...choice.applied } };
    } finally {
      if (fusedKernels()) batchSubmits(false); // what follows the step (merges, banks, joins) submits as usual
      logits?.dispose();
      if (choice.owned && choice.lora) disposeStepLora(choice.lora);
    }
  }

  /**
   * Reads back logits [rows, vocab] in one download: the rows flagged in `pickRows` as their tokens picked on the
   * device (GreedyPickProgram), the others as their logits.
   */
  private async readBack(logits: tf.Tensor2D, pickRows: readonly boolean[]): Promise<PassOutput> {
    const [rows, V] = logits.shape;
    const keep = Array.from({ length: rows }, (_, r) => r).filter((r) => !pickRows[r]);
    const logitsAt = new Int32Array(rows).fill(-1);
    keep.forEach((r, i) => (logitsAt[r] = i));
    if (rows === 0) return { picked: new Map(), logits: new Float32Array(0), logitsAt };
    if (keep.length === rows) return { picked: new Map(), logits: (await logits.data()) as Float32Array, logitsAt };
    // [rows · 2] (id, logprob of every row) then [keep, V] (the rows not picked)
    const joined = tf.tidy(() => {
      const picks = tf.reshape(greedyPickGpu(logits), [-1]);
      return keep.length === 0 ? picks : tf.concat([picks, tf.reshape(tf.gather(logits, tf.tensor1d(keep, 'int32')), [-1])]);
    });
    let data: Float32Array;
    try {
      data = (await joined.data()) as Float32Array;
    } finally {
      joined.dispose();
    }
    const picked = new Map<number, PickedToken>();
    for (let r = 0; r < rows; r++) if (pickRows[r]) picked.set(r, { id: data[2 * r]!, logprob: data[2 * r + 1]! });
    return { picked, logits: data.subarray(2 * rows, 2 * rows + keep.length * V), logitsAt };
  }
}
