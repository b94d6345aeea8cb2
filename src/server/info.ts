/** GET /info's content, from the runtime and the options (no tensors: plain fields only). */
import type { ServerOptions } from '../cli.ts';
import type { Runtime } from '../runtime.ts';
import { VERSION } from '../version.ts';
import type { ServerInfo } from './app.ts';

export function serverInfo(rt: Runtime, o: ServerOptions): ServerInfo {
  return {
    modelId: rt.modelId,
    ...(rt.modelSha !== undefined ? { modelSha: rt.modelSha } : {}),
    modelType: rt.config.modelType,
    dtype: rt.dtype,
    backend: rt.backend,
    nativeMatmul: rt.nativeMatmul,
    ...(rt.webgpuAdapter ? { webgpuAdapter: rt.webgpuAdapter } : {}),
    version: VERSION,
    workers: rt.workers,
    lora: {
      mode: o.loraMode, maxRank: o.maxLoraRank, maxLoadedAdapters: o.maxLoadedAdapters,
      deviceBytes: rt.adapterDeviceBytes, hostBytes: o.adapterHostBytes,
    },
    limits: { maxBatchSize: o.maxBatchSize, maxBatchTokens: o.maxBatchTokens, maxQueue: o.maxQueue, prefillChunk: o.prefillChunk },
  };
}
