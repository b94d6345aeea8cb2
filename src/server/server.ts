/** Builds the whole server (runtime + HTTP app) from options; main.ts listens, tests and benchmarks reuse it. */
import type { FastifyInstance } from 'fastify';
import { pino, type Logger } from 'pino';
import type { ServerOptions } from '../cli.ts';
import { webgpuCounts } from '../backend/webgpu/counters.ts';
import { Metrics } from '../obs/metrics.ts';
import { startRuntime, type Runtime } from '../runtime.ts';
import { buildApp } from './app.ts';
import { parseAllowedRoots } from '../lora/local-path.ts';
import { serverInfo } from './info.ts';

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

/**
 * `logger` is the one logger of the process: start-up messages, fastify's own and the per-request
 * lines all go through it (default: pino at `options.logLevel`, JSON lines on stdout).
 */
export async function createServer(options: ServerOptions, logger: Logger = createLogger(options.logLevel)): Promise<Server> {
  let runtime: Runtime | null = null;
  const metrics = new Metrics({
    deviceMemory: () => runtime?.deviceMemory() ?? { numTensors: 0, numBytes: 0 },
    profile: () => runtime?.profile() ?? {},
    webgpu: webgpuCounts,
    load: () => runtime?.engine.load() ?? { kvTokens: 0, kvCapacityTokens: 0, runningAdapters: [], waitingAdapters: [] },
    maxLora: options.maxLoadedAdapters,
    compat: options.metricsCompat,
  });
  let ready = false;
  runtime = await startRuntime(options, { log: (msg) => logger.info(msg), metrics });
  const app = await buildApp({
    engine: runtime.engine,
    adapters: runtime.adapters,
    tokenizer: runtime.tokenizer,
    metrics,
    info: serverInfo(runtime, options),
    options: {
      apiKey: options.apiKey,
      ...runtime.engine.limits,
      maxNewTokensDefault: options.maxNewTokens,
      maxAdapterBytes: options.maxAdapterBytes,
      allowedAdapterPaths: parseAllowedRoots(options.allowedLocalAdapterPaths),
      bodyLimitBytes: 4 * 1024 * 1024,
      requestTimeoutMs: options.requestTimeout > 0 ? options.requestTimeout * 1000 : undefined,
      connection: {
        headersTimeoutMs: options.headersTimeout * 1000,
        requestTimeoutMs: options.bodyTimeout * 1000,
        keepAliveTimeoutMs: options.keepAliveTimeout * 1000,
      },
      streamStallMs: options.streamStallTimeout * 1000,
      ready: () => ready,
    },
  }, { loggerInstance: logger });
  return {
    app, runtime, metrics,
    setReady: (r) => {
      ready = r;
    },
    async close(graceMs = 0) {
      ready = false;
      // Stop accepting; requests in flight (streams included) finish, or are cancelled after the grace.
      const closing = app.close();
      await runtime.close(graceMs);
      await closing;
    },
  };
}
