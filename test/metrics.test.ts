/** src/obs/metrics.ts: the exposition parses, names follow the conventions, counters move, docs/metrics.md matches. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { collectDefaultMetrics, Registry } from 'prom-client';
import { Metrics, VLLM_NAMES } from '../src/obs/metrics.ts';
import { build } from './helpers/app.ts';

interface Family {
  type: string;
  help: string;
  samples: { name: string; labels: Record<string, string>; value: number }[];
}

/** A strict-enough parser of the text exposition format (0.0.4). */
function parseExposition(text: string): Map<string, Family> {
  const families = new Map<string, Family>();
  const familyOf = (sample: string): Family | undefined => {
    for (const suffix of ['', '_bucket', '_sum', '_count']) {
      if (sample.endsWith(suffix)) {
        const f = families.get(sample.slice(0, sample.length - suffix.length));
        if (f) return f;
      }
    }
    return undefined;
  };
  for (const line of text.split('\n')) {
    if (line === '') continue;
    let m = /^# (HELP|TYPE) ([a-zA-Z_:][a-zA-Z0-9_:]*) (.*)$/.exec(line);
    if (m) {
      const f = families.get(m[2]!) ?? { type: '', help: '', samples: [] };
      if (m[1] === 'HELP') f.help = m[3]!;
      else {
        assert.ok(['counter', 'gauge', 'histogram', 'summary', 'untyped'].includes(m[3]!), line);
        f.type = m[3]!;
      }
      families.set(m[2]!, f);
      continue;
    }
    m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)(?: \d+)?$/.exec(line);
    assert.ok(m, `unparsable line: ${line}`);
    const labels: Record<string, string> = {};
    if (m[2]) {
      const re = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$)/gy;
      let lm: RegExpExecArray | null;
      let consumed = 0;
      while ((lm = re.exec(m[2])) !== null) {
        labels[lm[1]!] = lm[2]!;
        consumed = re.lastIndex;
        if (lm[3] === '') break;
      }
      assert.equal(consumed, m[2].length, `bad labels: ${line}`);
    }
    // Go's ParseFloat (Prometheus) reads NaN and Inf case-insensitively; prom-client writes "Nan".
    const value = /^nan$/i.test(m[3]!) ? NaN : /^[+-]?inf$/i.test(m[3]!) ? (m[3]!.startsWith('-') ? -Infinity : Infinity) : Number(m[3]);
    assert.ok(!Number.isNaN(value) || /^nan$/i.test(m[3]!), `bad value: ${line}`);
    const family = familyOf(m[1]!);
    assert.ok(family, `sample without # TYPE: ${line}`);
    family.samples.push({ name: m[1]!, labels, value });
  }
  return families;
}

async function defaultMetricNames(): Promise<Set<string>> {
  const r = new Registry();
  collectDefaultMetrics({ register: r });
  return new Set((await r.getMetricsAsJSON()).map((m) => m.name));
}

function value(families: Map<string, Family>, sample: string, labels: Record<string, string> = {}): number | undefined {
  for (const f of families.values()) {
    for (const s of f.samples) {
      if (s.name === sample && Object.entries(labels).every(([k, v]) => s.labels[k] === v)) return s.value;
    }
  }
  return undefined;
}

test('the exposition parses; own metrics are prefixed, counters end in _total, no adapter labels', async () => {
  const m = new Metrics({ deviceMemory: () => ({ numBytes: 2048, numTensors: 3 }) });
  m.step({ kind: 'decode', seconds: 0.01, passes: [{ rows: 4, adapters: 2, mode: 'unmerged' }] });
  m.httpRequest('/generate', 'POST', 200, 0.05);
  const families = parseExposition(await m.text());
  const defaults = await defaultMetricNames();
  assert.ok(families.size > 25);
  for (const [name, f] of families) {
    assert.ok(f.type && f.help, `${name} has no TYPE or HELP`);
    if (defaults.has(name)) continue;
    assert.ok(name.startsWith('lora_serve_'), name);
    if (f.type === 'counter') assert.ok(name.endsWith('_total'), name);
    if (name.includes('duration') || name.includes('latency') || name.includes('time_to')) {
      assert.ok(name.endsWith('_seconds') && f.type === 'histogram', name);
    }
    // The LoRA info gauge lists adapters by design, in one series reset on every scrape (tested below).
    if (name === 'lora_serve_lora_requests_info') continue;
    for (const s of f.samples) assert.ok(!Object.keys(s.labels).some((l) => /adapter|prompt/.test(l)), `${name} has an unbounded label`);
  }
  assert.equal(value(families, 'lora_serve_tfjs_memory_bytes'), 2048);
  assert.equal(value(families, 'lora_serve_tfjs_tensors'), 3);
  assert.ok((value(families, 'process_cpu_user_seconds_total') ?? -1) >= 0, 'process defaults are collected');
});

