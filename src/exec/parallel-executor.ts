/**
 * Data-parallel execution over worker threads: each worker holds a full copy of the model (TensorFlow.js
 * wasm runs one thread per instance, so this is how a second core does work) and every sequence lives on one
 * worker for its whole life. A step runs the workers' shares of the batch at the same time. Adapters are
 * uploaded to every worker. Results are the same as in-process: a sequence's math does not depend on which
 * rows share its batch.
 */
import { Worker } from 'node:worker_threads';
import type { BackendName } from '../backend/select.ts';
import type { DecodeItem, Executor, LoraApplied, PrefillItem, StepResult } from '../engine/executor.ts';
import { ServeError, type ErrorCode, ERRORS } from '../errors.ts';
import type { AdapterWeights } from '../lora/adapter-file.ts';
import type { AdapterDevice, ResidentAdapter } from './lora-bank.ts';
import type { LoraMode } from './tf-executor.ts';
import type { WorkerInfo, WorkerInit, WorkerStep } from './worker.ts';
import { addTotals, profiler, type ProfileTotals } from '../obs/profile.ts';

class WorkerClient {
  private next = 1;
  private readonly pending = new Map<number, { resolve: (v: any) => void; reject: (e: Error) => void }>();
  private dead: Error | null = null;
  /** Sequences assigned here (prefilling or running). */
  load = 0;
  memory = { numTensors: 0, numBytes: 0 };
  /** The worker's step profile as of its last answer (with --profile). */
  profile: ProfileTotals = {};

  constructor(readonly worker: Worker) {
    worker.on('message', (msg: {
      id: number; result?: unknown; error?: { message: string; code?: string }; memory?: { numTensors: number; numBytes: number }; profile?: ProfileTotals;
    }) => {
      if (msg.memory) this.memory = msg.memory;
      if (msg.profile) this.profile = msg.profile;
      const p = this.pending.get(msg.id);
      if (!p) return;
      this.pending.delete(msg.id);
      if (msg.error) {
        const code = msg.error.code && msg.error.code in ERRORS ? (msg.error.code as ErrorCode) : 'GENERATION';
        p.reject(new ServeError(code, msg.error.message));
      } else {
        p.resolve(msg.result);
      }
    });
    const die = (err: Error) => {
      this.dead = err;
      for (const p of this.pending.values()) p.reject(err);
      this.pending.clear();
    };
    worker.on('error', die);
    worker.on('exit', (code) => die(new Error(`executor worker exited (${code})`)));
  }

  call<T>(op: string, args?: unknown): Promise<T> {
    if (this.dead) return Promise.reject(this.dead);
    const id = this.next++;
    return new Promise<T>((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      this.worker.postMessage({ id, op, args });
    });
  }
}

export interface ParallelExecutorOptions {
  readonly workers: number;
  readonly modelDir: string;
  readonly backend: BackendName;
  readonly loraMode: LoraMode;
  /** Time the phases of each step in the workers (src/obs/profile.ts). */
  readonly profile?: boolean;
  /** On wasm, matmuls in the native addon when it is available (default true). */
  readonly nativeMatmul?: boolean;
  /** Heap bytes each worker touches at start on wasm (TfExecutor.warmUp; default 0). */
  readonly warmHeapBytes?: number;
}

export class ParallelExecutor implements Executor {
  private readonly owner = new Map<number, WorkerClient>();
  private runningSeqs = new Set<number>();

  private constructor(private readonly clients: WorkerClient[], readonly vocabSize: number, readonly modelBytes: number, readonly backend: string,
    readonly nativeMatmul: boolean, readonly nativeMatmulNote?: string) {}

  static async start(opts: ParallelExecutorOptions): Promise<ParallelExecutor> {
    const clients: WorkerClient[] = [];
    try {
      for (let i = 0; i < opts.workers; i++) {
        // worker-entry.mjs registers the TypeScript loader in the worker, then loads worker.ts.
        clients.push(new WorkerClient(new Worker(new URL('./worker-entry.mjs', import.meta.url))));
      }
      const infos = await Promise.all(clients.map((c) => c.call<WorkerInfo>('init', {
        modelDir: opts.modelDir, backend: opts.backend, loraMode: opts.loraMode, profile: opts.profile ?? false, nativeMatmul: opts.nativeMatmul ?? true,
        warmHeapBytes: opts.warmHeapBytes ?? 0,
      } satisfies WorkerInit)));
      const i = infos[0]!;
      return new ParallelExecutor(clients, i.vocabSize, i.bytes, i.backend, infos.every((x) => x.nativeMatmul), i.nativeMatmulNote);
    } catch (err) {
      await Promise.all(clients.map((c) => c.worker.terminate()));
      throw err;
    }
  }

