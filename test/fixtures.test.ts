import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { Tokenizer } from '@huggingface/tokenizers';
import { Template } from '@huggingface/jinja';
import { bf16ToF32, f32ToBf16, openSafetensors, type SafetensorsReader } from '../src/formats/safetensors.ts';
import {
  TINY_GPT2, TINY_LLAMA, TINY_PHI3, TINY_GEMMA, TINY_GEMMA2, DEMO_LLAMA, BENCH_LLAMA, buildTokenizer, createRng, ensureCheckpoint, listLinearModules,
  matchesTarget, patternValue, writeCheckpoint, writePeftAdapter, type CheckpointOptions,
} from '../src/demo/index.ts';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'fixtures-test-'));
process.on('exit', () => fs.rmSync(tmp, { recursive: true, force: true }));
let dirCount = 0;
const newDir = (label: string) => path.join(tmp, `${label}-${dirCount++}`);

const readJson = (dir: string, file: string) => JSON.parse(fs.readFileSync(path.join(dir, file), 'utf8')) as Record<string, any>;

/** Every tensor of a checkpoint folder (single file or shards) as name → { shape, data, dtype }. */
function readAll(dir: string): Map<string, { shape: readonly number[]; dtype: string; data: Float32Array }> {
  const files = fs.existsSync(path.join(dir, 'model.safetensors.index.json'))
    ? [...new Set(Object.values(readJson(dir, 'model.safetensors.index.json').weight_map as Record<string, string>))]
    : ['model.safetensors'];
  const out = new Map<string, { shape: readonly number[]; dtype: string; data: Float32Array }>();
  for (const f of files) {
    const r = openSafetensors(path.join(dir, f));
    try {
      assert.deepEqual(r.metadata, { format: 'pt' });
      for (const [name, e] of r.tensors) {
        assert.ok(!out.has(name), `duplicate ${name}`);
        out.set(name, { shape: e.shape, dtype: e.dtype, data: r.readFloat32(name) });
      }
    } finally {
      r.close();
    }
  }
  return out;
}

/** The expected HF names and shapes, written out independently of the generator. */
function expectedGpt2(d: number, layers: number, vocab: number, nPos: number, inner: number, prefixed: boolean): Map<string, number[]> {
  const p = prefixed ? 'transformer.' : '';
  const m = new Map<string, number[]>([[`${p}wte.weight`, [vocab, d]], [`${p}wpe.weight`, [nPos, d]], [`${p}ln_f.weight`, [d]], [`${p}ln_f.bias`, [d]]]);
  for (let i = 0; i < layers; i++) {
    const h = `${p}h.${i}.`;
    for (const ln of ['ln_1', 'ln_2']) m.set(`${h}${ln}.weight`, [d]).set(`${h}${ln}.bias`, [d]);
    m.set(`${h}attn.c_attn.weight`, [d, 3 * d]).set(`${h}attn.c_attn.bias`, [3 * d]);
    m.set(`${h}attn.c_proj.weight`, [d, d]).set(`${h}attn.c_proj.bias`, [d]);
    m.set(`${h}mlp.c_fc.weight`, [d, inner]).set(`${h}mlp.c_fc.bias`, [inner]);
    m.set(`${h}mlp.c_proj.weight`, [inner, d]).set(`${h}mlp.c_proj.bias`, [d]);
    if (!prefixed) m.set(`${h}attn.bias`, [1, 1, nPos, nPos]).set(`${h}attn.masked_bias`, []);
  }
  return m;
}

function expectedLlama(o: { d: number; layers: number; heads: number; kv: number; hd: number; inter: number; vocab: number; tied: boolean; qkvBias: boolean }): Map<string, number[]> {
  const m = new Map<string, number[]>([['model.embed_tokens.weight', [o.vocab, o.d]], ['model.norm.weight', [o.d]]]);
  if (!o.tied) m.set('lm_head.weight', [o.vocab, o.d]);
  for (let i = 0; i < o.layers; i++) {
    const l = `model.layers.${i}.`;
    m.set(`${l}input_layernorm.weight`, [o.d]).set(`${l}post_attention_layernorm.weight`, [o.d]);
    m.set(`${l}self_attn.q_proj.weight`, [o.heads * o.hd, o.d]);
    m.set(`${l}self_attn.k_proj.weight`, [o.kv * o.hd, o.d]);
    m.set(`${l}self_attn.v_proj.weight`, [o.kv * o.hd, o.d]);
    m.set(`${l}self_attn.o_proj.weight`, [o.d, o.heads * o.hd]);
    m.set(`${l}mlp.gate_proj.weight`, [o.inter, o.d]).set(`${l}mlp.up_proj.weight`, [o.inter, o.d]);
    m.set(`${l}mlp.down_proj.weight`, [o.d, o.inter]);
    if (o.qkvBias) {
      m.set(`${l}self_attn.q_proj.bias`, [o.heads * o.hd]).set(`${l}self_attn.k_proj.bias`, [o.kv * o.hd]).set(`${l}self_attn.v_proj.bias`, [o.kv * o.hd]);
    }
  }
  return m;
}

function assertLayout(tensors: ReturnType<typeof readAll>, expected: Map<string, number[]>, dtype: string): void {
  assert.deepEqual([...tensors.keys()].sort(), [...expected.keys()].sort());
  for (const [name, shape] of expected) {
    const t = tensors.get(name)!;
    assert.deepEqual(t.shape, shape, name);
    assert.equal(t.dtype, dtype, name);
    assert.ok(t.data.every(Number.isFinite), `${name} has non-finite values`);
    if (t.data.length > 1 && !name.endsWith('attn.bias')) {
      assert.ok(t.data.some((v) => v !== t.data[0]), `${name} is constant`);
    }
  }
}

