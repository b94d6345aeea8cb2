/**
 * The executor contract between the engine (queue, scheduling, sampling: no tensors) and the tensor code.
 * In the spirit of LoRAX's proto: prefill, decode, release, load and offload adapters. Adapters cross this
 * boundary as opaque handles; how LoRA is applied in each call is decided by the scheduler (LoraPlan) and obeyed
 * here, so every worker of a step applies it the same way.
 */
import type { ServeError } from '../errors.ts';
import type { AdapterWeights } from '../lora/adapter-file.ts';
import type { ProfileTotals } from '../obs/profile.ts';

/** An adapter resident on the device, as the engine sees it: opaque beyond its identity. */
export interface ExecAdapter {
  readonly id: string;
  /**
   * Names this upload of the adapter on the device: unique for the life of the process (two ids with the same
   * content, or one id loaded again after an eviction, get different keys). Not the content version.
   */
  readonly key: string;
}

/** An adapter on the device(s), as the adapter manager sees it. */
export interface ResidentAdapter extends ExecAdapter {
  readonly rank: number;
  /** Device bytes of one copy of its weights. */
  readonly bytes: number;
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
  /** The next token may be picked on the device (see DecodeItem.pick); only for a last chunk without allLogits. */
  readonly pick?: boolean;
  /** The next token is sampled from a shortlist (see DecodeItem.shortlist); only for a last chunk without allLogits. */
  readonly shortlist?: ShortlistRequest;
  /** See DecodeItem.edits. */
  readonly edits?: LogitEdits;
}

export interface DecodeItem {
  readonly seq: number;
  readonly token: number;
  readonly position: number;
  readonly adapter: ExecAdapter | null;
  /**
   * The next token may be picked on the device: the engine would take the greedy choice of the row's logits after
   * `edits` (no constraint mask, temperature or top-n alternatives; sampling.ts `pickableOnDevice`). The executor then
   * may return a PickedToken for the sequence instead of its logits row.
   */
  readonly pick?: boolean;
  /**
   * The next token is sampled with top_k ≤ SHORTLIST_SIZE, or top_p alone or plain sampling (`fallback`), or taken
   * greedily with alternatives or a temperature, and nothing else reads the whole row but the normaliser and at most
   * SHORTLIST_SIZE top-n alternatives (sampling.ts `shortlistOnDevice`, `nucleusOnDevice`): the executor may return
   * the row's Shortlist at this temperature instead of its logits.
   */
  readonly shortlist?: ShortlistRequest;
  /**
   * The row's logit_bias and penalties as edits of its logits (Sampler.edits), for a row that is picked or shortlisted
   * on the device: the pick and the shortlist are made of the edited logits. Logits returned as such (StepResult.logits)
   * are never edited: the host applies the bias and penalties to them.
   */
  readonly edits?: LogitEdits;
}

/**
 * The host Sampler's steps 0–2 (logit_bias, then the repetition penalty, then the frequency and presence penalties) for
 * one row, as edits of the logits of distinct ids: logit = logit + bias; logit = logit > 0 ? logit / repetition :
 * logit · repetition (when repetition ≠ 1); logit = logit − minus. In float32 on the device (the host computes in
 * float64).
 */
export interface LogitEdits {
  readonly ids: Int32Array;
  readonly bias: Float32Array;
  readonly repetition: Float32Array;
  readonly minus: Float32Array;
}

/** What a row's shortlist is made at: the temperature of its normaliser. */
export interface ShortlistRequest {
  readonly temperature: number;
  /**
   * The shortlist may not decide the token (a nucleus reaching past it): the executor keeps the row's logits readable
   * until its next call, in StepResult.logits or through StepResult.readLogits.
   */
  readonly fallback?: boolean;
}

/** Candidates in a Shortlist: top_k sampling up to this many may use one (and top_p alone, with a fallback). */
export const SHORTLIST_SIZE = 64;

/**
 * A row's SHORTLIST_SIZE largest logits, best first (value descending, then id ascending; NaN counts as −∞, −0 as 0),
 * and `logNorm` = log Σ_v exp((logit_v − logits[0]) / temperature) over the whole row, in float32 (NaN when a logit is
 * +∞, −∞ when none is finite): enough for the host Sampler to draw a top_k ≤ SHORTLIST_SIZE token exactly as from the
 * whole row, and its logprob (logit − logits[0]) / temperature − logNorm to float32 rounding of logNorm (which is
 * between 0 and log vocab). `ids` is −1 (and `logits` −∞) past the vocabulary's end.
 */
export interface Shortlist {
  readonly ids: Int32Array;
  readonly logits: Float32Array;
  readonly logNorm: number;
}

/**
 * A next token picked on the device for a sequence that allowed it (`pick`): the lowest id among the largest of
 * the row's logits and its log-softmax over the row, NaN counting as −∞ (the host Sampler's greedy choice).
 * `id` is −1 when the row has no finite logit (every one −∞ or NaN) and −2 when it has a +∞ one; the engine fails
 * such a sequence as the Sampler would.
 */
