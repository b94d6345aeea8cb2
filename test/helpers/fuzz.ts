/**
 * Property-based fuzzing (fast-check) of what reads untrusted input: the safetensors reader, the PEFT config parser
 * (and its patterns, on RE2), the HTTP request schemas and the multipart adapter upload. Each target is written
 * once here; `test/fuzz.test.ts` runs a few hundred cases of each inside `npm test`, `bench/soak/fuzz.ts` runs as
 * many as it is asked to.
 *
 * What must hold for every input: no crash (only the catalogue's coded errors are thrown or answered), no hang (no
 * case over HANG_MS; a pattern matched in under PATTERN_MS), no 5xx; every HTTP rejection is a coded 4xx whose
 * status is the catalogue's; an upload that is refused leaves the adapter folder byte for byte as it was.
 */
import { createHash } from 'node:crypto';
import { readdir, readFile } from 'node:fs/promises';
import path from 'node:path';
import fc from 'fast-check';
import type { InjectOptions, LightMyRequestResponse } from 'fastify';
import { ERRORS, isServeError, type ErrorCode } from '../../src/errors.ts';
import { parseSafetensors, writeSafetensors, type WriteTensor } from '../../src/formats/safetensors.ts';
import { layerIndexOf, matchesTarget, parsePeftConfig, rankFor, scalingFor } from '../../src/lora/peft-config.ts';
import { registeredRoutes } from '../../src/server/app.ts';
import { responseStatus } from '../../src/server/routes/common.ts';
import { BASE_MODEL, build } from './app.ts';
import { adapterFor, buildWithStore, multipart, STORE_BASE } from './store-app.ts';

/** A case slower than this counts as a hang. */
export const HANG_MS = 5000;
/** The longest one pattern match (or compile) may block the event loop. */
export const PATTERN_MS = 100;

/** What a run measured: cases, seconds, outcome counts (by code for rejections), slowest case. */
export type FuzzFigures = Record<string, number | string>;

export interface FuzzTarget {
  readonly name: string;
  /** What must hold, in words (the soak report's criterion). */
  readonly criterion: string;
  /** Cases of the short run inside `npm test`. */
  readonly testCases: number;
  /** Runs `cases` cases; throws fast-check's report (seed, counterexample) on the first that breaks the property. */
  run(opts: { cases: number; seed?: number }): Promise<FuzzFigures>;
}

/** Counts outcomes and the slowest case of a run. */
class Tally {
  readonly counts = new Map<string, number>();
  maxCaseMs = 0;
  cases = 0;
  private readonly start = performance.now();

  add(outcome: string): void {
    this.counts.set(outcome, (this.counts.get(outcome) ?? 0) + 1);
  }

  /** Runs one case, failing it when it takes longer than HANG_MS. */
  async time<T>(fn: () => T | Promise<T>): Promise<T> {
    const t = performance.now();
    const out = await fn();
    const ms = performance.now() - t;
    this.cases++;
    this.maxCaseMs = Math.max(this.maxCaseMs, ms);
    if (ms > HANG_MS) throw new Error(`a case took ${ms.toFixed(0)} ms (over ${HANG_MS} ms: a hang)`);
    return out;
  }

  figures(extra: FuzzFigures = {}): FuzzFigures {
    const accepted = this.counts.get('accepted') ?? 0;
    return {
      cases: this.cases,
      seconds: +((performance.now() - this.start) / 1000).toFixed(2),
      accepted,
      rejected: this.cases - accepted,
      max_case_ms: +this.maxCaseMs.toFixed(1),
      ...Object.fromEntries([...this.counts].filter(([k]) => k !== 'accepted').sort().map(([k, v]) => [`code_${k}`, v])),
      ...extra,
    };
  }
}

/** The error's code when it is one of `allowed` (coded), else rethrows it: anything else is a crash. */
function codedOnly(err: unknown, allowed: readonly ErrorCode[]): string {
  if (isServeError(err) && allowed.includes(err.code)) return err.code;
  throw err;
}

async function check(property: fc.IAsyncPropertyWithHooks<unknown[]> | fc.IAsyncProperty<unknown[]>, opts: { cases: number; seed?: number }) {
  await fc.assert(property, { numRuns: opts.cases, ...(opts.seed !== undefined ? { seed: opts.seed } : {}), endOnFailure: true, includeErrorInReport: true });
}

// ------------------------------------------------------------------------------------------------
// Generators shared by the targets