function sameValues(a: ReturnType<typeof readAll>, b: ReturnType<typeof readAll>, rename: (n: string) => string = (n) => n): void {
  for (const [name, t] of a) assert.deepEqual(b.get(rename(name))?.data, t.data, name);
}

// ---------------------------------------------------------------------------------------------
// Checkpoints
// ---------------------------------------------------------------------------------------------

test('TINY_GPT2 in GPT2LMHeadModel layout (transformer. prefix)', async () => {
  const dir = newDir('gpt2');
  const { config, files } = await writeCheckpoint(dir, TINY_GPT2);
  assert.deepEqual([...files].sort(), ['config.json', 'generation_config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json']);
  assert.deepEqual(readJson(dir, 'config.json'), config);
  assert.equal(config.model_type, 'gpt2');
  assert.deepEqual(config.architectures, ['GPT2LMHeadModel']);
  assert.equal(config.n_embd, 32);
  assert.equal(config.n_layer, 2);
  assert.equal(config.n_head, 4);
  assert.equal(config.n_positions, 128);
  assert.equal(config.n_ctx, 128);
  assert.equal(config.n_inner, null);
  assert.equal(config.vocab_size, 320);
  assert.equal(config.layer_norm_epsilon, 1e-5);
  assert.equal(config.activation_function, 'gelu_new');
  assert.equal(config.bos_token_id, 319);
  assert.equal(config.eos_token_id, 319);
  assert.deepEqual(readJson(dir, 'generation_config.json'), { _from_model_config: true, bos_token_id: 319, eos_token_id: 319 });
  const tensors = readAll(dir);
  assertLayout(tensors, expectedGpt2(32, 2, 320, 128, 128, true), 'F32');
  // LayerNorm weights sit around 1, biases are small but non-zero
  const ln = tensors.get('transformer.h.0.ln_1.weight')!.data;
  assert.ok(Math.abs(ln.reduce((a, b) => a + b) / ln.length - 1) < 0.1);
  assert.ok(tensors.get('transformer.h.0.attn.c_attn.bias')!.data.every((v) => v !== 0 && Math.abs(v) < 1));
});

test('GPT-2 in the hub\'s original layout: no prefix, causal-mask buffers, same parameter values', async () => {
  const plain = newDir('gpt2-plain');
  const prefixed = newDir('gpt2-prefixed');
  await writeCheckpoint(plain, { ...TINY_GPT2, gpt2Prefix: false, intermediateSize: 48 });
  const { config } = await writeCheckpoint(prefixed, { ...TINY_GPT2, intermediateSize: 48 });
  assert.equal(config.n_inner, 48);
  const a = readAll(plain);
  const b = readAll(prefixed);
  assertLayout(a, expectedGpt2(32, 2, 320, 128, 48, false), 'F32');
  for (const [name] of b) assert.deepEqual(a.get(name.replace(/^transformer\./, ''))!.data, b.get(name)!.data, name);
  const mask = a.get('h.1.attn.bias')!.data;
  for (let i = 0; i < 128; i++) for (let j = 0; j < 128; j++) assert.equal(mask[i * 128 + j], j <= i ? 1 : 0);
  assert.deepEqual(a.get('h.0.attn.masked_bias')!.data, new Float32Array([-1e4]));
});

test('TINY_LLAMA (F32, GQA) in LlamaForCausalLM layout', async () => {
  const dir = newDir('llama');
  const { config } = await writeCheckpoint(dir, TINY_LLAMA);
  assert.equal(config.model_type, 'llama');
  assert.deepEqual(config.architectures, ['LlamaForCausalLM']);
  assert.equal(config.hidden_size, 32);
  assert.equal(config.intermediate_size, 64);
  assert.equal(config.num_hidden_layers, 2);
  assert.equal(config.num_attention_heads, 4);
  assert.equal(config.num_key_value_heads, 2);
  assert.equal(config.max_position_embeddings, 128);
  assert.equal(config.rms_norm_eps, 1e-6);
  assert.equal(config.rope_theta, 10000);
  assert.equal(config.tie_word_embeddings, false);
  assert.equal(config.hidden_act, 'silu');
  assert.equal(config.vocab_size, 320);
  assert.equal(config.bos_token_id, 1);
  assert.equal(config.eos_token_id, 2);
  assert.equal(config.torch_dtype, 'float32');
  assert.equal(config.head_dim, undefined);
  const tensors = readAll(dir);
  assertLayout(tensors, expectedLlama({ d: 32, layers: 2, heads: 4, kv: 2, hd: 8, inter: 64, vocab: 320, tied: false, qkvBias: false }), 'F32');
  assert.deepEqual(readJson(dir, 'generation_config.json'), { _from_model_config: true, bos_token_id: 1, eos_token_id: 2 });
});

