import { test } from 'node:test';
import assert from 'node:assert/strict';
import { layerIndexOf, matchesTarget, parsePeftConfig, rankFor, scalingFor, type PeftConfig } from '../src/lora/peft-config.ts';

const MAX = { maxRank: 64 };
/** A config as peft saves it (subset of fields). */
const base = (extra: Record<string, unknown> = {}): Record<string, unknown> => ({
  peft_type: 'LORA',
  task_type: 'CAUSAL_LM',
  base_model_name_or_path: 'gpt2',
  r: 8,
  lora_alpha: 16,
  lora_dropout: 0.05,
  target_modules: ['c_attn', 'c_proj'],
  bias: 'none',
  fan_in_fan_out: true,
  use_rslora: false,
  use_dora: false,
  modules_to_save: null,
  rank_pattern: {},
  alpha_pattern: {},
  layers_to_transform: null,
  layers_pattern: null,
  init_lora_weights: true,
  inference_mode: true,
  ...extra,
});
const parse = (extra: Record<string, unknown> = {}) => parsePeftConfig(base(extra), MAX);

function rejects(json: unknown, code: string, field?: RegExp) {
  assert.throws(() => parsePeftConfig(json, MAX), (err: { code?: string; message?: string }) => {
    assert.equal(err.code, code, `${err.message}`);
    if (field) assert.match(err.message!, field);
    return true;
  });
}

test('parses a typical peft config into a frozen object', () => {
  const cfg = parse({ some_future_field: { whatever: 1 } });
  assert.equal(cfg.r, 8);
  assert.equal(cfg.loraAlpha, 16);
  assert.equal(cfg.useRslora, false);
  assert.equal(cfg.fanInFanOut, true);
  assert.deepEqual(cfg.targetModules, ['c_attn', 'c_proj']);
  assert.deepEqual(cfg.rankPattern, []);
  assert.equal(cfg.layersToTransform, null);
  assert.equal(cfg.layersPattern, null);
  assert.equal(cfg.baseModel, 'gpt2');
  assert.ok(Object.isFrozen(cfg));
  assert.ok(Object.isFrozen(cfg.targetModules));
  assert.throws(() => { (cfg as { r: number }).r = 1; }, TypeError);
});

test('minimal config: optional fields default as in peft', () => {
  const cfg = parsePeftConfig({ r: 4, lora_alpha: 8, target_modules: ['q_proj'] }, MAX);
  assert.equal(cfg.useRslora, false);
  assert.equal(cfg.fanInFanOut, false);
  assert.equal(cfg.baseModel, undefined);
  assert.equal(cfg.excludeModules, null);
});

