/**
 * Data-parallel execution over worker threads: each worker holds a full copy of the model (TensorFlow.js
 * wasm runs one thread per instance, so this is how a second core does work) and every sequence lives on one
 * worker for its whole life. A step runs the workers' shares of the batch at the same time. Adapters are
 * uploaded to every worker. Results are the same as in-process: a sequence's math does not depend on which
 * rows share its batch.
 */
import { Worker } from 'node:worker_threads';
import type { BackendName } from '../backend/select.ts';
import type {
  DecodeItem, DeviceMemory, ExecAdapter, Executor, LoraPlan, PickedToken, PrefillItem, ResidentAdapter, Shortlist, StepPass, StepResult,
} from '../engine/executor.ts';
import { ERRORS, isServeError, ServeError } from '../errors.ts';
import type { AdapterWeights } from '../lora/adapter-file.ts';
import type { RequestOf, WorkerInit, WorkerOp, WorkerProgress, WorkerReply, WorkerResults, WorkerStep } from './protocol.ts';
import { addTotals, profiler, type ProfileTotals } from '../obs/profile.ts';

class WorkerClient {
  private next = 1;
  private readonly pending = new Map<number, { resolve: (v: WorkerResults[WorkerOp]) => void; reject: (e: Error) => void }>();
  /** Set when the thread has died (an uncaught error or an exit): every call fails with it. */
  dead: ServeError | null = null;
  /** Set by close(): the exit that follows is not a death to report. */
  closing = false;
  /** Sequences assigned here (prefilling or running). */
  load = 0;
  memory: DeviceMemory = { numTensors: 0, numBytes: 0 };
  /** The worker's step profile as of its last answer (with --profile). */
  profile: ProfileTotals = {};

  /**
   * `onDeath` is told once, with the thread's error or exit code, when the thread dies; `onTensor` of each tensor
   * the worker reads while it loads the model.
   */
  constructor(readonly worker: Worker, readonly index: number, onDeath: (cause: string) => void, onTensor?: (elements: number) => void) {
    worker.on('message', (msg: WorkerReply | WorkerProgress) => {
      if ('tensorRead' in msg) return onTensor?.(msg.tensorRead);
      this.memory = msg.memory;
      if (msg.profile) this.profile = msg.profile;
      const p = this.pending.get(msg.id);
      if (!p) return;
      this.pending.delete(msg.id);
      if (msg.ok) {
        p.resolve(msg.result);
      } else {
        const code = msg.error.code && msg.error.code in ERRORS ? msg.error.code : 'GENERATION';
        p.reject(new ServeError(code, msg.error.message));
      }
    });
    const die = (cause: string) => {
      if (this.dead) return;
      // The message is for clients; the cause (an error message may name files) is for the log.
      this.dead = new ServeError('WORKER_DIED', `executor worker ${index} died; the server needs a restart`, undefined, { cause });
      for (const p of this.pending.values()) p.reject(this.dead);
      this.pending.clear();
      if (!this.closing) onDeath(cause);
    };
    // An uncaught error in the thread is followed by its exit: the first says why.
    worker.on('error', (err) => die(`uncaught error: ${err.message}`));
    worker.on('exit', (code) => die(`exited with code ${code}`));
  }

  call<O extends WorkerOp>(req: RequestOf<O>): Promise<WorkerResults[O]> {
    if (this.dead) return Promise.reject(this.dead);
    const id = this.next++;
    return new Promise<WorkerResults[O]>((resolve, reject) => {
      // The reply to this id answers this request's op (the worker echoes ids), so its result has this op's type.
      this.pending.set(id, { resolve: resolve as (v: WorkerResults[WorkerOp]) => void, reject });
      this.worker.postMessage({ ...req, id });
    });
  }
}

export interface ParallelExecutorOptions {
  readonly workers: number;
  readonly modelDir: string;
  readonly backend: BackendName;
  /** Time the phases of each step in the workers (src/obs/profile.ts). */
  readonly profile?: boolean;
  /** On wasm, matmuls in the native addon when it is available (default true). */
  readonly nativeMatmul?: boolean;
  /** Heap bytes each worker touches at start on wasm (TfExecutor.warmUp; default 0). */
  readonly warmHeapBytes?: number;
  /**
   * Receives the failures of work nobody awaits: a release or an adapter offload that failed on a worker. Such a
   * failure leaves that worker holding memory it should have freed (and a sequence whose release failed makes its
   * next step there fail, which fails the sequences of that step as any executor failure does); it is not turned
   * into a failure of unrelated requests. The runtime logs it.
   */
  readonly onError: (err: Error, context: string) => void;
  /**
   * Told once per worker thread that dies after start (its index, and its error or exit code). The executor
   * does not restart it: broken() reports it and /health answers 503, so that the orchestrator restarts the
   * process. The runtime logs it.
   */
  readonly onWorkerDeath?: (index: number, cause: string) => void;
  /** Start-up progress: each tensor a worker reads (its element count), and each worker that has loaded the model. */
  readonly onTensor?: (elements: number) => void;
  readonly onWorkerStarted?: () => void;
}