test('TINY_PHI3 in Phi3ForCausalLM layout: fused qkv_proj and gate_up_proj', async () => {
  const dir = newDir('phi3');
  const { config } = await writeCheckpoint(dir, TINY_PHI3);
  assert.equal(config.model_type, 'phi3');
  assert.deepEqual(config.architectures, ['Phi3ForCausalLM']);
  assert.equal(config.original_max_position_embeddings, 128);
  assert.equal(config.rms_norm_eps, 1e-5);
  assert.equal(config.sliding_window, null);
  const expected = new Map<string, number[]>([['model.embed_tokens.weight', [320, 32]], ['model.norm.weight', [32]], ['lm_head.weight', [320, 32]]]);
  for (let i = 0; i < 2; i++) {
    const l = `model.layers.${i}.`;
    expected.set(`${l}input_layernorm.weight`, [32]).set(`${l}post_attention_layernorm.weight`, [32]);
    expected.set(`${l}self_attn.qkv_proj.weight`, [32 + 2 * 16, 32]).set(`${l}self_attn.o_proj.weight`, [32, 32]);
    expected.set(`${l}mlp.gate_up_proj.weight`, [2 * 64, 32]).set(`${l}mlp.down_proj.weight`, [32, 64]);
  }
  assertLayout(readAll(dir), expected, 'F32');
  // PEFT's adapter on the fused modules: lora_B has the fused output's rows.
  const adapter = await writePeftAdapter(newDir('phi3-adapter'), { baseConfig: config, targetModules: 'all-linear', r: 4 });
  assert.deepEqual(adapter.config.target_modules, ['down_proj', 'gate_up_proj', 'o_proj', 'qkv_proj']);
  assert.deepEqual(adapter.tensors['base_model.model.model.layers.0.self_attn.qkv_proj.lora_B.weight']!.shape, [64, 4]);
  assert.deepEqual(adapter.tensors['base_model.model.model.layers.1.mlp.gate_up_proj.lora_B.weight']!.shape, [128, 4]);
  assert.deepEqual((await writePeftAdapter(newDir('phi3-default'), { baseConfig: config })).config.target_modules, ['qkv_proj']);
});

test('TINY_GEMMA and TINY_GEMMA2 in GemmaForCausalLM / Gemma2ForCausalLM layout', async () => {
  const g1 = newDir('gemma');
  const { config: c1 } = await writeCheckpoint(g1, TINY_GEMMA);
  assert.equal(c1.model_type, 'gemma');
  assert.deepEqual(c1.architectures, ['GemmaForCausalLM']);
  assert.equal(c1.head_dim, 16);
  assert.equal(c1.hidden_activation, 'gelu_pytorch_tanh');
  assert.equal(c1.tie_word_embeddings, true);
  const expected = (gemma2: boolean) => {
    const m = new Map<string, number[]>([['model.embed_tokens.weight', [320, 32]], ['model.norm.weight', [32]]]);
    const kv = gemma2 ? 2 : 1;
    for (let i = 0; i < 2; i++) {
      const l = `model.layers.${i}.`;
      m.set(`${l}input_layernorm.weight`, [32]).set(`${l}post_attention_layernorm.weight`, [32]);
      if (gemma2) m.set(`${l}pre_feedforward_layernorm.weight`, [32]).set(`${l}post_feedforward_layernorm.weight`, [32]);
      m.set(`${l}self_attn.q_proj.weight`, [64, 32]).set(`${l}self_attn.k_proj.weight`, [16 * kv, 32]).set(`${l}self_attn.v_proj.weight`, [16 * kv, 32]);
      m.set(`${l}self_attn.o_proj.weight`, [32, 64]);
      m.set(`${l}mlp.gate_proj.weight`, [64, 32]).set(`${l}mlp.up_proj.weight`, [64, 32]).set(`${l}mlp.down_proj.weight`, [32, 64]);
    }
    return m;
  };
  const t1 = readAll(g1);
  assertLayout(t1, expected(false), 'F32');
  // Norm weights are stored as w in x/rms · (1 + w): drawn around 0.
  const w = t1.get('model.layers.0.input_layernorm.weight')!.data;
  assert.ok(Math.abs(w.reduce((a, b) => a + b, 0) / w.length) < 0.1);

  const g2 = newDir('gemma2');
  const { config: c2 } = await writeCheckpoint(g2, TINY_GEMMA2);
  assert.equal(c2.model_type, 'gemma2');
  assert.deepEqual(c2.architectures, ['Gemma2ForCausalLM']);
  assert.deepEqual([c2.attn_logit_softcapping, c2.final_logit_softcapping, c2.query_pre_attn_scalar, c2.sliding_window], [2, 5, 8, 64]);
  assertLayout(readAll(g2), expected(true), 'F32');
  const defaults = (await writeCheckpoint(newDir('gemma2-defaults'), { ...TINY_GEMMA, gemma2: true })).config;
  assert.deepEqual([defaults.attn_logit_softcapping, defaults.final_logit_softcapping, defaults.query_pre_attn_scalar, defaults.sliding_window], [50, 30, 16, 4096]);
  assert.deepEqual(listLinearModules('gemma', c2).slice(0, 4).map((m) => m.outFeatures), [64, 32, 32, 32]);
});

