/** Service routes: GET|HEAD /health (never needs a key), GET /info, GET /metrics (no key with --metrics-public). */
import type { FastifyInstance } from 'fastify';
import { fail } from '../../errors.ts';
import type { AppDeps } from '../app.ts';
import { Health, Info, MAX_STOP_SEQUENCES, MAX_TOP_N_TOKENS } from '../schemas.ts';

export function serviceRoutes(app: FastifyInstance, deps: AppDeps): void {
  app.route({
    method: ['GET', 'HEAD'],
    url: '/health',
    schema: {
      summary: 'Ready to serve: 200 once the model is loaded; 503 before, while shutting down, and once an executor worker has died (restart the process)',
      response: { 200: Health },
    },
    config: { public: true, doc: { tag: 'Service', errors: ['NOT_READY', 'WORKER_DIED'] } },
    handler: async () => {
      if (!deps.options.ready()) throw fail('NOT_READY', 'the server is not ready (loading the model or shutting down)');
      const broken = deps.options.broken?.();
      if (broken) throw broken;
      return { status: 'ok' as const };
    },
  });

  app.get('/info', {
    schema: { summary: 'Model, backend and limits', response: { 200: Info } },
    config: { doc: { tag: 'Service' } },
  }, async () => {
    const { info, options } = deps;
    return {
      model_id: info.modelId,
      model_sha: info.modelSha ?? null,
      model_type: info.modelType,
      model_dtype: info.dtype,
      backend: info.backend,
      native_matmul: info.nativeMatmul,
      webgpu_adapter: info.webgpuAdapter ? {
        vendor: info.webgpuAdapter.vendor,
        architecture: info.webgpuAdapter.architecture,
        device: info.webgpuAdapter.device,
        description: info.webgpuAdapter.description,
        software: info.webgpuAdapter.software,
        max_storage_buffer_binding_size: info.webgpuAdapter.maxStorageBufferBindingSize,
        max_buffer_size: info.webgpuAdapter.maxBufferSize,
      } : null,
      version: info.version,
      workers: info.workers,
      chat_template: deps.tokenizer.chatTemplate !== null,
      max_input_tokens: options.maxInputLength,
      max_total_tokens: options.maxTotalTokens,
      max_new_tokens: options.maxNewTokensDefault,
      max_stop_sequences: MAX_STOP_SEQUENCES,
      max_top_n_tokens: MAX_TOP_N_TOKENS,
      max_batch_size: info.limits.maxBatchSize,
      max_batch_total_tokens: info.limits.maxBatchTokens,
      max_queue: info.limits.maxQueue,
      prefill_chunk: info.limits.prefillChunk,
      max_adapter_bytes: options.maxAdapterBytes,
      lora: {
        mode: info.lora.mode,
        max_rank: info.lora.maxRank,
        max_loaded_adapters: info.lora.maxLoadedAdapters,
        device_bytes: info.lora.deviceBytes,
        host_bytes: info.lora.hostBytes,
      },
    };
  });

  app.get('/metrics', {
    schema: { summary: 'Prometheus metrics (text exposition format; see docs/metrics.md)' },
    config: { public: deps.options.metricsPublic === true, doc: { tag: 'Service', produces: 'text/plain' } },
  }, async (_request, reply) => {
    return reply.type(deps.metrics.contentType).send(await deps.metrics.text());
  });
}
