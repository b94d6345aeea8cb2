/** src/cli.ts: defaults, environment, flag precedence, bad values, --help. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { CliError, DEFAULT_OPTIONS, helpText, OPTIONS, parseOptions } from '../src/cli.ts';

test('defaults', () => {
  const o = parseOptions([], {});
  assert.deepEqual(o, DEFAULT_OPTIONS);
  assert.equal(o.model, '');
  assert.equal(o.host, '127.0.0.1');
  assert.equal(o.port, 3000);
  assert.equal(o.adapterDir, 'adapters');
  assert.equal(o.adapterSourceUrl, undefined);
  assert.equal(o.backend, 'auto');
  assert.equal(o.loraMode, 'auto');
  assert.equal(o.maxLoraRank, 64);
  assert.equal(o.maxLoadedAdapters, 0);
  assert.equal(o.adapterDeviceBytes, 'auto');
  assert.equal(o.adapterHostBytes, 256 * 1024 * 1024);
  assert.equal(o.maxAdapterBytes, 64 * 1024 * 1024);
  assert.equal(o.maxBatchSize, 32);
  assert.equal(o.maxBatchTokens, 2048);
  assert.equal(o.maxInputLength, 1024);
  assert.equal(o.maxTotalTokens, 2048);
  assert.equal(o.maxQueue, 256);
  assert.equal(o.maxNewTokens, 20);
  assert.equal(o.prefillChunk, 256);
  assert.equal(o.workers, 'auto');
  assert.equal(o.requestTimeout, 0);
  assert.equal(o.shutdownGrace, 30);
  assert.equal(o.headersTimeout, 60);
  assert.equal(o.bodyTimeout, 300);
  assert.equal(o.keepAliveTimeout, 72);
  assert.equal(o.streamStallTimeout, 30);
  assert.equal(o.apiKey, undefined);
  assert.equal(o.logLevel, 'info');
  assert.equal(o.help, false);
});

/**
 * Every option with its environment variable spelled out (not derived with the code's own formula), a value other
 * than its default, and what that value parses to. An option added to src/cli.ts without a row here fails the test.
 */
