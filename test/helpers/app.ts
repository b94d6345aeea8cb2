/**
 * HTTP test helper: the fastify app over a scripted engine and an in-memory adapter store, with
 * a real fixture tokenizer. `inject()` checks every response against openapi.yaml (status
 * documented, JSON body and each SSE event valid against the documented schema).
 */
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import AjvModule from 'ajv';
import type { FastifyInstance, InjectOptions, LightMyRequestResponse } from 'fastify';
import YAML from 'yaml';
import { checkLengths } from '../../src/engine/engine.ts';
import type { EngineApi, FinishReason, GenerateRequest, GenerationResult, GenerationSink, LengthLimits, TokenInfo } from '../../src/engine/types.ts';
import { fail, type ServeError } from '../../src/errors.ts';
import { buildTokenizer } from '../../src/demo/index.ts';
import type { AdapterAdmin, AdapterCacheStats, AdapterInfo } from '../../src/lora/types.ts';
import { Metrics } from '../../src/obs/metrics.ts';
import { TextTokenizer } from '../../src/text/tokenizer.ts';
import { buildApp, type AppOptions, type ServerInfo } from '../../src/server/app.ts';

export const BASE_MODEL = 'test-org/base';

// ------------------------------------------------------------------------------------------------
// Scripted engine

export interface Script {
  /** Generated tokens; `text` is what each adds to the output (default: the token text, '' for special). */
  tokens: (Partial<TokenInfo> & { id: number; text: string })[];
  finishReason: FinishReason;
  /** Throw this synchronously from generate(). */
  reject?: ServeError;
  /** Fail after this many tokens (0: before the first). */
  failAfter?: { tokens: number; error: ServeError };
  /** Emit the first token, then wait for the AbortSignal. */
  hang?: boolean;
}

export const DEFAULT_SCRIPT: Script = {
  tokens: [{ id: 10, text: ' Hello' }, { id: 11, text: ' world' }, { id: 2, text: '</s>', special: true }],
  finishReason: 'eos_token',
};

export class ScriptedEngine implements EngineApi {
  script: Script = DEFAULT_SCRIPT;
  readonly requests: GenerateRequest[] = [];
  constructor(
    /** Adapter ids the engine knows; others fail with ADAPTER_NOT_FOUND before the first token. */
    private readonly knownAdapters: () => Set<string>,
    /** Checked as the engine does. */
    private readonly limits: LengthLimits,
  ) {}

  generate(req: GenerateRequest, sink: GenerationSink): void {
    const s = this.script;
    if (s.reject) throw s.reject;
    checkLengths(req, this.limits);
    this.requests.push(req);
    const tokens: TokenInfo[] = s.tokens.map((t) => ({
      logprob: -0.5, special: false, ...t,
      ...(req.sampling.topNTokens > 0 ? { top: [{ id: t.id, text: t.text, logprob: -0.5, special: t.special ?? false }, { id: 99, text: ' alt', logprob: -1.5, special: false }].slice(0, req.sampling.topNTokens) } : {}),
    }));
    const texts = tokens.map((t) => (t.special ? '' : t.text));
    const result: GenerationResult = {
      text: texts.join(''), finishReason: s.finishReason, promptTokens: req.inputIds.length, generatedTokens: tokens.length,
      seed: req.sampling.doSample ? req.sampling.seed : null,
      prefill: req.decoderInputDetails ? req.inputIds.map((id, i) => ({ id, text: `t${id}`, logprob: i === 0 ? null : -1 })) : [],
      tokens, adapterId: req.adapterId, queueTimeS: 0.002, inferenceTimeS: 0.03, timeToFirstTokenS: 0.01,
    };
    let i = 0;
    let done = false;
    const finish = (fn: () => void) => {
      if (!done) fn();
      done = true;
    };
    req.signal?.addEventListener('abort', () => finish(() => sink.onError(fail('CANCELLED', 'the request was cancelled'))));
    const step = () => {
      if (done) return;
      const missing = (req.merge?.ids ?? (req.adapterId !== null ? [req.adapterId] : [])).find((id) => !this.knownAdapters().has(id));
      if (missing !== undefined) return finish(() => sink.onError(fail('ADAPTER_NOT_FOUND', `adapter "${missing}" not found`)));
      if (s.failAfter && i === s.failAfter.tokens) return finish(() => sink.onError(s.failAfter!.error));
      if (s.hang && i === 1) return; // wait for abort
      if (i === 0 && req.decoderInputDetails) sink.onPrefill?.(result.prefill);
      sink.onToken(tokens[i]!, texts[i]!);
      i++;
      if (i === tokens.length) return finish(() => sink.onDone(result)); // same tick as the last token, like the engine
      setImmediate(step);
    };
    setImmediate(step);
  }

