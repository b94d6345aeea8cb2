/** Shared, tensor-free types of the model layer. */
import type { RopeSpec } from './rope.ts';

export type Family = 'gpt2' | 'llama';

/** One typed view of an HF config.json (see normalizeConfig in config.ts). */
export interface ModelConfig {
  readonly family: Family;
  /** model_type as written in config.json ("gpt2", "llama", "mistral", "qwen2", ...). */
  readonly modelType: string;
  readonly vocabSize: number;
  readonly hiddenSize: number;
  readonly numLayers: number;
  /**
   * Each layer's sliding attention window W, or null for global attention (one entry per layer). In a layer with
   * a window, the query at position i sees the keys at positions j with i − W < j ≤ i (src/exec/kv.ts, mask()).
   */
  readonly layerWindows: readonly (number | null)[];
  readonly numHeads: number;
  readonly numKvHeads: number;
  readonly headDim: number;
  readonly intermediateSize: number;
  /** Longest sequence the position scheme supports (n_positions / max_position_embeddings). */
  readonly maxPositions: number;
  readonly normEps: number;
  /** Llama only. */
  readonly ropeTheta: number;
  /** Llama family: the rotary embedding (rope_scaling variant, frequencies, cos/sin factor); null for GPT-2. */
  readonly rope: RopeSpec | null;
  readonly tieWordEmbeddings: boolean;
  /** Llama family: q/k/v projections carry a bias (Qwen2). */
  readonly attentionBias: boolean;
  /** Llama family: o_proj and MLP carry biases (rare; attention_bias in Llama covers o_proj too). */
  readonly outputBias: boolean;
  readonly mlpBias: boolean;
  readonly activation: 'gelu_new' | 'gelu' | 'relu' | 'silu';
  readonly bosTokenId: number | null;
  readonly eosTokenIds: readonly number[];
  /** What the server changed to serve this config exactly (e.g. a served context shorter than the checkpoint's), for the start-up log. */
  readonly notes: readonly string[];
}

/** A float32 tensor on the host: row-major data with its shape. */
export interface HostTensor {
  readonly shape: readonly number[];
  readonly data: Float32Array;
}

/**
 * A linear module that LoRA can target. `path` is the module path as PEFT names it after the
 * model class (e.g. `transformer.h.0.attn.c_attn`, `model.layers.0.self_attn.q_proj`), `key` is
 * the executor's canonical key (e.g. `0.c_attn`, `0.q_proj`), `inFeatures`/`outFeatures` are the
 * dimensions of y = x·W (x: [.., in], y: [.., out]). `conv1d` is true for GPT-2's Conv1D modules
 * (weights stored [in, out]; PEFT's fan_in_fan_out).
 */
export interface LinearModule {
  readonly path: string;
  readonly key: string;
  readonly layer: number;
  /** Short name: the last path component (q_proj, c_attn, c_proj, ...). */
  readonly name: string;
  readonly inFeatures: number;
  readonly outFeatures: number;
  readonly conv1d: boolean;
}