const ENV_CASES: readonly [env: string, value: string, key: string, parsed: unknown][] = [
  ['LORA_SERVE_MODEL', '/models/llama', 'model', '/models/llama'],
  ['LORA_SERVE_HOST', '0.0.0.0', 'host', '0.0.0.0'],
  ['LORA_SERVE_PORT', '8080', 'port', 8080],
  ['LORA_SERVE_ADAPTER_DIR', '/data/adapters', 'adapterDir', '/data/adapters'],
  ['LORA_SERVE_ADAPTER_SOURCE_URL', 'http://127.0.0.1:9000/adapters', 'adapterSourceUrl', 'http://127.0.0.1:9000/adapters'],
  ['LORA_SERVE_ADAPTER_SOURCE', 'hub', 'adapterSource', 'hub'],
  ['LORA_SERVE_ADAPTER_REVALIDATE_AFTER', '60', 'adapterRevalidateAfter', 60],
  ['LORA_SERVE_ALLOWED_LOCAL_ADAPTER_PATHS', '/data/a,/data/b', 'allowedLocalAdapterPaths', '/data/a,/data/b'],
  ['LORA_SERVE_BACKEND', 'cpu', 'backend', 'cpu'],
  ['LORA_SERVE_LORA_MODE', 'unmerged', 'loraMode', 'unmerged'],
  ['LORA_SERVE_MAX_LORA_RANK', '16', 'maxLoraRank', 16],
  ['LORA_SERVE_MAX_LOADED_ADAPTERS', '4', 'maxLoadedAdapters', 4],
  ['LORA_SERVE_ADAPTER_DEVICE_BYTES', '2GiB', 'adapterDeviceBytes', 2 * 1024 ** 3],
  ['LORA_SERVE_ADAPTER_HOST_BYTES', '512MiB', 'adapterHostBytes', 512 * 1024 ** 2],
  ['LORA_SERVE_MAX_ADAPTER_BYTES', '500MB', 'maxAdapterBytes', 500 * 1000 ** 2],
  ['LORA_SERVE_MAX_BATCH_SIZE', '8', 'maxBatchSize', 8],
  ['LORA_SERVE_MAX_BATCH_TOKENS', '4096', 'maxBatchTokens', 4096],
  ['LORA_SERVE_MAX_INPUT_LENGTH', '512', 'maxInputLength', 512],
  ['LORA_SERVE_MAX_TOTAL_TOKENS', '4096', 'maxTotalTokens', 4096],
  ['LORA_SERVE_MAX_QUEUE', '64', 'maxQueue', 64],
  ['LORA_SERVE_MAX_NEW_TOKENS', '100', 'maxNewTokens', 100],
  ['LORA_SERVE_PREFILL_CHUNK', '64', 'prefillChunk', 64],
  ['LORA_SERVE_WORKERS', '2', 'workers', 2],
  ['LORA_SERVE_NATIVE_MATMUL', 'false', 'nativeMatmul', false],
  ['LORA_SERVE_RECORDED_STEPS', 'false', 'recordedSteps', false],
  ['LORA_SERVE_METRICS_COMPAT', 'vllm', 'metricsCompat', 'vllm'],
  ['LORA_SERVE_PROFILE', 'true', 'profile', true],
  ['LORA_SERVE_REQUEST_TIMEOUT', '2.5', 'requestTimeout', 2.5],
  ['LORA_SERVE_SHUTDOWN_GRACE', '5', 'shutdownGrace', 5],
  ['LORA_SERVE_HEADERS_TIMEOUT', '10', 'headersTimeout', 10],
  ['LORA_SERVE_BODY_TIMEOUT', '120', 'bodyTimeout', 120],
  ['LORA_SERVE_KEEP_ALIVE_TIMEOUT', '5', 'keepAliveTimeout', 5],
  ['LORA_SERVE_STREAM_STALL_TIMEOUT', '10', 'streamStallTimeout', 10],
  ['LORA_SERVE_API_KEY', 'from-env', 'apiKey', 'from-env'],
  ['LORA_SERVE_ADMIN_API_KEY', 'admin-from-env', 'adminApiKey', 'admin-from-env'],
  ['LORA_SERVE_METRICS_PUBLIC', 'true', 'metricsPublic', true],
  ['LORA_SERVE_LOG_LEVEL', 'debug', 'logLevel', 'debug'],
];

test('auto: --workers and --adapter-device-bytes take it (the runtime chooses); other numbers do not', () => {
  assert.equal(parseOptions(['--workers', 'auto'], {}).workers, 'auto');
  assert.equal(parseOptions(['--workers', '3'], {}).workers, 3);
  assert.equal(parseOptions([], { LORA_SERVE_ADAPTER_DEVICE_BYTES: 'AUTO' }).adapterDeviceBytes, 'auto');
  assert.equal(parseOptions(['--adapter-device-bytes', '0'], {}).adapterDeviceBytes, 0, '0: no byte limit');
  assert.throws(() => parseOptions(['--workers', '0'], {}), /--workers/);
  assert.throws(() => parseOptions(['--max-batch-size', 'auto'], {}), /--max-batch-size/);
  assert.match(helpText(), /--workers <int\|auto>/);
});