/** Numbers a JSON field could carry, the awkward ones often. */
const jsonNumber = fc.oneof(
  fc.integer({ min: -3, max: 70 }),
  fc.constantFrom(0, -1, 1, 0.5, 2 ** 31, 2 ** 32, 2 ** 53, -(2 ** 53), 1e300, -1e-300, 4.9e-324),
  fc.double({ noNaN: true, noDefaultInfinity: true }),
);
const shortString = fc.oneof(
  fc.string({ maxLength: 24 }),
  fc.string({ maxLength: 12, unit: 'grapheme' }),
  fc.constantFrom('', 'demo', 'org/style', BASE_MODEL, '../x', 'a/b/c', '\u0000', 'system', 'user', 'assistant', 'text', 'LORA', 'none'),
);
/** Any JSON value, mostly small. */
const anyJson = fc.jsonValue({ maxDepth: 2 });

/** Patterns as configs carry them: module names, regexes (catastrophic ones in a backtracking engine), junk. */
/** Patterns that backtrack exponentially (or polynomially) in a backtracking engine such as JavaScript's RegExp. */
export const CATASTROPHIC = ['(a+)+$', '(a|aa)*c', '(.*a){20}', '(a*)*b', '([a-z]+)*[0-9]', '(\\w+\\s?)+$', '.*.*.*.*.*=', '(?:a?){30}a{30}', '(x+x+)+y', '^(a|a?)+$'];
const regexAtom = fc.constantFrom('a', 'aa', '.', '\\w', '[a-z]', 'a?', '\\.', 'q_proj', 'layers', '\\d', '(?:a|aa)');
const { regex: regexArb } = fc.letrec((tie) => ({
  regex: fc.oneof(
    { depthSize: 'small', withCrossShrink: true },
    regexAtom,
    fc.tuple(tie('regex'), fc.constantFrom('*', '+', '?', '{2,5}', '{10}', '*?')).map(([r, q]) => `(?:${r})${q}`),
    fc.tuple(tie('regex'), tie('regex')).map(([a, b]) => `${a}${b}`),
    fc.tuple(tie('regex'), tie('regex')).map(([a, b]) => `(?:${a}|${b})`),
  ),
}));
const pattern = fc.oneof(
  fc.constantFrom(...CATASTROPHIC, 'q_proj', 'v_proj', 'self_attn.q_proj', '.*q_proj', 'model.layers.0.self_attn.q_proj', 'lm_head', 'embed_tokens', '(?=a)', '\\1', '(', '[', 'a{1000}{1000}', '((a{100}){100}){100}', 'x'.repeat(1100)),
  regexArb,
  fc.string({ maxLength: 16 }),
);

/** Mostly `valid`, now and then `invalid` (so that a record of many fields is often valid as a whole). */
const mostly = <T, U>(valid: fc.Arbitrary<T>, invalid: fc.Arbitrary<U>, odds = 12) => fc.oneof({ weight: odds, arbitrary: valid }, { weight: 1, arbitrary: invalid });
const MODULE_NAMES = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj', 'self_attn.q_proj'];

