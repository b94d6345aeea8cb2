/**
 * README's "Supported models" tables stay true: every field they list goes through normalizeConfig. A field listed
 * as honoured changes the normalized config (two values, two results), one accepted without effect leaves it
 * unchanged, one refused fails with CONFIG_UNSUPPORTED naming it; every rope_type's fields change its frequencies
 * or attention factor. A field listed without a sample here fails the test, so the tables and the test move together.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { normalizeConfig, SUPPORTED_MODEL_TYPES } from '../src/model/config.ts';

type Json = Record<string, unknown>;

/** The rows of the markdown table whose header starts with `firstHeader`: cells split, backticked names per cell. */
function readmeTable(firstHeader: string): string[][][] {
  const lines = readFileSync(new URL('../README.md', import.meta.url), 'utf8').split('\n');
  const start = lines.findIndex((l) => l.startsWith(`| ${firstHeader} |`));
  assert.ok(start >= 0, `README has no table headed "${firstHeader}"`);
  const rows: string[][][] = [];
  for (let i = start + 2; i < lines.length && lines[i]!.startsWith('|'); i++) {
    const cells = lines[i]!.split('|').slice(1, -1);
    rows.push(cells.map((c) => [...c.matchAll(/`([^`]+)`/g)].map((m) => m[1]!)));
  }
  return rows;
}

const LLAMA_BASE: Json = {
  hidden_size: 32, num_attention_heads: 4, num_key_value_heads: 2, num_hidden_layers: 2, intermediate_size: 64,
  vocab_size: 64, max_position_embeddings: 128,
};
const BASE: Record<string, Json> = {
  gpt2: { model_type: 'gpt2', n_embd: 32, n_head: 4, n_layer: 2, vocab_size: 64, n_positions: 128 },
  llama: { model_type: 'llama', ...LLAMA_BASE },
  mistral: { model_type: 'mistral', ...LLAMA_BASE, sliding_window: null },
  qwen2: { model_type: 'qwen2', ...LLAMA_BASE },
};

/** Two settings of a field that must normalize differently (honoured) or alike (no effect). */
const PAIRS: Record<string, [Json, Json]> = {
  vocab_size: [{ vocab_size: 64 }, { vocab_size: 96 }],
  n_embd: [{ n_embd: 32 }, { n_embd: 64 }],
  n_head: [{ n_head: 4 }, { n_head: 8 }],
  n_layer: [{ n_layer: 2 }, { n_layer: 3 }],
  n_inner: [{ n_inner: null }, { n_inner: 48 }],
  n_positions: [{ n_positions: 128 }, { n_positions: 64 }],
  n_ctx: [{ n_positions: null, n_ctx: 128 }, { n_positions: null, n_ctx: 64 }],
  layer_norm_epsilon: [{ layer_norm_epsilon: 1e-5 }, { layer_norm_epsilon: 1e-6 }],
  activation_function: [{ activation_function: 'gelu_new' }, { activation_function: 'relu' }],
  attn_pdrop: [{ attn_pdrop: 0 }, { attn_pdrop: 0.1 }],
  reorder_and_upcast_attn: [{ reorder_and_upcast_attn: false }, { reorder_and_upcast_attn: true }],
  hidden_size: [{ hidden_size: 32 }, { hidden_size: 64 }],
  intermediate_size: [{ intermediate_size: 64 }, { intermediate_size: 96 }],
  num_hidden_layers: [{ num_hidden_layers: 2 }, { num_hidden_layers: 3 }],
  num_attention_heads: [{ num_attention_heads: 4 }, { num_attention_heads: 2 }],
  num_key_value_heads: [{ num_key_value_heads: 2 }, { num_key_value_heads: 4 }],
  head_dim: [{ head_dim: null }, { head_dim: 16 }],
  max_position_embeddings: [{ max_position_embeddings: 128 }, { max_position_embeddings: 64 }],
  rms_norm_eps: [{ rms_norm_eps: 1e-6 }, { rms_norm_eps: 1e-5 }],
  rope_theta: [{ rope_theta: 10000 }, { rope_theta: 500000 }],
  rope_scaling: [{ rope_scaling: null }, { rope_scaling: { rope_type: 'linear', factor: 2 } }],
  tie_word_embeddings: [{ tie_word_embeddings: false }, { tie_word_embeddings: true }],
  attention_bias: [{ attention_bias: false }, { attention_bias: true }],
  mlp_bias: [{ mlp_bias: false }, { mlp_bias: true }],
  pretraining_tp: [{ pretraining_tp: 1 }, { pretraining_tp: 2 }],
  attention_dropout: [{ attention_dropout: 0 }, { attention_dropout: 0.1 }],
  sliding_window: [{ sliding_window: null }, { sliding_window: 64, use_sliding_window: true, max_window_layers: 0 }],
  use_sliding_window: [{ use_sliding_window: false, sliding_window: 64, max_window_layers: 0 }, { use_sliding_window: true, sliding_window: 64, max_window_layers: 0 }],
  max_window_layers: [{ use_sliding_window: true, sliding_window: 64, max_window_layers: 2 }, { use_sliding_window: true, sliding_window: 64, max_window_layers: 1 }],
  layer_types: [
    { use_sliding_window: true, sliding_window: 64, layer_types: ['full_attention', 'full_attention'] },
    { use_sliding_window: true, sliding_window: 64, layer_types: ['full_attention', 'sliding_attention'] },
  ],
};

/** A setting of a field that is refused. */
const REFUSED: Record<string, Json> = {
  scale_attn_weights: { scale_attn_weights: false },
  scale_attn_by_inverse_layer_idx: { scale_attn_by_inverse_layer_idx: true },
  tie_word_embeddings: { tie_word_embeddings: false },
  quantization_config: { quantization_config: { quant_method: 'gptq', bits: 4 } },
  hidden_act: { hidden_act: 'gelu' },
  partial_rotary_factor: { partial_rotary_factor: 0.5 },
};

function unsupported(cfg: Json): { code?: string; message: string } | null {
  try {
    normalizeConfig(cfg);
    return null;
  } catch (err) {
    return err as { code?: string; message: string };
  }
}

test('README model table: every model_type is supported, every honoured field matters, every refused one is refused by name', () => {
  const rows = readmeTable('model_type');
  assert.deepEqual(rows.map((r) => r[0]![0]).sort(), [...SUPPORTED_MODEL_TYPES].sort());
  for (const [[modelType], honoured, noEffect, refused] of rows) {
    const base = BASE[modelType!]!;
    for (const f of honoured!) {
      assert.ok(PAIRS[f], `README lists ${modelType} field "${f}" but config.test.ts has no sample for it`);
      const [a, b] = PAIRS[f]!.map((p) => normalizeConfig({ ...base, ...p }));
      assert.notDeepEqual(a, b, `${modelType}: "${f}" is listed as honoured but does not change the normalized config`);
    }
    for (const f of noEffect!) {
      assert.ok(PAIRS[f], `README lists ${modelType} field "${f}" but config.test.ts has no sample for it`);
      const [a, b] = PAIRS[f]!.map((p) => normalizeConfig({ ...base, ...p }));
      assert.deepEqual(a, b, `${modelType}: "${f}" is listed as without effect but changes the normalized config`);
    }
    for (const f of refused!) {
      assert.ok(REFUSED[f], `README lists ${modelType} field "${f}" as refused but config.test.ts has no sample for it`);
      const err = unsupported({ ...base, ...REFUSED[f] });
      assert.equal(err?.code, 'CONFIG_UNSUPPORTED', `${modelType}: "${f}" is listed as refused: ${err?.message ?? 'accepted'}`);
      assert.ok(err!.message.includes(`"${f}"`), `${modelType}: the error names "${f}": ${err!.message}`);
    }
  }
});

/** A complete rope_scaling per type, and another value for each field. */
const ROPE: Record<string, { base: Json; top?: Json; other: Json }> = {
  default: { base: { rope_type: 'default' }, other: {} },
  linear: { base: { rope_type: 'linear', factor: 2 }, other: { factor: 4 } },
  dynamic: { base: { rope_type: 'dynamic', factor: 2 }, other: {} }, // factor: no effect below max_position_embeddings
  llama3: {
    base: { rope_type: 'llama3', factor: 8, low_freq_factor: 1, high_freq_factor: 4, original_max_position_embeddings: 64 },
    other: { factor: 4, low_freq_factor: 2, high_freq_factor: 8, original_max_position_embeddings: 256 },
  },
  yarn: {
    base: { rope_type: 'yarn', factor: 4, original_max_position_embeddings: 64, mscale: 1, mscale_all_dim: 0.5 },
    top: { rope_theta: 100 }, // correction dims 0 and 3 of the 4 pairs: each beta moves one
    other: { factor: 8, original_max_position_embeddings: 16, attention_factor: 1.5, beta_fast: 1.5, beta_slow: 2, mscale: 2, mscale_all_dim: 1, truncate: false },
  },
  longrope: {
    base: { rope_type: 'longrope', short_factor: [1, 1, 1, 1], long_factor: [2, 2, 2, 2] },
    top: { original_max_position_embeddings: 32 },
    other: { short_factor: [1, 2, 3, 4], long_factor: [2, 3, 4, 5], factor: 4, attention_factor: 1.5 },
  },
};

test('README rope table: every rope_type is served and each of its fields changes the rotation', () => {
  const rows = readmeTable('rope_type');
  assert.deepEqual(rows.map((r) => r[0]![0]).sort(), Object.keys(ROPE).sort());
  for (const [[type], fields] of rows) {
    const { base, top = {}, other } = ROPE[type!]!;
    const spec = (rs: Json) => normalizeConfig({ ...BASE.llama, ...top, rope_scaling: rs }).rope!;
    const plain = spec(base);
    assert.equal(plain.type, type);
    for (const f of fields!) {
      assert.ok(f in other, `README lists ${type} field "${f}" but config.test.ts has no other value for it`);
      // longrope's factor must match max_position_embeddings / original when the original is at the top level.
      const cfgTop = type === 'longrope' && f === 'factor' ? {} : top;
      const changed = normalizeConfig({ ...BASE.llama, ...cfgTop, rope_scaling: { ...base, [f]: other[f] } }).rope!;
      const before = type === 'longrope' && f === 'factor' ? normalizeConfig({ ...BASE.llama, rope_scaling: base }).rope! : plain;
      assert.notDeepEqual(changed, before, `${type}: "${f}" does not change the rotation`);
    }
  }
  // The legacy key `type` names the variant too; both keys naming different variants are refused.
  assert.equal(normalizeConfig({ ...BASE.llama, rope_scaling: { type: 'linear', factor: 2 } }).rope!.type, 'linear');
  assert.equal(normalizeConfig({ ...BASE.llama, rope_scaling: { type: 'linear', rope_type: 'linear', factor: 2 } }).rope!.type, 'linear');
  assert.equal(unsupported({ ...BASE.llama, rope_scaling: { type: 'linear', rope_type: 'default', factor: 2 } })?.code, 'CONFIG_UNSUPPORTED');
});

test('sliding windows per layer, as transformers reads them; the served context stays max_position_embeddings', () => {
  const windows = (cfg: Json) => normalizeConfig(cfg).layerWindows;
  const mistral = normalizeConfig({ ...BASE.mistral, sliding_window: 64 });
  assert.deepEqual(mistral.layerWindows, [64, 64]);
  assert.equal(mistral.maxPositions, 128);
  assert.deepEqual(mistral.notes, []);
  // transformers' Mistral default window is 4096 when the key is absent; null is no window.
  const { sliding_window: _, ...noKey } = BASE.mistral!;
  assert.deepEqual(windows(noKey), [4096, 4096]);
  assert.deepEqual(windows(BASE.mistral!), [null, null]);
  assert.deepEqual(windows(BASE.llama!), [null, null]);
  assert.deepEqual(windows(BASE.gpt2!), [null, null]);
  // Qwen2: only with use_sliding_window (then an absent sliding_window is 4096), on layers from max_window_layers.
  const qwen = { ...BASE.qwen2, num_hidden_layers: 4 };
  assert.deepEqual(windows({ ...qwen, sliding_window: 8 }), [null, null, null, null]);
  assert.deepEqual(windows({ ...qwen, use_sliding_window: true, sliding_window: 8 }), [null, null, null, null]); // default 28
  assert.deepEqual(windows({ ...qwen, use_sliding_window: true, sliding_window: 8, max_window_layers: 2 }), [null, null, 8, 8]);
  assert.deepEqual(windows({ ...qwen, use_sliding_window: true, max_window_layers: 3 }), [null, null, null, 4096]);
  assert.deepEqual(windows({ ...qwen, use_sliding_window: true, sliding_window: null, max_window_layers: 0 }), [null, null, null, null]);
  const types = ['sliding_attention', 'full_attention', 'sliding_attention', 'full_attention'];
  assert.deepEqual(windows({ ...qwen, use_sliding_window: true, sliding_window: 8, max_window_layers: 0, layer_types: types }), [8, null, 8, null]);
  assert.equal(Object.isFrozen(mistral.layerWindows), true);
});

test('Qwen2 layer_types: malformed or unknown entries, and sliding layers without a window, are refused', () => {
  const qwen = { ...BASE.qwen2, use_sliding_window: true, sliding_window: 8 };
  const cases: [Json, string, RegExp][] = [
    [{ layer_types: ['full_attention'] }, 'CONFIG_INVALID', /"layer_types" must be a list of 2 strings/],
    [{ layer_types: 'sliding_attention' }, 'CONFIG_INVALID', /"layer_types"/],
    [{ layer_types: ['full_attention', 'chunked_attention'] }, 'CONFIG_UNSUPPORTED', /"chunked_attention"/],
    [{ layer_types: ['full_attention', 'sliding_attention'], use_sliding_window: false }, 'CONFIG_INVALID', /no window applies/],
    [{ layer_types: ['full_attention', 'sliding_attention'], sliding_window: null }, 'CONFIG_INVALID', /no window applies/],
    [{ sliding_window: 0, max_window_layers: 0 }, 'CONFIG_INVALID', /"sliding_window" must be a positive integer/],
    [{ max_window_layers: -1 }, 'CONFIG_INVALID', /"max_window_layers"/],
  ];
  for (const [extra, code, message] of cases) {
    const err = unsupported({ ...qwen, ...extra });
    assert.equal(err?.code, code, JSON.stringify(extra));
    assert.match(err!.message, message);
  }
  assert.equal(unsupported({ ...BASE.mistral, sliding_window: 'wide' })?.code, 'CONFIG_INVALID');
});

test('gpt2 activation functions other than gelu_new, gelu and relu are refused by name', () => {
  const err = unsupported({ ...BASE.gpt2, activation_function: 'swish' });
  assert.equal(err?.code, 'CONFIG_UNSUPPORTED');
  assert.match(err!.message, /"activation_function"/);
});
