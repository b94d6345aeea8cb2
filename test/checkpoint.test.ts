/** Checkpoint loading: sharded files, and coded errors for bad configs, tensors and tokenizers. */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync, truncateSync, rmSync, statSync } from 'node:fs';
import { join } from 'node:path';
import * as tf from '@tensorflow/tfjs-core';
import { TINY_GPT2, TINY_LLAMA, writeCheckpoint } from '../src/demo/index.ts';
import { normalizeConfig } from '../src/model/config.ts';
import { CausalLM } from '../src/model/model.ts';
import { newKV } from '../src/exec/kv.ts';
import { TextTokenizer } from '../src/text/tokenizer.ts';
import { writeSafetensors } from '../src/formats/safetensors.ts';
import { setupBackend, tempDir } from './helpers/tf.ts';

const tmp = tempDir();
before(setupBackend);
after(tmp.cleanup);

async function fresh(name: string, opts = TINY_LLAMA): Promise<string> {
  const dir = join(tmp.dir, name);
  await writeCheckpoint(dir, opts);
  return dir;
}

function expectCode(fn: () => unknown, code: string): void {
  assert.throws(fn, (err: { code?: string; message?: string }) => {
    assert.equal(err.code, code, `expected ${code}, got ${err.code}: ${err.message}`);
    return true;
  });
}

test('a sharded checkpoint loads and gives the same logits as the single file', async () => {
  const single = await fresh('single');
  const sharded = await fresh('sharded', { ...TINY_LLAMA, shards: 3 });
  const index = JSON.parse(readFileSync(join(sharded, 'model.safetensors.index.json'), 'utf8'));
  assert.equal(new Set(Object.values(index.weight_map)).size, 3);
  const logits = [];
  for (const dir of [single, sharded]) {
    const m = CausalLM.load(dir);
    const kv = newKV(m.config);
    kv.addEmptyRows(1);
    const out = m.forward({ kv, tokens: Int32Array.from([3, 4, 5]), positions: Int32Array.from([0, 1, 2]), T: 3, logitRows: Int32Array.from([2]) });
    logits.push(Array.from(await out.data()));
    out.dispose();
    kv.dispose();
    m.dispose();
  }
  assert.deepEqual(logits[0], logits[1]);
});

test('config.json problems are coded errors', () => {
  expectCode(() => normalizeConfig({ model_type: 'bert' }), 'MODEL_TYPE_UNSUPPORTED');
  expectCode(() => normalizeConfig([]), 'CONFIG_INVALID');
  expectCode(() => normalizeConfig({ hidden_size: 8 }), 'CONFIG_INVALID');
  expectCode(() => normalizeConfig({ model_type: 'llama', hidden_size: 8, num_attention_heads: 3, num_key_value_heads: 2, num_hidden_layers: 1, intermediate_size: 4, vocab_size: 4 }), 'CONFIG_INVALID');
  expectCode(() => normalizeConfig({ model_type: 'gpt2', n_embd: -1, n_head: 1, n_layer: 1, vocab_size: 3, n_positions: 4 }), 'CONFIG_INVALID');
  expectCode(() => normalizeConfig({ model_type: 'llama', hidden_size: 8, num_attention_heads: 2, num_hidden_layers: 1, intermediate_size: 4, vocab_size: 4, rope_scaling: { rope_type: 'yarn' } }), 'CONFIG_INVALID');
});

test('bad checkpoint folders fail with coded errors and leak no tensors', async () => {
  const baseline = tf.memory().numTensors;
  const dir = await fresh('bad-json');
  writeFileSync(join(dir, 'config.json'), '{ not json');
  expectCode(() => CausalLM.load(dir), 'CONFIG_INVALID');

  const missing = await fresh('missing-tensor');
  const st = readFileSync(join(missing, 'model.safetensors'));
  // Rewrite the file without one layer norm.
  const { parseSafetensors } = await import('../src/formats/safetensors.ts');
  const r = parseSafetensors(st);
  const kept: Record<string, { shape: readonly number[]; data: Float32Array }> = {};
  for (const [name, e] of r.tensors) if (name !== 'model.layers.1.post_attention_layernorm.weight') kept[name] = { shape: e.shape, data: r.readFloat32(name) };
  writeFileSync(join(missing, 'model.safetensors'), writeSafetensors(kept));
  expectCode(() => CausalLM.load(missing), 'CHECKPOINT_MISSING_TENSOR');

  const shape = await fresh('bad-shape');
  const cfg = JSON.parse(readFileSync(join(shape, 'config.json'), 'utf8'));
  writeFileSync(join(shape, 'config.json'), JSON.stringify({ ...cfg, intermediate_size: cfg.intermediate_size + 1 }));
  expectCode(() => CausalLM.load(shape), 'CHECKPOINT_SHAPE');

  const trunc = await fresh('truncated', TINY_GPT2);
  truncateSync(join(trunc, 'model.safetensors'), Math.floor(statSync(join(trunc, 'model.safetensors')).size / 2));
  expectCode(() => CausalLM.load(trunc), 'SAFETENSORS_INVALID');

  const none = await fresh('no-weights');
  rmSync(join(none, 'model.safetensors'));
  writeFileSync(join(none, 'pytorch_model.bin'), 'pickle');
  expectCode(() => CausalLM.load(none), 'CHECKPOINT_INVALID');
  assert.equal(tf.memory().numTensors, baseline);
});

test('a tokenizer that does not match the model is refused', async () => {
  const dir = await fresh('tok');
  const cfg = JSON.parse(readFileSync(join(dir, 'config.json'), 'utf8'));
  await assert.rejects(TextTokenizer.load(dir, { ...normalizeConfig(cfg), vocabSize: 10 }), { code: 'TOKENIZER_INVALID' });
  writeFileSync(join(dir, 'tokenizer.json'), '{"model": 3}');
  await assert.rejects(TextTokenizer.load(dir, normalizeConfig(cfg)), { code: 'TOKENIZER_INVALID' });
});