/** adapter_config.json: near-valid objects (each field valid, or now and then not), sometimes any JSON at all. */
export const peftConfigArb: fc.Arbitrary<unknown> = fc.oneof(
  { weight: 1, arbitrary: anyJson },
  {
    weight: 8,
    arbitrary: fc.record({
      peft_type: mostly(fc.constant('LORA'), fc.oneof(shortString, anyJson)),
      r: mostly(fc.constantFrom(1, 2, 4, 8, 16), fc.oneof(fc.constantFrom(17, 64, undefined), jsonNumber, anyJson)),
      lora_alpha: mostly(fc.oneof(fc.constantFrom(1, 4, 16), fc.double({ min: -64, max: 64, noNaN: true })), fc.oneof(fc.constant(undefined), jsonNumber, anyJson)),
      target_modules: mostly(
        fc.oneof(fc.constantFrom('all-linear', 'ALL-LINEAR'), fc.uniqueArray(fc.constantFrom(...MODULE_NAMES), { minLength: 1, maxLength: 4 }), regexArb),
        fc.oneof(fc.constantFrom(['lm_head'], [], [''], undefined), fc.array(shortString, { maxLength: 3 }), pattern, anyJson),
        4,
      ),
      exclude_modules: mostly(fc.constantFrom(null, ['down_proj'], 'model\.layers\.1\..*'), fc.oneof(fc.array(shortString, { maxLength: 2 }), pattern, anyJson)),
      rank_pattern: mostly(fc.dictionary(fc.oneof(fc.constantFrom(...MODULE_NAMES), regexArb), fc.constantFrom(1, 2, 4), { maxKeys: 3 }), fc.oneof(fc.dictionary(pattern, jsonNumber, { maxKeys: 2 }), anyJson)),
      alpha_pattern: mostly(fc.dictionary(fc.oneof(fc.constantFrom(...MODULE_NAMES), regexArb), fc.double({ min: -64, max: 64, noNaN: true }), { maxKeys: 3 }), fc.oneof(fc.dictionary(pattern, jsonNumber, { maxKeys: 2 }), anyJson)),
      use_rslora: mostly(fc.boolean(), anyJson),
      fan_in_fan_out: mostly(fc.boolean(), anyJson),
      layers_to_transform: mostly(fc.oneof(fc.constant(null), fc.nat(3), fc.array(fc.nat(3), { maxLength: 3 })), fc.oneof(fc.array(jsonNumber, { maxLength: 3 }), anyJson)),
      layers_pattern: mostly(fc.constantFrom(null, 'layers', 'h', ['layers']), fc.oneof(fc.constant(''), pattern, fc.array(pattern, { maxLength: 2 }), anyJson)),
      bias: mostly(fc.constant('none'), fc.oneof(fc.constantFrom('all', 'lora_only'), anyJson)),
      use_dora: mostly(fc.constant(false), anyJson),
      modules_to_save: mostly(fc.constant(null), anyJson),
      base_model_name_or_path: fc.oneof(shortString, anyJson),
      task_type: fc.oneof(fc.constant('CAUSAL_LM'), anyJson),
    }, { requiredKeys: ['r', 'lora_alpha', 'target_modules'] }),
  },
);

// ------------------------------------------------------------------------------------------------
// safetensors

const SAFETENSORS_ERRORS: readonly ErrorCode[] = ['SAFETENSORS_INVALID', 'SAFETENSORS_DTYPE'];

/** A valid file of a few small tensors. */
const validSafetensors = fc.dictionary(
  fc.string({ minLength: 1, maxLength: 10 }),
  fc.record({ dtype: fc.constantFrom('F32', 'F16', 'BF16') as fc.Arbitrary<'F32' | 'F16' | 'BF16'>, shape: fc.array(fc.nat(3), { maxLength: 3 }) }),
  { maxKeys: 4 },
).filter((t) => !('__metadata__' in t)).map((tensors) => {
  const out: Record<string, WriteTensor> = {};
  for (const [name, t] of Object.entries(tensors)) {
    const n = t.shape.reduce((a, b) => a * b, 1);
    out[name] = { dtype: t.dtype, shape: t.shape, data: Float32Array.from({ length: n }, (_, i) => i - 1.5) };
  }
  return writeSafetensors(out);
});

/** A header edit: set a field of one entry (or the header) to another value. */
const headerEdit = fc.record({
  entry: fc.nat(),
  field: fc.constantFrom('dtype', 'shape', 'data_offsets', 'extra', '__metadata__', 'self'),
  value: fc.oneof(
    anyJson,
    { weight: 3, arbitrary: fc.constantFrom('I64', 'F64', 'U8', 'BOOL', 'F8_E4M3', 'Q4', '') },
    fc.array(fc.oneof(fc.nat(5), jsonNumber), { maxLength: 4 }),
    fc.tuple(jsonNumber, jsonNumber),
  ),
});

/** A valid file with its header edited and re-encoded (header length sometimes wrong), and bytes flipped or cut. */
const editedSafetensors = fc.record({
  file: validSafetensors,
  edits: fc.array(headerEdit, { maxLength: 3 }),
  lengthDelta: mostly(fc.constant(0), fc.oneof(fc.integer({ min: -20, max: 20 }), fc.constantFrom(2 ** 40, -(2 ** 20))), 3),
  flips: mostly(fc.constant([]), fc.array(fc.tuple(fc.nat(), fc.integer({ min: 0, max: 255 })), { minLength: 1, maxLength: 3 }), 2),
  cut: mostly(fc.constant(undefined), fc.nat(), 3),
}).map(({ file, edits, lengthDelta, flips, cut }) => {
  const len = Number(new DataView(file.buffer, file.byteOffset).getBigUint64(0, true));
  const header = JSON.parse(new TextDecoder().decode(file.subarray(8, 8 + len))) as Record<string, unknown>;
  const names = Object.keys(header);
  for (const e of edits) {
    if (e.field === 'self' || names.length === 0) header[`t${e.entry % 5}`] = e.value;
    else if (e.field === '__metadata__') header.__metadata__ = e.value;
    else {
      const entry = header[names[e.entry % names.length]!];
      if (typeof entry === 'object' && entry !== null) (entry as Record<string, unknown>)[e.field] = e.value;
    }
  }
  const head = new TextEncoder().encode(JSON.stringify(header));
  const out = new Uint8Array(8 + head.length + file.length - 8 - len);
  new DataView(out.buffer).setBigUint64(0, BigInt(Math.max(0, head.length + lengthDelta)), true);
  out.set(head, 8);
  out.set(file.subarray(8 + len), 8 + head.length);
  for (const [pos, byte] of flips) if (out.length > 0) out[pos % out.length] = byte;
  return cut === undefined ? out : out.subarray(0, cut % (out.length + 1));
});

