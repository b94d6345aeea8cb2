/**
 * vLLM's dynamic LoRA routes, as the Gateway API Inference Extension's LoRA syncer and vLLM clients call them:
 * `POST /v1/load_lora_adapter {"lora_name", "lora_path"}` and `POST /v1/unload_lora_adapter {"lora_name"}`.
 *
 * - `lora_name` is the adapter id (`name` or `org/name`), the `model` that requests then name.
 * - `lora_path` absent or equal to `lora_name`: the adapter comes from the adapter store (--adapter-dir, then
 *   --adapter-source-url) and is loaded onto the device.
 * - `lora_path` an absolute folder: read only inside --allowed-local-adapter-paths (src/lora/local-path.ts),
 *   validated, stored under `lora_name` (replacing an older version, as vLLM's `load_inplace`), then loaded.
 * - With --adapter-source hub, `lora_path` not absolute: a Hugging Face Hub repo id, as vLLM takes it; its files are
 *   downloaded into the Hub cache, validated and stored under `lora_name` the same way (else: refused as relative).
 * - Unload drops the adapter from the device (it stays in the store: a later request naming it loads it again).
 *
 * Both answer 200 with vLLM's plain-text message; errors are OpenAI-shaped like every /v1/ route.
 */
import { Type, type Static } from '@sinclair/typebox';
import type { FastifyInstance } from 'fastify';
import { isAbsolute } from 'node:path';
import { readAllowedAdapterFolder } from '../../lora/local-path.ts';
import { validateAdapterId } from '../../lora/ids.ts';
import type { AppDeps } from '../app.ts';
import { Closed } from '../schemas.ts';
import { LOAD_ERRORS, STORE_WRITE_ERRORS } from './adapters.ts';

const LoadLoraAdapter = Type.Object({
  lora_name: Type.String({ description: 'Adapter id (`name` or `org/name`)' }),
  lora_path: Type.Optional(Type.String({ description: 'Absolute adapter folder inside --allowed-local-adapter-paths, or with --adapter-source hub a Hugging Face Hub repo id; absent or equal to lora_name: from the adapter store' })),
}, { title: 'LoadLoraAdapterRequest', ...Closed });

const UnloadLoraAdapter = Type.Object({
  lora_name: Type.String({ description: 'Adapter id (`name` or `org/name`)' }),
}, { title: 'UnloadLoraAdapterRequest', ...Closed });

export function vllmRoutes(app: FastifyInstance, deps: AppDeps): void {
  const roots = deps.options.allowedAdapterPaths ?? [];

  app.post<{ Body: Static<typeof LoadLoraAdapter> }>('/v1/load_lora_adapter', {
    schema: { summary: 'vLLM: load a LoRA adapter (from the adapter store, a local folder inside --allowed-local-adapter-paths, or with --adapter-source hub a Hub repo)', body: LoadLoraAdapter },
    config: { admin: true, doc: { tag: 'Adapters', produces: 'text/plain', errors: [...LOAD_ERRORS, ...STORE_WRITE_ERRORS, 'ADAPTER_TOO_LARGE'] } },
  }, async (request, reply) => {
    const { lora_name: name, lora_path: folder } = request.body;
    const id = validateAdapterId(name);
    if (folder !== undefined && folder !== '' && folder !== id) {
      if (deps.options.hubLoraPaths && !isAbsolute(folder)) {
        await deps.adapters.putFromHub(id, validateAdapterId(folder));
      } else {
        const files = await readAllowedAdapterFolder(id, folder, roots, deps.options.maxAdapterBytes);
        await deps.adapters.put(id, { config: files.config, weights: files.weights });
      }
    }
    await deps.adapters.load(id);
    return reply.type('text/plain; charset=utf-8').send(`Success: LoRA adapter '${id}' added successfully.`);
  });

  app.post<{ Body: Static<typeof UnloadLoraAdapter> }>('/v1/unload_lora_adapter', {
    schema: { summary: 'vLLM: drop a LoRA adapter from the device (it stays in the adapter store)', body: UnloadLoraAdapter },
    config: { admin: true, doc: { tag: 'Adapters', produces: 'text/plain', errors: ['ADAPTER_INVALID_ID', 'ADAPTER_NOT_FOUND'] } },
  }, async (request, reply) => {
    const id = validateAdapterId(request.body.lora_name);
    await deps.adapters.unload(id);
    return reply.type('text/plain; charset=utf-8').send(`Success: LoRA adapter '${id}' removed successfully.`);
  });
}

