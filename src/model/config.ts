/** normalizeConfig(): one typed ModelConfig from a Hugging Face config.json (+ generation_config.json). */
import { fail } from '../errors.ts';
import { flag, int, num, type Json } from './config-fields.ts';
import { ropeSpec } from './rope.ts';
import type { Family, ModelConfig } from './types.ts';

/** model_type → family. Llama-family covers Mistral and Qwen2 (q/k/v biases). */
const FAMILIES: Record<string, Family> = {
  gpt2: 'gpt2',
  llama: 'llama',
  mistral: 'llama',
  qwen2: 'llama',
};

export const SUPPORTED_MODEL_TYPES = Object.keys(FAMILIES);

/**
 * The attention window of each layer (null: global attention), as transformers reads them:
 * - Mistral (configuration_mistral.py): every layer slides by `sliding_window`; the key absent means the class
 *   default 4096, null means no window.
 * - Qwen2 (configuration_qwen2.py): `sliding_window` (absent: 4096) applies only with `use_sliding_window`;
 *   `layer_types` names each layer's attention, and without it layers from `max_window_layers` (default 28) on
 *   slide. A "sliding_attention" layer without a window is refused, as transformers' mask builder raises for it.
 * - Llama and GPT-2: no window.
 */
function layerWindows(cfg: Json, modelType: string, numLayers: number): (number | null)[] {
  const window = (): number | null => ('sliding_window' in cfg && cfg.sliding_window === null ? null : int(cfg, 'sliding_window', 4096));
  if (modelType === 'mistral') return new Array<number | null>(numLayers).fill(window());
  if (modelType !== 'qwen2') return new Array<number | null>(numLayers).fill(null);
  const w = flag(cfg, 'use_sliding_window') ? window() : null;
  const types = cfg.layer_types == null
    ? Array.from({ length: numLayers }, (_, l) => (w !== null && l >= firstWindowLayer(cfg) ? 'sliding_attention' : 'full_attention'))
    : layerTypes(cfg.layer_types, numLayers);
  return types.map((t) => {
    if (t === 'full_attention') return null;
    if (w === null) {
      throw fail('CONFIG_INVALID', 'config.json: "layer_types" has a "sliding_attention" layer but no window applies ("use_sliding_window" is false or "sliding_window" null)');
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
  const headDim = cfg.head_dim == null ? hidden / heads : int(cfg, 'head_dim');
  if (!Number.isInteger(headDim) || headDim % 2 !== 0) {
    throw fail('CONFIG_INVALID', `config.json: head dimension ${headDim} must be an even integer`);
  }
  const act = cfg.hidden_act ?? 'silu';
  if (act !== 'silu' && act !== 'swish') throw fail('CONFIG_UNSUPPORTED', `config.json: "hidden_act" ${JSON.stringify(act)} is not supported (silu)`);
  const numLayers = int(cfg, 'num_hidden_layers');
  const maxPositions = int(cfg, 'max_position_embeddings', 2048);
  const theta = num(cfg, 'rope_theta', 10000);
  // Llama's attention_bias puts biases on q/k/v and o_proj, mlp_bias on the MLP; Qwen2 always has q/k/v biases
  // and nothing else; Mistral has none (its modules ignore both keys).
  const llama = modelType === 'llama';
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
    normEps: num(cfg, 'rms_norm_eps', 1e-6),
    ropeTheta: theta,
    rope: ropeSpec(cfg, theta, headDim, maxPositions),
    tieWordEmbeddings: flag(cfg, 'tie_word_embeddings'),
    attentionBias: modelType === 'qwen2' || (llama && flag(cfg, 'attention_bias')),
    outputBias: llama && flag(cfg, 'attention_bias'),
    mlpBias: llama && flag(cfg, 'mlp_bias'),
    activation: 'silu',
    bosTokenId: bos,
    eosTokenIds: eos,
    notes: [],
  });
}
