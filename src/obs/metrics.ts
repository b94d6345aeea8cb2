/**
 * Every Prometheus metric of the server, declared here and nowhere else (docs/metrics.md lists
 * them; a test keeps the two in step). One Registry per `Metrics` instance, names prefixed
 * `lora_serve_`, durations in seconds, counters end in `_total`. Label values are bounded:
 * route patterns, methods, status codes, step kinds, LoRA modes, cache tiers, outcomes and error
 * codes — never adapter ids or prompts.
 *
 * Two gauges carry adapter ids in label values, by design: `lora_serve_lora_requests_info` (and its vLLM twin) is
 * the Gateway API Inference Extension's LoRA info metric, whose labels list the adapters in use. It is reset on
 * every scrape, so it holds exactly one series at a time.
 *
 * With `compat: 'vllm'` (--metrics-compat vllm) the gauges the endpoint picker reads are also exported under
 * vLLM's names, so the picker works with its default settings.
 *
 * The Node.js process defaults (prom-client's `collectDefaultMetrics`) keep their standard
 * unprefixed names (`process_*`, `nodejs_*`) so stock dashboards work.
 */
import { collectDefaultMetrics, Counter, Gauge, Histogram, Registry } from 'prom-client';
import { ERRORS } from '../errors.ts';
import type { StepPass } from '../engine/executor.ts';
import type { EngineLoad, EngineMetrics, FinishReason } from '../engine/types.ts';
import type { AdapterMetrics } from '../lora/types.ts';
import type { MergeStrategy } from '../lora/merge.ts';
import type { Phase, ProfileTotals, StepKind } from './profile.ts';
import { DECODE_PATHS, WEBGPU_OPS, type WebGPUCounts } from '../backend/webgpu/counters.ts';

export const METRIC_PREFIX = 'lora_serve_';

/** --metrics-compat: also export the endpoint picker's gauges under another server's names. */
export const METRICS_COMPAT = ['none', 'vllm'] as const;
export type MetricsCompat = (typeof METRICS_COMPAT)[number];

/** vLLM's names for the gauges of the GIE model-server protocol, each with the name of ours it repeats. */
export const VLLM_NAMES = {
  'vllm:num_requests_waiting': `${METRIC_PREFIX}requests_waiting`,
  'vllm:num_requests_running': `${METRIC_PREFIX}requests_running`,
  'vllm:kv_cache_usage_perc': `${METRIC_PREFIX}kv_cache_usage_ratio`,
  'vllm:gpu_cache_usage_perc': `${METRIC_PREFIX}kv_cache_usage_ratio`,
  'vllm:lora_requests_info': `${METRIC_PREFIX}lora_requests_info`,
} as const;

/** Device memory as TensorFlow.js reports it (`tf.memory()`), passed in so this file never imports tfjs. */
export type DeviceMemory = () => { numBytes: number; numTensors: number } | Promise<{ numBytes: number; numTensors: number }>;

export interface MetricsOptions {
  /** Sampled on every scrape; without it the TensorFlow.js gauges stay 0. */
  deviceMemory?: DeviceMemory;
  /** Step phase totals, all threads (src/obs/profile.ts; only with --profile). */
  profile?: () => ProfileTotals;
  /** The webgpu backend's device operation totals (src/backend/webgpu/counters.ts); null on other backends. */
  webgpu?: () => Readonly<WebGPUCounts> | null;
  /** Register the Node.js process defaults (default true). */
  processMetrics?: boolean;
  /** The engine's load, sampled on every scrape; without it the KV and LoRA info gauges have no sample. */
  load?: () => EngineLoad;
  /** `max_lora` of the LoRA info gauge: adapters resident on the device at once (--max-loaded-adapters). */
  maxLora?: number;
  /** Also export vLLM's names (default 'none'). */
  compat?: MetricsCompat;
}

type CacheTier = 'device' | 'host';
type Outcome = FinishReason | 'cancelled' | 'timeout' | 'error';

const LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120];
const TOKEN_LATENCY_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5];
const BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256];
const ADAPTER_COUNT_BUCKETS = [0, 1, 2, 3, 4, 6, 8, 12, 16, 32];

export class Metrics implements EngineMetrics, AdapterMetrics {
  readonly registry = new Registry();

  // --- HTTP ---
  private readonly httpRequests = new Counter({
    name: `${METRIC_PREFIX}http_requests_total`, help: 'HTTP requests answered, by route pattern, method and status code.',
    labelNames: ['route', 'method', 'status'] as const, registers: [this.registry],
  });
  private readonly httpDuration = new Histogram({
    name: `${METRIC_PREFIX}http_request_duration_seconds`, help: 'Time from receiving an HTTP request to the end of its response (streams included).',
    labelNames: ['route', 'method'] as const, buckets: LATENCY_BUCKETS, registers: [this.registry],
  });

