/**
 * The fastify app over a scripted engine and a real AdapterManager + AdapterStore on a folder, for tests of what
 * uploads, deletes and loads do on disk. No tensors: a fake executor takes the validated weights. The base model is
 * a one-layer Llama shape (hidden 8, 2 heads), so adapters built with `adapterFor` validate against it.
 */
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import type { FastifyInstance } from 'fastify';
import { listLinearModules, writePeftAdapter, type AdapterOptions } from '../../src/demo/adapter.ts';
import type { AdapterExecutor } from '../../src/engine/executor.ts';
import { AdapterManager } from '../../src/lora/manager.ts';
import { AdapterStore, type AdapterStoreOptions } from '../../src/lora/store.ts';
import { Metrics } from '../../src/obs/metrics.ts';
import { buildApp, type AppOptions } from '../../src/server/app.ts';
import { fixtureTokenizer, ScriptedEngine, TEST_INFO } from './app.ts';

export const STORE_BASE_CONFIG = { model_type: 'llama', hidden_size: 8, num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 16 };
export const STORE_BASE = { modules: listLinearModules('llama', STORE_BASE_CONFIG).map((m) => ({ ...m, key: m.path })) };

/** Takes the weights as a device would and hands back a handle; nothing to free. */
export const FAKE_EXECUTOR: AdapterExecutor = {
  copiesOnUpload: true,
  async loadAdapter(weights, key) {
    return { id: weights.id, key, rank: weights.rank, bytes: weights.bytes };
  },
  offloadAdapter() {},
};

/** A valid adapter for STORE_BASE: adapter_config.json's text and adapter_model.safetensors' bytes. */
export async function adapterFor(opts: Partial<AdapterOptions> = {}): Promise<{ config: string; weights: Buffer }> {
  const dir = await mkdtemp(path.join(tmpdir(), 'lora-fixture-'));
  try {
    await writePeftAdapter(dir, { baseConfig: STORE_BASE_CONFIG, r: 2, targetModules: ['q_proj', 'v_proj'], ...opts });
    return { config: await readFile(path.join(dir, 'adapter_config.json'), 'utf8'), weights: await readFile(path.join(dir, 'adapter_model.safetensors')) };
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

/** A multipart/form-data body: each part a field, or a file part when it has a filename. */
export function multipart(parts: readonly { name: string; filename?: string; content: string | Uint8Array }[], boundary = '----lora-serve-boundary') {
  const chunks: Buffer[] = [];
  for (const p of parts) {
    const disposition = `form-data; name="${p.name}"${p.filename !== undefined ? `; filename="${p.filename}"` : ''}`;
    const type = p.filename !== undefined ? 'Content-Type: application/octet-stream\r\n' : '';
    chunks.push(Buffer.from(`--${boundary}\r\nContent-Disposition: ${disposition}\r\n${type}\r\n`), Buffer.from(p.content), Buffer.from('\r\n'));
  }
  chunks.push(Buffer.from(`--${boundary}--\r\n`));
  return { payload: Buffer.concat(chunks), headers: { 'content-type': `multipart/form-data; boundary=${boundary}` } };
}

/** The two parts of an upload. */
export const uploadParts = (a: { config: string; weights: Uint8Array }) =>
  multipart([{ name: 'config', filename: 'adapter_config.json', content: a.config }, { name: 'weights', filename: 'adapter_model.safetensors', content: a.weights }]);

export interface StoreServer {
  app: FastifyInstance;
  store: AdapterStore;
  adapters: AdapterManager;
  /** The adapter folder. */
  dir: string;
  close(): Promise<void>;
}

/** The app over a real store in `dir` (created by the caller, or a fresh temp folder removed by close()). */
export async function buildWithStore(opts: {
  dir?: string;
  options?: Partial<AppOptions>;
  store?: Partial<AdapterStoreOptions>;
} = {}): Promise<StoreServer> {
  const own = opts.dir === undefined;
  const dir = opts.dir ?? path.join(await mkdtemp(path.join(tmpdir(), 'lora-store-app-')), 'adapters');
  const options: AppOptions = {
    maxInputLength: 64, maxTotalTokens: 96, maxNewTokensDefault: 20, maxAdapterBytes: 1 << 20, bodyLimitBytes: 64 * 1024,
    ready: () => true, ...opts.options,
  };
  const store = new AdapterStore({ dir, maxAdapterBytes: options.maxAdapterBytes, ...opts.store });
  const adapters = new AdapterManager(store, STORE_BASE, { maxRank: 16, maxDeviceAdapters: 4, maxDeviceBytes: 0, maxHostBytes: 1 << 20 }, FAKE_EXECUTOR);
  const engine = new ScriptedEngine(() => new Set(), options);
  const metrics = new Metrics({ deviceMemory: () => ({ numBytes: 0, numTensors: 0 }), processMetrics: false });
  const app = await buildApp({ engine, adapters, metrics, tokenizer: fixtureTokenizer('llama'), info: TEST_INFO, options });
  return {
    app, store, adapters, dir,
    async close() {
      await app.close();
      await store.close();
      if (own) await rm(path.dirname(dir), { recursive: true, force: true });
    },
  };
}
