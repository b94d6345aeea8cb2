/**
 * A worker thread that owns one copy of the model and one TfExecutor (see parallel-executor.ts).
 * Requests arrive as `{ id, op, args }` and are answered in order with `{ id, result }` or `{ id, error }`.
 * Adapters are uploaded here by key (ExecAdapter.key); prefill/decode items name them by key.
 */
import { parentPort } from 'node:worker_threads';
import * as tf from '@tensorflow/tfjs-core';
import { initBackend, type BackendName } from '../backend/select.ts';
import type { DecodeItem, ExecAdapter, PrefillItem, StepResult } from '../engine/executor.ts';
import { isServeError } from '../errors.ts';
import { profiler } from '../obs/profile.ts';
import type { AdapterWeights } from '../lora/adapter-file.ts';
import { disposeAdapter, uploadAdapter, type DeviceAdapter } from './lora-bank.ts';
import { CausalLM } from '../model/model.ts';
import { TfExecutor, type LoraMode } from './tf-executor.ts';

export interface WorkerInit {
  readonly modelDir: string;
  readonly backend: BackendName;
  readonly loraMode: LoraMode;
  /** Time the phases of each step (src/obs/profile.ts). */
  readonly profile: boolean;
  /** On wasm, matmuls in the native addon when it is available. */
  readonly nativeMatmul: boolean;
  /** Heap bytes to touch at start on wasm (TfExecutor.warmUp). */
  readonly warmHeapBytes: number;
}

/** init's answer. */
export interface WorkerInfo {
  readonly backend: string;
  readonly vocabSize: number;
  readonly bytes: number;
  readonly dtype: string;
  readonly nativeMatmul: boolean;
  readonly nativeMatmulNote?: string;
}

/** A step's answer: logits per sequence (transferred). */
export interface WorkerStep {
  readonly logits: [number, Float32Array][];
  readonly modes: StepResult['modes'];
  readonly rows: StepResult['rows'];
  readonly adapters: StepResult['adapters'];
}

let executor: TfExecutor | null = null;
let model: CausalLM | null = null;
const adapters = new Map<string, DeviceAdapter>();

function resolve(a: ExecAdapter | null): DeviceAdapter | null {
  if (!a) return null;
  const d = adapters.get(a.key);
  if (!d) throw new Error(`worker: adapter ${a.id} (upload ${a.key}) is not loaded`);
  return d;
}

function memory() {
  const m = tf.memory();
  return { numTensors: m.numTensors, numBytes: m.numBytes };
}

function step(r: StepResult): { value: WorkerStep; transfer: ArrayBuffer[] } {
  // Copy each sequence's rows out of the shared logits buffer so each can be transferred on its own.
  const logits: [number, Float32Array][] = [...r.logits].map(([seq, l]) => [seq, l.slice()]);
  return { value: { logits, modes: r.modes, adapters: r.adapters, rows: r.rows }, transfer: logits.map(([, l]) => l.buffer as ArrayBuffer) };
}

const ops: Record<string, (args: any) => Promise<{ value: unknown; transfer?: ArrayBuffer[] }> | { value: unknown; transfer?: ArrayBuffer[] }> = {
  async init(args: WorkerInit) {
    profiler.enabled = args.profile;
    const backend = await initBackend(args.backend, { nativeMatmul: args.nativeMatmul });
    model = CausalLM.load(args.modelDir);
    executor = new TfExecutor(model, { loraMode: args.loraMode });
    executor.warmUp(backend.name === 'wasm' ? args.warmHeapBytes : 0);
    const info: WorkerInfo = {
      backend: backend.name, vocabSize: model.config.vocabSize, bytes: model.bytes, dtype: model.dtype,
      nativeMatmul: backend.nativeMatmul, ...(backend.nativeMatmulNote ? { nativeMatmulNote: backend.nativeMatmulNote } : {}),
    };
    return { value: info };
  },
  prefill(items: PrefillItem[]) {
    return profiler.step('prefill', 'executor', async () => step(await executor!.prefill(items.map((i) => ({ ...i, adapter: resolve(i.adapter) })))));
  },
  decode(items: DecodeItem[]) {
    return profiler.step('decode', 'executor', async () => step(await executor!.decode(items.map((i) => ({ ...i, adapter: resolve(i.adapter) })))));
  },
  release(seq: number) {
    executor!.release(seq);
    return { value: null };
  },
  loadAdapter(args: { weights: AdapterWeights; key: string }) {
    if (!adapters.has(args.key)) adapters.set(args.key, uploadAdapter(args.weights, args.key));
    return { value: null };
  },
  offloadAdapter(a: ExecAdapter) {
    const d = adapters.get(a.key);
    if (d) {
      executor!.adapterDevice.dispose(d);
      adapters.delete(a.key);
    }
    return { value: null };
  },
  memory() {
    return { value: null };
  },
  dispose() {
    executor?.dispose();
    for (const d of adapters.values()) disposeAdapter(d);
    adapters.clear();
    model?.dispose();
    return { value: null };
  },
};

// Requests are handled strictly one after another, in arrival order.
let queue = Promise.resolve();
parentPort!.on('message', (msg: { id: number; op: string; args: unknown }) => {
  queue = queue.then(async () => {
    try {
      const { value, transfer } = await ops[msg.op]!(msg.args);
      // Every answer carries the device memory after the operation (for metrics and /info), and the step profile.
      const profile = profiler.enabled ? profiler.snapshot() : undefined;
      parentPort!.postMessage({ id: msg.id, result: value, memory: memory(), profile }, transfer ?? []);
    } catch (err) {
      const e = err as Error & { code?: string };
      parentPort!.postMessage({ id: msg.id, error: { message: e.message, code: isServeError(err) ? e.code : undefined } });
    }
  });
});