export class ParallelExecutor implements Executor {
  /** Workers run wasm or cpu, where rows are always answered with logits. */
  readonly answersOnDevice = false;
  private readonly owner = new Map<number, WorkerClient>();
  private runningSeqs = new Set<number>();

  private constructor(private readonly clients: WorkerClient[], private readonly onError: ParallelExecutorOptions['onError'],
    readonly vocabSize: number, readonly modelBytes: number, readonly backend: string,
    readonly nativeMatmul: boolean, readonly nativeMatmulNote?: string) {}

  static async start(opts: ParallelExecutorOptions): Promise<ParallelExecutor> {
    const clients: WorkerClient[] = [];
    try {
      let started = false;
      for (let i = 0; i < opts.workers; i++) {
        // worker-entry.mjs registers the TypeScript loader in the worker, then loads worker.ts.
        const worker = new Worker(new URL('./worker-entry.mjs', import.meta.url));
        // A death during start fails start() (its init call rejects); after, it is the caller's to hear.
        clients.push(new WorkerClient(worker, i, (cause) => started && opts.onWorkerDeath?.(i, cause), opts.onTensor));
      }
      const init: WorkerInit = {
        modelDir: opts.modelDir, backend: opts.backend, profile: opts.profile ?? false, nativeMatmul: opts.nativeMatmul ?? true,
        warmHeapBytes: opts.warmHeapBytes ?? 0,
      };
      const infos = await Promise.all(clients.map(async (c) => {
        const info = await c.call({ op: 'init', init });
        opts.onWorkerStarted?.();
        return info;
      }));
      started = true;
      const i = infos[0]!;
      return new ParallelExecutor(clients, opts.onError, i.vocabSize, i.bytes, i.backend, infos.every((x) => x.nativeMatmul), i.nativeMatmulNote);
    } catch (err) {
      await Promise.all(clients.map((c) => c.worker.terminate()));
      // A worker that died while loading: say how (start-up failures are logged, not answered).
      throw isServeError(err) && err.code === 'WORKER_DIED' ? new Error(`${err.message} while loading the model (${String(err.cause)})`) : err;
    }
  }

  get running(): number {
    return this.runningSeqs.size;
  }

  /** The worker threads that are alive. */
  private get live(): WorkerClient[] {
    return this.clients.filter((c) => !c.dead);
  }

  /** The first worker death (WORKER_DIED), or null while every worker is alive. */
  broken(): ServeError | null {
    return this.clients.find((c) => c.dead)?.dead ?? null;
  }

  /**
   * Test seam: stops worker `index` as a crash would (its requests in flight fail, its 'exit' event reports it),
   * without the dispose a close() sends first.
   */
  async terminateWorker(index: number): Promise<void> {
    await this.clients[index]!.worker.terminate();
  }

  /** Device memory summed over the live workers; workers answer in order, so this follows every operation posted before. */
  async deviceMemory(): Promise<DeviceMemory> {
    const live = this.live;
    await Promise.all(live.map((c) => c.call({ op: 'memory' })));
    return live.reduce((m, c) => ({ numTensors: m.numTensors + c.memory.numTensors, numBytes: m.numBytes + c.memory.numBytes }), { numTensors: 0, numBytes: 0 });
  }

  /** The workers' step profiles, summed, as of their last answers. */
  profile(): ProfileTotals {
    return addTotals(...this.clients.map((c) => c.profile));
  }

  /** The worker of a sequence; a new sequence goes to the least loaded live worker. */
  private assign(seq: number): WorkerClient {
    let c = this.owner.get(seq);
    if (!c) {
      const live = this.live;
      if (live.length === 0) throw this.broken()!;
      c = live.reduce((best, x) => (x.load < best.load ? x : best));
      c.load++;
      this.owner.set(seq, c);
    }
    return c;
  }

