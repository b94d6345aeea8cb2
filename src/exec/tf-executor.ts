/**
 * The TensorFlow.js executor: runs prefill and decode forward passes of the resident model over KV batches,
 * applying LoRA per row (unmerged bank) or merged into W, as the lora mode decides.
 *
 * `auto` rule (dLoRA's insight, with hysteresis): a forward pass whose rows all use one adapter X runs on
 * merged weights W + s·B·A when X's merged weights already exist, or when X has been the only adapter for
 * `mergeAfter` (32) consecutive passes: a merge costs one small matmul and a copy of W per targeted linear
 * (with a threshold of 8, bench/ adapter-switch saw the request that triggered the merge take ≈86 ms longer on
 * the 76 M-parameter bench model), which only pays back over many steps, so short single-adapter moments stay
 * unmerged; any other pass runs unmerged. Merged weights of one adapter at a time are kept; the pristine W is never modified.
 */
import * as tf from '@tensorflow/tfjs-core';
import type { DecodeItem, ExecAdapter, Executor, LoraApplied, PrefillItem, StepResult } from '../engine/executor.ts';
import { buildBank, disposeAdapter, disposeBank, disposeStepLora, mergeWeights, stepLora, uploadAdapter, type AdapterDevice, type DeviceAdapter, type LoraBank } from './lora-bank.ts';
import { profiler } from '../obs/profile.ts';
import type { StepLora } from '../model/layers.ts';
import { newKV, type KVBatch } from './kv.ts';
import type { CausalLM } from '../model/model.ts';

export type LoraMode = 'auto' | 'merged' | 'unmerged';

export interface TfExecutorOptions {
  readonly loraMode: LoraMode;
  /** auto: consecutive single-adapter passes before merging (default 32). */
  readonly mergeAfter?: number;
  /** Cached banks (sets of adapters) kept on the device. */
  readonly maxBanks?: number;
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
  private readonly banks = new Map<string, LoraBank>();
  private merged: { adapter: DeviceAdapter; weights: Map<string, tf.Tensor2D> } | null = null;
  private soleStreak: { key: string; passes: number } | null = null;
  private readonly mergeAfter: number;
  private readonly maxBanks: number;

  constructor(readonly model: CausalLM, readonly opts: TfExecutorOptions) {
    this.vocabSize = model.config.vocabSize;
    this.kv = newKV(model.config);
    this.mergeAfter = opts.mergeAfter ?? 32;
    this.maxBanks = opts.maxBanks ?? 4;
  }

  get running(): number {
    return this.rows.length;
  }

  /**
   * Start-up warm-up: one base-model prefill and decode (first-call costs of the kernels are paid here, not by the
   * first request), then `heapBytes` allocated and freed on the backend. On wasm the first write to heap memory
   * costs a page fault per 4 KiB (about 2–3 ms per MB on the bench machine): a fresh server would pay that in its
   * first adapter uploads and forwards, a server that has run pays it never again, as the heap is reused.
   */
  warmUp(heapBytes = 0): void {
    const c = this.model.config;
    const T = Math.min(16, c.maxPositions - 1);
    const kv = newKV(this.model.config);
    const profiling = profiler.enabled; // not a step: it stays out of the profile
    profiler.enabled = false;
    try {
      kv.addEmptyRows(2);
      const tokens = new Int32Array(2 * T); // token 0: every vocabulary has it
      const positions = Int32Array.from({ length: 2 * T }, (_, i) => i % T);
      this.model.forward({ kv, tokens, positions, T, pad: [0, 0], logitRows: Int32Array.of(T - 1, 2 * T - 1) }).dispose();
      this.model.forward({ kv, tokens: new Int32Array(2), positions: Int32Array.of(T, T), T: 1, logitRows: Int32Array.of(0, 1) }).dispose();
    } finally {
      kv.dispose();
      profiler.enabled = profiling;
    }
    if (heapBytes >= 4) tf.zeros([Math.floor(heapBytes / 4)]).dispose(); // zeros writes every element
  }

  prefill(items: readonly PrefillItem[]): Promise<StepResult> {
    return profiler.timeAsync('executor', () => this.prefillAll(items));
  }

  private async prefillAll(items: readonly PrefillItem[]): Promise<StepResult> {
    const logits = new Map<number, Float32Array>();
    const modes: LoraApplied[] = [];
    const adapters: number[] = [];
    const rows: number[] = [];
    // Whole prompts in one chunk run together (left-padded); chunks of long prompts run one by one.
    const whole = items.filter((i) => i.start === 0 && i.last && !this.prefilling.has(i.seq));
    const chunks = items.filter((i) => !whole.includes(i));
    if (whole.length > 0) await this.prefillPass(whole, logits, modes, adapters, rows);
    for (const item of chunks) await this.prefillPass([item], logits, modes, adapters, rows);
    return { logits, modes, adapters, rows };
  }

  private async prefillPass(items: readonly PrefillItem[], out: Map<number, Float32Array>, modes: LoraApplied[], adapters: number[], rows: number[]): Promise<void> {
    rows.push(items.length);
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
    const rowAdapters = items.flatMap((i) => new Array<DeviceAdapter | null>(T).fill(i.adapter as DeviceAdapter | null));
    const data = await this.forward(kv, tokens, positions, T, cont ? undefined : pad, rowAdapters, logitRows, modes, adapters);
    const V = this.vocabSize;
    for (const r of rowsOf) if (r.count > 0) out.set(r.seq, data.subarray(r.from * V, (r.from + r.count) * V));

    // Sequences whose prompt is complete join the decode batch; others keep their own KV for the next chunk.
    if (items.every((i) => i.last)) {
      this.prefilling.delete(items[0]!.seq);
      this.kv.append(kv);
      for (const item of items) this.rows.push({ seq: item.seq, adapter: item.adapter as DeviceAdapter | null });
    } else if (!cont) {
      this.prefilling.set(items[0]!.seq, { kv, adapter: items[0]!.adapter as DeviceAdapter | null });
    }
  }

