/**
 * The messages between a ParallelExecutor (main thread) and its executor workers (worker.ts). Every request carries
 * an id; the worker handles requests one after another, in arrival order, and answers each with the same id.
 */
import type { BackendName } from '../backend/select.ts';
import type { DecodeItem, DeviceMemory, ExecAdapter, LoraPlan, PickedToken, PrefillItem, Shortlist, StepPass } from '../engine/executor.ts';
import type { ErrorCode } from '../errors.ts';
import type { AdapterWeights } from '../lora/adapter-file.ts';
import type { ProfileTotals } from '../obs/profile.ts';

export interface WorkerInit {
  readonly modelDir: string;
  readonly backend: BackendName;
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

/**
 * A step's answer: logits per sequence (each its own transferred buffer), tokens picked on the device and shortlists
 * per sequence (StepResult.picked, StepResult.shortlists; none on the backends workers run today) and the worker's
 * forward passes.
 */
export interface WorkerStep {
  readonly logits: [number, Float32Array][];
  readonly picked: [number, PickedToken][];
  readonly shortlists: [number, Shortlist][];
  readonly passes: readonly StepPass[];
}

/** What the main thread asks, by operation. */
export type WorkerRequest =
  | { readonly op: 'init'; readonly init: WorkerInit }
  | { readonly op: 'prefill'; readonly items: readonly PrefillItem[]; readonly lora: LoraPlan }
  | { readonly op: 'decode'; readonly items: readonly DecodeItem[]; readonly lora: LoraPlan }
  | { readonly op: 'release'; readonly seq: number }
  | { readonly op: 'fork'; readonly seq: number; readonly into: readonly number[] }
  | { readonly op: 'loadAdapter'; readonly weights: AdapterWeights; readonly key: string }
  | { readonly op: 'offloadAdapter'; readonly adapter: ExecAdapter }
  /** Nothing to do: the answer carries the memory after every earlier request. */
  | { readonly op: 'memory' }
  | { readonly op: 'dispose' };

export type WorkerOp = WorkerRequest['op'];

/** The answer's value for each operation. */
export interface WorkerResults {
  readonly init: WorkerInfo;
  readonly prefill: WorkerStep;
  readonly decode: WorkerStep;
  readonly release: null;
  readonly fork: null;
  readonly loadAdapter: null;
  readonly offloadAdapter: null;
  readonly memory: null;
  readonly dispose: null;
}

/** The request of one operation, without its id. */
export type RequestOf<O extends WorkerOp> = Extract<WorkerRequest, { op: O }>;

export type WorkerMessage = WorkerRequest & { readonly id: number };

/** Every answer carries the device memory after the operation (for metrics and /info), and the step profile when profiling. */
interface ReplyBase {
  readonly id: number;
  readonly memory: DeviceMemory;
  readonly profile?: ProfileTotals;
}

/** Sent by the worker while init reads the weights, once per tensor read (its element count): start-up progress. */
export interface WorkerProgress {
  readonly tensorRead: number;
}

export type WorkerReply =
  | (ReplyBase & { readonly ok: true; readonly result: WorkerResults[WorkerOp] })
  | (ReplyBase & { readonly ok: false; readonly error: { readonly message: string; readonly code?: ErrorCode } });
