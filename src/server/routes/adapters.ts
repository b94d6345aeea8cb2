/**
 * Adapter management. Ids may be `name` or `org/name`, so the routes are wildcards and the id is
 * validated here: `GET|PUT|DELETE /adapters/{id}`, `POST /adapters/{id}/load|unload`.
 */
import multipart, { type Multipart } from '@fastify/multipart';
import type { FastifyInstance, FastifyReply } from 'fastify';
import { fail, isServeError, type ErrorCode } from '../../errors.ts';
import { validateAdapterId } from '../../lora/ids.ts';
import type { AdapterInfo as Info } from '../../lora/types.ts';
import type { AppDeps } from '../app.ts';
import { AdapterDeleted, AdapterInfo, AdapterList, AdapterUpload, LoadQuery, type LoadQueryString } from '../schemas.ts';

/** What validating an adapter's files can fail with (uploads, and loads on first use). */
export const ADAPTER_FILE_ERRORS: readonly ErrorCode[] = [
  'ADAPTER_INVALID_ID', 'ADAPTER_INVALID_CONFIG', 'ADAPTER_UNSUPPORTED', 'ADAPTER_SHAPE_MISMATCH', 'ADAPTER_UNKNOWN_MODULE',
  'ADAPTER_RANK_TOO_LARGE', 'ADAPTER_NON_FINITE', 'ADAPTER_PICKLE', 'SAFETENSORS_INVALID', 'SAFETENSORS_DTYPE',
];
/** What fetching an adapter from the Hugging Face Hub can fail with (adapter_source "hub", --adapter-source hub). */
export const HUB_ERRORS: readonly ErrorCode[] = ['HUB_ACCESS_DENIED', 'HUB_NOT_FOUND', 'HUB_NOT_CACHED', 'HUB_UNAVAILABLE'];
/** What writing to the adapter folder can fail with (uploads, deletes): a full or read-only disk, a symlinked folder. */
export const STORE_WRITE_ERRORS: readonly ErrorCode[] = ['INSUFFICIENT_STORAGE', 'STORAGE_UNAVAILABLE', 'ADAPTER_PATH_NOT_ALLOWED'];
/** What loading an adapter from the store (or, with --adapter-source hub, the Hub) can fail with. */
export const LOAD_ERRORS: readonly ErrorCode[] = [...ADAPTER_FILE_ERRORS, 'ADAPTER_NOT_FOUND', 'ADAPTER_FETCH_FAILED', 'ADAPTER_FETCH_TIMEOUT', ...HUB_ERRORS, 'ADAPTER_BUSY'];

export function adapterJson(a: Info) {
  return {
    id: a.id,
    state: a.state,
    tier: a.tier,
    source: a.source,
    version: a.version,
    bytes: a.bytes,
    rank: a.rank,
    alpha: a.alpha,
    target_modules: a.targetModules === null ? null : [...a.targetModules],
    pinned: a.pinned,
    active_requests: a.activeRequests,
    last_used: a.lastUsed,
    error: a.error,
  };
}

const UPLOAD_HELP = 'send multipart/form-data with the parts "config" (adapter_config.json) and "weights" (adapter_model.safetensors)';

/** What a multipart body may hold beyond its parts' contents (boundaries, part headers): a declared length over the limit plus this is refused unread. */
const MULTIPART_OVERHEAD_BYTES = 64 * 1024;

/** fastify/multipart's limit errors (file, parts, fields) are all "too large" here. */
const LIMIT_ERRORS = new Set(['FST_REQ_FILE_TOO_LARGE', 'FST_PARTS_LIMIT', 'FST_FILES_LIMIT', 'FST_FIELDS_LIMIT']);