const rejectCases: [string, unknown, string, RegExp][] = [
  ['not an object', [1, 2], 'ADAPTER_INVALID_CONFIG', /JSON object/],
  ['null', null, 'ADAPTER_INVALID_CONFIG', /JSON object/],
  ['peft_type other than LORA', base({ peft_type: 'IA3' }), 'ADAPTER_INVALID_CONFIG', /peft_type/],
  ['r = 0', base({ r: 0 }), 'ADAPTER_INVALID_CONFIG', /\br must/],
  ['r negative', base({ r: -4 }), 'ADAPTER_INVALID_CONFIG', /\br must/],
  ['r fractional', base({ r: 2.5 }), 'ADAPTER_INVALID_CONFIG', /\br must/],
  ['r a string', base({ r: '8' }), 'ADAPTER_INVALID_CONFIG', /\br must/],
  ['r missing', base({ r: undefined }), 'ADAPTER_INVALID_CONFIG', /\br must/],
  ['lora_alpha NaN-like', base({ lora_alpha: null }), 'ADAPTER_INVALID_CONFIG', /lora_alpha/],
  ['lora_alpha string', base({ lora_alpha: '16' }), 'ADAPTER_INVALID_CONFIG', /lora_alpha/],
  ['lora_alpha infinite', base({ lora_alpha: Infinity }), 'ADAPTER_INVALID_CONFIG', /lora_alpha/],
  ['use_rslora not boolean', base({ use_rslora: 'yes' }), 'ADAPTER_INVALID_CONFIG', /use_rslora/],
  ['fan_in_fan_out not boolean', base({ fan_in_fan_out: 1 }), 'ADAPTER_INVALID_CONFIG', /fan_in_fan_out/],
  ['target_modules missing', base({ target_modules: null }), 'ADAPTER_INVALID_CONFIG', /target_modules/],
  ['target_modules empty', base({ target_modules: [] }), 'ADAPTER_INVALID_CONFIG', /target_modules/],
  ['target_modules wrong type', base({ target_modules: [1] }), 'ADAPTER_INVALID_CONFIG', /target_modules/],
  ['target_modules bad regex', base({ target_modules: '(unclosed' }), 'ADAPTER_INVALID_CONFIG', /target_modules/],
  ['target_modules with a lookahead (not RE2)', base({ target_modules: '.*(?=q)q_proj' }), 'ADAPTER_INVALID_CONFIG', /target_modules.*RE2/],
  ['rank_pattern key with a backreference', base({ rank_pattern: { '(q)\\1': 4 } }), 'ADAPTER_INVALID_CONFIG', /rank_pattern key/],
  ['target_modules pattern too long', base({ target_modules: 'a'.repeat(2000) }), 'ADAPTER_INVALID_CONFIG', /longer than/],
  ['rank_pattern value not int', base({ rank_pattern: { c_attn: 'x' } }), 'ADAPTER_INVALID_CONFIG', /rank_pattern\["c_attn"\]/],
  ['rank_pattern not an object', base({ rank_pattern: [1] }), 'ADAPTER_INVALID_CONFIG', /rank_pattern/],
  ['alpha_pattern value not finite', base({ alpha_pattern: { c_attn: null } }), 'ADAPTER_INVALID_CONFIG', /alpha_pattern\["c_attn"\]/],
  ['layers_to_transform wrong type', base({ layers_to_transform: ['0'] }), 'ADAPTER_INVALID_CONFIG', /layers_to_transform/],
  ['layers_pattern wrong type', base({ layers_pattern: 3 }), 'ADAPTER_INVALID_CONFIG', /layers_pattern/],
  ['bias not a string', base({ bias: 1 }), 'ADAPTER_INVALID_CONFIG', /bias/],
  ['use_dora', base({ use_dora: true }), 'ADAPTER_UNSUPPORTED', /use_dora/],
  ['modules_to_save', base({ modules_to_save: ['score'] }), 'ADAPTER_UNSUPPORTED', /modules_to_save/],
  ['bias all', base({ bias: 'all' }), 'ADAPTER_UNSUPPORTED', /bias "all"/],
  ['bias lora_only', base({ bias: 'lora_only' }), 'ADAPTER_UNSUPPORTED', /bias "lora_only"/],
  ['lora_bias', base({ lora_bias: true }), 'ADAPTER_UNSUPPORTED', /lora_bias/],
  ['target embed_tokens', base({ target_modules: ['q_proj', 'embed_tokens'] }), 'ADAPTER_UNSUPPORTED', /embed_tokens/],
  ['target wte', base({ target_modules: ['c_attn', 'wte'] }), 'ADAPTER_UNSUPPORTED', /"wte"/],
  ['target lm_head', base({ target_modules: ['lm_head'] }), 'ADAPTER_UNSUPPORTED', /lm_head/],
  ['target full embedding path', base({ target_modules: ['model.embed_tokens'] }), 'ADAPTER_UNSUPPORTED', /embed_tokens/],
  ['regex selecting embeddings', base({ target_modules: '.*(q_proj|embed_tokens)' }), 'ADAPTER_UNSUPPORTED', /embed_tokens/],
  ['trainable_token_indices', base({ trainable_token_indices: [1, 2] }), 'ADAPTER_UNSUPPORTED', /trainable_token_indices/],
  ['r above maxRank', base({ r: 128 }), 'ADAPTER_RANK_TOO_LARGE', /r=128/],
  ['rank_pattern above maxRank', base({ rank_pattern: { c_proj: 65 } }), 'ADAPTER_RANK_TOO_LARGE', /rank_pattern\["c_proj"\]=65/],
];

for (const [name, json, code, field] of rejectCases) {
  test(`rejects: ${name} → ${code}`, () => rejects(json, code, field));
}

test('accepts explicit false / null / empty for the unsupported features', () => {
  const cfg = parse({ use_dora: false, lora_bias: false, modules_to_save: [], bias: 'none', layer_replication: null });
  assert.equal(cfg.r, 8);
});

