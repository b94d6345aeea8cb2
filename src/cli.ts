/**
 * Command-line and environment options. Every option is one row of `OPTIONS` (flag, env var,
 * default, help), so `--help`, the README and the tests read the same data.
 *
 * Some options also take TGI's launcher names where the meaning is the same (`aliases`,
 * `envAliases`: `--max-input-tokens`, `MODEL_ID`, `PORT`, ...), so a TGI command line or
 * environment carries over.
 *
 * Precedence: flag (or its alias) > env `LORA_SERVE_<UPPER_SNAKE>` > an alias env var > default. Flags take `--name value` or
 * `--name=value`; a boolean flag alone means true. Byte sizes accept a plain integer or a suffix: KiB/MiB/GiB (1024) or KB/MB/GB (1000).
 */
import { BACKENDS } from './backend/select.ts';
import { LORA_MODES } from './engine/scheduler.ts';
import { ADAPTER_SOURCE_KINDS } from './engine/types.ts';
import { METRICS_COMPAT, type MetricsCompat } from './obs/metrics.ts';
import type { RuntimeOptions } from './runtime.ts';
import { COMPLETION_DEFAULT_MAX_TOKENS } from './server/schemas.ts';

export const LOG_LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'] as const;
export type LogLevel = (typeof LOG_LEVELS)[number];

/** Everything the runtime takes (model, adapters, batching limits: see src/runtime.ts), plus the HTTP side. */
export interface ServerOptions extends RuntimeOptions {
  readonly port: number;
  readonly host: string;
  /** Base URL adapters are fetched from when not on disk; undefined: none. */
  readonly adapterSourceUrl: string | undefined;
  /** Comma-separated folders POST /v1/load_lora_adapter may read adapters from; '': none. */
  readonly allowedLocalAdapterPaths: string;
  /** Default max_new_tokens of /generate and /generate_stream. */
  readonly maxNewTokens: number;
  /** Seconds; 0: no per-request timeout. */
  readonly requestTimeout: number;
  /** Seconds in-flight requests get to finish on SIGTERM/SIGINT. */
  readonly shutdownGrace: number;
  /** Seconds a client has to send a request's headers (Node's `headersTimeout`). */
  readonly headersTimeout: number;
  /** Seconds a client has to send a whole request, headers and body (Node's `requestTimeout`); 0: no limit. */
  readonly bodyTimeout: number;
  /** Seconds an idle keep-alive connection is kept open between requests (Node's `keepAliveTimeout`). */
  readonly keepAliveTimeout: number;
  /** Seconds a streaming client may accept no data before its request is cancelled and the connection closed; 0: no limit. */
  readonly streamStallTimeout: number;
  /** undefined: no authentication. */
  readonly apiKey: string | undefined;
  /** undefined: admin routes take apiKey like the others. */
  readonly adminApiKey: string | undefined;
  /** /metrics needs no key even with apiKey. */
  readonly metricsPublic: boolean;
  readonly logLevel: LogLevel;
  /** Also export the endpoint picker's gauges under vLLM's names. */
  readonly metricsCompat: MetricsCompat;
  /** --help was given: print helpText() and exit. */
  readonly help: boolean;
}

type Kind = 'string' | 'int' | 'seconds' | 'bytes' | 'url' | 'choice' | 'bool';

export interface OptionSpec {
  readonly flag: string;
  readonly key: Exclude<keyof ServerOptions, 'help'>;
  readonly env: string;
  readonly kind: Kind;
  readonly default: string | number | boolean | undefined;
  readonly help: string;
  readonly min?: number;
  readonly choices?: readonly string[];
  /** Never echoed back in error messages. */
  readonly secret?: boolean;
  /** Also takes `auto`: the runtime chooses from the machine (src/sizing.ts). */
  readonly auto?: boolean;
  /** Other flag names (without --) with the same meaning: TGI's launcher names. */
  readonly aliases?: readonly string[];
  /** Other environment variables with the same meaning (TGI's), read when LORA_SERVE_* is unset; the first set wins. */
  readonly envAliases?: readonly string[];
}

