/** src/obs/profile.ts: nested sections, the runtime's totals (in-process and workers), the metric, the --profile flag. */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { parseOptions, CliError } from '../src/cli.ts';
import { TINY_LLAMA, writeCheckpoint, writePeftAdapter } from '../src/demo/index.ts';
import { Metrics } from '../src/obs/metrics.ts';
import { addTotals, PHASES, profiler, type ProfileTotals } from '../src/obs/profile.ts';
import { startRuntime } from '../src/runtime.ts';
import { generate, request, TEST_RUNTIME } from './helpers/runtime.ts';
import { setupBackend, tempDir } from './helpers/tf.ts';

const tmp = tempDir();
before(async () => {
  await setupBackend();
  const { config } = await writeCheckpoint(join(tmp.dir, 'model'), TINY_LLAMA);
  await writePeftAdapter(join(tmp.dir, 'adapters', 'a'), { baseConfig: config, seed: 5, r: 4, targetModules: ['q_proj', 'v_proj'] });
});
after(() => {
  profiler.enabled = false;
  profiler.reset();
  tmp.cleanup();
});

const busy = (ms: number) => {
  const end = performance.now() + ms;
  while (performance.now() < end);
};

test('sections charge their own time: nested time goes to the inner phase, per step kind', async () => {
  profiler.reset();
  profiler.enabled = false;
  await profiler.step('decode', 'engine', async () => profiler.time('sampling', () => busy(2)));
  assert.deepEqual(profiler.snapshot(), {}, 'disabled: nothing recorded');

  profiler.enabled = true;
  let wall = 0; // the step's own time, measured inside it (outside, a loaded machine adds its scheduling delays)
  await profiler.step('decode', 'engine', async () => {
    const t0 = performance.now();
    busy(10);
    // Long enough that the check below tells "nested time charged to the inner phase only" (engine ≈ 10 ms) from
    // "charged to both" (engine ≥ 70 ms) even when a loaded machine preempts this thread for tens of ms.
    profiler.time('sampling', () => busy(60));
    await profiler.timeAsync('executor_wait', async () => {
      await new Promise((r) => setTimeout(r, 5));
      profiler.time('base_matmul', () => busy(3));
    });
    wall = (performance.now() - t0) / 1000;
  });
  await profiler.step('prefill', 'engine', async () => profiler.time('sampling', () => busy(1)));
  profiler.enabled = false;
  const d = profiler.snapshot().decode!;
  assert.ok(d.sampling! >= 0.06, `sampling ${d.sampling}`);
  assert.ok(d.engine! >= 0.01 && d.engine! < d.sampling!, `engine ${d.engine}`);
  // a 5 ms timer: libuv's millisecond clock may fire it up to 1 ms early by performance.now()
  assert.ok(d.executor_wait! >= 0.004, `wait ${d.executor_wait}`);
  assert.ok(d.base_matmul! >= 0.003, `matmul ${d.base_matmul}`);
  const sum = d.engine! + d.sampling! + d.executor_wait! + d.base_matmul!;
  assert.ok(Math.abs(sum - wall) < 0.002, `phases add up to the step: ${sum} vs ${wall}`);
  assert.ok(profiler.snapshot().prefill!.sampling! >= 0.001);
  assert.equal(profiler.snapshot().prefill!.base_matmul, undefined);
  // Snapshots are copies; totals add across threads.
  const a: ProfileTotals = { decode: { engine: 1, sampling: 2 } };
  assert.deepEqual(addTotals(a, { decode: { engine: 0.5 }, prefill: { attention: 3 } }, {}), { decode: { engine: 1.5, sampling: 2 }, prefill: { attention: 3 } });
  assert.deepEqual(a, { decode: { engine: 1, sampling: 2 } });
  profiler.reset();
  assert.deepEqual(profiler.snapshot(), {});
});

for (const workers of [1, 2]) {
  test(`a runtime with profile (${workers === 1 ? 'in-process' : '2 workers'}) reports every phase of its steps`, async () => {
    const rt = await startRuntime({ ...TEST_RUNTIME, model: join(tmp.dir, 'model'), adapterDir: join(tmp.dir, 'adapters'), workers, profile: true, loraMode: 'unmerged' });
    try {
      const outs = await Promise.all([generate(rt, request([5, 6, 7], { adapterId: 'a', maxNewTokens: 6 })), generate(rt, request([8, 9], { maxNewTokens: 6 }))]);
      for (const o of outs) assert.equal(o.error, undefined);
      const p = rt.profile();
      for (const kind of ['prefill', 'decode'] as const) {
        const k = p[kind]!;
        for (const phase of ['engine', 'sampling', 'executor', 'lora_setup', 'base_matmul', 'lora_delta', 'attention', 'kv_cache', 'lm_head', 'other_ops', 'logits_download'] as const) {
          assert.ok(k[phase]! > 0, `${kind}/${phase}: ${k[phase]}`);
        }
        assert.equal(k.executor_wait !== undefined, workers > 1, `${kind}/executor_wait only with workers`);
      }
    } finally {
      await rt.close();
    }
  });
}

test('lora_serve_profile_seconds_total follows the totals', async () => {
  let totals: ProfileTotals = { decode: { base_matmul: 0.5, sampling: 0.25 } };
  const m = new Metrics({ processMetrics: false, profile: () => totals });
  const value = (text: string, kind: string, phase: string) =>
    Number(new RegExp(`^lora_serve_profile_seconds_total\\{kind="${kind}",phase="${phase}"\\} (\\S+)$`, 'm').exec(text)?.[1]);
  let text = await m.text();
  assert.equal(value(text, 'decode', 'base_matmul'), 0.5);
  assert.equal(value(text, 'decode', 'sampling'), 0.25);
  totals = { decode: { base_matmul: 1.5, sampling: 0.25 }, prefill: { attention: 2 } };
  text = await m.text();
  assert.equal(value(text, 'decode', 'base_matmul'), 1.5);
  assert.equal(value(text, 'decode', 'sampling'), 0.25);
  assert.equal(value(text, 'prefill', 'attention'), 2);
  const off = await new Metrics({ processMetrics: false }).text();
  assert.doesNotMatch(off, /^lora_serve_profile_seconds_total\{/m, 'no series without --profile');
});

test('--profile: alone, with a value, from the environment', () => {
  assert.equal(parseOptions([], {}).profile, false);
  assert.equal(parseOptions(['--profile'], {}).profile, true);
  const o = parseOptions(['--profile', '--port', '1'], {});
  assert.equal(o.profile, true);
  assert.equal(o.port, 1);
  assert.equal(parseOptions(['--profile', 'false'], {}).profile, false);
  assert.equal(parseOptions(['--profile=true'], {}).profile, true);
  assert.equal(parseOptions([], { LORA_SERVE_PROFILE: '1' }).profile, true);
  assert.equal(parseOptions(['--profile', 'no'], { LORA_SERVE_PROFILE: 'yes' }).profile, false);
  assert.throws(() => parseOptions(['--profile', 'maybe'], {}), (e: unknown) => e instanceof CliError && /expected true or false/.test(e.message));
});

test('docs/metrics.md describes exactly the phases of src/obs/profile.ts', () => {
  const doc = readFileSync('docs/metrics.md', 'utf8');
  const section = doc.slice(doc.indexOf('## Step profile'));
  const documented = [...section.matchAll(/^\| `(\w+)` \| (main|executor) \|/gm)].map((m) => m[1]);
  assert.deepEqual(documented, Object.keys(PHASES));
});