test('a step of several forward passes (one per worker) is one step duration, and each pass counts its own rows', async () => {
  const m = new Metrics({ processMetrics: false });
  m.step({ kind: 'decode', seconds: 0.08, passes: [{ rows: 16, adapters: 16, mode: 'unmerged' }, { rows: 15, adapters: 1, mode: 'merged' }] });
  const f = parseExposition(await m.text());
  assert.equal(value(f, 'lora_serve_step_duration_seconds_count', { kind: 'decode' }), 1);
  assert.equal(value(f, 'lora_serve_step_duration_seconds_sum', { kind: 'decode' }), 0.08);
  assert.equal(value(f, 'lora_serve_steps_total', { kind: 'decode', lora_mode: 'unmerged' }), 1);
  assert.equal(value(f, 'lora_serve_steps_total', { kind: 'decode', lora_mode: 'merged' }), 1);
  assert.equal(value(f, 'lora_serve_batch_size_sum', { kind: 'decode' }), 31, 'rows are counted once, not once per pass');
  assert.equal(value(f, 'lora_serve_batch_size_count', { kind: 'decode' }), 2);
  assert.equal(value(f, 'lora_serve_batch_adapters_sum', { kind: 'decode' }), 17);
});

test('the webgpu backend\'s device operations, readback bytes and decode steps by path are counters; absent (bytes: 0) on other backends', async () => {
  const ops = { dispatch: 526, submit: 36, upload: 40, readback: 1 };
  const counts = { ...ops, readbackBytes: 4096, decodeSteps: { replayed: 30, recorded: 2, tfjs: 1 } };
  const m = new Metrics({ processMetrics: false, webgpu: () => counts });
  let f = parseExposition(await m.text());
  for (const [op, n] of Object.entries(ops)) assert.equal(value(f, 'lora_serve_webgpu_operations_total', { op }), n);
  assert.equal(value(f, 'lora_serve_webgpu_readback_bytes_total'), 4096);
  for (const [path, n] of Object.entries(counts.decodeSteps)) assert.equal(value(f, 'lora_serve_webgpu_decode_steps_total', { path }), n);
  counts.dispatch += 100;
  counts.readbackBytes += 64;
  counts.decodeSteps.replayed += 5;
  f = parseExposition(await m.text());
  assert.equal(value(f, 'lora_serve_webgpu_decode_steps_total', { path: 'replayed' }), 35);
  assert.equal(value(f, 'lora_serve_webgpu_operations_total', { op: 'dispatch' }), 626, 'each scrape adds what happened since the last');
  assert.equal(value(f, 'lora_serve_webgpu_readback_bytes_total'), 4160);
  const other = parseExposition(await new Metrics({ processMetrics: false, webgpu: () => null }).text());
  assert.equal(value(other, 'lora_serve_webgpu_operations_total', { op: 'dispatch' }), undefined);
  assert.equal(value(other, 'lora_serve_webgpu_readback_bytes_total'), 0);
  assert.equal(value(other, 'lora_serve_webgpu_decode_steps_total', { path: 'replayed' }), undefined);
});