const safetensorsTarget: FuzzTarget = {
  name: 'safetensors',
  criterion: 'parseSafetensors and every tensor read either succeed or throw SAFETENSORS_INVALID/SAFETENSORS_DTYPE; no case over 5 s',
  testCases: 1500,
  async run(opts) {
    const tally = new Tally();
    await check(fc.asyncProperty(fc.oneof(validSafetensors, editedSafetensors, fc.uint8Array({ maxLength: 64 })), (bytes) => tally.time(() => {
      let reader;
      try {
        reader = parseSafetensors(bytes, 'adapter_model.safetensors');
      } catch (err) {
        tally.add(codedOnly(err, SAFETENSORS_ERRORS));
        return;
      }
      for (const [name, entry] of reader.tensors) {
        if (reader.readRaw(name).length !== entry.end - entry.begin) throw new Error(`readRaw("${name}") has the wrong length`);
        try {
          const data = reader.readFloat32(name);
          const numel = entry.shape.reduce((a, b) => a * b, 1);
          if (data.length !== numel) throw new Error(`readFloat32("${name}") has ${data.length} values, not ${numel}`);
        } catch (err) {
          codedOnly(err, SAFETENSORS_ERRORS);
        }
      }
      tally.add('accepted');
    })), opts);
    return tally.figures();
  },
};

// ------------------------------------------------------------------------------------------------
// PEFT config and its patterns

const PEFT_ERRORS: readonly ErrorCode[] = ['ADAPTER_INVALID_CONFIG', 'ADAPTER_UNSUPPORTED', 'ADAPTER_RANK_TOO_LARGE'];
const MODULE_PATHS = STORE_BASE.modules.map((m) => m.path);

/**
 * Runs `fn`, failing when it blocks longer than PATTERN_MS; returns its duration in ms. Measured in CPU time of this
 * process, so that time the machine gives to other processes (tests run on shared cores) does not count.
 */
export function bounded(what: string, fn: () => unknown): number {
  const t = process.cpuUsage();
  fn();
  const used = process.cpuUsage(t);
  const ms = (used.user + used.system) / 1000;
  if (ms > PATTERN_MS) throw new Error(`${what} took ${ms.toFixed(1)} ms of CPU (over ${PATTERN_MS} ms)`);
  return ms;
}

const peftTarget: FuzzTarget = {
  name: 'peft-config',
  criterion: 'parsePeftConfig returns a frozen config (finite scalings, matching that never throws) or a coded ADAPTER_* error',
  testCases: 1500,
  async run(opts) {
    const tally = new Tally();
    await check(fc.asyncProperty(peftConfigArb, (json) => tally.time(() => {
      let cfg;
      try {
        cfg = parsePeftConfig(json, { maxRank: 16 });
      } catch (err) {
        tally.add(codedOnly(err, PEFT_ERRORS));
        return;
      }
      if (!Object.isFrozen(cfg)) throw new Error('the parsed config is not frozen');
      for (const p of MODULE_PATHS) {
        matchesTarget(cfg, p);
        layerIndexOf(p, cfg.layersPattern);
        if (rankFor(cfg, p) < 1) throw new Error(`rankFor("${p}") < 1`);
        if (!Number.isFinite(scalingFor(cfg, p, 2))) throw new Error(`scalingFor("${p}") is not finite`);
      }
      tally.add('accepted');
    })), opts);
    return tally.figures();
  },
};

