/**
 * The executor contract between the engine (queue, scheduling, sampling: no tensors) and the tensor code.
 * In the spirit of LoRAX's proto: prefill, decode, release. Adapters cross this boundary as opaque handles.
 */

/** An adapter resident on the device, as the engine sees it: opaque beyond its identity. */
export interface ExecAdapter {
  readonly id: string;
  /**
   * Names this upload of the adapter on the device: unique for the life of the process (two ids with the same
   * content, or one id loaded again after an eviction, get different keys). Not the content version.
   */
  readonly key: string;
}

export interface PrefillItem {
  readonly seq: number;
  /** This chunk's prompt tokens. */
  readonly tokens: readonly number[];
  /** Position of tokens[0] (0 for the first chunk). */
  readonly start: number;
  /** Final chunk: the sequence joins the decode batch and its next-token logits are returned. */
  readonly last: boolean;
  readonly adapter: ExecAdapter | null;
  /** Return logits for every token of the chunk (prompt logprobs), not only the last. */
  readonly allLogits: boolean;
}

export interface DecodeItem {
  readonly seq: number;
  readonly token: number;
  readonly position: number;
  readonly adapter: ExecAdapter | null;
}

export type LoraApplied = 'none' | 'merged' | 'unmerged';

export interface StepResult {
  /** Per sequence: logits rows, row-major [rows, vocab]. */
  readonly logits: ReadonlyMap<number, Float32Array>;
  /** How LoRA was applied in each forward pass of the call (a worker's share of a step is one pass). */
  readonly modes: readonly LoraApplied[];
  /** Distinct adapters per forward pass. */
  readonly adapters: readonly number[];
  /** Sequences per forward pass. */
  readonly rows: readonly number[];
}

export interface Executor {
  readonly vocabSize: number;
  /** Sequences in the decode batch. */
  readonly running: number;
  prefill(items: readonly PrefillItem[]): Promise<StepResult>;
  /** One token for every sequence in the decode batch (all of them, any order). */
  decode(items: readonly DecodeItem[]): Promise<StepResult>;
  /** Frees a sequence's KV cache (running or mid-prefill). Idempotent. */
  release(seq: number): void;
}
