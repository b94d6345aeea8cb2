/**
 * Wires the layers together: backend → resident model → executor → adapter manager → engine.
 * Used by src/server/main.ts, the end-to-end tests and the benchmarks.
 */
import { existsSync } from 'node:fs';
import { availableParallelism, freemem } from 'node:os';
import { join, resolve } from 'node:path';
import { initBackend, type BackendInfo, type BackendName } from './backend/select.ts';
import { adapterSummary, type WebGPUAdapter } from './backend/webgpu/init.ts';
import { Engine } from './engine/engine.ts';
import type { EngineMetrics } from './engine/types.ts';
import { DEMO_LLAMA, ensureCheckpoint, writePeftAdapter } from './demo/index.ts';
import type { DeviceMemory, Executor } from './engine/executor.ts';
import { AdapterManager } from './lora/manager.ts';
import { HubAdapters } from './lora/hub-adapters.ts';
import { HubClient, hubSettingsFromEnv, parseRepoSpec, type HubSettings } from './hub/client.ts';
import { downloadModel } from './hub/model.ts';
import { fail } from './errors.ts';
import type { AdapterSourceKind } from './engine/types.ts';
import { AdapterStore } from './lora/store.ts';
import type { AdapterMetrics } from './lora/types.ts';
import { openCheckpoint } from './model/checkpoint.ts';
import { CausalLM, modulesFor } from './model/model.ts';
import { ParallelExecutor } from './exec/parallel-executor.ts';
import { TextTokenizer } from './text/tokenizer.ts';
import { TfExecutor } from './exec/tf-executor.ts';
import type { LoraMode } from './engine/scheduler.ts';
import type { ModelConfig } from './model/types.ts';
import { addTotals, profiler, type ProfileTotals } from './obs/profile.ts';
import { assertModelFits, autoAdapterDeviceBytes, autoWorkers } from './sizing.ts';
import { StartupProgress } from './startup.ts';

export interface RuntimeOptions {
  /** Checkpoint directory; '' serves the embedded demo model. */
  readonly model: string;
  readonly adapterDir: string;
  readonly adapterSourceUrl?: string;
  /** Where an adapter id the adapter folder does not have comes from when a request does not say (default local). */
  readonly adapterSource?: AdapterSourceKind;
  /** The Hugging Face Hub: models given as org/name, and Hub adapters (default: from the environment, hubSettingsFromEnv). */
  readonly hub?: HubSettings;
  /** Seconds after which an adapter cached from the source is checked for a newer version (ETag); 0: never. */
  readonly adapterRevalidateAfter?: number;
  readonly backend: BackendName;
  readonly loraMode: LoraMode;
  readonly maxLoraRank: number;
  /** 0: no count limit. */
  readonly maxLoadedAdapters: number;
  /** Per model copy; 0: no byte limit; auto: chosen from the backend and the model (src/sizing.ts). */
  readonly adapterDeviceBytes: number | 'auto';
  readonly adapterHostBytes: number;
  readonly maxAdapterBytes: number;
  readonly maxBatchSize: number;
  readonly maxBatchTokens: number;
  readonly maxInputLength: number;
  readonly maxTotalTokens: number;
  readonly maxQueue: number;
  readonly prefillChunk: number;
  /** Executor worker threads, each with its own copy of the model (1: run in this thread). */
  readonly workers: number | 'auto';
  /** Time the phases of every step (src/obs/profile.ts). */
  readonly profile?: boolean;
  /** On wasm, run matrix products in the native AVX2/FMA addon when it is built (default true). */
  readonly nativeMatmul?: boolean;
  /** On webgpu, record decode steps and replay them (TfExecutor's recordSteps; default true). */
  readonly recordedSteps?: boolean;
  /**
   * Heap bytes each executor allocates and frees at start on the wasm backend (TfExecutor.warmUp), so that first
   * adapter uploads and forwards write already-faulted memory. Default WARM_HEAP_BYTES.
   */
  readonly warmHeapBytes?: number;
  /** Rounds of the adapter load path run at start on a synthetic adapter (AdapterManager.warmUp). Default WARM_UP_LOADS. */
  readonly warmUpLoads?: number;
}