export const ENV_PREFIX = 'LORA_SERVE_';
const MiB = 1024 * 1024;

function opt(flag: string, key: OptionSpec['key'], kind: Kind, def: OptionSpec['default'], help: string, extra: Partial<OptionSpec> = {}): OptionSpec {
  return Object.freeze({ flag, key, env: ENV_PREFIX + flag.toUpperCase().replaceAll('-', '_'), kind, default: def, help, ...extra });
}

export const OPTIONS: readonly OptionSpec[] = Object.freeze([
  opt('model', 'model', 'string', '', 'Hugging Face checkpoint folder (config.json, *.safetensors, tokenizer.json), or a Hub repo org/name[@revision] when no such folder exists (downloaded into the Hub cache; HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE); empty: the embedded demo model',
    { aliases: ['model-id'], envAliases: ['MODEL_ID'] }),
  opt('host', 'host', 'string', '127.0.0.1', 'Address to listen on (use 0.0.0.0 in a container)', { aliases: ['hostname'] }),
  opt('port', 'port', 'int', 3000, 'TCP port', { min: 0, envAliases: ['PORT'] }),
  opt('adapter-dir', 'adapterDir', 'string', 'adapters', 'Folder of PEFT adapters (<id>/adapter_config.json + adapter_model.safetensors); uploads are stored here'),
  opt('adapter-source-url', 'adapterSourceUrl', 'url', undefined, 'Base URL to fetch adapters missing from --adapter-dir (<url>/<id>/adapter_config.json ...)'),
  opt('adapter-source', 'adapterSource', 'choice', 'local', 'Where an adapter id that --adapter-dir does not have comes from when a request does not say (LoRAX adapter_source): local: --adapter-source-url, else 404; hub: the Hugging Face Hub (HF_ENDPOINT, HF_TOKEN, the Hub cache)', { choices: ADAPTER_SOURCE_KINDS }),
  opt('adapter-revalidate-after', 'adapterRevalidateAfter', 'seconds', 300, 'Seconds after which an adapter cached from --adapter-source-url is checked for a newer version (conditional GET with its ETag) when it is next used, and a Hub adapter\'s commit is resolved again; 0: never'),
  opt('allowed-local-adapter-paths', 'allowedLocalAdapterPaths', 'string', '', 'Folders (comma-separated) that POST /v1/load_lora_adapter may read a lora_path from, symlinks resolved; empty: local paths are refused'),
  opt('backend', 'backend', 'choice', 'auto', 'TensorFlow.js backend; auto: tensorflow-gpu, webgpu on a hardware GPU, tensorflow, wasm, cpu (a software WebGPU adapter such as lavapipe only with --backend webgpu)', { choices: BACKENDS }),
  opt('lora-mode', 'loraMode', 'choice', 'auto', 'How LoRA is applied: merged into the weights (one adapter per step), unmerged (mixed batches), or auto', { choices: LORA_MODES }),
  opt('max-lora-rank', 'maxLoraRank', 'int', 64, 'Largest adapter rank accepted', { min: 1 }),
  opt('max-loaded-adapters', 'maxLoadedAdapters', 'int', 0, 'Adapters resident on the device at once (0: no count limit, only --adapter-device-bytes)', { min: 0 }),
  opt('adapter-device-bytes', 'adapterDeviceBytes', 'bytes', 'auto', 'Device memory for adapters per model copy (auto: a quarter of the wasm heap the model leaves free, of the free host memory on cpu, 1GiB on other backends; 0: no byte limit)', { auto: true }),
  opt('adapter-host-bytes', 'adapterHostBytes', 'bytes', 256 * MiB, 'Host memory cache of validated adapters (an adapter is kept from its second load since start)'),
  opt('max-adapter-bytes', 'maxAdapterBytes', 'bytes', 64 * MiB, 'Largest adapter upload or download', { min: 1 }),
  opt('max-batch-size', 'maxBatchSize', 'int', 32, 'Sequences per forward step', { min: 1, envAliases: ['MAX_BATCH_SIZE'] }),
  opt('max-batch-tokens', 'maxBatchTokens', 'int', 2048, 'Tokens per forward step (prefill tokens + decode rows)', { min: 1 }),
  opt('max-input-length', 'maxInputLength', 'int', 1024, 'Longest prompt, in tokens',
    { min: 1, aliases: ['max-input-tokens'], envAliases: ['MAX_INPUT_TOKENS', 'MAX_INPUT_LENGTH'] }),
  opt('max-total-tokens', 'maxTotalTokens', 'int', 2048, 'Longest prompt + generation, in tokens (and at most the model\'s max positions)',
    { min: 2, envAliases: ['MAX_TOTAL_TOKENS'] }),
  opt('max-queue', 'maxQueue', 'int', 256, 'Requests waiting before new ones get 429', { min: 1 }),
  opt('max-new-tokens', 'maxNewTokens', 'int', 20, `Default max_new_tokens of /generate and /generate_stream (TGI clients' default); /v1/completions defaults to ${COMPLETION_DEFAULT_MAX_TOKENS}, chat to the remaining context`, { min: 1 }),
  opt('prefill-chunk', 'prefillChunk', 'int', 256, 'Prompt tokens prefilled per sequence per step (chunked prefill)', { min: 1 }),
  opt('workers', 'workers', 'int', 'auto', 'Executor threads, each with its own copy of the model; sequences are spread over them (auto: on wasm and cpu, which compute on one thread per copy, one per core as long as the copies fit in half of the free memory; 1 on other backends; webgpu runs in the main thread: 1 only)', { min: 1, auto: true }),
  opt('native-matmul', 'nativeMatmul', 'bool', true, 'On the wasm backend, run matrix products in the native AVX2/FMA addon built by npm ci (falls back to the wasm kernels when it is missing)'),
  opt('recorded-steps', 'recordedSteps', 'bool', true, 'On the webgpu backend, record a decode step once and replay it (one command buffer of pre-built bind groups) while the batch and its KV caches stay the same, instead of running every step through TensorFlow.js op by op'),
  opt('profile', 'profile', 'bool', false, 'Time the phases of every step (matmuls, LoRA, attention, sampling, ...) into lora_serve_profile_seconds_total; exact on wasm/cpu'),
  opt('request-timeout', 'requestTimeout', 'seconds', 0, 'Per-request deadline in seconds (0: none)'),
  opt('shutdown-grace', 'shutdownGrace', 'seconds', 30, 'Seconds in-flight requests get to finish on SIGTERM/SIGINT'),
  opt('api-key', 'apiKey', 'string', undefined, 'Require "Authorization: Bearer <key>" on every route but /health (and /metrics with --metrics-public)', { secret: true }),
  opt('admin-api-key', 'adminApiKey', 'string', undefined, 'Require this key instead on the routes that change adapters (PUT/DELETE /adapters/{id}, POST /adapters/{id}/load|unload, /v1/load_lora_adapter, /v1/unload_lora_adapter); it opens every other route too', { secret: true }),
  opt('metrics-public', 'metricsPublic', 'bool', false, 'Serve /metrics without the API key (for a Prometheus that sends no credentials)'),
  opt('headers-timeout', 'headersTimeout', 'seconds', 60, 'Seconds a client has to send a request\'s headers before the connection is closed (Node\'s headersTimeout)'),
  opt('body-timeout', 'bodyTimeout', 'seconds', 300, 'Seconds a client has to send a whole request, headers and body, before it gets 408 and the connection is closed (Node\'s requestTimeout; 0: no limit)'),
  opt('keep-alive-timeout', 'keepAliveTimeout', 'seconds', 72, 'Seconds an idle keep-alive connection stays open between requests (Node\'s keepAliveTimeout; above the usual 60 s of load balancers)'),
  opt('stream-stall-timeout', 'streamStallTimeout', 'seconds', 30, 'Seconds a streaming client may read nothing while the server has data for it before its generation is cancelled and the connection closed (0: no limit)'),
  opt('metrics-compat', 'metricsCompat', 'choice', 'none', 'Also export the gauges a Gateway API Inference Extension endpoint picker reads under vLLM\'s names (vllm:num_requests_waiting, ...), so it works with its defaults', { choices: METRICS_COMPAT }),
  opt('log-level', 'logLevel', 'choice', 'info', 'Log level', { choices: LOG_LEVELS }),
]);

