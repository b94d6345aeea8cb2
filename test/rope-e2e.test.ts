/**
 * End to end through the runtime (engine, scheduler, executor) on scaled-rope checkpoints: a tiny Llama 3.2
 * (llama3 rope, tied embeddings), a Phi-3-style longrope one and a Mistral with a sliding window, concurrent greedy requests giving the reference's
 * greedy tokens (prompt in one step, then a token a step, as generate() with a KV cache).
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { TINY_LLAMA, TINY_LLAMA32, type CheckpointOptions } from '../src/demo/index.ts';
import { startRuntime } from '../src/runtime.ts';
import { referenceGreedy } from './reference/forward.ts';
import { generate, request, TEST_RUNTIME } from './helpers/runtime.ts';
import { fixtureCheckpoint, setupBackend, tempDir } from './helpers/tf.ts';

const tmp = tempDir();
before(setupBackend);
after(tmp.cleanup);

const NEW_TOKENS = 8;

/** Runs the prompts concurrently through a runtime on `opts`; returns the runtime's start-up log. */
async function matchesReference(name: string, opts: CheckpointOptions, prompts: number[][], prefillChunk = TEST_RUNTIME.prefillChunk): Promise<string[]> {
  const { dir, config, get } = await fixtureCheckpoint(join(tmp.dir, name, 'model'), opts);
  const logs: string[] = [];
  const rt = await startRuntime({ ...TEST_RUNTIME, prefillChunk, model: dir, adapterDir: join(tmp.dir, name, 'adapters') }, { log: (m) => logs.push(m) });
  try {
    assert.equal(rt.config.rope!.type, (opts.ropeScaling as { rope_type?: string } | undefined)?.rope_type ?? 'default');
    const outs = await Promise.all(prompts.map((p) => generate(rt, request(p, { maxNewTokens: NEW_TOKENS, ignoreEos: true }))));
    prompts.forEach((p, i) => {
      assert.equal(outs[i]!.error, undefined);
      // The prompt runs in chunks of prefillChunk tokens, one forward step each.
      const chunks = Array.from({ length: Math.ceil(p.length / prefillChunk) }, (_, c) => Math.min(prefillChunk, p.length - c * prefillChunk));
      assert.deepEqual(outs[i]!.tokens.map((t) => t.id), referenceGreedy(config, get, p, NEW_TOKENS, undefined, chunks), `${name}, prompt ${i}`);
    });
  } finally {
    await rt.close();
  }
  return logs;
}

test('a tiny Llama 3.2 (llama3 rope scaling, tied embeddings) generates the reference tokens', async () => {
  await matchesReference('llama32', TINY_LLAMA32, [[5, 17, 42, 99, 3, 250, 7], [11, 12], [200, 201, 202, 203, 204, 205, 206, 207, 208, 209, 210, 211]]);
});

const LONGROPE: CheckpointOptions = {
  ...TINY_LLAMA, seed: 13, configExtra: { original_max_position_embeddings: 8 },
  ropeScaling: { rope_type: 'longrope', short_factor: [1, 1.3, 1.7, 2.2], long_factor: [1.1, 2.5, 5, 11] },
};
const LONGROPE_PROMPTS = [[9, 8, 7, 6, 5, 4, 3, 2, 1, 30], [40, 41, 42, 43, 44], [60, 61]];

test('longrope: short factors below the original context, long ones from the step that passes it', async () => {
  // 10 tokens: the prompt's step already passes 8; 5 and 2: decoding switches at position 8.
  await matchesReference('longrope', LONGROPE, LONGROPE_PROMPTS);
});

test('longrope with chunked prefill: each chunk picks its factors by its own last position', async () => {
  // Chunks of 4: the 10-token prompt runs positions 0-3 and 4-7 with the short factors, 8-9 with the long ones.
  await matchesReference('longrope-chunked', LONGROPE, LONGROPE_PROMPTS, 4);
});

test('Mistral with a sliding window serves its whole context: prompts and generations past the window, chunked prefill', async () => {
  const opts: CheckpointOptions = { ...TINY_LLAMA, seed: 14, configExtra: { model_type: 'mistral', sliding_window: 6, architectures: ['MistralForCausalLM'] } };
  const prompts = [[3, 4, 5], Array.from({ length: 23 }, (_, i) => (i * 13 + 2) % 300), Array.from({ length: 9 }, (_, i) => 100 + i)];
  const logs = await matchesReference('mistral', opts, prompts, 5);
  assert.ok(!logs.some((l) => /sliding_window/.test(l)), logs.join('\n'));
});