export async function adapterRoutes(app: FastifyInstance, deps: AppDeps): Promise<void> {
  const maxBytes = deps.options.maxAdapterBytes;
  await app.register(multipart, { limits: { fileSize: maxBytes, fieldSize: maxBytes, files: 2, fields: 2, parts: 4 } });
  /** The body is not read further: the connection closes after the 413 (lingering, src/server/linger.ts). */
  const tooLarge = (reply: FastifyReply) => {
    reply.header('connection', 'close');
    return fail('ADAPTER_TOO_LARGE', `the adapter is larger than the limit of ${maxBytes} bytes (--max-adapter-bytes)`);
  };
  /** A part's bytes, given up as soon as the upload passes `budget` bytes (not when the part ends). */
  const readPart = async (part: Multipart, budget: number, reply: FastifyReply): Promise<Buffer> => {
    if (part.type !== 'file') return Buffer.from(String(part.value), 'utf8');
    const chunks: Buffer[] = [];
    let n = 0;
    for await (const chunk of part.file as AsyncIterable<Buffer>) {
      n += chunk.length;
      if (n > budget || part.file.truncated) throw tooLarge(reply); // leaving the loop destroys the part's stream
      chunks.push(chunk);
    }
    if (part.file.truncated) throw tooLarge(reply);
    return Buffer.concat(chunks, n);
  };

  app.get('/adapters', {
    schema: { summary: 'Every known adapter and the cache occupancy', response: { 200: AdapterList } },
    config: { doc: { tag: 'Adapters' } },
  }, async () => {
    const s = deps.adapters.stats();
    return {
      adapters: (await deps.adapters.list()).map(adapterJson),
      cache: {
        device_adapters: s.deviceAdapters, device_bytes: s.deviceBytes, host_adapters: s.hostAdapters, host_bytes: s.hostBytes,
        max_device_adapters: s.maxDeviceAdapters, max_device_bytes: s.maxDeviceBytes, max_host_bytes: s.maxHostBytes,
      },
    };
  });

  app.get<{ Params: { '*': string } }>('/adapters/*', {
    schema: { response: { 200: AdapterInfo } },
    config: { doc: { tag: 'Adapters', operations: [{ path: '/adapters/{id}', summary: 'One adapter' }], errors: ['ADAPTER_INVALID_ID', 'ADAPTER_NOT_FOUND'] } },
  }, async (request) => adapterJson(await deps.adapters.info(validateAdapterId(request.params['*']))));

  app.put<{ Params: { '*': string } }>('/adapters/*', {
    schema: { response: { 200: AdapterInfo } },
    // A declared length over the limit is refused before any of the body is read (a body without one is counted as it streams).
    onRequest: async (request, reply) => {
      const declared = Number(request.headers['content-length']);
      if (Number.isFinite(declared) && declared > maxBytes + MULTIPART_OVERHEAD_BYTES) throw tooLarge(reply);
    },
    config: {
      admin: true,
      doc: {
        tag: 'Adapters',
        operations: [{
          path: '/adapters/{id}',
          summary: 'Upload (or replace) an adapter: validated fully, then stored atomically',
          body: { contentType: 'multipart/form-data', schema: AdapterUpload },
        }],
        errors: [...ADAPTER_FILE_ERRORS, ...STORE_WRITE_ERRORS, 'ADAPTER_TOO_LARGE', 'ADAPTER_BUSY'],
      },
    },
  }, async (request, reply) => {
    const id = validateAdapterId(request.params['*']);
    if (!request.isMultipart()) throw fail('UNSUPPORTED_MEDIA_TYPE', `PUT /adapters/{id}: ${UPLOAD_HELP}`);
    let config: string | undefined;
    let weights: Buffer | undefined;
    let total = 0;
    try {
      for await (const part of request.parts()) {
        const data = await readPart(part, maxBytes - total, reply);
        total += data.length;
        if (total > maxBytes) throw tooLarge(reply);
        if (part.fieldname === 'config' && config === undefined) config = data.toString('utf8');
        else if (part.fieldname === 'weights' && weights === undefined && part.type === 'file') weights = data;
        else throw fail('VALIDATION', `unexpected part "${part.fieldname}"${part.fieldname === 'weights' ? ' (weights must be a file part)' : ''}: ${UPLOAD_HELP}`);
      }
    } catch (err) {
      if (isServeError(err)) throw err;
      if (LIMIT_ERRORS.has((err as { code?: string }).code ?? '')) throw tooLarge(reply);
      // Anything else reading the parts is the body's framing (busboy: "Unexpected end of form", "Malformed part header").
      throw fail('BAD_REQUEST', `malformed multipart body (${(err as Error).message}): ${UPLOAD_HELP}`);
    }
    if (config === undefined || weights === undefined) {
      throw fail('VALIDATION', `missing part "${config === undefined ? 'config' : 'weights'}": ${UPLOAD_HELP}`);
    }
    let parsed: unknown;
    try {
      parsed = JSON.parse(config);
    } catch (err) {
      throw fail('ADAPTER_INVALID_CONFIG', `adapter_config.json is not valid JSON: ${(err as Error).message}`);
    }
    // A copy: small Buffers can be views into Node's shared pool.
    return adapterJson(await deps.adapters.put(id, { config: parsed, weights: new Uint8Array(weights) }));
  });

  app.delete<{ Params: { '*': string } }>('/adapters/*', {
    schema: { response: { 200: AdapterDeleted } },
    config: {
      admin: true,
      doc: { tag: 'Adapters', operations: [{ path: '/adapters/{id}', summary: 'Delete an adapter from every tier and the disk' }], errors: ['ADAPTER_INVALID_ID', 'ADAPTER_NOT_FOUND', 'ADAPTER_BUSY', ...STORE_WRITE_ERRORS] },
    },
  }, async (request) => {
    const id = validateAdapterId(request.params['*']);
    if (!(await deps.adapters.delete(id))) throw fail('ADAPTER_NOT_FOUND', `adapter "${id}" not found`);
    return { id, deleted: true as const };
  });

  app.post<{ Params: { '*': string }; Querystring: LoadQueryString }>('/adapters/*', {
    schema: { querystring: LoadQuery, response: { 200: AdapterInfo } },
    config: {
      admin: true,
      doc: {
        tag: 'Adapters',
        operations: [
          { path: '/adapters/{id}/load', summary: 'Load an adapter onto the device (pin=true keeps it there until unload)' },
          { path: '/adapters/{id}/unload', summary: 'Unpin an adapter and drop it from the device when no request uses it', query: undefined },
        ],
        errors: [...LOAD_ERRORS, 'NOT_FOUND'],
      },
    },
  }, async (request) => {
    const path = request.params['*'];
    const slash = path.lastIndexOf('/');
    const action = path.slice(slash + 1);
    if (slash < 0 || (action !== 'load' && action !== 'unload')) {
      throw fail('NOT_FOUND', `no route POST /adapters/${path}: use /adapters/{id}/load or /adapters/{id}/unload`);
    }
    const id = validateAdapterId(path.slice(0, slash));
    const info = action === 'load'
      ? await deps.adapters.load(id, { pin: request.query.pin === 'true' })
      : await deps.adapters.unload(id);
    return adapterJson(info);
  });
}