  // --- generation requests ---
  private readonly requests = new Counter({
    name: `${METRIC_PREFIX}requests_total`, help: 'Generation requests finished, by outcome (length, eos_token, stop_sequence, cancelled, timeout, error).',
    labelNames: ['outcome'] as const, registers: [this.registry],
  });
  private readonly requestDuration = new Histogram({
    name: `${METRIC_PREFIX}request_duration_seconds`, help: 'End-to-end generation time, from submission to the last token.',
    buckets: LATENCY_BUCKETS, registers: [this.registry],
  });
  private readonly queueDuration = new Histogram({
    name: `${METRIC_PREFIX}request_queue_duration_seconds`, help: 'Time a request waited before its first scheduled step.',
    buckets: LATENCY_BUCKETS, registers: [this.registry],
  });
  private readonly ttft = new Histogram({
    name: `${METRIC_PREFIX}time_to_first_token_seconds`, help: 'Time from submission to the first generated token.',
    buckets: LATENCY_BUCKETS, registers: [this.registry],
  });
  private readonly itl = new Histogram({
    name: `${METRIC_PREFIX}inter_token_latency_seconds`, help: 'Time between consecutive generated tokens of one request.',
    buckets: TOKEN_LATENCY_BUCKETS, registers: [this.registry],
  });
  private readonly promptTokens = new Counter({
    name: `${METRIC_PREFIX}prompt_tokens_total`, help: 'Prompt tokens of finished requests.', registers: [this.registry],
  });
  private readonly generatedTokens = new Counter({
    name: `${METRIC_PREFIX}generated_tokens_total`, help: 'Tokens generated by finished requests (eos included).', registers: [this.registry],
  });
  private readonly running = new Gauge({
    name: `${METRIC_PREFIX}requests_running`, help: 'Requests being prefilled or decoded.', registers: [this.registry],
  });
  private readonly waiting = new Gauge({
    name: `${METRIC_PREFIX}requests_waiting`, help: 'Requests queued (including those waiting for their adapter).', registers: [this.registry],
  });

  // --- engine steps ---
  private readonly steps = new Counter({
    name: `${METRIC_PREFIX}steps_total`, help: 'Forward passes, by kind (prefill, decode) and how LoRA was applied (none, merged, unmerged); a step runs one pass per worker with sequences in it, and one per prompt chunk.',
    labelNames: ['kind', 'lora_mode'] as const, registers: [this.registry],
  });
  private readonly stepDuration = new Histogram({
    name: `${METRIC_PREFIX}step_duration_seconds`, help: 'Duration of one engine step (all its forward passes).',
    labelNames: ['kind'] as const, buckets: TOKEN_LATENCY_BUCKETS, registers: [this.registry],
  });
  private readonly batchSize = new Histogram({
    name: `${METRIC_PREFIX}batch_size`, help: 'Sequences in one forward pass.',
    labelNames: ['kind'] as const, buckets: BATCH_BUCKETS, registers: [this.registry],
  });
  private readonly batchAdapters = new Histogram({
    name: `${METRIC_PREFIX}batch_adapters`, help: 'Distinct adapters in one forward pass (0: base model only).',
    labelNames: ['kind'] as const, buckets: ADAPTER_COUNT_BUCKETS, registers: [this.registry],
  });

  // --- adapter cache ---
  private readonly cacheHits = new Counter({
    name: `${METRIC_PREFIX}adapter_cache_hits_total`, help: 'Adapter lookups served from a cache tier (device, host).',
    labelNames: ['tier'] as const, registers: [this.registry],
  });
  private readonly cacheMisses = new Counter({
    name: `${METRIC_PREFIX}adapter_cache_misses_total`, help: 'Adapter lookups that had to read from disk or the remote source.',
    registers: [this.registry],
  });
  private readonly adapterLoads = new Counter({
    name: `${METRIC_PREFIX}adapter_loads_total`, help: 'Adapters loaded into a tier (device, host).',
    labelNames: ['tier'] as const, registers: [this.registry],
  });
  private readonly adapterLoadDuration = new Histogram({
    name: `${METRIC_PREFIX}adapter_load_duration_seconds`, help: 'Time to load an adapter into a tier (device, host).',
    labelNames: ['tier'] as const, buckets: LATENCY_BUCKETS, registers: [this.registry],
  });
  private readonly adapterLoadFailures = new Counter({
    name: `${METRIC_PREFIX}adapter_load_failures_total`, help: 'Adapter loads that failed, by error code (the ADAPTER_* codes of the error catalogue).',
    labelNames: ['code'] as const, registers: [this.registry],
  });
  private readonly adapterEvictions = new Counter({
    name: `${METRIC_PREFIX}adapter_evictions_total`, help: 'Adapters evicted from a tier (device, host).',
    labelNames: ['tier'] as const, registers: [this.registry],
  });
  private readonly residentAdapters = new Gauge({
    name: `${METRIC_PREFIX}adapter_resident_adapters`, help: 'Adapters resident in a tier (device, host).',
    labelNames: ['tier'] as const, registers: [this.registry],
  });
  private readonly residentBytes = new Gauge({
    name: `${METRIC_PREFIX}adapter_resident_bytes`, help: 'Bytes of adapter weights resident in a tier (device, host).',
    labelNames: ['tier'] as const, registers: [this.registry],
  });
  private readonly adapterMerges = new Counter({
    name: `${METRIC_PREFIX}adapter_merges_total`, help: 'Merged adapters computed from their sources (merged_adapters), by strategy; a merge served from the cache is not counted.',
    labelNames: ['strategy'] as const, registers: [this.registry],
  });
  private readonly adapterMergeDuration = new Histogram({
    name: `${METRIC_PREFIX}adapter_merge_duration_seconds`, help: 'Time to read the sources of a merged adapter and merge them.',
    buckets: LATENCY_BUCKETS, registers: [this.registry],
  });

