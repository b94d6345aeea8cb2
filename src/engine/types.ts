/** The engine's public contract with the HTTP layer: plain data, no tensors. */
import type { ServeError } from '../errors.ts';
import type { MergeSpec } from '../lora/types.ts';
import type { StepPass } from './executor.ts';
import type { TokenConstraint } from './constraint/tokens.ts';
import type { SamplingParams } from './sampling.ts';

export interface GenerateRequest {
  /** Prompt token ids (the HTTP layer tokenises). */
  readonly inputIds: readonly number[];
  /** null: the base model. Unknown ids fail with ADAPTER_NOT_FOUND, never fall back to the base. */
  readonly adapterId: string | null;
  /** Run on the adapter merged from these sources (LoRAX merged_adapters, each from adapterSource); adapterId is then `mergeId(merge)`. */
  readonly merge?: MergeSpec;
  /** Where the adapter comes from (LoRAX's adapter_source and api_token); absent: the server's --adapter-source. */
  readonly adapterSource?: AdapterSource;
  readonly sampling: SamplingParams;
  /**
   * Structured output (TGI `grammar`, OpenAI `response_format`): each step samples only among the ids the grammar
   * allows, and EOS only once the text is a full match. Shared between requests; the engine holds each one's state.
   */
  readonly constraint?: TokenConstraint;
  readonly maxNewTokens: number;
  /** How the client's API names inputIds and maxNewTokens, for the length errors (default TGI's). */
  readonly fields?: LengthFields;
  readonly stop: readonly string[];
  /** Keep a matched stop sequence in the text (TGI, the default) or cut it (OpenAI). */
  readonly includeStop?: boolean;
  /** Frequency/presence penalties count generated tokens only (OpenAI) instead of the whole history (TGI). */
  readonly penalizeGeneratedOnly?: boolean;
  /**
   * Compute prompt logprobs (TGI decoder_input_details, OpenAI echo with logprobs): result.prefill, with each
   * prompt token's `sampling.topNTokens` alternatives when that is above 0.
   */
  readonly decoderInputDetails: boolean;
  /**
   * Requests given the same object (several choices of one prompt) share one prefill: the first to be queued
   * prefills, the others wait for it, then copy its KV cache (StepExecutor.fork) and sample their first token
   * from its last logits. One that cannot (a different prompt or adapter, no room in the batch then, or queued
   * after that moment) prefills on its own.
   */
  readonly prefixGroup?: object;
  /** Ignore eos and always generate maxNewTokens (benchmarks). */
  readonly ignoreEos?: boolean;
  /** Aborting cancels the request and frees its KV cache and adapter pin. */
  readonly signal?: AbortSignal;
  /** Per-request deadline (ms from submission); TIMEOUT when exceeded. */
  readonly timeoutMs?: number;
}

/** `local`: the adapter folder, then --adapter-source-url; `hub`: the Hugging Face Hub. */
export const ADAPTER_SOURCE_KINDS = ['local', 'hub'] as const;
export type AdapterSourceKind = (typeof ADAPTER_SOURCE_KINDS)[number];

/** A request's adapter source: the kind (absent: the server's default) and the Hub token to fetch it with. */
export interface AdapterSource {
  readonly kind?: AdapterSourceKind;
  readonly token?: string;
}

/** Names of the length fields in error messages, e.g. TGI's `inputs` and `max_new_tokens`. */
export interface LengthFields {
  readonly input: string;
  readonly maxNewTokens: string;
}

/** The lengths every request must fit: the prompt alone, and the prompt with everything it may generate. */
export interface LengthLimits {
  readonly maxInputLength: number;
  readonly maxTotalTokens: number;
}

export interface TopToken {
  readonly id: number;
  readonly text: string;
  readonly logprob: number;
  readonly special: boolean;
}

export interface TokenInfo extends TopToken {
  /** The top_n_tokens alternatives, best first (only when asked for). */
  readonly top?: readonly TopToken[];
}