test('target list: exact name or "." suffix (c_proj hits attn.c_proj and mlp.c_proj)', () => {
  const cfg = parse({ target_modules: ['c_proj'] });
  assert.equal(matchesTarget(cfg, 'transformer.h.0.attn.c_proj'), true);
  assert.equal(matchesTarget(cfg, 'transformer.h.0.mlp.c_proj'), true);
  assert.equal(matchesTarget(cfg, 'c_proj'), true);
  assert.equal(matchesTarget(cfg, 'transformer.h.0.attn.c_attn'), false);
  assert.equal(matchesTarget(cfg, 'transformer.h.0.attn.xc_proj'), false, 'suffix must follow a dot');
  const full = parse({ target_modules: ['attn.c_proj'] });
  assert.equal(matchesTarget(full, 'transformer.h.0.attn.c_proj'), true);
  assert.equal(matchesTarget(full, 'transformer.h.0.mlp.c_proj'), false);
});

test('hostile patterns (catastrophic backtracking elsewhere) match in linear time', () => {
  // In a backtracking engine each of these takes seconds to minutes on a module path of this length.
  const hostile = [
    { target_modules: '.*.*.*.*.*.*.*.*.*.*.*.*=' },
    { target_modules: '(a|aa)*c' },
    { target_modules: '(.*a){12}' },
    { target_modules: ['q_proj'], rank_pattern: { '(a+)+b': 2 }, alpha_pattern: { '(x+x+)+y': 4 } },
    { target_modules: ['q_proj'], layers_to_transform: [0], layers_pattern: '(a|a)*b' },
  ];
  const path = `model.${'a'.repeat(40)}.layers.10.self_attn.q_proj`;
  for (const h of hostile) {
    const cfg = parse(h);
    const t0 = performance.now();
    for (let i = 0; i < 10; i++) {
      matchesTarget(cfg, path);
      rankFor(cfg, path);
      scalingFor(cfg, path, 8);
    }
    const ms = performance.now() - t0;
    assert.ok(ms < 100, `${JSON.stringify(h)}: ${ms.toFixed(1)} ms for 10 matches`);
  }
});

test('target regex: must match the whole module name', () => {
  const cfg = parse({ target_modules: '.*\\.(q|v)_proj' });
  assert.deepEqual(cfg.targetModules, { regex: '.*\\.(q|v)_proj' });
  assert.equal(matchesTarget(cfg, 'model.layers.0.self_attn.q_proj'), true);
  assert.equal(matchesTarget(cfg, 'model.layers.0.self_attn.v_proj'), true);
  assert.equal(matchesTarget(cfg, 'model.layers.0.self_attn.k_proj'), false);
  assert.equal(matchesTarget(cfg, 'model.layers.0.self_attn.q_proj.extra'), false, 'no partial match at the end');
  const anchored = parse({ target_modules: 'q_proj' });
  assert.equal(matchesTarget(anchored, 'model.layers.0.self_attn.q_proj'), false, 'no partial match at the start');
  const alt = parse({ target_modules: 'model.layers.0.self_attn.q_proj|.*v_proj' });
  assert.equal(matchesTarget(alt, 'model.layers.1.self_attn.q_proj'), false, 'alternation is grouped under the anchors');
  assert.equal(matchesTarget(alt, 'model.layers.0.self_attn.q_proj'), true);
});

test('target all-linear: every linear module except the output layer', () => {
  const cfg = parse({ target_modules: 'ALL-LINEAR' });
  assert.equal(cfg.targetModules, 'all-linear');
  assert.equal(matchesTarget(cfg, 'model.layers.3.mlp.down_proj'), true);
  assert.equal(matchesTarget(cfg, 'lm_head', true), false);
});

test('exclude_modules wins over target_modules', () => {
  const cfg = parse({ target_modules: ['c_proj'], exclude_modules: ['mlp.c_proj'] });
  assert.equal(matchesTarget(cfg, 'transformer.h.0.attn.c_proj'), true);
  assert.equal(matchesTarget(cfg, 'transformer.h.0.mlp.c_proj'), false);
  const re = parse({ target_modules: ['c_proj'], exclude_modules: '.*\\.h\\.1\\..*' });
  assert.equal(matchesTarget(re, 'transformer.h.1.attn.c_proj'), false);
});

