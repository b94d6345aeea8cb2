/**
 * Builds the whole server (runtime + HTTP app) from options. main.ts calls startServer, which listens before the
 * model loads; tests and benchmarks also use createServer, which loads first and leaves listening to them.
 */
import { createServer as createHttpServer, type IncomingMessage, type Server as HttpServer, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import type { FastifyInstance } from 'fastify';
import { pino, type Logger } from 'pino';
import type { ServerOptions } from '../cli.ts';
import { webgpuCounts } from '../backend/webgpu/counters.ts';
import { Metrics } from '../obs/metrics.ts';
import { startRuntime, type Runtime } from '../runtime.ts';
import { buildApp, checkingIntervalMs, type ConnectionTimeouts } from './app.ts';
import { parseAllowedRoots } from '../lora/local-path.ts';
import { serverInfo } from './info.ts';
import { loadingHandler } from './loading.ts';
import { StartupProgress } from '../startup.ts';

export interface Server {
  readonly app: FastifyInstance;
  readonly runtime: Runtime;
  readonly metrics: Metrics;
  /** /health answers 200 only while ready. */
  setReady(ready: boolean): void;
  /** Stops accepting, drains in-flight requests within graceMs, frees the model. */
  close(graceMs?: number): Promise<void>;
}

/** The process's logger: pino JSON lines on stdout with ISO times. */
export function createLogger(level: ServerOptions['logLevel']): Logger {
  return pino({ level, timestamp: pino.stdTimeFunctions.isoTime });
}

export interface CreateHooks {
  /** Where start-up reports its progress (its gate is the tests' seam to hold it at a phase). */
  readonly progress?: StartupProgress;
  /**
   * A server already listening (startServer's): it answers with `loading` until the app is built, then the app
   * answers on it. Absent: the app creates its own, and the caller listens.
   */
  readonly listening?: { readonly http: HttpServer; readonly take: (app: (req: IncomingMessage, res: ServerResponse) => void) => void };
  /** Called with the metrics before the model loads (startServer serves /metrics while loading). */
  readonly onMetrics?: (metrics: Metrics) => void;
}

/**
 * `logger` is the one logger of the process: start-up messages, fastify's own and the per-request
 * lines all go through it (default: pino at `options.logLevel`, JSON lines on stdout).
 */
export async function createServer(options: ServerOptions, logger: Logger = createLogger(options.logLevel), hooks: CreateHooks = {}): Promise<Server> {
  let runtime: Runtime | null = null;
  const metrics = new Metrics({
    deviceMemory: () => runtime?.deviceMemory() ?? { numTensors: 0, numBytes: 0 },
    profile: () => runtime?.profile() ?? {},
    webgpu: webgpuCounts,
    load: () => runtime?.engine.load() ?? { kvTokens: 0, kvCapacityTokens: 0, runningAdapters: [], waitingAdapters: [] },
    maxLora: options.maxLoadedAdapters,
    compat: options.metricsCompat,
  });
  hooks.onMetrics?.(metrics);
  let ready = false;
  const progress = hooks.progress ?? new StartupProgress();
  runtime = await startRuntime(options, { log: (msg) => logger.info(msg), error: (msg) => logger.error(msg), metrics, progress });
  const rt = runtime;
  const listening = hooks.listening;
  let appHandler: ((req: IncomingMessage, res: ServerResponse) => void) | null = null;
  const app = await buildApp({
    engine: runtime.engine,
    adapters: runtime.adapters,
    tokenizer: runtime.tokenizer,
    metrics,
    info: serverInfo(runtime, options),
    options: {
      apiKey: options.apiKey,
      adminApiKey: options.adminApiKey,
      metricsPublic: options.metricsPublic,
      ...runtime.engine.limits,
      maxNewTokensDefault: options.maxNewTokens,
      maxAdapterBytes: options.maxAdapterBytes,
      allowedAdapterPaths: parseAllowedRoots(options.allowedLocalAdapterPaths),
      hubLoraPaths: options.adapterSource === 'hub',
      bodyLimitBytes: 4 * 1024 * 1024,
      requestTimeoutMs: options.requestTimeout > 0 ? options.requestTimeout * 1000 : undefined,
      connection: connectionTimeouts(options),
      streamStallMs: options.streamStallTimeout * 1000,
      ready: () => ready,
      broken: () => rt.executor.broken(),
    },
  }, {
    loggerInstance: logger,
    ...(listening ? {
      serverFactory: (handler) => {
        appHandler = handler;
        return listening.http;
      },
    } : {}),
  });
  if (listening) {
    // The app answers once every route is registered.
    await app.ready();
    listening.take(appHandler!);
  }
  await progress.enter('ready');
  return {
    app, runtime, metrics,
    setReady: (r) => {
      ready = r;
    },
    async close(graceMs = 0) {
      ready = false;
      // Stop accepting; requests in flight (streams included) finish, or are cancelled after the grace. fastify
      // does not close a server it was given: that is closed here.
      const closing = Promise.all([app.close(), listening ? new Promise((r) => listening.http.close(r)) : null]);
      await rt.close(graceMs);
      await closing;
    },
  };
}

/** The HTTP server's connection timeouts from the options, in milliseconds. */
function connectionTimeouts(options: ServerOptions): ConnectionTimeouts {
  return {
    headersTimeoutMs: options.headersTimeout * 1000,
    requestTimeoutMs: options.bodyTimeout * 1000,
    keepAliveTimeoutMs: options.keepAliveTimeout * 1000,
  };
}

/**
 * Listens on `options.host`:`options.port` at once (logging `listening on <url>`), answering every request as
 * src/server/loading.ts does while the runtime starts (checking --api-key, --admin-api-key and --metrics-public as
 * the app does), then hands the socket to the app. `/health` answers 200 once the caller calls setReady(true).
 */
export async function startServer(options: ServerOptions, logger: Logger = createLogger(options.logLevel), progress = new StartupProgress()): Promise<Server> {
  let handle: (req: IncomingMessage, res: ServerResponse) => void = (_req, res) => res.writeHead(503).end();
  // The app is handed this server (fastify's serverFactory), so fastify's own timeout options do not reach it: the
  // connection timeouts (--headers-timeout, --body-timeout, --keep-alive-timeout) are set here.
  const timeouts: ConnectionTimeouts = connectionTimeouts(options);
  const http = createHttpServer({
    headersTimeout: timeouts.headersTimeoutMs,
    requestTimeout: timeouts.requestTimeoutMs,
    keepAliveTimeout: timeouts.keepAliveTimeoutMs,
    connectionsCheckingInterval: checkingIntervalMs(timeouts),
  }, (req, res) => handle(req, res));
  await new Promise<void>((resolve, reject) => {
    http.once('error', reject);
    http.listen({ host: options.host, port: options.port }, () => {
      http.off('error', reject);
      resolve();
    });
  });
  const { address, port, family } = http.address() as AddressInfo;
  logger.info(`listening on http://${family === 'IPv6' ? `[${address}]` : address}:${port}`);
  try {
    return await createServer(options, logger, {
      progress,
      onMetrics: (metrics) => {
        handle = loadingHandler(progress, metrics, { apiKey: options.apiKey, adminApiKey: options.adminApiKey, metricsPublic: options.metricsPublic });
      },
      listening: {
        http,
        take: (app) => {
          handle = app;
        },
      },
    });
  } catch (err) {
    http.close();
    throw err;
  }
}
