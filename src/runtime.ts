/**
 * Wires the layers together: backend → resident model → executor → adapter manager → engine.
 * Used by src/server/main.ts, the end-to-end tests and the benchmarks.
 */
import { existsSync } from 'node:fs';
import { join, resolve } from 'node:path';
import * as tf from '@tensorflow/tfjs-core';
import { initBackend, type BackendInfo, type BackendName } from './backend.ts';
import { Engine } from './engine/engine.ts';
import type { EngineMetrics } from './engine/types.ts';
import { DEMO_LLAMA, ensureCheckpoint, writePeftAdapter } from './fixtures/index.ts';
import { AdapterManager } from './lora/manager.ts';
import { AdapterStore } from './lora/store.ts';
import type { AdapterMetrics } from './lora/types.ts';
import { CausalLM } from './model/model.ts';
import { TextTokenizer } from './model/tokenizer.ts';
import { TfExecutor, type LoraMode } from './model/tf-executor.ts';

export interface RuntimeOptions {
  /** Checkpoint directory; '' serves the embedded demo model. */
  readonly model: string;
  readonly adapterDir: string;
  readonly adapterSourceUrl?: string;
  readonly backend: BackendName;
  readonly loraMode: LoraMode;
  readonly maxLoraRank: number;
  readonly maxLoadedAdapters: number;
  readonly adapterDeviceBytes: number;
  readonly adapterHostBytes: number;
  readonly maxAdapterBytes: number;
  readonly maxBatchSize: number;
  readonly maxBatchTokens: number;
  readonly maxInputLength: number;
  readonly maxTotalTokens: number;
  readonly maxQueue: number;
  readonly prefillChunk: number;
}

export interface Runtime {
  readonly backend: BackendInfo;
  readonly model: CausalLM;
  readonly modelId: string;
  /** True when serving the generated demo checkpoint. */
  readonly demo: boolean;
  readonly tokenizer: TextTokenizer;
  readonly executor: TfExecutor;
  readonly adapters: AdapterManager;
  readonly store: AdapterStore;
  readonly engine: Engine;
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
  hooks: { log?: (msg: string) => void; metrics?: EngineMetrics & AdapterMetrics } = {},
): Promise<Runtime> {
  const log = hooks.log ?? (() => {});
  const backend = await initBackend(opts.backend);
  log(`TensorFlow.js backend: ${backend.name}${backend.skipped.length ? ` (skipped: ${backend.skipped.join('; ')})` : ''}`);
  const demo = opts.model === '';
  const dir = demo ? await ensureDemo(opts.adapterDir, log) : resolve(opts.model);
  if (demo) log('serving the embedded demo model: a small Llama-family checkpoint with RANDOM weights (its output is gibberish); pass --model DIR to serve a real checkpoint');
  const model = CausalLM.load(dir);
  const c = model.config;
  log(`loaded ${c.modelType} from ${dir}: ${c.numLayers} layers, hidden ${c.hiddenSize}, vocab ${c.vocabSize}, ${(model.bytes / 2 ** 20).toFixed(1)} MiB on the device`);
  const tokenizer = await TextTokenizer.load(dir, c);
  const executor = new TfExecutor(model, { loraMode: opts.loraMode });
  const store = new AdapterStore({ dir: opts.adapterDir, remoteUrl: opts.adapterSourceUrl || undefined, maxAdapterBytes: opts.maxAdapterBytes });
  const adapters = new AdapterManager(store, model, {
    maxRank: opts.maxLoraRank, maxDeviceAdapters: opts.maxLoadedAdapters, maxDeviceBytes: opts.adapterDeviceBytes, maxHostBytes: opts.adapterHostBytes,
  }, (a) => executor.forgetAdapter(a), hooks.metrics);
  const engine = new Engine(executor, tokenizer, adapters, {
    maxBatchSize: opts.maxBatchSize, maxBatchTokens: opts.maxBatchTokens, prefillChunk: opts.prefillChunk, loraMode: opts.loraMode,
    maxQueue: opts.maxQueue, maxInputLength: opts.maxInputLength, maxTotalTokens: opts.maxTotalTokens, maxPositions: c.maxPositions,
  }, hooks.metrics);
  const modelId = demo ? 'lora-serve/demo-llama' : dir.split('/').filter(Boolean).pop() ?? dir;
  let closed = false;
  return {
    backend, model, modelId, demo, tokenizer, executor, adapters, store, engine,
    async close(graceMs = 0) {
      if (closed) return;
      closed = true;
      await engine.drain(graceMs);
      executor.dispose();
      adapters.dispose();
      model.dispose();
      await store.close();
    },
  };
}

/** tf.memory() for metrics and /info without importing TensorFlow.js in the HTTP layer. */
export function deviceMemory(): { numTensors: number; numBytes: number } {
  const m = tf.memory();
  return { numTensors: m.numTensors, numBytes: m.numBytes };
}
