/**
 * Per-request adapter merging end to end, over a real socket on the real runtime (tiny Llama fixture, wasm):
 * a `merged_adapters` request gives the tokens of a request on an adapter uploaded with the reference-merged
 * weights (test/reference/merge.ts), for every strategy; a repeated merge is served from the cache (the merges
 * counter, in the manager and on /metrics, does not move); a replaced or deleted source invalidates it; merged
 * requests share mixed batches with other adapters; best_of's sequences share one merge; bad parameters and incompatible sources are coded errors
 * and the server keeps serving; tensors go back to their baseline.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import * as tf from '@tensorflow/tfjs-core';
import { request as http, FormData } from 'undici';
import { TINY_LLAMA, writeCheckpoint, writePeftAdapter } from '../src/demo/index.ts';
import { parseSafetensors, writeSafetensors } from '../src/formats/safetensors.ts';
import { listeningServer, type ListeningServer } from './helpers/listening.ts';
import { refMergeAdapters, type RefMergeParams, type RefSource } from './reference/merge.ts';
import { setupBackend, tempDir } from './helpers/tf.ts';

const tmp = tempDir();
let config: Record<string, unknown>;
let server: ListeningServer;
let baselineTensors: number;

const SOURCES = {
  'org/a': { r: 4, loraAlpha: 8, targetModules: ['q_proj', 'v_proj'], seed: 1, std: 0.5 },
  'org/b': { r: 4, loraAlpha: 16, targetModules: ['q_proj', 'k_proj', 'o_proj', 'down_proj'], seed: 2, std: 0.5 },
  'org/c': { r: 4, loraAlpha: 8, targetModules: 'all-linear', seed: 3, std: 0.5 },
  'org/r8': { r: 8, loraAlpha: 8, targetModules: ['q_proj'], seed: 4, std: 0.5 },
} as const;

const adapterDir = (id: string) => join(tmp.dir, 'adapters', id);

before(async () => {
  await setupBackend();
  ({ config } = await writeCheckpoint(join(tmp.dir, 'model'), TINY_LLAMA));
  for (const [id, o] of Object.entries(SOURCES)) await writePeftAdapter(adapterDir(id), { baseConfig: config, ...o });
  baselineTensors = tf.memory().numTensors;
  server = await listeningServer(tmp.dir, { workers: 1 });
});
after(async () => {
  await server?.close();
  assert.equal(tf.memory().numTensors, baselineTensors, 'tensors back to their baseline after close');
  tmp.cleanup();
});

async function post(path: string, body: unknown) {
  const res = await http(`${server.url}${path}`, { method: 'POST', body: JSON.stringify(body), headers: { 'content-type': 'application/json' } });
  return { status: res.statusCode, headers: res.headers, json: (await res.body.json()) as any };
}

const PROMPT = 'merge these adapters, please';
const generate = (parameters: Record<string, unknown>) => post('/generate', { inputs: PROMPT, parameters: { max_new_tokens: 12, details: true, ...parameters } });
const tokens = (r: { json: any }) => r.json.details.tokens.map((t: any) => t.id) as number[];

/** An adapter's files as the reference reads them: config, and A/B per module path. */
function refSource(id: string): RefSource {
  const c = JSON.parse(readFileSync(join(adapterDir(id), 'adapter_config.json'), 'utf8'));
  const st = parseSafetensors(readFileSync(join(adapterDir(id), 'adapter_model.safetensors')));
  const modules = new Map<string, { A: Float32Array; B: Float32Array }>();
  for (const name of st.tensors.keys()) {
    const m = /^base_model\.model\.(.+)\.lora_A\.weight$/.exec(name);
    if (m) modules.set(m[1]!, { A: st.readFloat32(name), B: st.readFloat32(name.replace('.lora_A.', '.lora_B.')) });
  }
  return { config: c, modules };
}