/** The defaults as a ServerOptions object. */
export const DEFAULT_OPTIONS: ServerOptions = Object.freeze({
  ...Object.fromEntries(OPTIONS.map((o) => [o.key, o.default])),
  help: false,
}) as ServerOptions;

/** A bad flag or environment value; main prints the message and exits with status 2. */
export class CliError extends Error {
  readonly code = 'CLI_USAGE';
  constructor(message: string) {
    super(message);
    this.name = 'CliError';
  }
}

const BYTE_UNITS: Record<string, number> = {
  '': 1, b: 1, kib: 1024, mib: 1024 ** 2, gib: 1024 ** 3, kb: 1000, mb: 1000 ** 2, gb: 1000 ** 3,
};

function parseValue(spec: OptionSpec, raw: string, source: string): string | number | boolean | undefined {
  if (spec.auto && raw.trim().toLowerCase() === 'auto') return 'auto';
  const bad = (why: string): never => {
    const shown = spec.secret ? '' : ` ${JSON.stringify(raw)}`;
    throw new CliError(`invalid value${shown} for ${source}: ${why}`);
  };
  switch (spec.kind) {
    case 'bool': {
      const v = raw.trim().toLowerCase();
      if (['true', '1', 'yes', 'on'].includes(v)) return true;
      if (['false', '0', 'no', 'off', ''].includes(v)) return false;
      return bad('expected true or false');
    }
    case 'string':
      return spec.secret && raw === '' ? undefined : raw;
    case 'choice':
      if (!spec.choices!.includes(raw)) bad(`expected one of ${spec.choices!.join(', ')}`);
      return raw;
    case 'url': {
      if (raw === '') return undefined;
      let url: URL;
      try {
        url = new URL(raw);
      } catch {
        return bad('expected an http(s) URL');
      }
      if (url.protocol !== 'http:' && url.protocol !== 'https:') bad('expected an http(s) URL');
      return raw;
    }
    case 'int': {
      if (!/^\d+$/.test(raw.trim())) bad('expected a non-negative integer');
      const n = Number(raw);
      if (!Number.isSafeInteger(n)) bad('too large');
      if (spec.min !== undefined && n < spec.min) bad(`must be >= ${spec.min}`);
      if (spec.key === 'port' && n > 65535) bad('must be <= 65535');
      return n;
    }
    case 'seconds': {
      const n = Number(raw);
      if (raw.trim() === '' || !Number.isFinite(n) || n < 0) bad('expected a non-negative number of seconds');
      return n;
    }
    case 'bytes': {
      const m = /^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$/i.exec(raw);
      const unit = m ? BYTE_UNITS[m[2]!.toLowerCase()] : undefined;
      if (!m || unit === undefined) return bad('expected bytes, e.g. 1048576, 512MiB, 2GiB or 500MB');
      const n = Math.round(Number(m[1]) * unit);
      if (!Number.isSafeInteger(n)) bad('too large');
      if (spec.min !== undefined && n < spec.min) bad(`must be >= ${spec.min}`);
      return n;
    }
  }
}