test('Llama variants: BF16, two shards, tied embeddings, explicit head_dim, Qwen2-style q/k/v bias', async () => {
  const base = readAll(await (async () => { const d = newDir('llama-ref'); await writeCheckpoint(d, TINY_LLAMA); return d; })());

  const bf16 = newDir('llama-bf16');
  const { config: c16 } = await writeCheckpoint(bf16, { ...TINY_LLAMA, dtype: 'BF16' });
  assert.equal(c16.torch_dtype, 'bfloat16');
  const t16 = readAll(bf16);
  for (const [name, t] of base) {
    assert.equal(t16.get(name)!.dtype, 'BF16');
    assert.deepEqual(t16.get(name)!.data, bf16ToF32(f32ToBf16(t.data)), name);
  }

  const sharded = newDir('llama-sharded');
  const { files } = await writeCheckpoint(sharded, { ...TINY_LLAMA, shards: 2 });
  assert.ok(files.includes('model-00001-of-00002.safetensors') && files.includes('model-00002-of-00002.safetensors'));
  assert.ok(!fs.existsSync(path.join(sharded, 'model.safetensors')));
  const index = readJson(sharded, 'model.safetensors.index.json');
  assert.deepEqual(Object.keys(index.weight_map).sort(), [...base.keys()].sort());
  assert.deepEqual(new Set(Object.values(index.weight_map)), new Set(['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors']));
  for (const [name, file] of Object.entries(index.weight_map as Record<string, string>)) {
    const r = openSafetensors(path.join(sharded, file));
    assert.ok(r.tensors.has(name), `${name} not in ${file}`);
    r.close();
  }
  assert.equal(index.metadata.total_size, [...base.values()].reduce((a, t) => a + t.data.length * 4, 0));
  sameValues(base, readAll(sharded));

  const tied = newDir('llama-tied');
  const { config: ct } = await writeCheckpoint(tied, { ...TINY_LLAMA, tieWordEmbeddings: true });
  assert.equal(ct.tie_word_embeddings, true);
  assertLayout(readAll(tied), expectedLlama({ d: 32, layers: 2, heads: 4, kv: 2, hd: 8, inter: 64, vocab: 320, tied: true, qkvBias: false }), 'F32');

  const hd = newDir('llama-head-dim');
  const { config: ch } = await writeCheckpoint(hd, { ...TINY_LLAMA, headDim: 16, ropeTheta: 500000 });
  assert.equal(ch.head_dim, 16);
  assert.equal(ch.rope_theta, 500000);
  assertLayout(readAll(hd), expectedLlama({ d: 32, layers: 2, heads: 4, kv: 2, hd: 16, inter: 64, vocab: 320, tied: false, qkvBias: false }), 'F32');

  const qwen = newDir('qwen2');
  const { config: cq } = await writeCheckpoint(qwen, { ...TINY_LLAMA, attentionBias: true, dtype: 'F16' });
  assert.equal(cq.model_type, 'qwen2');
  assert.deepEqual(cq.architectures, ['Qwen2ForCausalLM']);
  assert.equal(cq.torch_dtype, 'float16');
  assertLayout(readAll(qwen), expectedLlama({ d: 32, layers: 2, heads: 4, kv: 2, hd: 8, inter: 64, vocab: 320, tied: false, qkvBias: true }), 'F16');
});

test('checkpoints are deterministic and depend on the seed', async () => {
  const a = newDir('det');
  const b = newDir('det');
  const c = newDir('det');
  await writeCheckpoint(a, TINY_LLAMA);
  await writeCheckpoint(b, TINY_LLAMA);
  await writeCheckpoint(c, { ...TINY_LLAMA, seed: 99 });
  for (const f of ['model.safetensors', 'tokenizer.json', 'tokenizer_config.json', 'config.json']) {
    assert.deepEqual(fs.readFileSync(path.join(a, f)), fs.readFileSync(path.join(b, f)), f);
  }
  assert.notDeepEqual(fs.readFileSync(path.join(a, 'model.safetensors')), fs.readFileSync(path.join(c, 'model.safetensors')));
});

test('presets have the documented sizes', () => {
  const params = (o: CheckpointOptions) => {
    const d = o.hiddenSize; const hd = d / o.numHeads; const kv = o.numKvHeads ?? o.numHeads; const I = o.intermediateSize!;
    const layer = d * o.numHeads * hd * 2 + d * kv * hd * 2 + 3 * d * I + 2 * d;
    return o.numLayers * layer + 2 * (o.vocabSize ?? 320) * d + d;
  };
  assert.ok(Math.abs(params(BENCH_LLAMA) - 76e6) < 1e6, String(params(BENCH_LLAMA)));
  assert.equal(BENCH_LLAMA.vocabSize, 512);
  assert.equal(DEMO_LLAMA.vocabSize, 512);
  assert.equal(DEMO_LLAMA.maxPositions, 1024);
});

test('bad checkpoint options are refused', async () => {
  await assert.rejects(writeCheckpoint(newDir('bad'), { ...TINY_LLAMA, numKvHeads: 3 }), /multiple of numKvHeads/);
  await assert.rejects(writeCheckpoint(newDir('bad'), { ...TINY_GPT2, numHeads: 5 }), /divisible/);
  await assert.rejects(writeCheckpoint(newDir('bad'), { ...TINY_LLAMA, shards: 0 }), /shards/);
});

test('ensureCheckpoint writes once, rewrites on other options, leaves foreign folders alone', async () => {
  const dir = newDir('ensure');
  const first = await ensureCheckpoint(dir, TINY_LLAMA);
  assert.equal(first.written, true);
  assert.ok(fs.existsSync(path.join(dir, '.fixture.json')));
  const mtime = fs.statSync(path.join(dir, 'model.safetensors')).mtimeMs;
  const again = await ensureCheckpoint(dir, TINY_LLAMA);
  assert.equal(again.written, false);
  assert.deepEqual(again.config, first.config);
  assert.equal(fs.statSync(path.join(dir, 'model.safetensors')).mtimeMs, mtime);

  const sharded = await ensureCheckpoint(dir, { ...TINY_LLAMA, shards: 2 });
  assert.equal(sharded.written, true);
  assert.ok(!fs.existsSync(path.join(dir, 'model.safetensors')), 'stale files are removed');
  assert.ok(fs.existsSync(path.join(dir, 'model.safetensors.index.json')));

  // concurrent callers on a fresh folder agree and leave no temporary folders behind
  const racy = newDir('ensure-race');
  const results = await Promise.all([ensureCheckpoint(racy, TINY_GPT2), ensureCheckpoint(racy, TINY_GPT2)]);
  assert.deepEqual(results[0].config, results[1].config);
  assert.deepEqual(fs.readdirSync(tmp).filter((f) => f.includes('.tmp-')), []);

  const foreign = newDir('foreign');
  fs.mkdirSync(foreign);
  fs.writeFileSync(path.join(foreign, 'config.json'), '{"model_type":"llama"}');
  const kept = await ensureCheckpoint(foreign, TINY_LLAMA);
  assert.equal(kept.written, false);
  assert.deepEqual(fs.readdirSync(foreign), ['config.json']);
});

// ---------------------------------------------------------------------------------------------
// Tokenizers
// ---------------------------------------------------------------------------------------------