  get running(): number {
    return this.runningSeqs.size;
  }

  /** Device memory summed over the workers, as of their last answer (every answer carries it). */
  memory(): { numTensors: number; numBytes: number } {
    return this.clients.reduce((m, c) => ({ numTensors: m.numTensors + c.memory.numTensors, numBytes: m.numBytes + c.memory.numBytes }), { numTensors: 0, numBytes: 0 });
  }

  /** The workers' step profiles, summed, as of their last answers. */
  profile(): ProfileTotals {
    return addTotals(...this.clients.map((c) => c.profile));
  }

  async refreshMemory(): Promise<{ numTensors: number; numBytes: number }> {
    await Promise.all(this.clients.map((c) => c.call('memory')));
    return this.memory();
  }

  private assign(seq: number): WorkerClient {
    let c = this.owner.get(seq);
    if (!c) {
      c = this.clients.reduce((best, x) => (x.load < best.load ? x : best));
      c.load++;
      this.owner.set(seq, c);
    }
    return c;
  }

  /** Runs each worker's share of the items at the same time and merges the answers. */
  private async fanOut<T extends { seq: number }>(op: 'prefill' | 'decode', items: readonly T[]): Promise<StepResult> {
    const groups = new Map<WorkerClient, T[]>();
    for (const item of items) {
      const c = this.assign(item.seq);
      let g = groups.get(c);
      if (!g) groups.set(c, (g = []));
      g.push(item);
    }
    const answers = await profiler.timeAsync('executor_wait', () => Promise.all([...groups].map(([c, g]) => c.call<WorkerStep>(op, g))));
    const logits = new Map<number, Float32Array>();
    const modes: LoraApplied[] = [];
    const adapters: number[] = [];
    const rows: number[] = [];
    for (const r of answers) {
      for (const [seq, l] of r.logits) logits.set(seq, l);
      modes.push(...r.modes);
      adapters.push(...r.adapters);
      rows.push(...r.rows);
    }
    return { logits, modes, adapters, rows };
  }

  async prefill(items: readonly PrefillItem[]): Promise<StepResult> {
    const strip = items.map((i) => ({ ...i, adapter: i.adapter && { id: i.adapter.id, key: i.adapter.key } }));
    const r = await this.fanOut('prefill', strip);
    for (const i of items) if (i.last) this.runningSeqs.add(i.seq);
    return r;
  }

  decode(items: readonly DecodeItem[]): Promise<StepResult> {
    if (items.length !== this.runningSeqs.size || items.some((i) => !this.runningSeqs.has(i.seq))) {
      throw new Error(`decode: expected one item for each of the ${this.runningSeqs.size} running sequences`);
    }
    return this.fanOut('decode', items.map((i) => ({ ...i, adapter: i.adapter && { id: i.adapter.id, key: i.adapter.key } })));
  }

  release(seq: number): void {
    const c = this.owner.get(seq);
    if (!c) return;
    this.owner.delete(seq);
    this.runningSeqs.delete(seq);
    c.load--;
    // Messages are handled in order, so the release lands before any later step on that worker.
    c.call('release', seq).catch(() => undefined);
  }

  /** Where the adapter manager uploads adapters: to every worker. */
  readonly adapterDevice: AdapterDevice = ((executor: ParallelExecutor): AdapterDevice => ({
    // A wasm worker has copied the weights into its heap when it answers (TfExecutor.adapterDevice).
    get copiesOnUpload() {
      return executor.backend === 'wasm';
    },
    upload: async (w: AdapterWeights, key: string): Promise<ResidentAdapter> => {
      // Every worker answers before this settles (so the host arrays are no longer read); one that failed leaves
      // nothing behind on the others.
      const answers = await Promise.allSettled(executor.clients.map((c) => c.call('loadAdapter', { weights: w, key })));
      const failed = answers.find((a): a is PromiseRejectedResult => a.status === 'rejected');
      if (failed) {
        for (const c of executor.clients) c.call('offloadAdapter', { id: w.id, key }).catch(() => undefined);
        throw failed.reason;
      }
      return { id: w.id, key, rank: w.rank, bytes: w.bytes };
    },
    dispose: (a: ResidentAdapter): void => {
      for (const c of executor.clients) c.call('offloadAdapter', { id: a.id, key: a.key }).catch(() => undefined);
    },
  }))(this);

  /** Frees the workers' device memory and stops them. */
  async close(): Promise<void> {
    await Promise.all(this.clients.map(async (c) => {
      await c.call('dispose').catch(() => undefined);
      await c.worker.terminate();
    }));
  }
}
