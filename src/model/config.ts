/** normalizeConfig(): one typed ModelConfig from a Hugging Face config.json (+ generation_config.json). */
import { fail } from '../errors.ts';
import type { Family, ModelConfig } from './types.ts';

/** model_type → family. Llama-family covers Mistral and Qwen2 (q/k/v biases). */
const FAMILIES: Record<string, Family> = {
  gpt2: 'gpt2',
  llama: 'llama',
  mistral: 'llama',
  qwen2: 'llama',
};

export const SUPPORTED_MODEL_TYPES = Object.keys(FAMILIES);

type Json = Record<string, unknown>;

function int(cfg: Json, key: string, fallback?: number): number {
  const v = cfg[key] ?? fallback;
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v <= 0) {
    throw fail('CONFIG_INVALID', `config.json: "${key}" must be a positive integer (got ${JSON.stringify(cfg[key])})`);
  }
  return v;
}

function num(cfg: Json, key: string, fallback: number): number {
  const v = cfg[key] ?? fallback;
  if (typeof v !== 'number' || !Number.isFinite(v) || v <= 0) {
    throw fail('CONFIG_INVALID', `config.json: "${key}" must be a positive number (got ${JSON.stringify(cfg[key])})`);
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
  const eos = [...new Set([...tokenIds(gen.eos_token_id), ...tokenIds(cfg.eos_token_id)])];
  const bos = tokenIds(gen.bos_token_id ?? cfg.bos_token_id)[0] ?? null;

  if (family === 'gpt2') {
    const hidden = int(cfg, 'n_embd');
    const heads = int(cfg, 'n_head');
    if (hidden % heads !== 0) throw fail('CONFIG_INVALID', `config.json: n_embd ${hidden} is not divisible by n_head ${heads}`);
    const act = (cfg.activation_function ?? 'gelu_new') as string;
    if (act !== 'gelu_new' && act !== 'gelu' && act !== 'relu') {
      throw fail('CONFIG_INVALID', `config.json: activation_function "${act}" is not supported (gelu_new, gelu, relu)`);
    }
    return Object.freeze({
      family, modelType,
      vocabSize: int(cfg, 'vocab_size'),
      hiddenSize: hidden,
      numLayers: int(cfg, 'n_layer'),
      numHeads: heads,
      numKvHeads: heads,
      headDim: hidden / heads,
      intermediateSize: cfg.n_inner == null ? 4 * hidden : int(cfg, 'n_inner'),
      maxPositions: int(cfg, 'n_positions', cfg.n_ctx as number | undefined),
      normEps: num(cfg, 'layer_norm_epsilon', 1e-5),
      ropeTheta: 0,
      tieWordEmbeddings: true,
      attentionBias: true,
      outputBias: true,
      mlpBias: true,
      activation: act as ModelConfig['activation'],
      bosTokenId: bos,
      eosTokenIds: eos,
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
  if (cfg.rope_scaling != null) {
    const t = (cfg.rope_scaling as Json).rope_type ?? (cfg.rope_scaling as Json).type;
    if (t !== 'default') throw fail('CONFIG_INVALID', `config.json: rope_scaling "${String(t)}" is not supported yet`);
  }
  const act = (cfg.hidden_act ?? 'silu') as string;
  if (act !== 'silu') throw fail('CONFIG_INVALID', `config.json: hidden_act "${act}" is not supported (silu)`);
  const qkvBias = modelType === 'qwen2' || cfg.attention_bias === true;
  return Object.freeze({
    family, modelType,
    vocabSize: int(cfg, 'vocab_size'),
    hiddenSize: hidden,
    numLayers: int(cfg, 'num_hidden_layers'),
    numHeads: heads,
    numKvHeads: kvHeads,
    headDim,
    intermediateSize: int(cfg, 'intermediate_size'),
    maxPositions: int(cfg, 'max_position_embeddings', 2048),
    normEps: num(cfg, 'rms_norm_eps', 1e-6),
    ropeTheta: num(cfg, 'rope_theta', 10000),
    tieWordEmbeddings: cfg.tie_word_embeddings === true,
    attentionBias: qkvBias,
    // Llama's attention_bias also puts a bias on o_proj; Qwen2 has q/k/v biases only.
    outputBias: modelType !== 'qwen2' && cfg.attention_bias === true,
    mlpBias: cfg.mlp_bias === true,
    activation: 'silu',
    bosTokenId: bos,
    eosTokenIds: eos,
  });
}