test('engine, adapter and HTTP events move the counters', async () => {
  const m = new Metrics({ processMetrics: false });
  m.step({ kind: 'prefill', seconds: 0.02, passes: [{ rows: 2, adapters: 1, mode: 'merged' }] });
  m.step({ kind: 'decode', seconds: 0.005, passes: [{ rows: 2, adapters: 2, mode: 'unmerged' }] });
  m.step({ kind: 'decode', seconds: 0.005, passes: [{ rows: 2, adapters: 2, mode: 'unmerged' }] });
  m.requestQueued(0.1);
  m.firstToken(0.2);
  m.interToken(0.01);
  m.requestFinished({ promptTokens: 12, generatedTokens: 5, seconds: 0.5, outcome: 'eos_token' });
  m.requestFinished({ promptTokens: 3, generatedTokens: 1, seconds: 0.1, outcome: 'cancelled' });
  m.queueDepth(3, 7);
  m.hit('device');
  m.hit('host');
  m.miss();
  m.loaded('device', 0.3);
  m.loadFailed('ADAPTER_SHAPE_MISMATCH');
  m.loadFailed('something unbounded');
  m.evicted('device');
  m.resident('device', 2, 4096);
  const f = parseExposition(await m.text());
  assert.equal(value(f, 'lora_serve_steps_total', { kind: 'decode', lora_mode: 'unmerged' }), 2);
  assert.equal(value(f, 'lora_serve_steps_total', { kind: 'prefill', lora_mode: 'merged' }), 1);
  assert.equal(value(f, 'lora_serve_batch_adapters_count', { kind: 'decode' }), 2);
  assert.equal(value(f, 'lora_serve_batch_size_sum', { kind: 'decode' }), 4);
  assert.equal(value(f, 'lora_serve_request_queue_duration_seconds_count'), 1);
  assert.equal(value(f, 'lora_serve_time_to_first_token_seconds_bucket', { le: '0.25' }), 1);
  assert.equal(value(f, 'lora_serve_inter_token_latency_seconds_count'), 1);
  assert.equal(value(f, 'lora_serve_requests_total', { outcome: 'eos_token' }), 1);
  assert.equal(value(f, 'lora_serve_requests_total', { outcome: 'cancelled' }), 1);
  assert.equal(value(f, 'lora_serve_prompt_tokens_total'), 15);
  assert.equal(value(f, 'lora_serve_generated_tokens_total'), 6);
  assert.equal(value(f, 'lora_serve_request_duration_seconds_count'), 2);
  assert.equal(value(f, 'lora_serve_requests_running'), 3);
  assert.equal(value(f, 'lora_serve_requests_waiting'), 7);
  assert.equal(value(f, 'lora_serve_adapter_cache_hits_total', { tier: 'host' }), 1);
  assert.equal(value(f, 'lora_serve_adapter_cache_misses_total'), 1);
  assert.equal(value(f, 'lora_serve_adapter_loads_total', { tier: 'device' }), 1);
  assert.equal(value(f, 'lora_serve_adapter_load_duration_seconds_sum', { tier: 'device' }), 0.3);
  assert.equal(value(f, 'lora_serve_adapter_load_failures_total', { code: 'ADAPTER_SHAPE_MISMATCH' }), 1);
  assert.equal(value(f, 'lora_serve_adapter_load_failures_total', { code: 'INTERNAL' }), 1);
  assert.equal(value(f, 'lora_serve_adapter_evictions_total', { tier: 'device' }), 1);
  assert.equal(value(f, 'lora_serve_adapter_resident_bytes', { tier: 'device' }), 4096);
  assert.equal(value(f, 'lora_serve_adapter_resident_adapters', { tier: 'device' }), 2);
});

test('HTTP requests are counted by route pattern and status, streams included', async () => {
  const s = await build({ validate: false });
  const post = (url: string, body: object) => s.inject({ method: 'POST', url, payload: JSON.stringify(body), headers: { 'content-type': 'application/json' } });
  await post('/generate', { inputs: 'Hi' });
  await post('/generate', {});
  await post('/generate_stream', { inputs: 'Hi' });
  await s.inject({ method: 'GET', url: '/adapters/org/style' });
  await s.inject({ method: 'GET', url: '/nope/1' });
  const f = parseExposition(await s.metrics.text());
  const count = (route: string, status: string) => value(f, 'lora_serve_http_requests_total', { route, status });
  assert.equal(count('/generate', '200'), 1);
  assert.equal(count('/generate', '422'), 1);
  assert.equal(count('/generate_stream', '200'), 1);
  assert.equal(count('/adapters/*', '200'), 1);
  assert.equal(count('unmatched', '404'), 1);
  assert.equal(value(f, 'lora_serve_http_request_duration_seconds_count', { route: '/generate_stream', method: 'POST' }), 1);
});