test('every option is settable by its LORA_SERVE_* variable; flags override the environment', () => {
  assert.deepEqual(ENV_CASES.map((c) => c[2]).sort(), OPTIONS.map((o) => o.key).sort(), 'one row per option');
  for (const [env, value, key, parsed] of ENV_CASES) {
    const o = parseOptions([], { [env]: value }) as unknown as Record<string, unknown>;
    assert.deepEqual(o[key], parsed, `${env}=${value}`);
    assert.notDeepEqual(DEFAULT_OPTIONS[key as keyof typeof DEFAULT_OPTIONS], parsed, `${env}: the value differs from the default`);
    assert.equal(OPTIONS.find((x) => x.key === key)!.env, env, `${key} is documented as ${env}`);
  }
  const env = Object.fromEntries(ENV_CASES.map(([e, v]) => [e, v]));
  const all = parseOptions([], env) as unknown as Record<string, unknown>;
  for (const [, , key, parsed] of ENV_CASES) assert.deepEqual(all[key], parsed, `${key}, all variables set at once`);

  const flags = parseOptions(['--max-batch-size', '4', '--api-key=from-flag', '--port=0', '--model', '/models/x', '--lora-mode', 'merged'], env);
  assert.equal(flags.maxBatchSize, 4);
  assert.equal(flags.apiKey, 'from-flag');
  assert.equal(flags.port, 0);
  assert.equal(flags.model, '/models/x');
  assert.equal(flags.loraMode, 'merged');
  assert.equal(flags.backend, 'cpu', 'unset flags keep the env value');
  assert.equal(parseOptions([], { LORA_SERVE_API_KEY: '' }).apiKey, undefined, 'an empty key means none');
  assert.equal(parseOptions([], { LORA_SERVE_ADMIN_API_KEY: '' }).adminApiKey, undefined, 'an empty admin key means none');
});

test('byte sizes take units', () => {
  const bytes = (v: string) => parseOptions(['--adapter-device-bytes', v], {}).adapterDeviceBytes;
  assert.equal(bytes('1048576'), 1048576);
  assert.equal(bytes('2GiB'), 2 * 1024 ** 3);
  assert.equal(bytes('1.5MiB'), 1.5 * 1024 ** 2);
  assert.equal(bytes('500MB'), 500e6);
  assert.equal(bytes('64kib'), 65536);
});

test('bad values are clear CliErrors', () => {
  const bad: [string[], Record<string, string>, RegExp][] = [
    [['--max-batch-size', 'many'], {}, /--max-batch-size.*non-negative integer/],
    [['--max-batch-size', '0'], {}, /--max-batch-size.*>= 1/],
    [['--max-batch-size', '-3'], {}, /--max-batch-size/],
    [['--port', '70000'], {}, /--port.*65535/],
    [['--backend', 'cuda'], {}, /--backend.*auto, tensorflow-gpu, webgpu, tensorflow, wasm, cpu/],
    [['--lora-mode', 'mixed'], {}, /--lora-mode/],
    [['--log-level', 'loud'], {}, /--log-level/],
    [['--adapter-host-bytes', '12 parsecs'], {}, /--adapter-host-bytes.*bytes/],
    [['--request-timeout', '-1'], {}, /--request-timeout.*seconds/],
    [['--adapter-source-url', 'ftp://x'], {}, /http\(s\) URL/],
    [['--nope'], {}, /unknown option --nope/],
    [['--port'], {}, /--port needs a value/],
    [['positional'], {}, /unexpected argument/],
    [[], { LORA_SERVE_MAX_QUEUE: 'lots' }, /LORA_SERVE_MAX_QUEUE/],
    [['--max-input-length', '4096'], {}, /--max-input-length \(4096\) must be less than --max-total-tokens \(2048\)/],
    [['--prefill-chunk', '4096'], {}, /--prefill-chunk/],
    [['--headers-timeout', '0'], {}, /--headers-timeout and --keep-alive-timeout must be more than 0/],
    [['--keep-alive-timeout', '0'], {}, /--keep-alive-timeout must be more than 0/],
    [['--headers-timeout', '20', '--body-timeout', '10'], {}, /--headers-timeout \(20\) must be at most --body-timeout \(10\)/],
    [['--backend', 'webgpu', '--workers', '2'], {}, /--backend webgpu runs in the main thread.*--workers must be 1, not 2/],
    [['--workers', '2'], { LORA_SERVE_BACKEND: 'webgpu' }, /--workers must be 1/],
  ];
  for (const [argv, env, message] of bad) {
    assert.throws(() => parseOptions(argv, env), (err: unknown) => {
      assert.ok(err instanceof CliError, `${argv.join(' ')}: ${String(err)}`);
      assert.equal(err.code, 'CLI_USAGE');
      assert.match(err.message, message);
      return true;
    }, argv.join(' '));
  }
  // The API key is never echoed.
  assert.throws(() => parseOptions(['--api-key'], {}), /needs a value/);
});