  decode(items: readonly DecodeItem[]): Promise<StepResult> {
    return profiler.timeAsync('executor', () => this.decodeAll(items));
  }

  private async decodeAll(items: readonly DecodeItem[]): Promise<StepResult> {
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
    const modes: LoraApplied[] = [];
    const adapters: number[] = [];
    const logitRows = Int32Array.from({ length: B }, (_, i) => i);
    const data = await this.forward(this.kv, tokens, positions, 1, undefined, this.rows.map((r) => r.adapter), [...logitRows], modes, adapters);
    const V = this.vocabSize;
    const logits = new Map<number, Float32Array>();
    this.rows.forEach((r, b) => logits.set(r.seq, data.subarray(b * V, (b + 1) * V)));
    return { logits, modes, adapters, rows: [B] };
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

  /**
   * Where the adapter manager puts adapters for this executor: uploaded here; disposing one first drops the
   * merged weights and banks built from it.
   */
  readonly adapterDevice: AdapterDevice = {
    // The wasm backend copies a new tensor's values into its heap at once; the cpu backend keeps the array.
    get copiesOnUpload() {
      return tf.getBackend() === 'wasm';
    },
    upload: async (w, key) => uploadAdapter(w, key),
    dispose: (a) => {
      this.forgetAdapter(a);
      disposeAdapter(a as DeviceAdapter);
    },
  };

  /** Drops anything derived from this adapter (merged weights, banks). */
  forgetAdapter(adapter: ExecAdapter): void {
    if (this.merged?.adapter.key === adapter.key) this.dropMerged();
    for (const [key, bank] of this.banks) {
      if (bank.adapters.some((a) => a.key === adapter.key)) {
        disposeBank(bank);
        this.banks.delete(key);
      }
    }
  }

  /** Frees everything: KV caches, banks, merged weights. */
  dispose(): void {
    for (const seq of [...this.prefilling.keys()]) this.release(seq);
    this.kv.dispose();
    this.rows = [];
    for (const bank of this.banks.values()) disposeBank(bank);
    this.banks.clear();
    this.dropMerged();
  }

  private dropMerged(): void {
    if (!this.merged) return;
    for (const w of this.merged.weights.values()) w.dispose();
    this.merged = null;
  }

  /** Decides merged/unmerged for one pass and builds its StepLora (see the rule at the top). */
  private loraFor(rowAdapters: readonly (DeviceAdapter | null)[]): { lora?: StepLora; mode: LoraApplied; distinct: number; owned: boolean } {
    const distinct = [...new Map(rowAdapters.filter((a): a is DeviceAdapter => a !== null).map((a) => [a.key, a])).values()];
    if (distinct.length === 0) {
      this.soleStreak = null;
      return { mode: 'none', distinct: 0, owned: false };
    }
    const sole = distinct.length === 1 && rowAdapters.every((a) => a !== null) ? distinct[0]! : null;
    if (sole) {
      this.soleStreak = this.soleStreak?.key === sole.key
        ? { key: sole.key, passes: this.soleStreak.passes + 1 } : { key: sole.key, passes: 1 };
    } else {
      this.soleStreak = null;
    }
    const mode = this.opts.loraMode;
    const wantMerge = sole !== null && (mode === 'merged' ||
      (mode === 'auto' && (this.merged?.adapter.key === sole.key || this.soleStreak!.passes >= this.mergeAfter)));
    if (wantMerge) {
      if (this.merged?.adapter.key !== sole!.key) {
        this.dropMerged();
        this.merged = { adapter: sole!, weights: mergeWeights(this.model.linears, sole!) };
      }
      return { lora: { merged: this.merged!.weights }, mode: 'merged', distinct: 1, owned: false };
    }
    const key = distinct.map((a) => a.key).sort().join(',');
    let bank = this.banks.get(key);
    if (bank) {
      this.banks.delete(key); // refresh LRU position
    } else {
      bank = buildBank(this.model.linears.values(), distinct, { pack: true });
      while (this.banks.size >= this.maxBanks) {
        const [oldKey, old] = this.banks.entries().next().value!;
        disposeBank(old);
        this.banks.delete(oldKey);
      }
    }
    this.banks.set(key, bank);
    const slot = new Map(bank.adapters.map((a, i) => [a.key, i]));
    return { lora: stepLora(bank, rowAdapters.map((a) => (a ? slot.get(a.key)! : null))), mode: 'unmerged', distinct: distinct.length, owned: true };
  }

  private async forward(kv: KVBatch, tokens: Int32Array, positions: Int32Array, T: number, pad: number[] | undefined,
    rowAdapters: readonly (DeviceAdapter | null)[], logitRows: number[], modes: LoraApplied[], adapters: number[]): Promise<Float32Array> {
    const choice = profiler.time('lora_setup', () => this.loraFor(rowAdapters));
    modes.push(choice.mode);
    adapters.push(choice.distinct);
    let logits: tf.Tensor2D | null = null;
    try {
      logits = this.model.forward({ kv, tokens, positions, T, pad, lora: choice.lora, logitRows: Int32Array.from(logitRows) });
      const l = logits;
      return logitRows.length === 0 ? new Float32Array(0) : await profiler.timeAsync('logits_download', async () => (await l.data()) as Float32Array);
    } finally {
      logits?.dispose();
      if (choice.owned && choice.lora) disposeStepLora(choice.lora);
    }
  }
}