/** A prompt token with its logprob given the tokens before it: log_softmax of the raw logits (no penalties, no temperature). */
export interface PrefillToken {
  readonly id: number;
  readonly text: string;
  /** null for the first prompt token (nothing predicts it). */
  readonly logprob: number | null;
  /** The `sampling.topNTokens` most likely tokens at its position, best first (absent for the first token and when none are asked for). */
  readonly top?: readonly TopToken[];
}

export type FinishReason = 'length' | 'eos_token' | 'stop_sequence';

export interface GenerationResult {
  /** Generated text: special tokens skipped; with a stop sequence, up to and including it (TGI). */
  readonly text: string;
  readonly finishReason: FinishReason;
  readonly promptTokens: number;
  /** Includes the eos token that ended the sequence. */
  readonly generatedTokens: number;
  /** The seed used when sampling, else null. */
  readonly seed: number | null;
  /** Prompt tokens with the logprob of each given the ones before (first: null); empty unless asked for. */
  readonly prefill: readonly PrefillToken[];
  readonly tokens: readonly TokenInfo[];
  readonly adapterId: string | null;
  /** Seconds from submission to the first scheduled step. */
  readonly queueTimeS: number;
  /** Seconds from the first scheduled step to the end. */
  readonly inferenceTimeS: number;
  /** Seconds from submission to the first generated token. */
  readonly timeToFirstTokenS: number;
}

/** Receives one request's events, in order: at most one onPrefill, any number of onToken, then exactly one onDone or onError. */
export interface GenerationSink {
  /** With decoderInputDetails: the prompt's logprobs (result.prefill), once it is prefilled, before the first token. */
  onPrefill?(prefill: readonly PrefillToken[]): void;
  /** `text` is the newly stable text (UTF-8 complete, stop sequences applied): concatenated it is result.text. */
  onToken(token: TokenInfo, text: string): void;
  onDone(result: GenerationResult): void;
  onError(err: ServeError): void;
}

export interface EngineStats {
  readonly running: number;
  readonly waiting: number;
  /** Waiting for their adapter to load. */
  readonly waitingForAdapter: number;
}

/**
 * What a load balancer or the Gateway API Inference Extension's endpoint picker reads about a replica
 * (docs/metrics.md, "Scale-out gauges"), sampled at scrape time.
 */
export interface EngineLoad {
  /** Tokens whose keys and values the prefilling and running sequences hold in the KV cache. */
  readonly kvTokens: number;
  /** The most KV tokens the engine ever holds: --max-batch-size sequences of at most maxTotalTokens each. */
  readonly kvCapacityTokens: number;
  /** Distinct adapter ids of prefilling or decoding requests, sorted. */
  readonly runningAdapters: readonly string[];
  /** Distinct adapter ids of requests queued or waiting for their adapter to load, sorted. */
  readonly waitingAdapters: readonly string[];
}

export interface EngineApi {
  /** Validates limits at once (throws a ServeError synchronously: INPUT_TOO_LONG, OVERLOADED, SHUTTING_DOWN...). */
  generate(req: GenerateRequest, sink: GenerationSink): void;
  stats(): EngineStats;
  /** Stops accepting, lets in-flight requests finish within graceMs, then cancels the rest. */
  drain(graceMs: number): Promise<void>;
}

/** What the engine reports to metrics (implemented in src/obs/metrics.ts). */
export interface EngineMetrics {
  /** One engine step (one executor call): its duration and each of its forward passes (StepResult.passes). */
  step(e: { kind: 'prefill' | 'decode'; seconds: number; passes: readonly StepPass[] }): void;
  requestQueued(seconds: number): void;
  firstToken(seconds: number): void;
  interToken(seconds: number): void;
  requestFinished(e: { promptTokens: number; generatedTokens: number; seconds: number; outcome: FinishReason | 'cancelled' | 'timeout' | 'error' }): void;
  /** Requests prefilling or decoding, and requests waiting: queued or waiting for their adapter to load. */
  queueDepth(running: number, waiting: number): void;
}