  constructor(opts: MetricsOptions = {}) {
    const memory = opts.deviceMemory;
    new Gauge({
      name: `${METRIC_PREFIX}tfjs_memory_bytes`, help: 'Bytes held by TensorFlow.js tensors (tf.memory().numBytes).',
      registers: [this.registry],
      async collect() { if (memory) this.set((await memory()).numBytes); },
    });
    new Gauge({
      name: `${METRIC_PREFIX}tfjs_tensors`, help: 'Live TensorFlow.js tensors (tf.memory().numTensors).',
      registers: [this.registry],
      async collect() { if (memory) this.set((await memory()).numTensors); },
    });
    const profile = opts.profile;
    const seen = new Map<string, number>();
    new Counter({
      name: `${METRIC_PREFIX}profile_seconds_total`,
      help: 'With --profile: time spent in each phase of prefill and decode steps (see docs/metrics.md), summed over the main thread and the executor workers.',
      labelNames: ['kind', 'phase'] as const, registers: [this.registry],
      collect() {
        for (const [kind, phases] of Object.entries(profile?.() ?? {}) as [StepKind, Partial<Record<Phase, number>>][]) {
          for (const [phase, seconds] of Object.entries(phases) as [Phase, number][]) {
            const key = `${kind}/${phase}`;
            const delta = seconds - (seen.get(key) ?? 0);
            if (delta > 0) this.inc({ kind, phase }, delta);
            seen.set(key, seconds);
          }
        }
      },
    });
    const webgpu = opts.webgpu;
    this.webgpuTotals('webgpu_operations_total',
      'On the webgpu backend: compute dispatches, command-buffer submits, host-to-device uploads and device-to-host readbacks.',
      'op', WEBGPU_OPS, () => webgpu?.() ?? null);
    let seenBytes = 0;
    new Counter({
      name: `${METRIC_PREFIX}webgpu_readback_bytes_total`,
      help: 'On the webgpu backend: bytes read back from the device.',
      registers: [this.registry],
      collect() {
        const counts = webgpu?.();
        if (!counts) return;
        if (counts.readbackBytes > seenBytes) this.inc(counts.readbackBytes - seenBytes);
        seenBytes = counts.readbackBytes;
      },
    });
    this.webgpuTotals('webgpu_decode_steps_total',
      'On the webgpu backend: decode steps by how they ran: replayed from a recording, recorded, or through TensorFlow.js unrecorded.',
      'path', DECODE_PATHS, () => webgpu?.()?.decodeSteps ?? null);
    this.scaleOutGauges(opts);
    if (opts.processMetrics ?? true) collectDefaultMetrics({ register: this.registry });
  }

  /** Running and waiting have vLLM twins set with them; the KV and LoRA gauges are sampled from `opts.load`. */
  private readonly twins: { running?: Gauge; waiting?: Gauge } = {};

  /**
   * A counter labelled `label` over `keys` that adds, at each scrape, what `read`'s running totals (null: not on
   * webgpu) grew by since the last.
   */
  private webgpuTotals<K extends string>(name: string, help: string, label: string, keys: readonly K[], read: () => Readonly<Record<K, number>> | null): void {
    const seen = new Map<K, number>();
    new Counter({
      name: `${METRIC_PREFIX}${name}`, help, labelNames: [label], registers: [this.registry],
      collect() {
        const totals = read();
        if (!totals) return;
        for (const k of keys) {
          const delta = totals[k] - (seen.get(k) ?? 0);
          if (delta > 0) this.inc({ [label]: k }, delta);
          seen.set(k, totals[k]);
        }
      },
    });
  }