test('--help lists every flag with its env var and default', () => {
  assert.equal(parseOptions(['--help'], {}).help, true);
  assert.equal(parseOptions(['-h'], {}).help, true);
  assert.equal(parseOptions(['--port', 'x', '--help'], { LORA_SERVE_MAX_QUEUE: 'lots' }).help, true);
  const text = helpText();
  for (const spec of OPTIONS) {
    const line = text.split('\n').findIndex((l) => l.trimStart().startsWith(`--${spec.flag} `));
    assert.ok(line >= 0, `--${spec.flag} missing`);
    const block = text.split('\n').slice(line, line + 2).join('\n');
    assert.ok(block.includes(spec.env), `${spec.env} missing`);
    assert.match(block, /default /);
  }
  assert.match(text, /--adapter-host-bytes[\s\S]*default 256MiB/);
  assert.match(text, /--host[\s\S]*default 127\.0\.0\.1/);
});

/** TGI launcher names accepted where the meaning is the same, spelled out: flag or env var → option key, with a sample value. */
const TGI_ALIASES: readonly [name: string, value: string, key: string, parsed: unknown][] = [
  ['--model-id', '/models/llama', 'model', '/models/llama'],
  ['MODEL_ID', '/models/llama', 'model', '/models/llama'],
  ['--hostname', '0.0.0.0', 'host', '0.0.0.0'],
  ['PORT', '8080', 'port', 8080],
  ['MAX_BATCH_SIZE', '8', 'maxBatchSize', 8],
  ['--max-input-tokens', '512', 'maxInputLength', 512],
  ['MAX_INPUT_TOKENS', '512', 'maxInputLength', 512],
  ['MAX_INPUT_LENGTH', '512', 'maxInputLength', 512],
  ['MAX_TOTAL_TOKENS', '4096', 'maxTotalTokens', 4096],
];

test('TGI flag and env names: same meaning as the option; LORA_SERVE_* and flags win; --help lists them', () => {
  const declared = OPTIONS.flatMap((o) => [...(o.aliases ?? []).map((a) => `--${a}`), ...(o.envAliases ?? [])]).sort();
  assert.deepEqual(TGI_ALIASES.map((a) => a[0]).sort(), declared, 'one row per alias');
  const help = helpText();
  for (const [name, value, key, parsed] of TGI_ALIASES) {
    const o = (name.startsWith('--') ? parseOptions([name, value], {}) : parseOptions([], { [name]: value })) as unknown as Record<string, unknown>;
    assert.deepEqual(o[key], parsed, `${name}=${value}`);
    assert.ok(help.includes(name.startsWith('--') ? name : `env ${name}`), `--help names ${name}`);
  }
  assert.equal(parseOptions([], { PORT: '8080', LORA_SERVE_PORT: '9000' }).port, 9000, 'LORA_SERVE_PORT wins over PORT');
  assert.equal(parseOptions(['--port', '7000'], { PORT: '8080' }).port, 7000, 'a flag wins over PORT');
  assert.equal(parseOptions([], { MAX_INPUT_TOKENS: '100', MAX_INPUT_LENGTH: '200' }).maxInputLength, 100, 'the newer TGI name first');
  assert.throws(() => parseOptions([], { PORT: 'http' }), (e: CliError) => /invalid value "http" for PORT/.test(e.message));
  // Names whose TGI meaning differs are not aliases: HOSTNAME (set by shells and Docker to the machine's name).
  assert.equal(parseOptions([], { HOSTNAME: 'box' }).host, '127.0.0.1');
  for (const flag of ['--max-batch-prefill-tokens', '--max-concurrent-requests']) assert.throws(() => parseOptions([flag, '10'], {}), CliError, flag);
});