  stats() {
    return { running: 0, waiting: 0, waitingForAdapter: 0 };
  }

  async drain(): Promise<void> {}
}

// ------------------------------------------------------------------------------------------------
// In-memory adapters

export class MemoryAdapters implements AdapterAdmin {
  readonly adapters = new Map<string, AdapterInfo>();
  readonly uploads: { id: string; config: unknown; weights: Uint8Array }[] = [];

  add(id: string, extra: Partial<AdapterInfo> = {}): AdapterInfo {
    const info: AdapterInfo = {
      id, state: 'available', tier: 'disk', source: 'disk', version: 'abc123', bytes: 4096, rank: 8, alpha: 16,
      targetModules: ['q_proj', 'v_proj'], pinned: false, activeRequests: 0, lastUsed: null, error: null, ...extra,
    };
    this.adapters.set(id, info);
    return info;
  }

  private get(id: string): AdapterInfo {
    const a = this.adapters.get(id);
    if (!a) throw fail('ADAPTER_NOT_FOUND', `adapter "${id}" not found`);
    return a;
  }

  async list() { return [...this.adapters.values()]; }
  async info(id: string) { return this.get(id); }
  async put(id: string, files: { config: unknown; weights: Uint8Array }) {
    const c = files.config as { r?: unknown };
    if (typeof c !== 'object' || c === null || typeof c.r !== 'number') throw fail('ADAPTER_INVALID_CONFIG', 'adapter_config.json: `r` must be a positive integer');
    this.uploads.push({ id, ...files });
    return this.add(id, { source: 'upload', rank: c.r });
  }
  async putFromHub(id: string, repo: string): Promise<AdapterInfo> { throw fail('ADAPTER_NOT_FOUND', `adapter "${repo}" (for "${id}"): no Hub in these tests`); }
  async delete(id: string) { return this.adapters.delete(id); }
  async load(id: string, opts: { pin?: boolean } = {}) {
    return this.add(id, { ...this.get(id), state: 'ready', tier: 'device', pinned: opts.pin ?? false });
  }
  async unload(id: string) { return this.add(id, { ...this.get(id), state: 'available', tier: 'host', pinned: false }); }
  async ids() { return [...this.adapters.keys()]; }
  stats(): AdapterCacheStats {
    return { deviceAdapters: 0, deviceBytes: 0, hostAdapters: 0, hostBytes: 0, maxDeviceAdapters: 16, maxDeviceBytes: 0, maxHostBytes: 256 << 20 };
  }
}

// ------------------------------------------------------------------------------------------------
// Tokenizers (built once per process)

const tokenizers = new Map<string, TextTokenizer>();
export function fixtureTokenizer(flavour: 'llama' | 'gpt2'): TextTokenizer {
  let t = tokenizers.get(flavour);
  if (!t) {
    const files = buildTokenizer({ flavour });
    t = TextTokenizer.fromJSON(files.tokenizerJson, files.tokenizerConfig);
    tokenizers.set(flavour, t);
  }
  return t;
}

export const TEST_INFO: ServerInfo = {
  modelId: BASE_MODEL, modelType: 'llama', dtype: 'float32', backend: 'cpu', nativeMatmul: false, version: '0.0.0-test', workers: 1,
  lora: { mode: 'auto', maxRank: 64, maxLoadedAdapters: 16, deviceBytes: 0, hostBytes: 256 << 20 },
  limits: { maxBatchSize: 32, maxBatchTokens: 2048, maxQueue: 256, prefillChunk: 256 },
};

// ------------------------------------------------------------------------------------------------
// OpenAPI response validation

// ajv is CommonJS with a `default` export; under NodeNext the default import is the module object.
export const Ajv = ((AjvModule as unknown as { default?: unknown }).default ?? AjvModule) as typeof AjvModule.default;
type Json = Record<string, any>;

export const OPENAPI_PATH = new URL('../../openapi.yaml', import.meta.url);

class DocValidator {
  private readonly ajv = new Ajv({ strict: false, validateFormats: false, allErrors: true });
  private readonly paths: { template: string; re: RegExp; item: Json }[];

