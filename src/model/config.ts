/** normalizeConfig(): one typed ModelConfig from a Hugging Face config.json (+ generation_config.json). */
import { fail } from '../errors.ts';
import { flag, int, num, type Json } from './config-fields.ts';
import { ropeSpec } from './rope.ts';
import type { Family, ModelConfig } from './types.ts';

/** model_type → family. Llama-family covers Mistral and Qwen2 (q/k/v biases); the Gemma family covers Gemma 2. */
const FAMILIES: Record<string, Family> = {
  gpt2: 'gpt2',
  llama: 'llama',
  mistral: 'llama',
  qwen2: 'llama',
  phi3: 'phi3',
  gemma: 'gemma',
  gemma2: 'gemma',
};

export const SUPPORTED_MODEL_TYPES = Object.keys(FAMILIES);

/**
 * The attention window of each layer (null: global attention), as transformers reads them:
 * - Mistral (configuration_mistral.py): every layer slides by `sliding_window`; the key absent means the class
 *   default 4096, null means no window.
 * - Phi-3 (configuration_phi3.py, modeling_phi3.py): every layer slides by `sliding_window` (default none), as
 *   Mistral's model: the attention and the mask both take `config.sliding_window`.
 * - Qwen2 (configuration_qwen2.py): `sliding_window` (absent: 4096) applies only with `use_sliding_window`;
 *   `layer_types` names each layer's attention, and without it layers from `max_window_layers` (default 28) on
 *   slide.
 * - Gemma 2 (configuration_gemma2.py): `sliding_window` (absent: 4096) on the layers `layer_types` names
 *   "sliding_attention"; without it the even layers (0, 2, ...) slide.
 * - Llama, Gemma and GPT-2: no window.
 * A "sliding_attention" layer without a window is refused, as transformers' mask builder raises for it.
 */
function layerWindows(cfg: Json, modelType: string, numLayers: number): (number | null)[] {
  const window = (): number | null => ('sliding_window' in cfg && cfg.sliding_window === null ? null : int(cfg, 'sliding_window', 4096));
  const every = (w: number | null) => new Array<number | null>(numLayers).fill(w);
  if (modelType === 'mistral') return every(window());
  if (modelType === 'phi3') return every(cfg.sliding_window == null ? null : int(cfg, 'sliding_window'));
  if (modelType !== 'qwen2' && modelType !== 'gemma2') return every(null);
  const w = modelType === 'gemma2' || flag(cfg, 'use_sliding_window') ? window() : null;
  const slidesByDefault = (l: number): boolean => (modelType === 'gemma2' ? l % 2 === 0 : w !== null && l >= firstWindowLayer(cfg));
  const types = cfg.layer_types == null
    ? Array.from({ length: numLayers }, (_, l) => (slidesByDefault(l) ? 'sliding_attention' : 'full_attention'))
    : layerTypes(cfg.layer_types, numLayers);
  return types.map((t, l) => {
    if (t === 'full_attention') return null;
    if (w === null) {
      const why = modelType === 'qwen2' ? '"use_sliding_window" is false or "sliding_window" null' : '"sliding_window" is null';
      throw fail('CONFIG_INVALID', `config.json: layer ${l} is a "sliding_attention" layer (per "layer_types" or its default) but no window applies (${why})`);
    }
    return w;
  });
}

function layerTypes(v: unknown, numLayers: number): string[] {
  if (!Array.isArray(v) || v.length !== numLayers || v.some((t) => typeof t !== 'string')) {
    throw fail('CONFIG_INVALID', `config.json: "layer_types" must be a list of ${numLayers} strings, one per layer (got ${JSON.stringify(v)})`);
  }
  const other = v.find((t) => t !== 'full_attention' && t !== 'sliding_attention');
  if (other !== undefined) {
    throw fail('CONFIG_UNSUPPORTED', `config.json: "layer_types" entry ${JSON.stringify(other)} is not supported (full_attention, sliding_attention)`);
  }
  return v as string[];
}

function firstWindowLayer(cfg: Json): number {
  const v = cfg.max_window_layers ?? 28;
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0) {
    throw fail('CONFIG_INVALID', `config.json: "max_window_layers" must be a non-negative integer (got ${JSON.stringify(v)})`);
  }
  return v;
}

function tokenIds(v: unknown): number[] {
  if (typeof v === 'number' && Number.isInteger(v) && v >= 0) return [v];
  if (Array.isArray(v)) return v.filter((x): x is number => typeof x === 'number' && Number.isInteger(x) && x >= 0);
  return [];
}