/** Default RuntimeOptions.warmHeapBytes: room for the intermediates of a large step and a device tier of adapters. */
export const WARM_HEAP_BYTES = 64 * 2 ** 20;
/** Default RuntimeOptions.warmUpLoads: enough rounds for the load path's JavaScript to be compiled before the first real load. */
export const WARM_UP_LOADS = 40;

export interface Runtime {
  /** The backend that runs the model (in the workers when there are several). */
  readonly backend: string;
  /** Matrix products run in the native addon (src/backend/wasm/native-matmul.ts). */
  readonly nativeMatmul: boolean;
  /** The WebGPU adapter and its limits, on the webgpu backend. */
  readonly webgpuAdapter?: WebGPUAdapter;
  readonly config: ModelConfig;
  /** Checkpoint dtype as stored (computation is float32). */
  readonly dtype: string;
  /** Copies of the model (executor worker threads; 1: in this thread), as chosen for `--workers`. */
  readonly workers: number;
  /** Device bytes per model copy the adapter tier may use (0: no limit), as chosen for `--adapter-device-bytes`. */
  readonly adapterDeviceBytes: number;
  /** Device bytes of one copy of the base weights. */
  readonly modelBytes: number;
  readonly modelId: string;
  /** The Hub commit served, for a model given as org/name[@revision]. */
  readonly modelSha?: string;
  /** True when serving the generated demo checkpoint. */
  readonly demo: boolean;
  readonly tokenizer: TextTokenizer;
  readonly executor: Executor;
  readonly adapters: AdapterManager;
  readonly store: AdapterStore;
  readonly engine: Engine;
  /** TensorFlow.js memory of every copy of the model (this thread's, or the workers' after they answer). */
  deviceMemory(): Promise<DeviceMemory>;
  /** Step phase totals of this thread and the executor workers (with `profile`). */
  profile(): ProfileTotals;
  close(graceMs?: number): Promise<void>;
}

/** Where the demo checkpoint is generated (git-ignored). */
export const DEMO_MODEL_DIR = resolve('.cache/demo-model');

/** Demo adapters written into the adapter dir on first start when serving the demo model. */
const DEMO_ADAPTERS = [
  { id: 'demo-attention', r: 8, loraAlpha: 16, targetModules: ['q_proj', 'k_proj', 'v_proj', 'o_proj'], seed: 11 },
  { id: 'demo-mlp', r: 4, loraAlpha: 8, targetModules: ['gate_proj', 'up_proj', 'down_proj'], seed: 12 },
  { id: 'demo-all-linear', r: 16, loraAlpha: 16, targetModules: 'all-linear', seed: 13, useRslora: true },
] as const;

export async function ensureDemo(adapterDir: string, log: (msg: string) => void = () => {}): Promise<string> {
  const { config, written } = await ensureCheckpoint(DEMO_MODEL_DIR, DEMO_LLAMA);
  if (written) log(`generated the demo checkpoint in ${DEMO_MODEL_DIR}`);
  for (const a of DEMO_ADAPTERS) {
    const dir = join(adapterDir, a.id);
    if (existsSync(join(dir, 'adapter_config.json'))) continue;
    const { id, ...opts } = a;
    await writePeftAdapter(dir, { baseConfig: config, baseModelNameOrPath: 'lora-serve/demo-llama', ...opts, targetModules: opts.targetModules as string | string[] });
    log(`wrote demo adapter ${id} to ${dir}`);
  }
  return DEMO_MODEL_DIR;
}

