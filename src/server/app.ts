/**
 * The HTTP layer as a fastify app builder (no listen: src/server/main.ts does that). It parses
 * and validates JSON, tokenises, talks to the engine and the adapter manager through their
 * plain-data contracts and formats responses. It never touches a tensor.
 *
 * One error handler answers every error as `{error, error_type, code}` (OpenAI routes:
 * `{error: {message, type, param, code}}`) with the status of the error catalogue (OpenAI routes:
 * 400 for request validation, `responseStatus`).
 */
import { createHash, timingSafeEqual } from 'node:crypto';
import Fastify, { LogController, type FastifyBaseLogger, type FastifyError, type FastifyInstance, type FastifyRequest, type FastifySchemaValidationError, type FastifyServerFactory, type FastifyServerOptions } from 'fastify';
import type { WebGPUAdapter } from '../backend/webgpu/init.ts';
import type { EngineApi } from '../engine/types.ts';
import type { LoraMode } from '../engine/scheduler.ts';
import { fail, isServeError, ServeError } from '../errors.ts';
import type { AdapterAdmin } from '../lora/types.ts';
import type { Metrics } from '../obs/metrics.ts';
import type { TextTokenizer } from '../text/tokenizer.ts';
import { lingerOnClose } from './linger.ts';
import { adapterRoutes } from './routes/adapters.ts';
import { openAIErrorBody, publicErrorBody, requestSummary, responseStatus } from './routes/common.ts';
import { generateRoutes } from './routes/generate.ts';
import { openAIRoutes } from './routes/openai.ts';
import { openApiRoutes, recordRoute, type RouteRecord } from './routes/openapi.ts';
import { serviceRoutes } from './routes/service.ts';
import { vllmRoutes } from './routes/vllm.ts';
import { tokenizeRoutes } from './routes/tokenize.ts';

/** What /info reports beyond the request limits of `AppOptions`. */
export interface ServerInfo {
  /** The base model's id (also its `model` name on the OpenAI routes). */
  readonly modelId: string;
  /** The Hub commit of a model given as org/name (TGI's model_sha); absent for a folder. */
  readonly modelSha?: string;
  /** config.json model_type (llama, gpt2, ...). */
  readonly modelType: string;
  readonly dtype: string;
  /** TensorFlow.js backend in use. */
  readonly backend: string;
  /** Matrix products run in the native addon. */
  readonly nativeMatmul: boolean;
  /** The WebGPU adapter (webgpu backend only). */
  readonly webgpuAdapter?: WebGPUAdapter;
  readonly version: string;
  /** Copies of the model (executor workers), as chosen for --workers. */
  readonly workers: number;
  readonly lora: {
    readonly mode: LoraMode;
    readonly maxRank: number;
    readonly maxLoadedAdapters: number;
    /** 0: no byte limit. */
    readonly deviceBytes: number;
    readonly hostBytes: number;
  };
  readonly limits: {
    readonly maxBatchSize: number;
    readonly maxBatchTokens: number;
    readonly maxQueue: number;
    readonly prefillChunk: number;
  };
}