export function normalizeConfig(raw: unknown, generation: unknown = {}): ModelConfig {
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) {
    throw fail('CONFIG_INVALID', 'config.json must be a JSON object');
  }
  const cfg = raw as Json;
  const gen = (typeof generation === 'object' && generation !== null ? generation : {}) as Json;
  const modelType = cfg.model_type;
  if (typeof modelType !== 'string') throw fail('CONFIG_INVALID', 'config.json: "model_type" is missing');
  const family = FAMILIES[modelType];
  if (!family) {
    throw fail('MODEL_TYPE_UNSUPPORTED',
      `model_type "${modelType}" is not supported (supported: ${SUPPORTED_MODEL_TYPES.join(', ')})`);
  }
  if (cfg.quantization_config != null) {
    throw fail('CONFIG_UNSUPPORTED', 'config.json: "quantization_config" is set: quantized checkpoints are not supported (float32, float16 and bfloat16 weights are)');
  }
  const eos = [...new Set([...tokenIds(gen.eos_token_id), ...tokenIds(cfg.eos_token_id)])];
  const bos = tokenIds(gen.bos_token_id ?? cfg.bos_token_id)[0] ?? null;

  if (family === 'gpt2') {
    const hidden = int(cfg, 'n_embd');
    const heads = int(cfg, 'n_head');
    const layers = int(cfg, 'n_layer');
    if (hidden % heads !== 0) throw fail('CONFIG_INVALID', `config.json: n_embd ${hidden} is not divisible by n_head ${heads}`);
    const act = (cfg.activation_function ?? 'gelu_new') as string;
    if (act !== 'gelu_new' && act !== 'gelu' && act !== 'relu') {
      throw fail('CONFIG_UNSUPPORTED', `config.json: "activation_function" ${JSON.stringify(act)} is not supported (gelu_new, gelu, relu)`);
    }
    if (cfg.scale_attn_weights === false) throw fail('CONFIG_UNSUPPORTED', 'config.json: "scale_attn_weights" false is not supported (scores are divided by √head_dim)');
    if (flag(cfg, 'scale_attn_by_inverse_layer_idx')) throw fail('CONFIG_UNSUPPORTED', 'config.json: "scale_attn_by_inverse_layer_idx" true is not supported');
    if (cfg.tie_word_embeddings === false) throw fail('CONFIG_UNSUPPORTED', 'config.json: "tie_word_embeddings" false is not supported for gpt2 (the head is wte)');
    return Object.freeze({
      family, modelType,
      vocabSize: int(cfg, 'vocab_size'),
      hiddenSize: hidden,
      numLayers: layers,
      layerWindows: Object.freeze(new Array<number | null>(layers).fill(null)),
      numHeads: heads,
      numKvHeads: heads,
      headDim: hidden / heads,
      intermediateSize: cfg.n_inner == null ? 4 * hidden : int(cfg, 'n_inner'),
      maxPositions: int(cfg, 'n_positions', cfg.n_ctx as number | undefined),
      normEps: num(cfg, 'layer_norm_epsilon', 1e-5),
      ropeTheta: 0,
      rope: null,
      tieWordEmbeddings: true,
      attentionBias: true,
      outputBias: true,
      mlpBias: true,
      activation: act as ModelConfig['activation'],
      attentionScale: 1 / Math.sqrt(hidden / heads),
      attnLogitSoftcap: null,
      finalLogitSoftcap: null,
      sandwichNorms: false,
      bosTokenId: bos,
      eosTokenIds: eos,
      notes: [],
    });
  }

  const hidden = int(cfg, 'hidden_size');
  const heads = int(cfg, 'num_attention_heads');
  const kvHeads = int(cfg, 'num_key_value_heads', heads);
  if (heads % kvHeads !== 0) {
    throw fail('CONFIG_INVALID', `config.json: num_attention_heads ${heads} is not a multiple of num_key_value_heads ${kvHeads}`);
  }
  const headDim = headDimOf(cfg, family, hidden, heads);
  if (!Number.isInteger(headDim) || headDim % 2 !== 0) {
    throw fail('CONFIG_INVALID', `config.json: head dimension ${headDim} must be an even integer`);
  }
  const gemma = family === 'gemma';
  const gemma2 = modelType === 'gemma2';
  if (gemma) refuseGemmaFields(cfg);
  const numLayers = int(cfg, 'num_hidden_layers');
  const maxPositions = int(cfg, 'max_position_embeddings', DEFAULT_POSITIONS[family]);
  const theta = num(cfg, 'rope_theta', 10000);
  // Llama's attention_bias puts biases on q/k/v and o_proj (Gemma's too), mlp_bias on the MLP; Qwen2 always has
  // q/k/v biases and nothing else; Mistral and Phi-3 have none (their modules ignore both keys).
  const llama = modelType === 'llama';
  const attentionBias = (llama || gemma) && flag(cfg, 'attention_bias');
  return Object.freeze({
    family, modelType,
    vocabSize: int(cfg, 'vocab_size'),
    hiddenSize: hidden,
    numLayers,
    layerWindows: Object.freeze(layerWindows(cfg, modelType, numLayers)),
    numHeads: heads,
    numKvHeads: kvHeads,
    headDim,
    intermediateSize: int(cfg, 'intermediate_size'),
    maxPositions,
    normEps: num(cfg, 'rms_norm_eps', family === 'phi3' ? 1e-5 : 1e-6),
    ropeTheta: theta,
    rope: ropeSpec(family === 'phi3' ? phi3Rope(cfg) : cfg, theta, headDim, maxPositions),
    tieWordEmbeddings: flag(cfg, 'tie_word_embeddings', gemma),
    attentionBias: modelType === 'qwen2' || attentionBias,
    outputBias: attentionBias,
    mlpBias: llama && flag(cfg, 'mlp_bias'),
    activation: gemma ? gemmaActivation(cfg) : siluActivation(cfg),
    attentionScale: 1 / Math.sqrt(gemma2 ? num(cfg, 'query_pre_attn_scalar', 256) : headDim),
    attnLogitSoftcap: gemma2 ? softcap(cfg, 'attn_logit_softcapping', 50) : null,
    finalLogitSoftcap: gemma2 ? softcap(cfg, 'final_logit_softcapping', 30) : null,
    sandwichNorms: gemma2,
    bosTokenId: bos,
    eosTokenIds: eos,
    notes: [],
  });
}