export interface PickedToken {
  readonly id: number;
  readonly logprob: number;
}

/**
 * How one executor call applies LoRA (src/engine/scheduler.ts decides):
 * - none: no row uses an adapter;
 * - unmerged: each forward pass applies its rows' adapters per row (a bank of the pass's distinct adapters);
 * - merged: every adapter row uses the adapter uploaded under `key`, applied merged into the weights.
 * Rows without an adapter are allowed in any plan only where they do not contradict it (none: all of them;
 * merged: none of them).
 */
export type LoraPlan =
  | { readonly kind: 'none' }
  | { readonly kind: 'unmerged' }
  | { readonly kind: 'merged'; readonly key: string };

/** How LoRA was applied in one forward pass ('none' also when a pass had no adapter row under another plan). */
export type LoraApplied = 'none' | 'merged' | 'unmerged';

/** One forward pass of a call (a worker's share of a step is one pass; so is each chunk of a long prompt). */
export interface StepPass {
  /** Sequences in the pass. */
  readonly rows: number;
  /** Distinct adapters among them (0: base only). */
  readonly adapters: number;
  readonly mode: LoraApplied;
}

export interface StepResult {
  /** Per sequence that returns logits: its rows, row-major [rows, vocab]. */
  readonly logits: ReadonlyMap<number, Float32Array>;
  /**
   * Per sequence whose next token was picked on the device (only those whose item allowed it; an executor may
   * always return logits instead): the token, and no logits entry.
   */
  readonly picked?: ReadonlyMap<number, PickedToken>;
  /**
   * Per sequence whose item asked for a shortlist and got one (an executor may return logits instead): no logits entry,
   * except for a `fallback` shortlist, whose row the executor may return in `logits` as well.
   */
  readonly shortlists?: ReadonlyMap<number, Shortlist>;
  /**
   * Reads the logits rows of sequences given a `fallback` shortlist and no logits entry in this result: required when
   * there is such a sequence. Only before the executor's next call (prefill, decode, release, fork, adapter loads and
   * offloads), after which it may reject (TfExecutor's does after a decode, release, offload or dispose).
   */
  readonly readLogits?: (seqs: readonly number[]) => Promise<ReadonlyMap<number, Float32Array>>;
  /** The call's forward passes, in the order they ran. */
  readonly passes: readonly StepPass[];
}

export interface DeviceMemory {
  readonly numTensors: number;
  readonly numBytes: number;
}

/** The part of the contract the engine's step loop uses. */
export interface StepExecutor {
  readonly vocabSize: number;
  /** Sequences in the decode batch. */
  readonly running: number;
  /**
   * false: the executor always answers with logits, never with picks or shortlists (then the engine does not make
   * the rows' edits). Absent: it may answer on the device.
   */
  readonly answersOnDevice?: boolean;
  prefill(items: readonly PrefillItem[], lora: LoraPlan): Promise<StepResult>;
  /** One token for every sequence in the decode batch (all of them, any order). */
  decode(items: readonly DecodeItem[], lora: LoraPlan): Promise<StepResult>;
  /** Frees a sequence's KV cache (running or mid-prefill). Idempotent. */
  release(seq: number): void;
  /**
   * Copies a running sequence's KV cache to new sequences `into`, which join the decode batch at its position with
   * its adapter: choices of one prompt share its prefill. Only before `seq`'s first decode step (its cache then
   * holds the prompt alone).
   */
  fork(seq: number, into: readonly number[]): void;
}

/** The part of the contract the adapter manager uses. */
export interface AdapterExecutor {
  /**
   * Whether a load has copied the weights once its promise settles (wasm), so their host arrays may be reused;
   * false where device tensors may keep referencing them (the cpu backend's do).
   */
  readonly copiesOnUpload: boolean;
  /** Uploads the weights under `key` (ExecAdapter.key: the caller makes it unique); all or nothing. */
  loadAdapter(weights: AdapterWeights, key: string): Promise<ResidentAdapter>;
  /** Frees the adapter's device memory and everything derived from it (merged weights, banks). */
  offloadAdapter(adapter: ExecAdapter): void;
}

export interface Executor extends StepExecutor, AdapterExecutor {
  /**
   * Why the executor is broken and the process should be restarted (WORKER_DIED: an executor worker thread
   * died), or null while it is whole. /health answers 503 with it.
   */
  broken(): ServeError | null;
  /** TensorFlow.js memory of every copy of the model, after every operation posted before this call. */
  deviceMemory(): Promise<DeviceMemory>;
  /** Step phase totals recorded by the executor on threads other than the caller's (src/obs/profile.ts). */
  profile(): ProfileTotals;
  /** Frees everything it holds on the device (KV caches, adapters, the model) and stops its threads. */
  close(): Promise<void>;
}