  constructor(readonly doc: Json) {
    // Refs become absolute so each response schema compiles on its own against the document.
    const text = JSON.stringify(doc.components).replaceAll('"#/components/', '"openapi.json#/components/');
    this.ajv.addSchema({ $id: 'openapi.json', components: JSON.parse(text) });
    this.paths = Object.entries(doc.paths as Json)
      .map(([template, item]) => ({
        template, item,
        re: new RegExp(`^${template.replace(/[.*+?^$()|[\]\\]/g, '\\$&').replace(/\{\w+\}/g, '(.+)')}$`),
      }))
      // Most literal characters first: /adapters/{id}/load before /adapters/{id}.
      .sort((a, b) => b.template.replace(/\{\w+\}/g, '').length - a.template.replace(/\{\w+\}/g, '').length);
  }

  private compile(schema: Json) {
    return this.ajv.compile(JSON.parse(JSON.stringify(schema).replaceAll('"#/components/', '"openapi.json#/components/')));
  }

  private check(schema: Json, value: unknown, what: string): void {
    const validate = this.compile(schema);
    assert.ok(validate(value), `${what} does not match openapi.yaml: ${this.ajv.errorsText(validate.errors)}\n${JSON.stringify(value).slice(0, 500)}`);
  }

  validate(method: string, url: string, res: LightMyRequestResponse): void {
    const path = url.split('?')[0]!;
    const m = method.toLowerCase();
    const entry = this.paths.find((p) => p.re.test(path) && p.item[m]);
    if (!entry) {
      assert.equal(res.statusCode, 404, `${method} ${path} is not in openapi.yaml but answered ${res.statusCode}`);
      return;
    }
    const what = `${method} ${entry.template} → ${res.statusCode}`;
    const response = entry.item[m].responses[String(res.statusCode)];
    assert.ok(response, `${what}: status not documented`);
    const type = String(res.headers['content-type'] ?? '').split(';')[0]!.trim();
    if (m === 'head') {
      assert.equal(res.body, '', `${what}: a HEAD response has no body`);
      return;
    }
    const media = response.content?.[type];
    assert.ok(media, `${what}: content type ${type} not documented`);
    if (type === 'application/json') this.check(media.schema, res.json(), what);
    if (type === 'text/event-stream') {
      for (const data of sseData(res.body)) if (data !== '[DONE]') this.check(media['x-event-schema'], JSON.parse(data), `${what} event`);
    }
  }
}

let validator: DocValidator | undefined;
export function docValidator(): DocValidator {
  validator ??= new DocValidator(YAML.parse(readFileSync(OPENAPI_PATH, 'utf8')) as Json);
  return validator;
}

/** The `data:` payloads of an SSE body, in order. */
export function sseData(body: string): string[] {
  return body.split('\n\n').filter((e) => e.length > 0).map((e) => {
    assert.match(e, /^data:/, `not an SSE data event: ${JSON.stringify(e)}`);
    return e.replace(/^data: ?/, '');
  });
}

// ------------------------------------------------------------------------------------------------
// build()

export interface TestServer {
  app: FastifyInstance;
  engine: ScriptedEngine;
  adapters: MemoryAdapters;
  metrics: Metrics;
  /** Like app.inject, plus the openapi.yaml check. */
  inject(opts: InjectOptions & { method: string; url: string }): Promise<LightMyRequestResponse>;
  setReady(ready: boolean): void;
}

export async function build(opts: {
  options?: Partial<AppOptions>;
  tokenizer?: 'llama' | 'gpt2';
  validate?: boolean;
  info?: Partial<ServerInfo>;
} = {}): Promise<TestServer> {
  const adapters = new MemoryAdapters();
  adapters.add('demo');
  adapters.add('org/style');
  let ready = true;
  const options: AppOptions = {
    maxInputLength: 64, maxTotalTokens: 96, maxNewTokensDefault: 20, maxAdapterBytes: 4096, bodyLimitBytes: 64 * 1024,
    ready: () => ready, ...opts.options,
  };
  const engine = new ScriptedEngine(() => new Set(adapters.adapters.keys()), options);
  const metrics = new Metrics({ deviceMemory: () => ({ numBytes: 1234, numTensors: 5 }), processMetrics: false });
  const app = await buildApp({ engine, adapters, metrics, tokenizer: fixtureTokenizer(opts.tokenizer ?? 'llama'), info: { ...TEST_INFO, ...opts.info }, options });
  const validate = opts.validate ?? true;
  return {
    app, engine, adapters, metrics,
    async inject(o) {
      const res = await app.inject(o);
      if (validate) docValidator().validate(o.method, o.url, res);
      return res;
    },
    setReady(r) { ready = r; },
  };
}