test('docs/metrics.md lists exactly the registered metrics, with type and labels', async () => {
  const doc = readFileSync(new URL('../docs/metrics.md', import.meta.url), 'utf8');
  const documented = new Map<string, { type: string; labels: string[] }>();
  for (const m of doc.matchAll(/^\| `(lora_serve_\w+)` \| (\w+) \| ([^|]*) \|/gm)) {
    assert.ok(!documented.has(m[1]!), `${m[1]} is listed twice`);
    documented.set(m[1]!, { type: m[2]!, labels: [...m[3]!.matchAll(/`(\w+)`/g)].map((l) => l[1]!).sort() });
  }
  const metrics = new Metrics();
  const defaults = await defaultMetricNames();
  const registered = new Map<string, { type: string; labels: string[] }>();
  for (const j of await metrics.registry.getMetricsAsJSON()) {
    if (defaults.has(j.name)) continue;
    const labelNames = (metrics.registry.getSingleMetric(j.name) as unknown as { labelNames: string[] }).labelNames;
    registered.set(j.name, { type: String(j.type), labels: [...labelNames].sort() });
  }
  assert.deepEqual(Object.fromEntries([...documented].sort()), Object.fromEntries([...registered].sort()));
});

test('scale-out gauges: KV usage and the LoRA info gauge are sampled from the engine load, one info series at a time', async () => {
  let load = { kvTokens: 300, kvCapacityTokens: 1200, runningAdapters: ['a', 'org/b'], waitingAdapters: ['c'] };
  const m = new Metrics({ processMetrics: false, load: () => load, maxLora: 4 });
  const before = Date.now() / 1000;
  let f = parseExposition(await m.text());
  assert.equal(value(f, 'lora_serve_kv_cache_usage_ratio'), 0.25);
  const info = f.get('lora_serve_lora_requests_info')!;
  assert.equal(info.type, 'gauge');
  assert.deepEqual(info.samples.map((s) => s.labels), [{ max_lora: '4', running_lora_adapters: 'a,org/b', waiting_lora_adapters: 'c' }]);
  assert.ok(info.samples[0]!.value >= before - 1 && info.samples[0]!.value <= Date.now() / 1000 + 1, 'value is the sample time in seconds');
  assert.equal(f.get('vllm:lora_requests_info'), undefined, 'no vLLM names without --metrics-compat vllm');
  load = { kvTokens: 0, kvCapacityTokens: 1200, runningAdapters: [], waitingAdapters: [] };
  f = parseExposition(await m.text());
  assert.deepEqual(f.get('lora_serve_lora_requests_info')!.samples.map((s) => s.labels), [{ max_lora: '4', running_lora_adapters: '', waiting_lora_adapters: '' }]);
  assert.equal(value(f, 'lora_serve_kv_cache_usage_ratio'), 0);
});

test('--metrics-compat vllm: the endpoint picker\'s default names carry the same values as ours, and docs/metrics.md lists them', async () => {
  const load = { kvTokens: 64, kvCapacityTokens: 256, runningAdapters: ['x'], waitingAdapters: [] };
  const m = new Metrics({ processMetrics: false, load: () => load, maxLora: 2, compat: 'vllm' });
  m.queueDepth(3, 5);
  const f = parseExposition(await m.text());
  for (const [vllm, ours] of Object.entries(VLLM_NAMES)) {
    const a = f.get(vllm)!;
    const b = f.get(ours)!;
    assert.ok(a, `${vllm} is exported`);
    assert.equal(a.type, 'gauge');
    assert.deepEqual(a.samples.map((s) => s.labels), b.samples.map((s) => s.labels), vllm);
    // The info gauges' values are each one's sample time, taken microseconds apart.
    if (!vllm.endsWith('_info')) assert.deepEqual(a.samples.map((s) => s.value), b.samples.map((s) => s.value), vllm);
  }
  assert.equal(value(f, 'vllm:num_requests_running'), 3);
  assert.equal(value(f, 'vllm:num_requests_waiting'), 5);
  assert.equal(value(f, 'vllm:kv_cache_usage_perc'), 0.25);
  assert.equal(value(f, 'vllm:gpu_cache_usage_perc'), 0.25);
  assert.ok(value(f, 'vllm:lora_requests_info', { max_lora: '2', running_lora_adapters: 'x', waiting_lora_adapters: '' })! > 0);
  const doc = readFileSync(new URL('../docs/metrics.md', import.meta.url), 'utf8');
  for (const name of Object.keys(VLLM_NAMES)) assert.ok(doc.includes(`\`${name}\``), `docs/metrics.md names ${name}`);
});