export interface AppOptions {
  /**
   * Require `Authorization: Bearer <apiKey>` (or the admin key) on every route but /health (and /metrics with
   * `metricsPublic`). Absent: those routes are open.
   */
  readonly apiKey?: string;
  /**
   * The admin routes (`config.admin`: adapter upload, delete, load/unload, vLLM's load/unload) need this key, and
   * `apiKey` is not enough; it also opens every other route. Absent: admin routes take `apiKey` like the others.
   */
  readonly adminApiKey?: string;
  /** /metrics needs no key (a Prometheus without credentials). */
  readonly metricsPublic?: boolean;
  /** The engine's length limits (`Engine.limits`): /info reports them and default max-new-tokens are fitted to them. */
  readonly maxInputLength: number;
  readonly maxTotalTokens: number;
  /** Default max_new_tokens of /generate and /generate_stream. */
  readonly maxNewTokensDefault: number;
  readonly maxAdapterBytes: number;
  /** JSON body limit. */
  readonly bodyLimitBytes: number;
  /** Per-request deadline passed to the engine; absent or 0: none. */
  readonly requestTimeoutMs?: number;
  /** Connection timeouts of the HTTP server (`--headers-timeout` ...); absent: those of `DEFAULT_CONNECTION_TIMEOUTS`. */
  readonly connection?: ConnectionTimeouts;
  /** A stream whose client accepts no data for this long is cancelled and its connection closed; absent or 0: never. */
  readonly streamStallMs?: number;
  /** Absolute folders POST /v1/load_lora_adapter may read a lora_path from (--allowed-local-adapter-paths); absent: none. */
  readonly allowedAdapterPaths?: readonly string[];
  /** POST /v1/load_lora_adapter takes a lora_path that is not absolute as a Hub repo id, as vLLM does (--adapter-source hub). */
  readonly hubLoraPaths?: boolean;
  /** false until the model is loaded (and again while shutting down): /health answers 503. */
  ready(): boolean;
  /** Why the server can no longer serve fully and should be restarted (WORKER_DIED), or null: /health answers 503 with it. */
  broken?(): ServeError | null;
}

/** How long the HTTP server waits for a client, in milliseconds (Node's http.Server options of the same names). */
export interface ConnectionTimeouts {
  /** To receive a request's headers. */
  readonly headersTimeoutMs: number;
  /** To receive a whole request, headers and body (408 after it); 0: no limit. */
  readonly requestTimeoutMs: number;
  /** An idle keep-alive connection is closed after this long. */
  readonly keepAliveTimeoutMs: number;
}

/** The defaults of `--headers-timeout`, `--body-timeout` and `--keep-alive-timeout`. */
export const DEFAULT_CONNECTION_TIMEOUTS: ConnectionTimeouts = { headersTimeoutMs: 60_000, requestTimeoutMs: 300_000, keepAliveTimeoutMs: 72_000 };

/**
 * Node checks the header and request timeouts of open connections every `connectionsCheckingInterval` (30 s by
 * default): checked four times per shortest timeout, at most once a second, so a timeout fires within a quarter of
 * itself (or a second) of its value.
 */
export function checkingIntervalMs(t: ConnectionTimeouts): number {
  const shortest = Math.min(t.headersTimeoutMs, t.requestTimeoutMs || Infinity);
  return Math.max(50, Math.min(1000, Math.floor(shortest / 4)));
}

export interface AppDeps {
  readonly engine: EngineApi;
  readonly adapters: AdapterAdmin;
  readonly tokenizer: TextTokenizer;
  readonly metrics: Metrics;
  readonly info: ServerInfo;
  readonly options: AppOptions;
}

export interface BuildOptions {
  /** The process's logger (pino); absent: no logging. */
  readonly loggerInstance?: FastifyBaseLogger;
  /** A server of the caller's to answer on (fastify's serverFactory): one already listening (src/server/server.ts). */
  readonly serverFactory?: FastifyServerFactory;
}

function sha256(s: string): Buffer {
  return createHash('sha256').update(s).digest();
}

/**
 * Which of `--api-key` and `--admin-api-key` an `Authorization` header presents (null when neither is set).
 * Keys are compared as SHA-256 hashes: equal lengths, so timingSafeEqual never throws and the key length does not leak.
 */
export function keyMatcher(opts: Pick<AppOptions, 'apiKey' | 'adminApiKey'>): ((authorization: string | undefined) => { plain: boolean; admin: boolean }) | null {
  const plain = opts.apiKey ? sha256(opts.apiKey) : null;
  const admin = opts.adminApiKey ? sha256(opts.adminApiKey) : null;
  if (!plain && !admin) return null;
  const is = (presented: Buffer | null, key: Buffer | null) => presented !== null && key !== null && timingSafeEqual(presented, key);
  return (authorization) => {
    const m = /^Bearer +(\S+) *$/i.exec(authorization ?? '');
    const presented = m ? sha256(m[1]!) : null;
    return { plain: is(presented, plain), admin: is(presented, admin) };
  };
}