const BY_FLAG = new Map(OPTIONS.flatMap((o) => [o.flag, ...(o.aliases ?? [])].map((flag) => [flag, o] as const)));

/** Options from argv (without node and the script) and the environment. Throws CliError on bad input. */
export function parseOptions(argv: readonly string[], env: NodeJS.ProcessEnv): ServerOptions {
  // --help wins over any bad value next to it.
  if (argv.includes('--help') || argv.includes('-h')) return Object.freeze({ ...DEFAULT_OPTIONS, help: true });
  const out: Record<string, unknown> = { ...DEFAULT_OPTIONS };
  for (const spec of OPTIONS) {
    const name = [spec.env, ...(spec.envAliases ?? [])].find((e) => env[e] !== undefined);
    if (name !== undefined) out[spec.key] = parseValue(spec, env[name]!, name);
  }
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!;
    if (!arg.startsWith('--')) throw new CliError(`unexpected argument ${JSON.stringify(arg)} (options start with --; see --help)`);
    const eq = arg.indexOf('=');
    const name = arg.slice(2, eq < 0 ? undefined : eq);
    const spec = BY_FLAG.get(name);
    if (!spec) throw new CliError(`unknown option --${name} (see --help)`);
    let value: string;
    if (eq >= 0) {
      value = arg.slice(eq + 1);
    } else if (spec.kind === 'bool' && (i + 1 >= argv.length || argv[i + 1]!.startsWith('--'))) {
      value = 'true';
    } else {
      if (i + 1 >= argv.length) throw new CliError(`--${name} needs a value`);
      value = argv[++i]!;
    }
    out[spec.key] = parseValue(spec, value, `--${name}`);
  }
  const o = out as unknown as ServerOptions;
  if (o.maxInputLength >= o.maxTotalTokens) {
    throw new CliError(`--max-input-length (${o.maxInputLength}) must be less than --max-total-tokens (${o.maxTotalTokens})`);
  }
  if (o.maxNewTokens >= o.maxTotalTokens) {
    throw new CliError(`--max-new-tokens (${o.maxNewTokens}) must be less than --max-total-tokens (${o.maxTotalTokens})`);
  }
  if (o.prefillChunk > o.maxBatchTokens) {
    throw new CliError(`--prefill-chunk (${o.prefillChunk}) must be at most --max-batch-tokens (${o.maxBatchTokens})`);
  }
  if (o.headersTimeout <= 0 || o.keepAliveTimeout <= 0) {
    throw new CliError(`--headers-timeout and --keep-alive-timeout must be more than 0 seconds`);
  }
  if (o.bodyTimeout > 0 && o.headersTimeout > o.bodyTimeout) {
    throw new CliError(`--headers-timeout (${o.headersTimeout}) must be at most --body-timeout (${o.bodyTimeout})`);
  }
  if (o.backend === 'webgpu' && typeof o.workers === 'number' && o.workers > 1) {
    throw new CliError(`--backend webgpu runs in the main thread (one GPU device per process): --workers must be 1, not ${o.workers}`);
  }
  return Object.freeze(o);
}