/** Subjects a pattern is matched against: the base model's module paths and long adversarial ones. */
const subjectArb = fc.oneof(
  fc.constantFrom(...MODULE_PATHS),
  fc.tuple(fc.constantFrom('a', 'aa', 'x', 'a.', '0'), fc.integer({ min: 1, max: 400 }), fc.constantFrom('', '!', 'c', 'b', '=', 'y')).map(([unit, n, end]) => unit.repeat(n) + end),
  fc.integer({ min: 1, max: 60 }).map((n) => `model.${'layers.'.repeat(n)}0.self_attn.q_proj`),
);

const regexTarget: FuzzTarget = {
  name: 'peft-patterns',
  criterion: `patterns in target_modules, exclude_modules, rank_pattern, alpha_pattern and layers_pattern (catastrophic-backtracking ones included) compile and match each subject in < ${PATTERN_MS} ms, or are refused with ADAPTER_INVALID_CONFIG/ADAPTER_UNSUPPORTED`,
  testCases: 300,
  async run(opts) {
    const tally = new Tally();
    let maxMatchMs = 0;
    let maxCompileMs = 0;
    await check(fc.asyncProperty(pattern, fc.array(subjectArb, { minLength: 1, maxLength: 4 }), (re, subjects) => tally.time(() => {
      let cfg;
      try {
        maxCompileMs = Math.max(maxCompileMs, bounded(`compiling ${JSON.stringify(re)}`, () => {
          cfg = parsePeftConfig({ r: 2, lora_alpha: 4, target_modules: re, exclude_modules: `${re}x`, rank_pattern: { [re]: 2 }, alpha_pattern: { [re]: 8 }, layers_pattern: re }, { maxRank: 16 });
        }));
      } catch (err) {
        tally.add(codedOnly(err, PEFT_ERRORS));
        return;
      }
      const c = cfg!;
      for (const s of subjects) {
        maxMatchMs = Math.max(maxMatchMs,
          bounded(`matching ${JSON.stringify(re)} against ${s.length} characters`, () => matchesTarget(c, s)),
          bounded(`rank_pattern ${JSON.stringify(re)} against ${s.length} characters`, () => rankFor(c, s)),
          bounded(`alpha_pattern ${JSON.stringify(re)} against ${s.length} characters`, () => scalingFor(c, s, 2)),
          bounded(`layers_pattern ${JSON.stringify(re)} against ${s.length} characters`, () => layerIndexOf(s, c.layersPattern)));
      }
      tally.add('accepted');
    })), opts);
    return tally.figures({ max_match_ms: +maxMatchMs.toFixed(2), max_compile_ms: +maxCompileMs.toFixed(2) });
  },
};

// ------------------------------------------------------------------------------------------------
// HTTP

type Json = Record<string, unknown>;

/** Values for a JSON Schema (the routes' TypeBox schemas): mostly of the declared shape, sometimes anything. */
function fromSchema(schema: Json, depth = 0, field = ''): fc.Arbitrary<unknown> {
  const any = depth > 3 ? fc.constant(null) : anyJson;
  const shaped = ((): fc.Arbitrary<unknown> => {
    if (Array.isArray(schema.anyOf)) return fc.oneof(...(schema.anyOf as Json[]).map((s) => fromSchema(s, depth + 1, field)));
    if (Array.isArray(schema.enum)) return fc.constantFrom(...(schema.enum as unknown[]));
    if ('const' in schema) return fc.constant(schema.const);
    switch (schema.type) {
      case 'string': return mostly(PLAUSIBLE_STRINGS[field] ?? fc.string({ maxLength: 24 }), shortString, 3);
      case 'integer': return mostly(fc.integer({ min: 1, max: 8 }), fc.oneof(fc.integer({ min: -2, max: 100 }), fc.constantFrom(0, 2 ** 31, 2 ** 53, -(2 ** 53))), 3);
      case 'number': return mostly(fc.double({ min: 0.05, max: 1, noNaN: true }), jsonNumber, 3);
      case 'boolean': return fc.boolean();
      case 'null': return fc.constant(null);
      case 'array': {
        const items = schema.items as Json | undefined;
        return fc.array(items ? fromSchema(items, depth + 1, field) : anyJson, { maxLength: depth > 1 ? 2 : 4 });
      }
      case 'object': {
        const props = (schema.properties ?? {}) as Record<string, Json>;
        const required = (schema.required ?? []) as string[];
        const record = fc.record(Object.fromEntries(Object.entries(props).map(([k, s]) => [k, fromSchema(s, depth + 1, k)])), { requiredKeys: required.filter((k) => k in props) });
        // Now and then a field the schema does not know.
        return fc.tuple(record, mostly(fc.constant(null), fc.tuple(shortString, anyJson), 30))
          .map(([o, extra]) => (extra === null ? o : { ...(o as Json), [extra[0]]: extra[1] }));
      }
      default: return anyJson; // Unknown: fields accepted only at their default (fields.ts)
    }
  })();
  // Fields accepted only at their default (fields.ts) are typed Unknown: they stay absent or default-like mostly.
  return schema.type === undefined && !schema.anyOf ? mostly(fc.constant(null), any, 6) : mostly(shaped, any, 40);
}