  /** Runs each worker's share of the items at the same time (`call` posts one share) and merges the answers. */
  private async fanOut<T extends { seq: number; adapter: ExecAdapter | null }>(items: readonly T[], call: (c: WorkerClient, share: T[]) => Promise<WorkerStep>): Promise<StepResult> {
    const groups = new Map<WorkerClient, T[]>();
    for (const item of items) {
      const c = this.assign(item.seq);
      let g = groups.get(c);
      if (!g) groups.set(c, (g = []));
      // Only the adapter's identity crosses to the worker (the handle may be a larger object).
      g.push({ ...item, adapter: item.adapter && { id: item.adapter.id, key: item.adapter.key } });
    }
    const answers = await profiler.timeAsync('executor_wait', () => Promise.all([...groups].map(([c, g]) => call(c, g))));
    const logits = new Map<number, Float32Array>();
    const picked = new Map<number, PickedToken>();
    const shortlists = new Map<number, Shortlist>();
    const passes: StepPass[] = [];
    for (const r of answers) {
      for (const [seq, l] of r.logits) logits.set(seq, l);
      for (const [seq, p] of r.picked) picked.set(seq, p);
      for (const [seq, s] of r.shortlists) shortlists.set(seq, s);
      passes.push(...r.passes);
    }
    return { logits, picked, shortlists, passes };
  }

  /** Every worker gets the same LoRA plan with its share of the items. */
  async prefill(items: readonly PrefillItem[], lora: LoraPlan): Promise<StepResult> {
    const r = await this.fanOut(items, (c, share) => c.call({ op: 'prefill', items: share, lora }));
    for (const i of items) if (i.last) this.runningSeqs.add(i.seq);
    return r;
  }

  decode(items: readonly DecodeItem[], lora: LoraPlan): Promise<StepResult> {
    if (items.length !== this.runningSeqs.size || items.some((i) => !this.runningSeqs.has(i.seq))) {
      throw new Error(`decode: expected one item for each of the ${this.runningSeqs.size} running sequences`);
    }
    return this.fanOut(items, (c, share) => c.call({ op: 'decode', items: share, lora }));
  }

  release(seq: number): void {
    const c = this.owner.get(seq);
    if (!c) return;
    this.owner.delete(seq);
    this.runningSeqs.delete(seq);
    c.load--;
    if (c.dead) return; // its memory went with it
    // Messages are handled in order, so the release lands before any later step on that worker.
    c.call({ op: 'release', seq }).catch((err: Error) => this.onError(err, `releasing sequence ${seq}`));
  }

  /** The copies live on the worker of `seq`. Messages are handled in order: the fork lands before the next step. */
  fork(seq: number, into: readonly number[]): void {
    const c = this.owner.get(seq);
    if (!c || !this.runningSeqs.has(seq)) throw new Error(`fork: sequence ${seq} is not running`);
    for (const s of into) {
      this.owner.set(s, c);
      this.runningSeqs.add(s);
      c.load++;
    }
    // A failure here surfaces as the worker's: its next decode, which expects these rows, fails.
    c.call({ op: 'fork', seq, into }).catch((err: Error) => this.onError(err, `forking sequence ${seq}`));
  }

  /** A wasm worker has copied the weights into its heap when it answers (TfExecutor.copiesOnUpload). */
  get copiesOnUpload(): boolean {
    return this.backend === 'wasm';
  }

  /**
   * Uploads to every live worker. Every worker answers before this settles (so the host arrays are no longer
   * read); one that failed leaves nothing behind on the others.
   */
  async loadAdapter(weights: AdapterWeights, key: string): Promise<ResidentAdapter> {
    const answers = await Promise.allSettled(this.live.map((c) => c.call({ op: 'loadAdapter', weights, key })));
    const failed = answers.find((a): a is PromiseRejectedResult => a.status === 'rejected');
    if (failed) {
      this.offloadAdapter({ id: weights.id, key });
      throw failed.reason;
    }
    return { id: weights.id, key, rank: weights.rank, bytes: weights.bytes };
  }

  offloadAdapter(adapter: ExecAdapter): void {
    const a = { id: adapter.id, key: adapter.key };
    for (const c of this.live) {
      c.call({ op: 'offloadAdapter', adapter: a }).catch((err: Error) => this.onError(err, `offloading adapter ${a.id} (upload ${a.key})`));
    }
  }

  /** Frees the workers' device memory and stops them. */
  async close(): Promise<void> {
    await Promise.all(this.clients.map(async (c) => {
      if (!c.dead) await c.call({ op: 'dispose' }).catch((err: Error) => this.onError(err, 'closing a worker'));
      c.closing = true;
      await c.worker.terminate();
    }));
  }
}