export async function startRuntime(
  opts: RuntimeOptions,
  hooks: { log?: (msg: string) => void; error?: (msg: string) => void; metrics?: EngineMetrics & AdapterMetrics; progress?: StartupProgress } = {},
): Promise<Runtime> {
  const log = hooks.log ?? (() => {});
  const progress = hooks.progress ?? new StartupProgress();
  await progress.enter('checkpoint');
  profiler.enabled = opts.profile === true;
  profiler.reset();
  const demo = opts.model === '';
  const hub = new HubClient(opts.hub ?? hubSettingsFromEnv(), { log });
  const { dir, modelId, modelSha } = demo ? { dir: await ensureDemo(opts.adapterDir, log), modelId: 'lora-serve/demo-llama', modelSha: undefined } : await locateModel(opts.model, hub, log);
  if (demo) log('serving the embedded demo model: a small Llama-family checkpoint with RANDOM weights (its output is gibberish); pass --model DIR to serve a real checkpoint');

  // The checkpoint's headers give its config and size before any weight is read.
  const ckpt = openCheckpoint(dir);
  const { config, dtype, float32Bytes } = ckpt;
  ckpt.close();
  const machine = { cores: availableParallelism(), freeMemoryBytes: freemem() };
  let chosen: BackendInfo | null = null;
  let workers: number;
  if (opts.workers === 'auto') {
    // The right number of copies depends on the backend: choose it here, and give the workers its name.
    chosen = await initBackend(opts.backend, { nativeMatmul: opts.nativeMatmul });
    const w = autoWorkers(chosen.name, float32Bytes, machine);
    workers = w.value;
    log(`workers: ${workers} (--workers auto: ${w.why})`);
  } else {
    workers = opts.workers;
  }
  const ckptTensors = ckpt.names.size;
  progress.tensors.total = ckptTensors * workers;
  progress.bytes.total = float32Bytes * workers;
  progress.workers.total = workers > 1 ? workers : 0;
  await progress.enter('weights');

  let executor: Executor;
  let modelBytes: number;
  let backend: string;
  let nativeMatmul: boolean;
  let webgpuAdapter: WebGPUAdapter | undefined;
  if (workers > 1) {
    const parallel = await ParallelExecutor.start({
      workers, modelDir: dir, backend: chosen?.name ?? opts.backend, profile: opts.profile, nativeMatmul: opts.nativeMatmul,
      warmHeapBytes: opts.warmHeapBytes ?? WARM_HEAP_BYTES,
      onError: (err, context) => log(`executor worker error while ${context}: ${err.message}`),
      onTensor: (elements) => progress.tensorRead(elements),
      onWorkerStarted: () => progress.workers.loaded++,
      onWorkerDeath: (i, cause) => (hooks.error ?? log)(
        `executor worker ${i} of ${workers} died (${cause}): its requests in flight failed with WORKER_DIED; the other workers keep serving, /health answers 503 until the process is restarted`,
      ),
    });
    executor = parallel;
    modelBytes = parallel.modelBytes;
    backend = parallel.backend;
    nativeMatmul = parallel.nativeMatmul;
    log(`TensorFlow.js backend: ${backend}${kernelsNote(parallel)} in ${workers} worker threads, one copy of the model each`);
  } else {
    const info: BackendInfo = chosen ?? await initBackend(opts.backend, { nativeMatmul: opts.nativeMatmul });
    backend = info.name;
    nativeMatmul = info.nativeMatmul;
    webgpuAdapter = info.adapter;
    log(`TensorFlow.js backend: ${info.name}${info.adapter ? ` on ${adapterSummary(info.adapter)}` : ''}${kernelsNote(info)}${info.skipped.length ? ` (skipped: ${info.skipped.join('; ')})` : ''}`);
    assertModelFits(info.name, float32Bytes);
    // In this thread: layer by layer, letting the HTTP server answer (503, with the progress) in between.
    const model = await CausalLM.loadAsync(dir, { onTensor: (elements) => progress.tensorRead(elements) });
    modelBytes = model.bytes;
    const local = new TfExecutor(model, { recordSteps: opts.recordedSteps ?? true });
    local.warmUp(info.name === 'wasm' ? opts.warmHeapBytes ?? WARM_HEAP_BYTES : 0);
    executor = local;
  }
  let adapterDeviceBytes: number;
  if (opts.adapterDeviceBytes === 'auto') {
    const d = autoAdapterDeviceBytes(backend, modelBytes, workers, machine);
    adapterDeviceBytes = d.value;
    log(`adapter device tier: ${(adapterDeviceBytes / 2 ** 20).toFixed(0)} MiB per model copy (--adapter-device-bytes auto: ${d.why})`);
  } else {
    adapterDeviceBytes = opts.adapterDeviceBytes;
  }
  const c = config;
  log(`loaded ${c.modelType} from ${dir}: ${c.numLayers} layers, hidden ${c.hiddenSize}, vocab ${c.vocabSize}, ${(modelBytes / 2 ** 20).toFixed(1)} MiB on the device`);
  for (const note of c.notes) log(note);
  await progress.enter('tokenizer');
  const tokenizer = await TextTokenizer.load(dir, c);
  const store = new AdapterStore({ dir: opts.adapterDir, remoteUrl: opts.adapterSourceUrl || undefined, maxAdapterBytes: opts.maxAdapterBytes,
    revalidateAfterMs: (opts.adapterRevalidateAfter ?? 0) * 1000,
    onWarning: (message, err) => log(`${message}: ${(err as Error)?.message ?? String(err)}`),
  });
  const hubAdapters = new HubAdapters(hub, { maxAdapterBytes: opts.maxAdapterBytes, refreshAfterMs: (opts.adapterRevalidateAfter ?? 0) * 1000 });
  const adapters = new AdapterManager(store, { modules: modulesFor(c) }, {
    maxRank: opts.maxLoraRank, maxDeviceAdapters: opts.maxLoadedAdapters, maxDeviceBytes: adapterDeviceBytes, maxHostBytes: opts.adapterHostBytes,
    hub: hubAdapters, defaultSource: opts.adapterSource ?? 'local',
  }, executor, hooks.metrics);
  await progress.enter('adapters');
  await adapters.warmUp(opts.warmUpLoads ?? WARM_UP_LOADS);
  const engine = new Engine(executor, tokenizer, adapters, {
    maxBatchSize: opts.maxBatchSize, maxBatchTokens: opts.maxBatchTokens, prefillChunk: opts.prefillChunk, loraMode: opts.loraMode,
    maxQueue: opts.maxQueue, maxInputLength: opts.maxInputLength, maxTotalTokens: opts.maxTotalTokens, maxPositions: c.maxPositions,
  }, hooks.metrics);
  let closed = false;
  return {
    backend, nativeMatmul, ...(webgpuAdapter ? { webgpuAdapter } : {}), config, dtype, modelBytes, modelId, ...(modelSha ? { modelSha } : {}), demo, tokenizer, executor, adapters, store, engine, workers, adapterDeviceBytes,
    // Follows every operation posted before it (adapter offloads included).
    deviceMemory: () => executor.deviceMemory(),
    profile: () => addTotals(profiler.snapshot(), executor.profile()),
    async close(graceMs = 0) {
      if (closed) return;
      closed = true;
      await engine.drain(graceMs);
      adapters.dispose();
      await executor.close();
      await store.close();
      await hub.close();
    },
  };
}