/** Values that make sense for some string fields, so that generated requests get past them often. */
const PLAUSIBLE_STRINGS: Record<string, fc.Arbitrary<string>> = {
  model: fc.constantFrom(BASE_MODEL, 'demo', 'org/style', '', 'missing'),
  adapter_id: fc.constantFrom(BASE_MODEL, 'demo', 'org/style', '', 'missing'),
  lora_name: fc.constantFrom('demo', 'org/style', 'missing'),
  role: fc.constantFrom('user', 'system', 'assistant'),
  type: fc.constant('text'),
};

/** A request for one route: the body from its schema, or raw bytes, or another content type. */
interface HttpCase {
  readonly method: string;
  readonly url: string;
  readonly payload?: string | Buffer;
  readonly headers?: Record<string, string>;
}

/** Every coded 4xx or a success; a 5xx or an uncoded error fails. Returns the outcome. */
function checkResponse(req: HttpCase, res: LightMyRequestResponse): string {
  const what = `${req.method} ${req.url} → ${res.statusCode}`;
  if (res.statusCode >= 500) throw new Error(`${what} (a 5xx): ${res.body.slice(0, 500)}`);
  if (res.statusCode < 400) return 'accepted';
  let body: Json;
  try {
    body = res.json();
  } catch {
    throw new Error(`${what}: the error body is not JSON: ${res.body.slice(0, 200)}`);
  }
  const openai = req.url.startsWith('/v1/');
  const code = (openai ? (body.error as Json | undefined)?.code : body.code) as string;
  if (typeof code !== 'string' || !(code in ERRORS)) throw new Error(`${what}: no catalogue code in ${res.body.slice(0, 300)}`);
  if (responseStatus(code as ErrorCode, openai) !== res.statusCode) throw new Error(`${what}: ${code} is answered with ${responseStatus(code as ErrorCode, openai)} in the catalogue`);
  return code;
}