/** transformers' max_position_embeddings default per family. */
const DEFAULT_POSITIONS: Record<Exclude<Family, 'gpt2'>, number> = { llama: 2048, phi3: 4096, gemma: 8192 };

/**
 * head_dim: Llama-family configs may set it (default hidden / heads); Gemma's defaults to 256, not hidden / heads;
 * Phi-3's is hidden / heads (transformers 4.x ignores a head_dim key, later versions read it: one that differs is refused).
 */
function headDimOf(cfg: Json, family: Family, hidden: number, heads: number): number {
  if (family === 'gemma') return int(cfg, 'head_dim', 256);
  if (family === 'phi3') {
    if (cfg.head_dim != null && cfg.head_dim !== hidden / heads) {
      throw fail('CONFIG_UNSUPPORTED', `config.json: "head_dim" ${JSON.stringify(cfg.head_dim)} differs from hidden_size / num_attention_heads = ${hidden / heads} (transformers versions disagree on which Phi-3 uses)`);
    }
    return hidden / heads;
  }
  return cfg.head_dim == null ? hidden / heads : int(cfg, 'head_dim');
}

function siluActivation(cfg: Json): 'silu' {
  const act = cfg.hidden_act ?? 'silu';
  if (act !== 'silu' && act !== 'swish') throw fail('CONFIG_UNSUPPORTED', `config.json: "hidden_act" ${JSON.stringify(act)} is not supported (silu)`);
  return 'silu';
}

/**
 * Gemma's MLP activation: `hidden_activation` when set (transformers 4.38–4.47 read only it, a null meaning
 * gelu_pytorch_tanh; Gemma's configs set it to the tanh approximation the model was trained with), else `hidden_act`
 * (which later versions read), else gelu_pytorch_tanh.
 */
function gemmaActivation(cfg: Json): 'gelu_new' | 'gelu' {
  const key = cfg.hidden_activation != null ? 'hidden_activation' : 'hidden_act';
  const act = cfg[key] ?? 'gelu_pytorch_tanh';
  if (act === 'gelu_pytorch_tanh' || act === 'gelu_new') return 'gelu_new';
  if (act === 'gelu') return 'gelu';
  throw fail('CONFIG_UNSUPPORTED', `config.json: "${key}" ${JSON.stringify(act)} is not supported (gelu_pytorch_tanh, gelu_new, gelu)`);
}

/** A soft-capping constant: absent means transformers' default, null none. */
function softcap(cfg: Json, key: string, fallback: number): number | null {
  return key in cfg && cfg[key] == null ? null : num(cfg, key, fallback);
}

/**
 * Gemma fields with no implementation here: `rope_scaling` (transformers' Gemma ignored it before 4.45, later
 * versions apply it) and `use_bidirectional_attention` (EmbeddingGemma's encoder).
 */
function refuseGemmaFields(cfg: Json): void {
  if (cfg.rope_scaling != null) {
    throw fail('CONFIG_UNSUPPORTED', 'config.json: "rope_scaling" is not supported for Gemma (transformers versions disagree on whether Gemma applies it)');
  }
  if (flag(cfg, 'use_bidirectional_attention')) {
    throw fail('CONFIG_UNSUPPORTED', 'config.json: "use_bidirectional_attention" true is not supported (causal attention only)');
  }
}

/**
 * Phi-3's rotary settings as the shared rope code reads them: transformers' Phi3Config renames the legacy
 * rope_scaling types "su" and "yarn" to "longrope", accepts only default and longrope, and defaults
 * original_max_position_embeddings to 4096.
 */
function phi3Rope(cfg: Json): Json {
  const withOriginal = { ...cfg, original_max_position_embeddings: cfg.original_max_position_embeddings ?? 4096 };
  const rs = cfg.rope_scaling;
  if (rs == null || typeof rs !== 'object' || Array.isArray(rs)) return withOriginal;
  const given = (rs as Json).rope_type ?? (rs as Json).type;
  const type = given === 'su' || given === 'yarn' ? 'longrope' : given;
  if (type !== 'default' && type !== 'longrope') {
    throw fail('CONFIG_UNSUPPORTED', `config.json: "rope_scaling" type ${JSON.stringify(given ?? null)} is not supported for Phi-3 (default, longrope, or its legacy names su and yarn)`);
  }
  const { type: _legacy, ...rest } = rs as Json;
  return { ...withOriginal, rope_scaling: { ...rest, rope_type: type } };
}