/**
 * The checkpoint folder of `--model`: the folder itself when it exists (its id: the folder's name), else a Hub repo
 * `org/name[@revision]` downloaded into the Hub cache (its id: the repo).
 */
async function locateModel(model: string, hub: HubClient, log: (msg: string) => void): Promise<{ dir: string; modelId: string; modelSha?: string }> {
  if (existsSync(model)) {
    const dir = resolve(model);
    return { dir, modelId: dir.split('/').filter(Boolean).pop() ?? dir };
  }
  const spec = parseRepoSpec(model);
  if (spec === null) throw fail('CHECKPOINT_INVALID', `--model ${JSON.stringify(model)}: no such folder, and not a Hugging Face Hub repo id (org/name[@revision])`);
  const snap = await downloadModel(hub, spec);
  log(`model ${spec.repo} at ${spec.revision}: commit ${snap.commit}${snap.cachedOnly ? ' (from the cache only)' : ''}, in ${snap.dir}`);
  return { dir: snap.dir, modelId: spec.repo, modelSha: snap.commit };
}

/** ", matmuls in the native addon", or why the wasm kernels run instead. */
function kernelsNote(b: { nativeMatmul: boolean; nativeMatmulNote?: string }): string {
  if (b.nativeMatmul) return ' (matmuls in the native AVX2/FMA addon)';
  return b.nativeMatmulNote ? ` (native matmul unavailable: ${b.nativeMatmulNote})` : '';
}