/** Uploads the reference merge of `ids` as adapter `as` (PEFT files: the first source's alpha and r). */
async function uploadReferenceMerge(as: string, ids: string[], weights: number[], p: RefMergeParams): Promise<void> {
  const sources = ids.map(refSource);
  const { modules } = refMergeAdapters(sources, weights, p);
  const first = sources[0]!.config;
  const tensors: Record<string, { shape: number[]; data: Float32Array }> = {};
  for (const [path, { A, B }] of modules) {
    tensors[`base_model.model.${path}.lora_A.weight`] = { shape: [first.r, A.length / first.r], data: Float32Array.from(A) };
    tensors[`base_model.model.${path}.lora_B.weight`] = { shape: [B.length / first.r, first.r], data: Float32Array.from(B) };
  }
  const cfg = { peft_type: 'LORA', r: first.r, lora_alpha: first.lora_alpha, use_rslora: first.use_rslora ?? false, target_modules: [...modules.keys()] };
  const form = new FormData();
  form.append('config', new Blob([JSON.stringify(cfg)]), 'adapter_config.json');
  form.append('weights', new Blob([Uint8Array.from(writeSafetensors(tensors))]), 'adapter_model.safetensors');
  const res = await http(`${server.url}/adapters/${as}`, { method: 'PUT', body: form });
  assert.equal(res.statusCode, 200, await res.body.text());
}

const merges = () => server.runtime.adapters.mergesComputed;

async function metric(name: string): Promise<number> {
  const text = await (await http(`${server.url}/metrics`)).body.text();
  return text.split('\n').filter((l) => l.startsWith(name)).reduce((s, l) => s + Number(l.split(' ').at(-1)), 0);
}

const CASES = [
  { strategy: 'linear', weights: [0.7, 1.3, -0.5] },
  { strategy: 'ties', weights: [1, 0.6, 1.4], density: 0.5, majority_sign_method: 'total' },
  { strategy: 'dare_linear', weights: [0.8, 1.2, 1], density: 0.6, seed: 42 },
  { strategy: 'dare_ties', weights: [1.5, 0.5, 1], density: 0.7, majority_sign_method: 'frequency' }, // no seed: the default, 0
] as const;

test('each strategy: a merged request gives the tokens of an adapter uploaded with the reference-merged weights', async () => {
  const base = tokens(await generate({}));
  let differsFromBase = 0;
  for (const c of CASES) {
    const ids = ['org/a', 'org/b', 'org/c'];
    const merged = await generate({
      merged_adapters: { ids, weights: c.weights, merge_strategy: c.strategy, density: 'density' in c ? c.density : undefined, majority_sign_method: 'majority_sign_method' in c ? c.majority_sign_method : undefined },
      ...('seed' in c ? { seed: c.seed } : {}),
    });
    assert.equal(merged.status, 200, JSON.stringify(merged.json));
    assert.match(String(merged.headers['x-adapter-id']), /^merge:[0-9a-f]{16}$/);
    const p: RefMergeParams = {
      strategy: c.strategy, density: 'density' in c ? c.density : 1,
      signMethod: 'majority_sign_method' in c ? c.majority_sign_method : 'total', seed: 'seed' in c ? c.seed : 0,
    };
    await uploadReferenceMerge(`ref/${c.strategy}`, ids, [...c.weights], p);
    const ref = await generate({ adapter_id: `ref/${c.strategy}` });
    assert.equal(ref.status, 200);
    assert.deepEqual(tokens(merged), tokens(ref), c.strategy);
    if (tokens(merged).join() !== base.join()) differsFromBase++;
    // Streamed, the same text.
    const res = await http(`${server.url}/generate_stream`, {
      method: 'POST', headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ inputs: PROMPT, parameters: { max_new_tokens: 12, merged_adapters: { ids, weights: c.weights, merge_strategy: c.strategy, density: p.density, majority_sign_method: p.signMethod }, ...('seed' in c ? { seed: c.seed } : {}) } }),
    });
    const events = (await res.body.text()).split('\n').filter((l) => l.startsWith('data:')).map((l) => JSON.parse(l.slice(5)));
    assert.equal(events.at(-1).generated_text, merged.json.generated_text, `${c.strategy} streamed`);
  }
  assert.ok(differsFromBase >= 3, `merged adapters change the output (${differsFromBase} of 4 differ from the base model)`);
});