  private scaleOutGauges(opts: MetricsOptions): void {
    const { load, maxLora = 0 } = opts;
    const vllm = opts.compat === 'vllm';
    const kvHelp = 'KV-cache tokens held by prefilling and running requests, divided by the most the engine holds (--max-batch-size × max total tokens); 0..1.';
    const kv = (name: string) => new Gauge({
      name, help: kvHelp, registers: [this.registry],
      collect() { if (load) { const l = load(); this.set(l.kvCapacityTokens > 0 ? l.kvTokens / l.kvCapacityTokens : 0); } },
    });
    const loraHelp = 'LoRA adapters in use (value: Unix time of this sample, seconds); labels max_lora, running_lora_adapters and waiting_lora_adapters (comma-separated ids), as vLLM\'s vllm:lora_requests_info.';
    const info = (name: string) => new Gauge({
      name, help: loraHelp, labelNames: ['max_lora', 'running_lora_adapters', 'waiting_lora_adapters'] as const, registers: [this.registry],
      collect() {
        this.reset();
        if (!load) return;
        const l = load();
        this.set({ max_lora: String(maxLora), running_lora_adapters: l.runningAdapters.join(','), waiting_lora_adapters: l.waitingAdapters.join(',') }, Date.now() / 1000);
      },
    });
    kv(`${METRIC_PREFIX}kv_cache_usage_ratio`);
    info(`${METRIC_PREFIX}lora_requests_info`);
    if (!vllm) return;
    this.twins.waiting = new Gauge({ name: 'vllm:num_requests_waiting', help: `Same as ${METRIC_PREFIX}requests_waiting.`, registers: [this.registry] });
    this.twins.running = new Gauge({ name: 'vllm:num_requests_running', help: `Same as ${METRIC_PREFIX}requests_running.`, registers: [this.registry] });
    kv('vllm:kv_cache_usage_perc');
    kv('vllm:gpu_cache_usage_perc');
    info('vllm:lora_requests_info');
  }

  /** The text exposition format. */
  async text(): Promise<string> {
    return this.registry.metrics();
  }

  get contentType(): string {
    return this.registry.contentType;
  }

  httpRequest(route: string, method: string, status: number, seconds: number): void {
    this.httpRequests.inc({ route, method, status: String(status) });
    this.httpDuration.observe({ route, method }, seconds);
  }

  // --- EngineMetrics ---

  step(e: { kind: 'prefill' | 'decode'; seconds: number; passes: readonly StepPass[] }): void {
    this.stepDuration.observe({ kind: e.kind }, e.seconds);
    for (const p of e.passes) {
      this.steps.inc({ kind: e.kind, lora_mode: p.mode });
      this.batchSize.observe({ kind: e.kind }, p.rows);
      this.batchAdapters.observe({ kind: e.kind }, p.adapters);
    }
  }

  requestQueued(seconds: number): void {
    this.queueDuration.observe(seconds);
  }

  firstToken(seconds: number): void {
    this.ttft.observe(seconds);
  }

  interToken(seconds: number): void {
    this.itl.observe(seconds);
  }

  requestFinished(e: { promptTokens: number; generatedTokens: number; seconds: number; outcome: Outcome }): void {
    this.requests.inc({ outcome: e.outcome });
    this.requestDuration.observe(e.seconds);
    this.promptTokens.inc(e.promptTokens);
    this.generatedTokens.inc(e.generatedTokens);
  }

  queueDepth(running: number, waiting: number): void {
    this.running.set(running);
    this.waiting.set(waiting);
    this.twins.running?.set(running);
    this.twins.waiting?.set(waiting);
  }

  // --- AdapterMetrics ---

  hit(tier: CacheTier): void {
    this.cacheHits.inc({ tier });
  }

  miss(): void {
    this.cacheMisses.inc();
  }

  loaded(tier: CacheTier, seconds: number): void {
    this.adapterLoads.inc({ tier });
    this.adapterLoadDuration.observe({ tier }, seconds);
  }

  loadFailed(code: string): void {
    // Only catalogue codes become label values, so a stray string cannot grow the series.
    this.adapterLoadFailures.inc({ code: code in ERRORS ? code : 'INTERNAL' });
  }

  evicted(tier: CacheTier): void {
    this.adapterEvictions.inc({ tier });
  }

  resident(tier: CacheTier, adapters: number, bytes: number): void {
    this.residentAdapters.set({ tier }, adapters);
    this.residentBytes.set({ tier }, bytes);
  }

  merged(strategy: MergeStrategy, seconds: number): void {
    this.adapterMerges.inc({ strategy });
    this.adapterMergeDuration.observe(seconds);
  }
}