function showDefault(spec: OptionSpec): string {
  if (spec.default === undefined) return 'unset';
  if (spec.default === '') return '""';
  if (spec.kind === 'bytes' && typeof spec.default === 'number' && spec.default > 0 && spec.default % MiB === 0) return `${spec.default / MiB}MiB`;
  return String(spec.default);
}

/** The --help text: every flag with its env var and default. */
export function helpText(): string {
  const rows = OPTIONS.map((o) => {
    const value = o.kind === 'choice' ? `<${o.choices!.join('|')}>` : o.kind === 'bool' ? '[true|false]' : `<${o.kind === 'string' ? 'value' : o.kind}${o.auto ? '|auto' : ''}>`;
    const aliases = [...(o.aliases ?? []).map((a) => `--${a}`), ...(o.envAliases ?? []).map((e) => `env ${e}`)];
    return { left: `--${o.flag} ${value}`, help: o.help, meta: `env ${o.env}, default ${showDefault(o)}${aliases.length ? `; TGI's names: ${aliases.join(', ')}` : ''}` };
  });
  const width = Math.max(...rows.map((r) => r.left.length)) + 2;
  const pad = ' '.repeat(width + 2);
  return [
    'lora-serve: one base model, many LoRA adapters, TGI/LoRAX and OpenAI-compatible HTTP API.',
    '',
    'Usage: npm start -- [options]',
    '',
    'Options (flags override environment variables):',
    ...rows.map((r) => `  ${r.left.padEnd(width)}${r.help}\n${pad}(${r.meta})`),
    `  ${'--help'.padEnd(width)}Show this text`,
    '',
    'Byte sizes: 1048576, 512KiB, 256MiB, 2GiB (or KB/MB/GB in powers of 1000).',
    '',
  ].join('\n');
}