test('a repeated merge is computed once: the manager\'s count and lora_serve_adapter_merges_total stay; other parameters merge again', async () => {
  const body = { merged_adapters: { ids: ['org/a', 'org/c'], weights: [2, 0.5], merge_strategy: 'ties', density: 0.3 } };
  const before = merges();
  const beforeMetric = await metric('lora_serve_adapter_merges_total');
  const beforeTies = await metric('lora_serve_adapter_merges_total{strategy="ties"}');
  const first = await generate(body);
  assert.equal(first.status, 200);
  assert.equal(merges(), before + 1);
  for (let i = 0; i < 3; i++) assert.deepEqual(tokens(await generate(body)), tokens(first));
  assert.deepEqual(tokens(await generate({ ...body, seed: 5 })), tokens(first), 'ties draws nothing: the seed does not matter');
  assert.equal(merges(), before + 1);
  assert.equal(await metric('lora_serve_adapter_merges_total{strategy="ties"}'), beforeTies + 1);
  assert.equal(await metric('lora_serve_adapter_merges_total'), beforeMetric + 1);
  await generate({ merged_adapters: { ...body.merged_adapters, weights: [2, 0.6] } });
  await generate({ merged_adapters: { ...body.merged_adapters, merge_strategy: 'dare_ties' }, seed: 1 });
  await generate({ merged_adapters: { ...body.merged_adapters, merge_strategy: 'dare_ties' }, seed: 2 });
  assert.equal(merges(), before + 4);
  assert.equal(await metric('lora_serve_adapter_merges_total'), beforeMetric + 4);
  // It takes a device slot like any adapter, and is not an adapter one can list.
  assert.ok(server.runtime.adapters.stats().deviceAdapters >= 1);
  const models = (await (await http(`${server.url}/v1/models`)).body.json()) as any;
  assert.ok(!models.data.some((m: any) => String(m.id).startsWith('merge:')));
});

test('merged requests share a batch with other adapters and the base model: each equals its result alone', async () => {
  const bodies = [
    { merged_adapters: { ids: ['org/a', 'org/b'], weights: [1, 1] } },
    { adapter_id: 'org/c' },
    {},
    { merged_adapters: { ids: ['org/b', 'org/c'], merge_strategy: 'dare_linear', density: 0.5 }, seed: 3 },
    { adapter_id: 'org/a' },
  ];
  const alone: number[][] = [];
  for (const b of bodies) alone.push(tokens(await generate(b)));
  const together = await Promise.all(bodies.map((b) => generate(b)));
  together.forEach((r, i) => assert.deepEqual(tokens(r), alone[i], `request ${i}`));
});

test('best_of with merged_adapters: the merge is computed once for every sequence, each equals a request alone with its seed', async () => {
  const merged_adapters = { ids: ['org/c', 'org/a'], weights: [0.9, 0.4] };
  const before = merges();
  const best = await generate({ merged_adapters, best_of: 3, do_sample: true, temperature: 1.5 });
  assert.equal(best.status, 200, JSON.stringify(best.json));
  assert.equal(merges(), before + 1, 'one merge for the three sequences');
  const sequences = [best.json.details, ...best.json.details.best_of_sequences];
  assert.equal(sequences.length, 3);
  for (const s of sequences) {
    const alone = await generate({ merged_adapters, do_sample: true, temperature: 1.5, seed: s.seed });
    assert.deepEqual(tokens(alone), s.tokens.map((t: any) => t.id), `the sequence of seed ${s.seed}`);
  }
});

test('replacing a source invalidates the merge (recomputed with the new weights); deleting it makes the merge 404', async () => {
  const ids = ['org/a', 'org/b'];
  const body = { merged_adapters: { ids, weights: [1, 0.5], merge_strategy: 'linear' } };
  const before = await generate(body);
  const n = merges();
  assert.equal((await generate(body)).status, 200);
  assert.equal(merges(), n, 'cached');
  // Replace org/b (PUT) with other weights.
  await writePeftAdapter(join(tmp.dir, 'staging-b'), { baseConfig: config, ...SOURCES['org/b'], seed: 22 });
  const form = new FormData();
  form.append('config', new Blob([readFileSync(join(tmp.dir, 'staging-b', 'adapter_config.json'))]), 'adapter_config.json');
  form.append('weights', new Blob([readFileSync(join(tmp.dir, 'staging-b', 'adapter_model.safetensors'))]), 'adapter_model.safetensors');
  const put = await http(`${server.url}/adapters/org/b`, { method: 'PUT', body: form });
  assert.equal(put.statusCode, 200);
  await put.body.dump();
  const after = await generate(body);
  assert.equal(after.status, 200);
  assert.equal(merges(), n + 1, 'merged again after the replacement');
  await uploadReferenceMerge('ref/replaced', ids, [1, 0.5], { strategy: 'linear', density: 1, signMethod: 'total', seed: 0 });
  assert.deepEqual(tokens(after), tokens(await generate({ adapter_id: 'ref/replaced' })));
  assert.notDeepEqual(tokens(after), tokens(before));
  // Delete org/b: the merge is gone and cannot be made again.
  const del = await http(`${server.url}/adapters/org/b`, { method: 'DELETE' });
  assert.equal(del.statusCode, 200);
  await del.body.dump();
  const gone = await generate(body);
  assert.equal(gone.status, 404);
  assert.equal(gone.json.code, 'ADAPTER_NOT_FOUND');
  assert.match(gone.json.error, /"org\/b"/);
  assert.equal((await generate({ adapter_id: 'org/a' })).status, 200, 'the server keeps serving');
});