const TEXTS = [
  'The weather today is mild and bright.',
  'Hello, World! 123 + 4.5 = 127.5',
  'café naïve résumé — déjà vu',
  '日本語のテキスト and 中文',
  'emoji: 🦀🚀👩‍👩‍👧 ok',
  '  leading spaces,\ttabs\nand\n\nnewlines  ',
  "it's we're they've I'm you'll he'd",
  '',
];

for (const flavour of ['gpt2', 'llama'] as const) {
  test(`${flavour} tokenizer loads in @huggingface/tokenizers and round-trips`, () => {
    const files = buildTokenizer({ flavour, vocabSize: 320 });
    const tok = new Tokenizer(files.tokenizerJson, files.tokenizerConfig);
    const vocab = tok.get_vocab(true);
    assert.equal(vocab.size, 320);
    assert.deepEqual([...vocab.values()].sort((a, b) => a - b), [...Array(320).keys()]);
    const bos = files.bosTokenId;
    for (const text of TEXTS) {
      const plain = tok.encode(text, { add_special_tokens: false }).ids;
      assert.ok(plain.every((id: number) => id >= 0 && id < 320 && id !== bos), text);
      if (text) assert.equal(tok.decode(plain), text, text);
      const withSpecial = tok.encode(text).ids;
      if (flavour === 'llama') {
        assert.deepEqual(withSpecial, [1, ...plain], `BOS added once: ${text}`);
        assert.equal(tok.decode(withSpecial, { skip_special_tokens: true }), text);
      } else {
        assert.deepEqual(withSpecial, plain, `no BOS for gpt2: ${text}`);
      }
    }
    // merges learned from the corpus make common words single tokens
    assert.equal(tok.encode(' the', { add_special_tokens: false }).ids.length, 1);
    assert.ok(tok.encode('The weather today', { add_special_tokens: false }).ids.length <= 'The weather today'.length * 0.6);
  });
}

test('special tokens written in the prompt encode to their ids', () => {
  const gpt2 = buildTokenizer({ flavour: 'gpt2', vocabSize: 320 });
  assert.deepEqual(gpt2.specialTokens, { '<|endoftext|>': 319 });
  const g = new Tokenizer(gpt2.tokenizerJson, gpt2.tokenizerConfig);
  const gi = g.encode('a<|endoftext|>b').ids;
  assert.deepEqual(gi, [...g.encode('a').ids, 319, ...g.encode('b').ids]);
  assert.equal(g.decode(gi), 'a<|endoftext|>b');
  assert.equal(g.decode(gi, { skip_special_tokens: true }), 'ab');

  const llama = buildTokenizer({ flavour: 'llama', vocabSize: 512 });
  assert.deepEqual(llama.specialTokens, { '<unk>': 0, '<s>': 1, '</s>': 2 });
  assert.equal(llama.bosTokenId, 1);
  assert.equal(llama.eosTokenId, 2);
  const l = new Tokenizer(llama.tokenizerJson, llama.tokenizerConfig);
  const ids = l.encode('Hi</s><s>there').ids;
  assert.equal(ids[0], 1);
  assert.ok(ids.includes(2));
  assert.equal(ids.filter((i: number) => i === 1).length, 2);
  assert.equal(l.decode(ids), '<s>Hi</s><s>there');
  assert.equal(l.get_vocab(true).size, 512);
});

test('tokenizer files have the HF layout and the llama chat template renders', () => {
  const g = buildTokenizer({ flavour: 'gpt2' });
  const gj = g.tokenizerJson as Record<string, any>;
  assert.equal(gj.version, '1.0');
  assert.equal(gj.model.type, 'BPE');
  assert.ok(typeof gj.model.merges[0] === 'string' && gj.model.merges[0].split(' ').length === 2);
  assert.deepEqual(gj.pre_tokenizer, { type: 'ByteLevel', add_prefix_space: false, trim_offsets: true, use_regex: true });
  assert.equal(gj.post_processor.type, 'ByteLevel');
  assert.equal(gj.decoder.type, 'ByteLevel');
  assert.deepEqual(gj.added_tokens.map((t: any) => [t.id, t.content, t.special]), [[319, '<|endoftext|>', true]]);
  assert.equal(gj.model.vocab['!'], 0); // GPT-2's byte order
  assert.equal(gj.model.vocab['Ġ'], 220);
  assert.equal(g.tokenizerConfig.add_bos_token, false);
  assert.equal(g.tokenizerConfig.eos_token, '<|endoftext|>');
  const untyped = buildTokenizer({ flavour: 'gpt2', omitModelType: true });
  assert.equal((untyped.tokenizerJson as any).model.type, undefined);
  const tu = new Tokenizer(untyped.tokenizerJson, untyped.tokenizerConfig);
  assert.equal(tu.decode(tu.encode('the weather').ids), 'the weather');

  const l = buildTokenizer({ flavour: 'llama' });
  const lj = l.tokenizerJson as Record<string, any>;
  assert.equal(lj.post_processor.type, 'TemplateProcessing');
  assert.deepEqual(lj.post_processor.single, [{ SpecialToken: { id: '<s>', type_id: 0 } }, { Sequence: { id: 'A', type_id: 0 } }]);
  assert.equal(lj.model.vocab['!'], 3);
  const cfg = l.tokenizerConfig as Record<string, any>;
  assert.equal(cfg.add_bos_token, true);
  assert.equal(cfg.bos_token, '<s>');
  assert.equal(cfg.eos_token, '</s>');
  const rendered = new Template(cfg.chat_template).render({
    messages: [{ role: 'system', content: 'Be brief.' }, { role: 'user', content: 'Hi' }],
    bos_token: cfg.bos_token, eos_token: cfg.eos_token, add_generation_prompt: true,
  });
  assert.equal(rendered, '<s><|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\n');
  assert.throws(() => buildTokenizer({ flavour: 'llama', vocabSize: 100 }), /vocabSize/);
});