/** inject, failing a response that does not come within HANG_MS. */
async function injectBounded(inject: (o: InjectOptions) => Promise<LightMyRequestResponse>, req: HttpCase): Promise<LightMyRequestResponse> {
  let timer: NodeJS.Timeout | undefined;
  const hang = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${req.method} ${req.url}: no response within ${HANG_MS} ms`)), HANG_MS);
  });
  try {
    return await Promise.race([inject(req as InjectOptions), hang]);
  } finally {
    clearTimeout(timer);
  }
}

const ADAPTER_IDS = fc.oneof(
  // No raw `..`: inject() resolves dot segments as a URL does (a real request's path reaches the router as sent).
  fc.constantFrom('demo', 'org/style', 'missing', 'org/missing', '.hidden', 'a%2Fb', '%2e%2e%2Fx', 'a/b/c', '%00', encodeURIComponent('ü')),
  fc.string({ minLength: 1, maxLength: 12 }).map(encodeURIComponent),
);

const httpTarget: FuzzTarget = {
  name: 'http-schemas',
  criterion: 'every request to /generate, /generate_stream, /v1/completions, /v1/chat/completions, /tokenize, /detokenize, the vLLM and adapter routes is answered, as documented in openapi.yaml, with a success or a coded 4xx (the catalogue\'s status), never a 5xx or a hang',
  testCases: 600,
  async run(opts) {
    const tally = new Tally();
    const s = await build();
    try {
      await s.app.ready();
      const bodies = registeredRoutes(s.app).filter((r) => r.method === 'POST' && r.schema?.body);
      const jsonCase = fc.oneof(...bodies.map((r) => fromSchema(JSON.parse(JSON.stringify(r.schema!.body)) as Json).map((body) => ({ url: r.url, body }))));
      const caseArb: fc.Arbitrary<HttpCase> = fc.oneof(
        { weight: 12, arbitrary: jsonCase.map(({ url, body }) => ({ method: 'POST', url, payload: JSON.stringify(body) ?? 'null', headers: { 'content-type': 'application/json' } })) },
        { weight: 1, arbitrary: fc.tuple(fc.constantFrom(...bodies.map((r) => r.url)), fc.string({ maxLength: 40 }), fc.constantFrom('application/json', 'text/plain', 'application/x-www-form-urlencoded', 'multipart/form-data; boundary=x', 'application/json; charset=latin1'))
          .map(([url, raw, type]) => ({ method: 'POST', url, payload: raw, headers: { 'content-type': type } })) },
        { weight: 3, arbitrary: fc.tuple(fc.constantFrom('GET', 'POST', 'DELETE'), ADAPTER_IDS, fc.constantFrom('', '/load', '/unload', '/load?pin=true', '/load?pin=maybe', '?x=1'))
          .map(([method, id, tail]) => ({ method, url: `/adapters/${id}${method === 'POST' ? tail : ''}` })) },
        { weight: 1, arbitrary: ADAPTER_IDS.map((id) => ({ method: 'GET', url: `/v1/models/${id}` })) },
      );
      await check(fc.asyncProperty(caseArb, (req) => tally.time(async () => {
        tally.add(checkResponse(req, await injectBounded((o) => s.inject(o as InjectOptions & { method: string; url: string }), req)));
      })), opts);
    } finally {
      await s.app.close();
    }
    return tally.figures();
  },
};

// ------------------------------------------------------------------------------------------------
// Multipart upload

/** Every file under `dir` with its content hash (a refused upload must leave this unchanged). */
async function folderState(dir: string): Promise<Map<string, string>> {
  const out = new Map<string, string>();
  const walk = async (d: string) => {
    let entries;
    try {
      entries = await readdir(d, { withFileTypes: true });
    } catch {
      return;
    }
    for (const e of entries) {
      const p = path.join(d, e.name);
      if (e.isDirectory()) await walk(p);
      else out.set(path.relative(dir, p), createHash('sha256').update(await readFile(p)).digest('hex'));
    }
  };
  await walk(dir);
  return out;
}

function sameState(a: Map<string, string>, b: Map<string, string>): boolean {
  return a.size === b.size && [...a].every(([k, v]) => b.get(k) === v);
}

/** The ids most uploads go to (replacing each other's versions); an upload to another id is deleted after its check. */
const STORED_IDS = ['a', 'org/b', 'c'];

const uploadTarget: FuzzTarget = {
  name: 'adapter-upload',
  criterion: 'PUT /adapters/{id} with any multipart body: a success stores exactly the upload; a refusal is a coded 4xx and leaves the adapter folder byte for byte unchanged; never a 5xx or a hang',
  testCases: 150,
  async run(opts) {
    const tally = new Tally();
    const pool = await Promise.all([
      adapterFor({ seed: 1 }),
      adapterFor({ r: 4, targetModules: ['q_proj', 'k_proj', 'v_proj', 'o_proj'], seed: 2 }),
      adapterFor({ r: 1, targetModules: 'all-linear', dtype: 'BF16', seed: 3 }),
      adapterFor({ r: 2, targetModules: '.*\\.(q|v)_proj', nameInfix: true, seed: 4 }),
    ]);
    const s = await buildWithStore({ options: { maxAdapterBytes: 64 * 1024 } });
    try {
      const weightsArb = fc.oneof(
        { weight: 3, arbitrary: fc.constantFrom(...pool.map((a) => a.weights)) },
        { weight: 4, arbitrary: fc.record({ base: fc.constantFrom(...pool.map((a) => a.weights)), flips: fc.array(fc.tuple(fc.nat(), fc.integer({ min: 0, max: 255 })), { minLength: 1, maxLength: 4 }), cut: fc.option(fc.nat(), { nil: undefined }) })
          .map(({ base, flips, cut }) => {
            const out = Buffer.from(base);
            for (const [pos, byte] of flips) out[pos % out.length] = byte;
            return cut === undefined ? out : out.subarray(0, cut % (out.length + 1));
          }) },
        { weight: 1, arbitrary: fc.uint8Array({ maxLength: 64 }).map((b) => Buffer.from(b)) },
        { weight: 1, arbitrary: validSafetensors.map((b) => Buffer.from(b)) },
      );
      const configArb = fc.oneof(
        { weight: 3, arbitrary: fc.constantFrom(...pool.map((a) => a.config)) },
        { weight: 4, arbitrary: peftConfigArb.map((c) => JSON.stringify(c) ?? 'null') },
        { weight: 1, arbitrary: fc.string({ maxLength: 30 }) },
      );
      const name = fc.oneof({ weight: 6, arbitrary: fc.constantFrom('config', 'weights') }, { weight: 1, arbitrary: fc.string({ maxLength: 8 }) });
      const filename = fc.option(fc.oneof(fc.constantFrom('adapter_model.safetensors', '../../x', 'a/b', 'x\u0000y', '\u2024\u2024'), fc.string({ maxLength: 8 })), { nil: undefined });
      const part = fc.record({ name, filename, content: fc.oneof(configArb, weightsArb) });
      /** Mostly a config part and a weights part (so validation is reached), sometimes any parts in any order. */
      const parts: fc.Arbitrary<{ name: string; filename?: string; content: string | Buffer }[]> = fc.oneof(
        { weight: 3, arbitrary: fc.constantFrom(...pool).map((a) => [
          { name: 'config', filename: 'adapter_config.json', content: a.config },
          { name: 'weights', filename: 'adapter_model.safetensors', content: a.weights },
        ]) },
        { weight: 4, arbitrary: fc.tuple(configArb, weightsArb, fc.option(filename, { nil: undefined })).map(([config, weights, fname]) => [
          { name: 'config', filename: 'adapter_config.json', content: config },
          { name: 'weights', filename: fname ?? 'adapter_model.safetensors', content: weights },
        ]) },
        { weight: 2, arbitrary: fc.array(part, { maxLength: 5 }) },
      );
      const caseArb = fc.record({
        id: fc.oneof({ weight: 8, arbitrary: fc.constantFrom(...STORED_IDS) }, { weight: 1, arbitrary: ADAPTER_IDS }),
        parts,
        boundary: fc.oneof({ weight: 8, arbitrary: fc.constant('----fuzz-boundary') }, { weight: 1, arbitrary: fc.string({ minLength: 1, maxLength: 8 }) }),
        mangle: mostly(fc.constant(undefined), fc.tuple(fc.nat(), fc.nat(8)), 6),
      });
      let state = await folderState(s.dir);
      await check(fc.asyncProperty(caseArb, (c) => tally.time(async () => {
        const body = multipart(c.parts.map((p) => (p.filename === undefined ? { name: p.name, content: p.content } : { name: p.name, filename: p.filename, content: p.content })), c.boundary);
        // Sometimes the framing itself is broken: a slice of the body cut out.
        const payload = c.mangle === undefined ? body.payload : Buffer.concat([body.payload.subarray(0, c.mangle[0] % body.payload.length), body.payload.subarray((c.mangle[0] % body.payload.length) + c.mangle[1] + 1)]);
        const req: HttpCase = { method: 'PUT', url: `/adapters/${c.id}`, payload, headers: body.headers };
        const res = await injectBounded((o) => s.app.inject(o), req);
        const outcome = checkResponse(req, res);
        tally.add(outcome);
        const after = await folderState(s.dir);
        if ([...after.keys()].some((k) => k.split(path.sep).some((seg) => seg.startsWith('.tmp-') || seg.startsWith('.old-')))) {
          throw new Error(`a work folder was left: ${[...after.keys()].join(', ')}`);
        }
        if (outcome !== 'accepted') {
          if (!sameState(state, after)) throw new Error(`a refused upload (${outcome}) changed the adapter folder`);
          return;
        }
        const id = res.json().id as string;
        const stored = await s.store.read(id);
        if (stored.version !== res.json().version) throw new Error(`adapter "${id}": the stored version is not the one answered`);
        if (!STORED_IDS.includes(id)) {
          // Other ids are deleted again, so that the folder (read whole after every case) stays small in long runs.
          const del = await injectBounded((o) => s.app.inject(o), { method: 'DELETE', url: `/adapters/${c.id}` });
          if (del.statusCode !== 200) throw new Error(`DELETE of the uploaded adapter "${id}": ${del.statusCode} ${del.body.slice(0, 200)}`);
          state = await folderState(s.dir);
          return;
        }
        state = after;
      })), opts);
    } finally {
      await s.close();
    }
    return tally.figures();
  },
};

/** Every fuzz target, in the order the soak report lists them. */
export const FUZZ_TARGETS: readonly FuzzTarget[] = [safetensorsTarget, peftTarget, regexTarget, httpTarget, uploadTarget];