test('bad merge parameters are 400 MERGE_INVALID, incompatible sources 422 MERGE_INCOMPATIBLE; one id is that adapter', async () => {
  const bad = async (m: Record<string, unknown>, extra: Record<string, unknown> = {}, code = 'MERGE_INVALID', status = 400) => {
    const r = await generate({ merged_adapters: m, ...extra });
    assert.equal(r.status, status, JSON.stringify(r.json));
    assert.equal(r.json.code, code, JSON.stringify(r.json));
    return r.json.error as string;
  };
  assert.match(await bad({ ids: ['org/a', 'org/c'], weights: [1] }), /weights.*one weight per id \(2\), got 1/);
  assert.match(await bad({ ids: ['org/a', 'org/c'], merge_strategy: 'ties', density: 1.5 }), /density.*>= 0\.0 and <= 1\.0/);
  assert.match(await bad({ ids: ['org/a', 'org/c'], density: -0.1 }), /density/);
  assert.match(await bad({ ids: ['org/a', 'org/c'], merge_strategy: 'ties' }), /density.*required by ties/);
  assert.match(await bad({ ids: ['org/a', 'org/c'], merge_strategy: 'slerp' }), /merge_strategy.*linear, ties, dare_linear, dare_ties/);
  assert.match(await bad({ ids: ['org/a', 'org/c'], merge_strategy: 'ties', density: 0.5, majority_sign_method: 'max' }), /majority_sign_method/);
  assert.match(await bad({ ids: [] }), /ids.*1 to 16/);
  assert.match(await bad({ ids: ['org/a', ''] }), /ids\.1.*base model/);
  assert.match(await bad({ ids: ['org/a', 'org/c'] }, { adapter_id: 'org/a' }), /at most one of `adapter_id` and `parameters.merged_adapters`/);
  const inf = await http(`${server.url}/generate`, {
    method: 'POST', headers: { 'content-type': 'application/json' },
    body: `{"inputs": "x", "parameters": {"merged_adapters": {"ids": ["org/a", "org/c"], "weights": [1, 1e999]}}}`,
  });
  const infBody = (await inf.body.json()) as any;
  assert.equal(inf.statusCode, 422, JSON.stringify(infBody)); // 1e999 parses as Infinity, which JSON Schema's number refuses
  assert.equal(infBody.code, 'VALIDATION');
  assert.match(infBody.error, /weights/);
  assert.match(await bad({ ids: ['org/a', 'org/r8'] }, {}, 'MERGE_INCOMPATIBLE', 422), /different ranks \("org\/a": r=4, "org\/r8": r=8\)/);
  assert.equal((await bad({ ids: ['org/a', 'org/none'] }, {}, 'ADAPTER_NOT_FOUND', 404)).includes('org/none'), true);
  // One id: that adapter as it is (LoRAX), whatever its weight.
  const one = await generate({ merged_adapters: { ids: ['org/c'], weights: [0.1] } });
  assert.equal(one.headers['x-adapter-id'], 'org/c');
  assert.deepEqual(tokens(one), tokens(await generate({ adapter_id: 'org/c' })));
  assert.equal((await generate({ merged_adapters: { ids: ['org/a', 'org/c'] } })).status, 200, 'still serving merges');
});