// ---------------------------------------------------------------------------------------------
// PEFT adapters
// ---------------------------------------------------------------------------------------------

const tinyLlamaConfig = async () => (await writeCheckpoint(newDir('base-llama'), TINY_LLAMA)).config;
const tinyGpt2Config = async () => (await writeCheckpoint(newDir('base-gpt2'), TINY_GPT2)).config;

function readAdapter(dir: string): { config: Record<string, any>; reader: SafetensorsReader } {
  return { config: readJson(dir, 'adapter_config.json'), reader: openSafetensors(path.join(dir, 'adapter_model.safetensors')) };
}

test('listLinearModules follows the HF module paths and dimensions', async () => {
  const llama = listLinearModules('llama', await tinyLlamaConfig());
  assert.equal(llama.length, 14);
  assert.deepEqual(llama.slice(0, 7).map((m) => [m.path, m.inFeatures, m.outFeatures, m.layer, m.name, m.conv1d]), [
    ['model.layers.0.self_attn.q_proj', 32, 32, 0, 'q_proj', false],
    ['model.layers.0.self_attn.k_proj', 32, 16, 0, 'k_proj', false],
    ['model.layers.0.self_attn.v_proj', 32, 16, 0, 'v_proj', false],
    ['model.layers.0.self_attn.o_proj', 32, 32, 0, 'o_proj', false],
    ['model.layers.0.mlp.gate_proj', 32, 64, 0, 'gate_proj', false],
    ['model.layers.0.mlp.up_proj', 32, 64, 0, 'up_proj', false],
    ['model.layers.0.mlp.down_proj', 64, 32, 0, 'down_proj', false],
  ]);
  // ModelConfig-like dims give the same list
  assert.deepEqual(listLinearModules('llama', { hiddenSize: 32, numLayers: 2, numHeads: 4, numKvHeads: 2, intermediateSize: 64 }), llama);
  const gpt2 = listLinearModules('gpt2', await tinyGpt2Config());
  assert.deepEqual(gpt2.filter((m) => m.layer === 1).map((m) => [m.path, m.inFeatures, m.outFeatures, m.conv1d]), [
    ['transformer.h.1.attn.c_attn', 32, 96, true],
    ['transformer.h.1.attn.c_proj', 32, 32, true],
    ['transformer.h.1.mlp.c_fc', 32, 128, true],
    ['transformer.h.1.mlp.c_proj', 128, 32, true],
  ]);
  const hd = listLinearModules('llama', { hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 4, num_key_value_heads: 1, head_dim: 16, intermediate_size: 8 });
  assert.deepEqual(hd.map((m) => m.outFeatures), [64, 16, 16, 32, 8, 8, 32]);
});

test('PEFT matching rules (check_target_module_exists / get_pattern_key)', () => {
  // [key, target_modules, layers_to_transform, layers_pattern, expected] after PEFT's own test table
  const cases: Array<[string, string[] | string, number[] | number | undefined, string | string[] | undefined, boolean]> = [
    ['foo', [], undefined, undefined, false],
    ['foo', ['foo'], undefined, undefined, true],
    ['foo', ['bar'], undefined, undefined, false],
    ['foo', 'foo', undefined, undefined, true],
    ['foo', '.*oo', undefined, undefined, true],
    ['foo', 'fo.*', undefined, undefined, true],
    ['foo', '.*bar.*', undefined, undefined, false],
    ['foobar', '.*oba.*', undefined, undefined, true],
    ['foo.bar.1.baz', ['baz'], [1], ['bar'], true],
    ['foo.bar.1.baz', ['baz'], [0], ['bar'], false],
    ['foo.bar.1.baz', ['baz'], [1], ['ba'], false],
    ['foo.bar.1.baz', ['baz'], [1], undefined, true],
    ['foo.bar.1.baz', ['baz'], 1, 'bar', true],
    ['foo.bar.1.baz', ['baz'], [], undefined, true],
    ['foo.bar.1.baz', 'foo.bar.1.baz', [0], ['bar'], true], // regex: layers are not filtered
    ['foo.bar.1.baz', ['foo.bar.1.baz'], [0], ['bar'], true], // exact entry: layers are not filtered
    ['model.layers.0.self_attn.q_proj', ['q_proj'], undefined, undefined, true],
    ['model.layers.0.self_attn.q_proj', ['proj'], undefined, undefined, false],
    ['model.layers.0.self_attn.q_proj', 'q_proj', undefined, undefined, false], // regex must match the whole path
    ['transformer.h.0.attn.c_proj', ['c_proj'], undefined, undefined, true],
    ['transformer.h.0.mlp.c_proj', ['c_proj'], undefined, undefined, true],
    ['transformer.h.0.mlp.c_proj', ['mlp.c_proj'], undefined, undefined, true],
  ];
  for (const [key, targetModules, layersToTransform, layersPattern, want] of cases) {
    assert.equal(matchesTarget(key, { targetModules, layersToTransform, layersPattern }), want, JSON.stringify([key, targetModules, layersToTransform, layersPattern]));
  }
  const p = { 'q_proj': 8, 'layers\\.1\\..*v_proj': 2, 'proj': 5 };
  assert.equal(patternValue(p, 'model.layers.0.self_attn.q_proj', 4), 8);
  assert.equal(patternValue(p, 'model.layers.1.self_attn.v_proj', 4), 2);
  assert.equal(patternValue(p, 'model.layers.0.self_attn.v_proj', 4), 4); // "proj" needs a "." before it
  assert.equal(patternValue({ '.*proj': 3, 'q_proj': 5 }, 'model.layers.0.self_attn.q_proj', 4), 3); // first key wins
  assert.equal(patternValue(undefined, 'x', 7), 7);
});