/**
 * The onRequest check of `--api-key` and `--admin-api-key` (null when neither is set). A route with
 * `config.public` is open; one with `config.admin` takes only the admin key when there is one (a valid plain key
 * gets 403 ADMIN_KEY_REQUIRED, no or another key 401); every other route takes either key, and is open when only
 * the admin key is set.
 */
function apiKeyCheck(opts: Pick<AppOptions, 'apiKey' | 'adminApiKey'>): ((request: FastifyRequest) => void) | null {
  const match = keyMatcher(opts);
  if (!match) return null;
  return (request) => {
    const config = request.routeOptions.config;
    if (config?.public) return;
    const { plain: isPlain, admin: isAdmin } = match(request.headers.authorization);
    if (config?.admin && opts.adminApiKey) {
      if (isAdmin) return;
      if (isPlain) throw fail('ADMIN_KEY_REQUIRED', 'this route needs the admin API key (--admin-api-key); the API key is not enough');
      throw fail('UNAUTHORIZED', 'missing or invalid admin API key: send "Authorization: Bearer <admin key>"');
    }
    if (!opts.apiKey || isPlain || isAdmin) return;
    throw fail('UNAUTHORIZED', 'missing or invalid API key: send "Authorization: Bearer <key>"');
  };
}

/** Any error as a ServeError: fastify's own client errors and a request aborted mid-body get catalogue codes, everything else is INTERNAL. */
function toServeError(err: unknown): ServeError {
  if (isServeError(err)) return err;
  const e = err as Partial<FastifyError>;
  const status = e.statusCode ?? 500;
  // The client went away (or was timed out) while its body was being read: nobody reads the answer.
  if (e.code === 'ECONNRESET' || e.code === 'ERR_STREAM_PREMATURE_CLOSE') return fail('CANCELLED', 'the client closed the connection before its request was read');
  if (typeof e.code === 'string' && e.code.startsWith('FST_') && status >= 400 && status < 500) {
    if (status === 413) return fail('PAYLOAD_TOO_LARGE', e.message ?? 'request body too large');
    if (status === 415) return fail('UNSUPPORTED_MEDIA_TYPE', e.message ?? 'unsupported content type');
    return fail('BAD_REQUEST', e.message ?? 'bad request');
  }
  return new ServeError('INTERNAL', 'internal server error', undefined, { cause: err });
}

/**
 * A request validation failure as one coded error. A field the schema does not declare is
 * UNKNOWN_FIELD, with the known fields of its object listed; anything else is VALIDATION, one
 * readable line per failure (`parameters.max_new_tokens` must be integer), the `anyOf`/`null`
 * alternatives of nullable fields dropped. `param` is the (first) field at fault, dotted.
 */
