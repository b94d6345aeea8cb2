import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { listLinearModules, writePeftAdapter, type AdapterOptions, type AdapterTensor, type LinearModuleInfo } from '../src/demo/adapter.ts';
import { writeSafetensors } from '../src/formats/safetensors.ts';
import type { LinearModule } from '../src/model/types.ts';
import { assertNotPickle, firstNonFinite, loadAdapterWeights } from '../src/lora/adapter-file.ts';

const GPT2 = { model_type: 'gpt2', n_embd: 8, n_layer: 2, n_head: 2 };
const LLAMA = { model_type: 'llama', hidden_size: 8, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, intermediate_size: 12 };
const MAX = { maxRank: 16 };

/** The executor's key: path from the layer index on (`0.attn.c_proj`, `1.self_attn.q_proj`). */
const withKeys = (mods: LinearModuleInfo[]): LinearModule[] =>
  mods.map((m) => ({ ...m, key: m.path.replace(/^.*?\.(\d+)\./, '$1.') }));
const gpt2Base = { modules: withKeys(listLinearModules('gpt2', GPT2)) };
const llamaBase = { modules: withKeys(listLinearModules('llama', LLAMA)) };

/** Writes an adapter with the fixture builder and reads it back as the loader's input. */
async function build(opts: AdapterOptions) {
  const dir = await mkdtemp(path.join(tmpdir(), 'lora-adapter-'));
  try {
    const written = await writePeftAdapter(dir, opts);
    const config = JSON.parse(await readFile(path.join(dir, 'adapter_config.json'), 'utf8')) as unknown;
    const weights = new Uint8Array(await readFile(path.join(dir, 'adapter_model.safetensors')));
    return { written, input: { id: 'test-adapter', config, weights } };
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

function expectCode(fn: () => unknown, code: string, message?: RegExp) {
  assert.throws(fn, (err: { code?: string; message?: string }) => {
    assert.equal(err.code, code, err.message);
    assert.match(err.message!, /^adapter "test-adapter": /);
    if (message) assert.match(err.message!, message);
    return true;
  });
}

/** Renames every tensor key with `f`. */
const renameAll = (f: (name: string) => string) => (t: Record<string, AdapterTensor>) => {
  for (const [k, v] of Object.entries(t)) {
    delete t[k];
    t[f(k)] = v;
  }
};

/** PEFT's A [r, in] as [in, r] (Aᵀ). */
const transposedA = (A: Float32Array, r: number, inF: number) => Float32Array.from({ length: inF * r }, (_, k) => A[(k % r) * inF + Math.floor(k / r)]!);
/** PEFT's B [out, r] as s·Bᵀ [r, out]. */
const scaledTransposedB = (B: Float32Array, r: number, outF: number, s: number) =>
  Float32Array.from({ length: r * outF }, (_, k) => s * B[(k % outF) * r + Math.floor(k / outF)]!);

test('GPT-2: loads every targeted Conv1D module as Aᵀ and scaling·Bᵀ, all views of one shared buffer', async () => {
  const { written, input } = await build({ baseConfig: GPT2, r: 4, loraAlpha: 8, targetModules: ['c_attn', 'c_proj'] });
  const w = loadAdapterWeights(input, gpt2Base, MAX);
  assert.equal(w.id, 'test-adapter');
  assert.equal(w.modules.length, 6); // 2 layers × (c_attn, attn.c_proj, mlp.c_proj)
  assert.equal(w.rank, 4);
  assert.deepEqual(w.targetModules, ['c_attn', 'c_proj']);
  assert.equal(w.config.fanInFanOut, true);
  assert.deepEqual(w.modules.map((m) => m.module.key), ['0.attn.c_attn', '0.attn.c_proj', '0.mlp.c_proj', '1.attn.c_attn', '1.attn.c_proj', '1.mlp.c_proj']);
  let bytes = 0;
  for (const m of w.modules) {
    const t = written.targets.find((x) => x.path === m.module.path)!;
    assert.equal(m.r, 4);
    assert.equal(m.scaling, t.scaling);
    assert.equal(m.scaling, 2);
    assert.deepEqual(m.At, transposedA(written.tensors[t.aName]!.data, 4, m.module.inFeatures));
    assert.deepEqual(m.Bt, scaledTransposedB(written.tensors[t.bName]!.data, 4, m.module.outFeatures, 2));
    assert.equal(m.At.length, 4 * m.module.inFeatures);
    assert.equal(m.Bt.length, m.module.outFeatures * 4);
    assert.ok(m.At.buffer instanceof SharedArrayBuffer && m.Bt.buffer === m.At.buffer);
    assert.equal(m.At.buffer, w.modules[0]!.At.buffer);
    bytes += (m.At.length + m.Bt.length) * 4;
  }
  // Fused c_attn: one pair whose B spans q|k|v (out = 3·n_embd).
  assert.equal(w.modules[0]!.Bt.length, 3 * 8 * 4);
  assert.equal(w.bytes, bytes);
  assert.equal(w.modules[0]!.At.buffer.byteLength, bytes);
});

test('Llama: rank/alpha patterns, rsLoRA, F16 storage and the `.default` adapter-name infix', async () => {
  const { written, input } = await build({
    baseConfig: LLAMA, r: 8, loraAlpha: 16, targetModules: 'all-linear', useRslora: true, nameInfix: true, dtype: 'F16',
    rankPattern: { 'layers.1.self_attn.q_proj': 2, down_proj: 4 }, alphaPattern: { v_proj: 4 },
  });
  const w = loadAdapterWeights(input, llamaBase, MAX);
  assert.equal(w.modules.length, 14);
  assert.equal(w.rank, 8);
  assert.deepEqual(w.targetModules, ['down_proj', 'gate_proj', 'k_proj', 'o_proj', 'q_proj', 'up_proj', 'v_proj']);
  for (const m of w.modules) {
    const t = written.targets.find((x) => x.path === m.module.path)!;
    assert.equal(m.r, t.r, m.module.path);
    assert.ok(Math.abs(m.scaling - t.scaling) < 1e-12, m.module.path);
    assert.deepEqual(m.At, transposedA(written.tensors[t.aName]!.data, t.r, m.module.inFeatures));
    assert.deepEqual(m.Bt, scaledTransposedB(written.tensors[t.bName]!.data, t.r, m.module.outFeatures, m.scaling));
  }
  const q1 = w.modules.find((m) => m.module.path === 'model.layers.1.self_attn.q_proj')!;
  assert.equal(q1.r, 2);
  assert.equal(q1.scaling, 16 / Math.sqrt(2));
  const v0 = w.modules.find((m) => m.module.path === 'model.layers.0.self_attn.v_proj')!;
  assert.equal(v0.scaling, 4 / Math.sqrt(8));
});

test('prefix tolerance: adapters saved against the bare base model (h.N / layers.N) match', async () => {
  const gpt2 = await build({ baseConfig: GPT2, targetModules: ['c_attn'], mutateTensors: renameAll((n) => n.replace('base_model.model.transformer.', 'base_model.model.')) });
  const w1 = loadAdapterWeights(gpt2.input, gpt2Base, MAX);
  assert.deepEqual(w1.modules.map((m) => m.module.path), ['transformer.h.0.attn.c_attn', 'transformer.h.1.attn.c_attn']);

  const llama = await build({ baseConfig: LLAMA, targetModules: ['q_proj'], mutateTensors: renameAll((n) => n.replace('base_model.model.model.', 'base_model.model.')) });
  const w2 = loadAdapterWeights(llama.input, llamaBase, MAX);
  assert.deepEqual(w2.modules.map((m) => m.module.path), ['model.layers.0.self_attn.q_proj', 'model.layers.1.self_attn.q_proj']);

  // And the other way round: a base that names its modules without the class prefix.
  const bareBase = { modules: gpt2Base.modules.map((m) => ({ ...m, path: m.path.replace(/^transformer\./, '') })) };
  const w3 = loadAdapterWeights((await build({ baseConfig: GPT2, targetModules: ['c_fc'] })).input, bareBase, MAX);
  assert.deepEqual(w3.modules.map((m) => m.module.path), ['h.0.mlp.c_fc', 'h.1.mlp.c_fc']);

  // Without the base_model.model. prefix at all.
  const noPrefix = await build({ baseConfig: GPT2, targetModules: ['c_attn'], mutateTensors: renameAll((n) => n.replace('base_model.model.', '')) });
  assert.equal(loadAdapterWeights(noPrefix.input, gpt2Base, MAX).modules.length, 2);
});

test('two names for one base module are rejected', async () => {
  const { input } = await build({
    baseConfig: GPT2, targetModules: ['c_attn'], layersToTransform: [0], layersPattern: 'h',
    mutateTensors: (t) => {
      for (const [k, v] of Object.entries(t)) t[k.replace('transformer.', '')] = v;
    },
  });
  expectCode(() => loadAdapterWeights(input, gpt2Base, MAX), 'ADAPTER_INVALID_CONFIG', /both resolve to base module "transformer\.h\.0\.attn\.c_attn"/);
});

const A0 = 'base_model.model.transformer.h.0.attn.c_attn.lora_A.weight';
const B0 = 'base_model.model.transformer.h.0.attn.c_attn.lora_B.weight';

const rejectCases: [string, AdapterOptions, string, RegExp][] = [
  ['module missing from the base', { baseConfig: GPT2, targetModules: ['c_attn'], extraTensors: {
    'base_model.model.transformer.h.7.attn.c_attn.lora_A.weight': { shape: [4, 8], data: new Float32Array(32) },
    'base_model.model.transformer.h.7.attn.c_attn.lora_B.weight': { shape: [24, 4], data: new Float32Array(96) },
  } }, 'ADAPTER_UNKNOWN_MODULE', /"transformer\.h\.7\.attn\.c_attn"/],
  ['lm_head pair', { baseConfig: GPT2, targetModules: ['c_attn'], extraTensors: {
    'base_model.model.lm_head.lora_A.weight': { shape: [4, 8], data: new Float32Array(32) },
    'base_model.model.lm_head.lora_B.weight': { shape: [50, 4], data: new Float32Array(200) },
  } }, 'ADAPTER_UNKNOWN_MODULE', /"lm_head"/],
  ['A without B', { baseConfig: GPT2, targetModules: ['c_attn'], mutateTensors: (t) => { delete t[B0]; } }, 'ADAPTER_INVALID_CONFIG', /has lora_A but no lora_B/],
  ['B without A', { baseConfig: GPT2, targetModules: ['c_attn'], mutateTensors: (t) => { delete t[A0]; } }, 'ADAPTER_INVALID_CONFIG', /has lora_B but no lora_A/],
  ['A in_features wrong', { baseConfig: GPT2, targetModules: ['c_attn'], mutateTensors: (t) => { t[A0] = { shape: [4, 6], data: new Float32Array(24) }; } }, 'ADAPTER_SHAPE_MISMATCH', /lora_A is \[4, 6\], expected \[r, 8\]/],
  ['B out_features wrong (c_attn is 3d)', { baseConfig: GPT2, targetModules: ['c_attn'], mutateTensors: (t) => { t[B0] = { shape: [8, 4], data: new Float32Array(32) }; } }, 'ADAPTER_SHAPE_MISMATCH', /lora_B is \[8, 4\], expected \[24, r\]/],
  ['A.r != B.r', { baseConfig: GPT2, targetModules: ['c_attn'], mutateTensors: (t) => { t[B0] = { shape: [24, 2], data: new Float32Array(48) }; } }, 'ADAPTER_SHAPE_MISMATCH', /disagree on the rank/],
  ['1-D tensor', { baseConfig: GPT2, targetModules: ['c_attn'], mutateTensors: (t) => { t[A0] = { shape: [32], data: new Float32Array(32) }; } }, 'ADAPTER_SHAPE_MISMATCH', /2-D/],
  ['rank 0', { baseConfig: GPT2, targetModules: ['c_attn'], mutateTensors: (t) => { t[A0] = { shape: [0, 8], data: new Float32Array(0) }; t[B0] = { shape: [24, 0], data: new Float32Array(0) }; } }, 'ADAPTER_SHAPE_MISMATCH', /rank/],
  ['tensor rank above maxRank (config r within it)', { baseConfig: GPT2, r: 32, targetModules: ['c_attn'], extraConfig: { r: 4 } }, 'ADAPTER_RANK_TOO_LARGE', /rank 32/],
  ['config r above maxRank', { baseConfig: GPT2, r: 32, targetModules: ['c_attn'] }, 'ADAPTER_RANK_TOO_LARGE', /r=32/],
  ['NaN', { baseConfig: GPT2, targetModules: ['c_attn'], mutateTensors: (t) => { t[B0]!.data[5] = NaN; } }, 'ADAPTER_NON_FINITE', /lora_B\.weight" contains NaN at element 5/],
  ['Infinity in F16', { baseConfig: GPT2, dtype: 'F16', targetModules: ['c_attn'], mutateTensors: (t) => { t[A0]!.data[0] = 1e6; } }, 'ADAPTER_NON_FINITE', /Infinity/],
  ['DoRA magnitude vector', { baseConfig: GPT2, targetModules: ['c_attn'], extraTensors: {
    'base_model.model.transformer.h.0.attn.c_attn.lora_magnitude_vector': { shape: [24], data: new Float32Array(24) },
  } }, 'ADAPTER_UNSUPPORTED', /DoRA/],
  ['embedding LoRA', { baseConfig: GPT2, targetModules: ['c_attn'], extraTensors: {
    'base_model.model.transformer.wte.lora_embedding_A': { shape: [4, 50], data: new Float32Array(200) },
  } }, 'ADAPTER_UNSUPPORTED', /embedding/],
  ['LoRA bias tensor', { baseConfig: GPT2, targetModules: ['c_attn'], extraTensors: {
    'base_model.model.transformer.h.0.attn.c_attn.lora_B.bias': { shape: [24], data: new Float32Array(24) },
  } }, 'ADAPTER_UNSUPPORTED', /bias/],
  ['stray non-LoRA tensor', { baseConfig: GPT2, targetModules: ['c_attn'], extraTensors: {
    'base_model.model.score.weight': { shape: [2, 8], data: new Float32Array(16) },
  } }, 'ADAPTER_UNSUPPORTED', /unexpected tensor "base_model\.model\.score\.weight"/],
  ['module outside target_modules', { baseConfig: GPT2, targetModules: ['c_attn'], extraTensors: {
    'base_model.model.transformer.h.0.mlp.c_fc.lora_A.weight': { shape: [4, 8], data: new Float32Array(32) },
    'base_model.model.transformer.h.0.mlp.c_fc.lora_B.weight': { shape: [32, 4], data: new Float32Array(128) },
  } }, 'ADAPTER_INVALID_CONFIG', /"transformer\.h\.0\.mlp\.c_fc" has LoRA tensors but is not selected.*target_modules \["c_attn"\]/],
  ['module outside layers_to_transform', { baseConfig: GPT2, targetModules: ['c_attn'], layersToTransform: [1], layersPattern: 'h', extraTensors: {
    [A0]: { shape: [4, 8], data: new Float32Array(32) },
    [B0]: { shape: [24, 4], data: new Float32Array(96) },
  } }, 'ADAPTER_INVALID_CONFIG', /layers_to_transform \[1\]/],
  ['two adapter names', { baseConfig: GPT2, targetModules: ['c_attn'], mutateTensors: (t) => {
    for (const k of Object.keys(t).filter((n) => n.includes('.h.1.'))) { t[k.replace(/lora_([AB])\./, 'lora_$1.other.')] = t[k]!; delete t[k]; }
  } }, 'ADAPTER_INVALID_CONFIG', /several adapter names/],
  ['use_dora in the config', { baseConfig: GPT2, targetModules: ['c_attn'], extraConfig: { use_dora: true } }, 'ADAPTER_UNSUPPORTED', /use_dora/],
  ['malformed config', { baseConfig: GPT2, targetModules: ['c_attn'], extraConfig: { lora_alpha: 'x' } }, 'ADAPTER_INVALID_CONFIG', /lora_alpha/],
];

for (const [name, opts, code, message] of rejectCases) {
  test(`rejects: ${name} → ${code}`, async () => {
    const { input } = await build(opts);
    expectCode(() => loadAdapterWeights(input, gpt2Base, MAX), code, message);
  });
}

test('rejects: a file with no LoRA tensors', () => {
  const input = { id: 'test-adapter', config: { r: 4, lora_alpha: 8, target_modules: ['c_attn'] }, weights: writeSafetensors({}) };
  expectCode(() => loadAdapterWeights(input, gpt2Base, MAX), 'ADAPTER_INVALID_CONFIG', /no LoRA tensors/);
});

/** A safetensors file with arbitrary dtypes (the writer only produces float dtypes). */
function rawSafetensors(entries: { name: string; dtype: string; shape: number[]; bytes: number }[]): Uint8Array {
  const header: Record<string, unknown> = {};
  let offset = 0;
  for (const e of entries) {
    header[e.name] = { dtype: e.dtype, shape: e.shape, data_offsets: [offset, offset + e.bytes] };
    offset += e.bytes;
  }
  const json = new TextEncoder().encode(JSON.stringify(header));
  const out = new Uint8Array(8 + json.length + offset);
  new DataView(out.buffer).setBigUint64(0, BigInt(json.length), true);
  out.set(json, 8);
  return out;
}

test('rejects: non-float dtypes come back as the reader\'s SAFETENSORS_DTYPE', () => {
  const config = { r: 1, lora_alpha: 1, target_modules: ['c_attn'] };
  const i32 = rawSafetensors([
    { name: A0, dtype: 'I32', shape: [1, 8], bytes: 32 },
    { name: B0, dtype: 'F32', shape: [24, 1], bytes: 96 },
  ]);
  expectCode(() => loadAdapterWeights({ id: 'test-adapter', config, weights: i32 }, gpt2Base, MAX), 'SAFETENSORS_DTYPE', /I32/);
  const unknown = rawSafetensors([{ name: A0, dtype: 'Q4', shape: [1, 8], bytes: 8 }]);
  expectCode(() => loadAdapterWeights({ id: 'test-adapter', config, weights: unknown }, gpt2Base, MAX), 'SAFETENSORS_DTYPE');
});

test('rejects: garbage weights → SAFETENSORS_INVALID; pickles → ADAPTER_PICKLE', () => {
  const config = { r: 1, lora_alpha: 1, target_modules: ['c_attn'] };
  expectCode(() => loadAdapterWeights({ id: 'test-adapter', config, weights: new Uint8Array([1, 2, 3]) }, gpt2Base, MAX), 'SAFETENSORS_INVALID');
  const zip = new Uint8Array([0x50, 0x4b, 0x03, 0x04, 0x14, 0, 0, 0, 8, 0]);
  expectCode(() => loadAdapterWeights({ id: 'test-adapter', config, weights: zip }, gpt2Base, MAX), 'ADAPTER_PICKLE', /safetensors/);
  const pickle = new Uint8Array([0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20]);
  expectCode(() => loadAdapterWeights({ id: 'test-adapter', config, weights: pickle }, gpt2Base, MAX), 'ADAPTER_PICKLE');
});

test('assertNotPickle does not misfire on a safetensors header of length 0x280', () => {
  const bytes = new Uint8Array(8 + 0x280).fill(0x20);
  bytes.set([0x80, 0x02, 0, 0, 0, 0, 0, 0, 0x7b, 0x7d]);
  assert.doesNotThrow(() => assertNotPickle(bytes));
  assert.throws(() => assertNotPickle(new Uint8Array([0x80, 0x04, 0x95, 0, 0, 0, 0, 0, 0, 0])), { code: 'ADAPTER_PICKLE' });
});

test('firstNonFinite finds the first NaN or ±Infinity and passes every finite value', () => {
  const finite = new Float32Array([0, -0, 1e-45, -1e-45, 3.4028234663852886e38, -3.4028234663852886e38, 1.5]);
  assert.equal(firstNonFinite(finite), -1);
  assert.equal(firstNonFinite(new Float32Array(0)), -1);
  for (const bad of [NaN, Infinity, -Infinity]) {
    for (const at of [0, 3, 6]) {
      const a = Float32Array.from(finite);
      a[at] = bad;
      if (at < 6) a[6] = NaN; // a later one too: the first is reported
      assert.equal(firstNonFinite(a), at, `${bad} at ${at}`);
    }
  }
});