test('default llama adapter: q_proj and v_proj of every layer, PEFT config fields', async () => {
  const base = await tinyLlamaConfig();
  const dir = newDir('adapter-llama');
  const written = await writePeftAdapter(dir, { baseConfig: base, seed: 5 });
  const { config, reader } = readAdapter(dir);
  assert.deepEqual(config, written.config);
  assert.deepEqual(Object.keys(config), Object.keys(config).sort());
  assert.equal(config.peft_type, 'LORA');
  assert.equal(config.task_type, 'CAUSAL_LM');
  assert.equal(config.r, 4);
  assert.equal(config.lora_alpha, 8);
  assert.deepEqual(config.target_modules, ['q_proj', 'v_proj']);
  assert.equal(config.fan_in_fan_out, false);
  assert.equal(config.bias, 'none');
  assert.equal(config.use_rslora, false);
  assert.equal(config.use_dora, false);
  assert.equal(config.modules_to_save, null);
  assert.deepEqual(config.rank_pattern, {});
  assert.deepEqual(config.alpha_pattern, {});
  assert.equal(config.layers_to_transform, null);
  assert.equal(config.layers_pattern, null);
  assert.equal(config.inference_mode, true);
  assert.equal(config.revision, null);
  assert.equal(typeof config.base_model_name_or_path, 'string');
  assert.deepEqual(reader.metadata, { format: 'pt' });
  assert.deepEqual([...reader.tensors.keys()].sort(), [
    'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight',
    'base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight',
    'base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight',
    'base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight',
    'base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight',
    'base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight',
    'base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight',
    'base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight',
  ]);
  assert.deepEqual(reader.tensors.get('base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight')!.shape, [4, 32]);
  assert.deepEqual(reader.tensors.get('base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight')!.shape, [16, 4]);
  for (const [name, t] of Object.entries(written.tensors)) {
    assert.deepEqual(reader.readFloat32(name), t.data, name);
    assert.ok(t.data.some((v) => v !== 0), `${name} is zero`); // B is non-zero, unlike PEFT's init
  }
  assert.deepEqual(written.targets.map((t) => [t.path, t.r, t.alpha, t.scaling]), [
    ['model.layers.0.self_attn.q_proj', 4, 8, 2], ['model.layers.0.self_attn.v_proj', 4, 8, 2],
    ['model.layers.1.self_attn.q_proj', 4, 8, 2], ['model.layers.1.self_attn.v_proj', 4, 8, 2],
  ]);
  reader.close();
  // deterministic per seed
  const again = await writePeftAdapter(newDir('adapter-llama'), { baseConfig: base, seed: 5 });
  assert.deepEqual(again.tensors, written.tensors);
  const other = await writePeftAdapter(newDir('adapter-llama'), { baseConfig: base, seed: 6 });
  assert.notDeepEqual(other.tensors, written.tensors);
});

test('GPT-2 adapters: Conv1D paths, fan_in_fan_out, suffix list hits attn and mlp c_proj, default infix', async () => {
  const base = await tinyGpt2Config();
  const dir = newDir('adapter-gpt2');
  const w = await writePeftAdapter(dir, { baseConfig: base, targetModules: ['c_proj'], r: 2, loraAlpha: 4, nameInfix: true });
  const { config, reader } = readAdapter(dir);
  assert.equal(config.fan_in_fan_out, true);
  assert.deepEqual(w.targets.map((t) => t.path), [
    'transformer.h.0.attn.c_proj', 'transformer.h.0.mlp.c_proj', 'transformer.h.1.attn.c_proj', 'transformer.h.1.mlp.c_proj',
  ]);
  assert.deepEqual(reader.tensors.get('base_model.model.transformer.h.0.mlp.c_proj.lora_A.default.weight')!.shape, [2, 128]);
  assert.deepEqual(reader.tensors.get('base_model.model.transformer.h.0.mlp.c_proj.lora_B.default.weight')!.shape, [32, 2]);
  assert.ok([...reader.tensors.keys()].every((n) => /\.lora_[AB]\.default\.weight$/.test(n)));
  reader.close();
  const def = await writePeftAdapter(newDir('adapter-gpt2'), { baseConfig: base });
  assert.deepEqual(def.config.target_modules, ['c_attn']);
  assert.deepEqual(def.tensors['base_model.model.transformer.h.1.attn.c_attn.lora_B.weight']!.shape, [96, 4]);
});

test('regex and all-linear targets', async () => {
  const base = await tinyLlamaConfig();
  const regex = await writePeftAdapter(newDir('adapter-regex'), { baseConfig: base, targetModules: '.*\\.layers\\.1\\.self_attn\\.(q|k)_proj' });
  assert.equal(regex.config.target_modules, '.*\\.layers\\.1\\.self_attn\\.(q|k)_proj');
  assert.deepEqual(regex.targets.map((t) => t.path), ['model.layers.1.self_attn.q_proj', 'model.layers.1.self_attn.k_proj']);
  await assert.rejects(writePeftAdapter(newDir('adapter-regex'), { baseConfig: base, targetModules: 'q_proj' }), /match no module/);

  const all = await writePeftAdapter(newDir('adapter-all'), { baseConfig: base, targetModules: 'all-linear' });
  assert.deepEqual(all.config.target_modules, ['down_proj', 'gate_proj', 'k_proj', 'o_proj', 'q_proj', 'up_proj', 'v_proj']);
  assert.equal(all.targets.length, 14);
  assert.equal(Object.keys(all.tensors).length, 28);
  assert.ok(!Object.keys(all.tensors).some((n) => n.includes('lm_head')));
  const allGpt2 = await writePeftAdapter(newDir('adapter-all'), { baseConfig: await tinyGpt2Config(), targetModules: 'ALL-LINEAR' });
  assert.deepEqual(allGpt2.config.target_modules, ['c_attn', 'c_fc', 'c_proj']);
  assert.equal(allGpt2.targets.length, 8);
});