test('layers_to_transform with and without layers_pattern', () => {
  const cfg = parse({ target_modules: ['c_attn'], layers_to_transform: [0, 2], layers_pattern: 'h' });
  assert.deepEqual(cfg.layersToTransform, [0, 2]);
  assert.deepEqual(cfg.layersPattern, ['h']);
  assert.equal(matchesTarget(cfg, 'transformer.h.0.attn.c_attn'), true);
  assert.equal(matchesTarget(cfg, 'transformer.h.1.attn.c_attn'), false);
  assert.equal(matchesTarget(cfg, 'transformer.h.2.attn.c_attn'), true);
  assert.equal(matchesTarget(cfg, 'h.2.attn.c_attn'), true, 'bare-model paths have the pattern first');

  const single = parse({ target_modules: ['q_proj'], layers_to_transform: 1 });
  assert.deepEqual(single.layersToTransform, [1]);
  assert.equal(matchesTarget(single, 'model.layers.1.self_attn.q_proj'), true);
  assert.equal(matchesTarget(single, 'model.layers.10.self_attn.q_proj'), false);

  const wrongPattern = parse({ target_modules: ['q_proj'], layers_to_transform: [0], layers_pattern: ['blocks'] });
  assert.equal(matchesTarget(wrongPattern, 'model.layers.0.self_attn.q_proj'), false);

  const emptyList = parse({ target_modules: ['q_proj'], layers_to_transform: [] });
  assert.equal(emptyList.layersToTransform, null, 'an empty list means all layers, as in peft');
});

test('layerIndexOf', () => {
  const table: [string, string[] | null, number | null][] = [
    ['transformer.h.11.mlp.c_fc', ['h'], 11],
    ['transformer.h.11.mlp.c_fc', null, 11],
    ['model.layers.3.self_attn.q_proj', ['layers'], 3],
    ['model.layers.3.self_attn.q_proj', ['h', 'layers'], 3],
    ['model.layers.3.self_attn.q_proj', ['h'], null],
    ['layers.7.mlp.up_proj', ['layers'], 7],
    ['lm_head', null, null],
  ];
  for (const [p, pattern, want] of table) assert.equal(layerIndexOf(p, pattern), want, `${p} ${pattern}`);
});

test('scaling: alpha / r, rsLoRA alpha / sqrt(r), effective rank = tensor rank', () => {
  const cfg = parse({ r: 8, lora_alpha: 16 });
  assert.equal(scalingFor(cfg, 'transformer.h.0.attn.c_attn', 8), 2);
  assert.equal(scalingFor(cfg, 'transformer.h.0.attn.c_attn', 4), 4, "the tensor's own rank wins over r");
  const rs = parse({ r: 16, lora_alpha: 16, use_rslora: true });
  assert.equal(scalingFor(rs, 'transformer.h.0.attn.c_attn', 16), 4);
  assert.equal(scalingFor(rs, 'transformer.h.0.attn.c_attn', 4), 8);
});

test('rank_pattern / alpha_pattern: (.*\\.)?(key)$ matching, first key in dict order wins', () => {
  const cfg: PeftConfig = parse({
    r: 8,
    lora_alpha: 8,
    rank_pattern: { 'h.1.attn.c_attn': 4, c_attn: 2 },
    alpha_pattern: { 'mlp.c_proj': 32, c_proj: 64, 'h\\.\\d+\\.attn\\.c_proj': 1 },
  });
  assert.equal(rankFor(cfg, 'transformer.h.1.attn.c_attn'), 4);
  assert.equal(rankFor(cfg, 'transformer.h.0.attn.c_attn'), 2);
  assert.equal(rankFor(cfg, 'transformer.h.0.mlp.c_fc'), 8);
  assert.equal(rankFor(cfg, 'transformer.h.0.attn.xc_attn'), 8, 'a key must start at a "." boundary');
  assert.equal(scalingFor(cfg, 'transformer.h.0.mlp.c_proj', 8), 4, 'mlp.c_proj is first');
  assert.equal(scalingFor(cfg, 'transformer.h.0.attn.c_proj', 8), 8, 'c_proj comes before the more specific regex');
  assert.equal(scalingFor(cfg, 'transformer.h.0.attn.c_attn', 2), 4, 'no alpha key: lora_alpha / tensor rank');
  const llama = parse({ r: 8, lora_alpha: 16, alpha_pattern: { 'layers.0.self_attn.q_proj': 4 } });
  assert.equal(scalingFor(llama, 'model.layers.0.self_attn.q_proj', 8), 0.5);
  assert.equal(scalingFor(llama, 'model.layers.10.self_attn.q_proj', 8), 2, 'layers.10 is not layers.0');
});