function formatSchemaErrors(errors: FastifySchemaValidationError[], dataVar: string): Error {
  const dotted = (e: FastifySchemaValidationError) => e.instancePath.replace(/^\//, '').replaceAll('/', '.');
  const where = dataVar === 'body' ? '' : `${dataVar}: `;
  const unknown = errors.find((e) => e.keyword === 'additionalProperties');
  if (unknown) {
    const parent = dotted(unknown);
    const param = `${parent ? `${parent}.` : ''}${String(unknown.params.additionalProperty)}`;
    // ajv's verbose mode gives the object's schema: its properties are the known fields.
    const known = Object.keys((unknown as { parentSchema?: { properties?: object } }).parentSchema?.properties ?? {}).sort();
    return fail('UNKNOWN_FIELD', `${where}unknown field \`${param}\`; known fields${parent ? ` of \`${parent}\`` : ''}: ${known.join(', ')}`, { param });
  }
  const useful = errors.filter((e) => e.keyword !== 'anyOf' && !(e.keyword === 'type' && e.params.type === 'null'));
  const shown = useful.length > 0 ? useful : errors;
  const lines = shown.map((e) => `${dotted(e) ? `\`${dotted(e)}\` ` : ''}${e.message ?? 'is invalid'}`);
  const param = shown.map(dotted).find((p) => p !== '');
  return fail('VALIDATION', `${where}${[...new Set(lines)].join('; ')}`, param ? { param } : undefined);
}

/** OpenAI-compatible routes answer errors in OpenAI's shape. */
function isOpenAIRoute(request: FastifyRequest): boolean {
  return request.url.startsWith('/v1/');
}

const ROUTES = new WeakMap<FastifyInstance, readonly RouteRecord[]>();

/** The routes an app built by buildApp registered (recorded by its onRoute hook). */
export function registeredRoutes(app: FastifyInstance): readonly RouteRecord[] {
  return ROUTES.get(app) ?? [];
}

export async function buildApp(deps: AppDeps, opts: BuildOptions = {}): Promise<FastifyInstance> {
  const timeouts = deps.options.connection ?? DEFAULT_CONNECTION_TIMEOUTS;
  const app = Fastify({
    http: { headersTimeout: timeouts.headersTimeoutMs, connectionsCheckingInterval: checkingIntervalMs(timeouts) },
    requestTimeout: timeouts.requestTimeoutMs,
    keepAliveTimeout: timeouts.keepAliveTimeoutMs,
    ...(opts.loggerInstance ? { loggerInstance: opts.loggerInstance } : { logger: false }),
    ...(opts.serverFactory ? { serverFactory: opts.serverFactory } : {}),
    // One summary line per request (below) instead of fastify's "incoming request" and "request completed".
    logController: new LogController({ disableRequestLogging: true }),
    bodyLimit: deps.options.bodyLimitBytes,
    exposeHeadRoutes: false,
    // Strict JSON: no "5" for 5, as TGI and OpenAI reject it too. Query strings are declared as strings.
    // verbose: errors carry their schema, so an unknown field's message can list the known ones.
    ajv: { customOptions: { coerceTypes: false, removeAdditional: false, verbose: true } },
    schemaErrorFormatter: formatSchemaErrors,
  });

  const routes: RouteRecord[] = [];
  ROUTES.set(app, routes);
  app.addHook('onRoute', (r) => {
    routes.push(...recordRoute(r));
  });

  const check = apiKeyCheck(deps.options);
  if (check) app.addHook('onRequest', async (request) => check(request));

  // A response that closes the connection before the request body was read (a body over the limit) lingers.
  app.addHook('onSend', async (request, reply, payload) => {
    if (String(reply.getHeader('connection')).toLowerCase() === 'close') lingerOnClose(request.raw);
    return payload;
  });

  app.addHook('onResponse', async (request, reply) => {
    const route = request.routeOptions.url ?? 'unmatched';
    deps.metrics.httpRequest(route, request.method, reply.statusCode, reply.elapsedTime / 1000);
    // Probes and scrapes come every few seconds: their lines are debug.
    const quiet = route === '/health' || route === '/metrics';
    request.log[quiet ? 'debug' : 'info'](requestSummary(request, reply), 'request');
  });

  app.setErrorHandler((err, request, reply) => {
    const e = toServeError(err);
    const openai = isOpenAIRoute(request);
    const status = responseStatus(e.code, openai);
    if (status >= 500) request.log.error({ err }, 'request failed');
    const retryAfter = e.details?.retryAfter;
    if (typeof retryAfter === 'number') reply.header('retry-after', String(Math.ceil(retryAfter)));
    if (e.code === 'UNAUTHORIZED') reply.header('www-authenticate', 'Bearer');
    return reply.code(status).type('application/json; charset=utf-8').send(openai ? openAIErrorBody(e) : publicErrorBody(e).body);
  });

  app.setNotFoundHandler((request) => {
    throw fail('NOT_FOUND', `no route ${request.method} ${request.url.split('?')[0]}`);
  });

  generateRoutes(app, deps);
  openAIRoutes(app, deps);
  vllmRoutes(app, deps);
  await app.register(async (scope) => adapterRoutes(scope, deps));
  tokenizeRoutes(app, deps);
  serviceRoutes(app, deps);
  await openApiRoutes(app, routes);
  return app;
}