test('rank_pattern, alpha_pattern and rsLoRA', async () => {
  const base = await tinyLlamaConfig();
  const dir = newDir('adapter-patterns');
  const w = await writePeftAdapter(dir, {
    baseConfig: base, targetModules: ['q_proj', 'v_proj', 'down_proj'], r: 4, loraAlpha: 16, useRslora: true,
    rankPattern: { 'layers.1.self_attn.q_proj': 8, 'down_proj': 2 }, alphaPattern: { 'v_proj': 3 },
  });
  const byPath = new Map(w.targets.map((t) => [t.path, t]));
  assert.equal(byPath.get('model.layers.0.self_attn.q_proj')!.r, 4);
  assert.equal(byPath.get('model.layers.1.self_attn.q_proj')!.r, 8);
  assert.equal(byPath.get('model.layers.1.mlp.down_proj')!.r, 2);
  assert.equal(byPath.get('model.layers.0.self_attn.v_proj')!.alpha, 3);
  assert.equal(byPath.get('model.layers.1.self_attn.q_proj')!.scaling, 16 / Math.sqrt(8));
  assert.equal(byPath.get('model.layers.0.self_attn.v_proj')!.scaling, 3 / 2);
  const { config, reader } = readAdapter(dir);
  assert.equal(config.use_rslora, true);
  assert.deepEqual(config.rank_pattern, { 'down_proj': 2, 'layers.1.self_attn.q_proj': 8 });
  assert.deepEqual(Object.keys(config.rank_pattern), ['down_proj', 'layers.1.self_attn.q_proj']); // sort_keys, as PEFT saves
  assert.deepEqual(config.alpha_pattern, { v_proj: 3 });
  assert.deepEqual(reader.tensors.get('base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight')!.shape, [8, 32]);
  assert.deepEqual(reader.tensors.get('base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight')!.shape, [32, 8]);
  assert.deepEqual(reader.tensors.get('base_model.model.model.layers.0.mlp.down_proj.lora_A.weight')!.shape, [2, 64]);
  reader.close();
});

test('layers_to_transform with layers_pattern', async () => {
  const base = await tinyLlamaConfig();
  const only1 = await writePeftAdapter(newDir('adapter-layers'), { baseConfig: base, layersToTransform: [1], layersPattern: 'layers' });
  assert.deepEqual(only1.targets.map((t) => t.path), ['model.layers.1.self_attn.q_proj', 'model.layers.1.self_attn.v_proj']);
  assert.deepEqual(only1.config.layers_to_transform, [1]);
  assert.equal(only1.config.layers_pattern, 'layers');
  const int0 = await writePeftAdapter(newDir('adapter-layers'), { baseConfig: base, layersToTransform: 0 });
  assert.deepEqual(int0.targets.map((t) => t.layer), [0, 0]);
  assert.equal(int0.config.layers_to_transform, 0);
  await assert.rejects(writePeftAdapter(newDir('adapter-layers'), { baseConfig: base, layersToTransform: [0], layersPattern: 'blocks' }), /match no module/);
  const gpt2 = await writePeftAdapter(newDir('adapter-layers'), { baseConfig: await tinyGpt2Config(), targetModules: ['c_fc'], layersToTransform: [0], layersPattern: ['h'] });
  assert.deepEqual(gpt2.targets.map((t) => t.path), ['transformer.h.0.mlp.c_fc']);
});

test('dtype and escape hatches for negative tests', async () => {
  const base = await tinyLlamaConfig();
  const dir = newDir('adapter-bf16');
  const w = await writePeftAdapter(dir, { baseConfig: base, dtype: 'BF16' });
  const { reader } = readAdapter(dir);
  for (const [name, t] of Object.entries(w.tensors)) {
    assert.equal(reader.tensors.get(name)!.dtype, 'BF16');
    assert.deepEqual(reader.readFloat32(name), t.data);
  }
  reader.close();

  const broken = newDir('adapter-broken');
  const magnitude = 'base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector';
  const b = await writePeftAdapter(broken, {
    baseConfig: base,
    extraConfig: { use_dora: true, target_modules: 'all-linear' },
    extraTensors: { [magnitude]: { shape: [32], data: new Float32Array(32).fill(1) } },
    mutateTensors: (t) => {
      delete t['base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight'];
      t['base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight']!.data[0] = NaN;
    },
  });
  const r = readAdapter(broken);
  assert.equal(r.config.use_dora, true);
  assert.equal(r.config.target_modules, 'all-linear');
  assert.ok(r.reader.tensors.has(magnitude));
  assert.ok(!r.reader.tensors.has('base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight'));
  assert.ok(Number.isNaN(r.reader.readFloat32('base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight')[0]));
  assert.equal(Object.keys(b.tensors).length, 8);
  r.reader.close();
});

test('rng is deterministic with a standard normal', () => {
  const a = createRng(42).fillNormal(20000);
  assert.deepEqual(createRng(42).fillNormal(20000), a);
  assert.notDeepEqual(createRng(43).fillNormal(10), a.subarray(0, 10));
  const mean = a.reduce((s, v) => s + v, 0) / a.length;
  const variance = a.reduce((s, v) => s + (v - mean) ** 2, 0) / a.length;
  assert.ok(Math.abs(mean) < 0.03 && Math.abs(variance - 1) < 0.05, `${mean} ${variance}`);
  const u = createRng(1);
  for (let i = 0; i < 1000; i++) { const x = u.uniform(); assert.ok(x >= 0 && x < 1); }
});
