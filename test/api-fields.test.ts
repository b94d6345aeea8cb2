/**
 * README "HTTP API" field tables, the request schemas and src/server/fields.ts agree, and every
 * documented field behaves as its row says: supported and accepted fields are answered 200 (what
 * honouring means is checked on the engine request or the response), a field marked "only X" is
 * accepted at X (and at null) and refused otherwise, a refused field is refused; refusals are
 * UNSUPPORTED_PARAMETER naming the field. A field no table lists is UNKNOWN_FIELD on every object.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import type { TSchema } from '@sinclair/typebox';
import type { LightMyRequestResponse } from 'fastify';
import type { GenerateRequest } from '../src/engine/types.ts';
import { CHAT_FIELDS, COMPLETION_FIELDS, MESSAGE_FIELDS, STREAM_OPTIONS, TGI_PARAMETERS, type DefaultOnly } from '../src/server/fields.ts';
import { ChatCompletionRequest, CompletionRequest, DetokenizeRequest, GenerateRequest as GenerateBody, TokenizeRequest } from '../src/server/schemas.ts';
import { build, fixtureTokenizer } from './helpers/app.ts';

type Json = Record<string, any>;

// ------------------------------------------------------------------------------------------------
// The README tables

interface Row { field: string; status: string }

/** `### POST /x, POST /y` heading → its rows, from the README's "HTTP API" section. */
function readmeTables(): Map<string, Row[]> {
  const readme = readFileSync(new URL('../README.md', import.meta.url), 'utf8');
  const section = readme.split('\n## HTTP API\n')[1]!.split('\n## ')[0]!;
  const tables = new Map<string, Row[]>();
  for (const part of section.split('\n### ').slice(1)) {
    const [heading, ...lines] = part.split('\n');
    const url = /^POST (\S+?),?(?: |$)/.exec(heading!)![1]!;
    const rows = lines.map((l) => /^\| `([^`]+)` \| (.+?) \|.*\|$/.exec(l)).filter((m) => m !== null).map((m) => ({ field: m[1]!, status: m[2]! }));
    tables.set(url, rows);
  }
  return tables;
}

/** Every field path of a request schema: `parameters.top_k`, `messages[].role`. */
function fieldPaths(schema: TSchema, prefix = ''): string[] {
  const out: string[] = [];
  for (const [name, s] of Object.entries((schema as Json).properties ?? {}) as [string, Json][]) {
    out.push(prefix + name);
    const inner = s.anyOf?.find((x: Json) => x.type !== 'null' && s.anyOf.length === 2 && s.anyOf.some((y: Json) => y.type === 'null')) ?? s;
    if (inner.type === 'object' && inner.properties) out.push(...fieldPaths(inner, `${prefix}${name}.`));
    if (inner.type === 'array' && inner.items?.type === 'object') out.push(...fieldPaths(inner.items, `${prefix}${name}[].`));
  }
  return out;
}

// ------------------------------------------------------------------------------------------------
// What each body is and how each field is exercised

interface Sample {
  readonly value: unknown;
  /** More fields the sample needs (e.g. stream: true for stream_options). */
  readonly extra?: Json;
  /** Honoured: checked on the engine's request and the response. */
  readonly check?: (req: GenerateRequest | undefined, res: LightMyRequestResponse) => boolean;
  /** A value of a supported field that is refused. */
  readonly refused?: unknown;
  /** The body the field is set in, when not the section's base (a nested field's siblings). */
  readonly base?: Json;
}

const sampling = (key: keyof GenerateRequest['sampling'], value: number | boolean, field = key as string): [string, Sample] =>
  [field, { value, check: (r) => r!.sampling[key] === value }];

const OPENAI_SAMPLES: Record<string, Sample> = Object.fromEntries([
  ['model', { value: 'org/style', check: (r) => r!.adapterId === 'org/style' }],
  ['temperature', { value: 0, check: (r) => !r!.sampling.doSample }],
  sampling('topP', 0.5, 'top_p'),
  sampling('topK', 3, 'top_k'),
  sampling('repetitionPenalty', 1.2, 'repetition_penalty'),
  sampling('frequencyPenalty', 0.5, 'frequency_penalty'),
  sampling('presencePenalty', 0.5, 'presence_penalty'),
  sampling('seed', 7),
  ['ignore_eos', { value: true, check: (r) => r!.ignoreEos === true }],
  ['stop', { value: ['xyz'], check: (r) => r!.stop.join() === 'xyz' }],
  ['stream', { value: true, check: (_r, res) => String(res.headers['content-type']).startsWith('text/event-stream') }],
  ['stream_options', { value: { include_usage: true }, extra: { stream: true }, check: (_r, res) => res.body.includes('"usage":{') }],
  ['stream_options.include_usage', { value: true, extra: { stream: true }, check: (_r, res) => res.body.includes('"usage":{') }],
  ['max_tokens', { value: 3, check: (r) => r!.maxNewTokens === 3 }],
  ['n', { value: 2, check: (_r, res) => res.json().choices.length === 2 }],
  ['user', { value: 'user-1' }],
  ['logit_bias', { value: { 5: 100, 7: -100 }, check: (r) => JSON.stringify(r!.sampling.logitBias) === '[[5,100],[7,-100]]' }],
]);

const CHAT_BASE: Json = { messages: [{ role: 'user', content: 'Hello' }] };

/** A body with a two-adapter merge, for the samples of merged_adapters' own fields. */
const MERGE_BASE: Json = { inputs: 'Hello', parameters: { merged_adapters: { ids: ['demo', 'org/style'] } } };

/** Bodies holding the nested objects that have required fields, for the unknown-field test. */
const REQUIRED_BASE: Record<string, Json> = {
  'parameters.merged_adapters': MERGE_BASE,
  'parameters.grammar': { inputs: 'Hello', parameters: { grammar: { type: 'regex', value: 'x' } } },
  'parameters.response_format': { inputs: 'Hello', parameters: { response_format: { type: 'json_object' } } },
  response_format: { ...CHAT_BASE, response_format: { type: 'json_object' } },
  'response_format.json_schema': { ...CHAT_BASE, response_format: { type: 'json_schema', json_schema: {} } },
};

const SECTIONS: Record<string, { schema: TSchema; base: Json; tables: [string, Readonly<Record<string, DefaultOnly>>][]; samples: Record<string, Sample> }> = {
  '/generate': {
    schema: GenerateBody,
    base: { inputs: 'Hello' },
    tables: [['parameters.', TGI_PARAMETERS]],
    samples: Object.fromEntries([
      ['inputs', { value: 'hello world', check: (r) => r!.inputIds.length === fixtureTokenizer('llama').encode('hello world').length }],
      ['adapter_id', { value: 'demo', check: (r) => r!.adapterId === 'demo' }],
      ['stream', { value: false, refused: true }],
      ['parameters', { value: { max_new_tokens: 2 }, check: (r) => r!.maxNewTokens === 2 }],
      ['parameters.adapter_id', { value: 'org/style', check: (r) => r!.adapterId === 'org/style' }],
      ['parameters.max_new_tokens', { value: 2, check: (r) => r!.maxNewTokens === 2 }],
      sampling('doSample', true, 'parameters.do_sample'),
      sampling('temperature', 0.5, 'parameters.temperature'),
      sampling('topK', 3, 'parameters.top_k'),
      sampling('topP', 0.5, 'parameters.top_p'),
      sampling('typicalP', 0.5, 'parameters.typical_p'),
      sampling('repetitionPenalty', 1.2, 'parameters.repetition_penalty'),
      sampling('frequencyPenalty', 0.5, 'parameters.frequency_penalty'),
      sampling('presencePenalty', 0.5, 'parameters.presence_penalty'),
      sampling('seed', 7, 'parameters.seed'),
      sampling('topNTokens', 2, 'parameters.top_n_tokens'),
      ['parameters.stop', { value: ['xyz'], check: (r) => r!.stop.join() === 'xyz' }],
      ['parameters.return_full_text', { value: true, check: (_r, res) => res.json().generated_text.startsWith('Hello') }],
      ['parameters.truncate', { value: 2, check: (r) => r!.inputIds.length === 2 }],
      ['parameters.details', { value: true, check: (_r, res) => res.json().details.finish_reason === 'eos_token' }],
      ['parameters.decoder_input_details', { value: true, check: (r) => r!.decoderInputDetails }],
      ['parameters.ignore_eos', { value: true, check: (r) => r!.ignoreEos === true }],
      ['parameters.ignore_eos_token', { value: true, check: (r) => r!.ignoreEos === true }],
      ['parameters.merged_adapters', { value: { ids: ['demo', 'org/style'] }, check: (r) => r!.merge?.ids.join() === 'demo,org/style' && r!.adapterId!.startsWith('merge:') }],
      ['parameters.merged_adapters.ids', { value: ['demo'], base: MERGE_BASE, check: (r) => r!.adapterId === 'demo' && r!.merge === undefined }],
      ['parameters.merged_adapters.weights', { value: [0.5, 2], base: MERGE_BASE, check: (r) => r!.merge?.weights.join() === '0.5,2' }],
      ['parameters.merged_adapters.merge_strategy', {
        value: 'ties', base: { inputs: 'Hello', parameters: { merged_adapters: { ids: ['demo', 'org/style'], density: 0.5 } } }, check: (r) => r!.merge?.strategy === 'ties',
      }],
      ['parameters.merged_adapters.density', { value: 0.25, base: MERGE_BASE, check: (r) => r!.merge?.density === 0.25 }],
      ['parameters.grammar', { value: { type: 'regex', value: '[ab]+' }, check: (r) => r!.constraint !== undefined }],
      ['parameters.grammar.type', { value: 'json', base: { inputs: 'Hello', parameters: { grammar: { type: 'regex', value: { type: 'integer' } } } }, check: (r) => r!.constraint !== undefined }],
      ['parameters.grammar.value', { value: '\\d+', base: { inputs: 'Hello', parameters: { grammar: { type: 'regex', value: 'x' } } }, check: (r) => r!.constraint !== undefined }],
      ['parameters.response_format', { value: { type: 'json_object' }, check: (r) => r!.constraint !== undefined }],
      ['parameters.response_format.type', { value: 'json_object', base: { inputs: 'Hello', parameters: { response_format: { type: 'json_object' } } }, check: (r) => r!.constraint !== undefined }],
      ['parameters.response_format.schema', { value: { type: 'boolean' }, base: { inputs: 'Hello', parameters: { response_format: { type: 'json_object' } } }, check: (r) => r!.constraint !== undefined }],
      ['parameters.merged_adapters.majority_sign_method', { value: 'frequency', base: MERGE_BASE, check: (r) => r!.merge?.majoritySignMethod === 'frequency' }],
      ['parameters.adapter_source', { value: 'hub', check: (r) => r!.adapterSource?.kind === 'hub', refused: 's3' }],
      ['parameters.api_token', { value: 'hf_x', check: (r) => r!.adapterSource?.token === 'hf_x' }],
      ['parameters.best_of', {
        value: 2, extra: { parameters: { best_of: 2, do_sample: true, details: true } },
        check: (_r, res) => res.json().details.best_of_sequences.length === 1,
      }],
    ]),
  },
  '/v1/completions': {
    schema: CompletionRequest,
    base: { prompt: 'Hello' },
    tables: [['', COMPLETION_FIELDS], ['stream_options.', STREAM_OPTIONS]],
    samples: {
      ...OPENAI_SAMPLES,
      prompt: { value: [5, 6], check: (r) => r!.inputIds.join() === '5,6' },
      logprobs: { value: 2, check: (_r, res) => Object.keys(res.json().choices[0].logprobs.top_logprobs[0]).length === 2 },
      echo: { value: true, check: (_r, res) => res.json().choices[0].text.startsWith('Hello') },
      best_of: { value: 2, check: (_r, res) => res.json().choices.length === 1 && res.json().usage.completion_tokens === 6 },
    },
  },
  '/v1/chat/completions': {
    schema: ChatCompletionRequest,
    base: { messages: [{ role: 'user', content: 'Hello' }] },
    tables: [['', CHAT_FIELDS], ['stream_options.', STREAM_OPTIONS], ['messages[].', MESSAGE_FIELDS]],
    samples: {
      ...OPENAI_SAMPLES,
      messages: { value: [{ role: 'system', content: 'Be brief.' }, { role: 'user', content: 'Hi' }], check: (r) => r!.inputIds.length > 0 },
      'messages[].role': { value: 'user' },
      'messages[].content': { value: [{ type: 'text', text: 'Hi' }] },
      'messages[].name': { value: 'alice' },
      max_completion_tokens: { value: 4, extra: { max_tokens: 9 }, check: (r) => r!.maxNewTokens === 4 },
      logprobs: { value: true, check: (_r, res) => res.json().choices[0].logprobs.content.length > 0 },
      top_logprobs: { value: 1, extra: { logprobs: true }, check: (r) => r!.sampling.topNTokens === 1 },
      safety_identifier: { value: 'user-1' },
      metadata: { value: { team: 'a' } },
      prompt_cache_key: { value: 'key' },
      prompt_cache_retention: { value: '24h' },
      prompt_cache_options: { value: { mode: 'explicit' } },
      parallel_tool_calls: { value: false },
      response_format: { value: { type: 'json_object' }, check: (r) => r!.constraint !== undefined },
      'response_format.type': { value: 'text', base: { ...CHAT_BASE, response_format: { type: 'json_object' } }, check: (r) => r!.constraint === undefined },
      'response_format.json_schema': { value: { schema: { type: 'integer' } }, base: { ...CHAT_BASE, response_format: { type: 'json_schema' } }, check: (r) => r!.constraint !== undefined },
      'response_format.json_schema.schema': { value: { type: 'integer' }, base: { ...CHAT_BASE, response_format: { type: 'json_schema', json_schema: {} } }, check: (r) => r!.constraint !== undefined },
      'response_format.json_schema.name': { value: 'answer', base: { ...CHAT_BASE, response_format: { type: 'json_schema', json_schema: {} } } },
      'response_format.json_schema.description': { value: 'an answer', base: { ...CHAT_BASE, response_format: { type: 'json_schema', json_schema: {} } } },
      'response_format.json_schema.strict': { value: true, base: { ...CHAT_BASE, response_format: { type: 'json_schema', json_schema: {} } } },
    },
  },
  '/tokenize': {
    schema: TokenizeRequest,
    base: { inputs: 'Hello' },
    tables: [],
    samples: {
      inputs: { value: 'hello', check: (_r, res) => res.json().length === fixtureTokenizer('llama').encode('hello').length },
      add_special_tokens: { value: false, check: (_r, res) => res.json().length === fixtureTokenizer('llama').encode('Hello', { addSpecialTokens: false }).length },
    },
  },
  '/detokenize': {
    schema: DetokenizeRequest,
    base: { tokens: [5] },
    tables: [],
    samples: {
      tokens: { value: fixtureTokenizer('llama').encode('hello', { addSpecialTokens: false }), check: (_r, res) => res.json().prompt === 'hello' },
      skip_special_tokens: { value: true, extra: { tokens: fixtureTokenizer('llama').encode('hello') }, check: (_r, res) => res.json().prompt === 'hello' },
    },
  },
};

/** The body with `field` (a path: `parameters.x`, `parameters.x.y`, `messages[].x`) set to `value`. */
function withField(base: Json, field: string, value: unknown): Json {
  const body = structuredClone(base);
  const [head, rest] = field.split(/\.(.*)/s) as [string, string | undefined];
  if (rest === undefined) body[head] = value;
  else if (head.endsWith('[]')) body[head.slice(0, -2)][0] = withField(body[head.slice(0, -2)][0], rest, value);
  else body[head] = withField(body[head] ?? {}, rest, value);
  return body;
}

function ruleOf(section: (typeof SECTIONS)[string], field: string): DefaultOnly | undefined {
  for (const [prefix, table] of section.tables) {
    if (field.startsWith(prefix) && !field.slice(prefix.length).includes('.')) {
      const rule = table[field.slice(prefix.length)];
      if (rule) return rule;
    }
  }
  return undefined;
}

/** The README status a field must have, by the tables of src/server/fields.ts. */
function expectedStatus(rule: DefaultOnly | undefined, readme: string): string {
  if (!rule) return readme === 'accepted' ? 'accepted' : 'supported';
  return rule.accepted === 'absent or null' ? 'refused' : `only \`${rule.accepted}\``;
}

const json = (body: unknown) => ({ payload: JSON.stringify(body), headers: { 'content-type': 'application/json' } });

test('README HTTP API tables list exactly the fields of each request schema, with the status src/server/fields.ts gives', () => {
  const tables = readmeTables();
  assert.deepEqual([...tables.keys()].sort(), Object.keys(SECTIONS).sort());
  for (const [url, section] of Object.entries(SECTIONS)) {
    const rows = tables.get(url)!;
    assert.deepEqual(rows.map((r) => r.field).sort(), fieldPaths(section.schema).sort(), `${url}: README rows vs schema fields`);
    for (const row of rows) assert.equal(row.status, expectedStatus(ruleOf(section, row.field), row.status), `${url} ${row.field}`);
    const samples = rows.filter((r) => r.status === 'supported' || r.status === 'accepted').map((r) => r.field).sort();
    assert.deepEqual(Object.keys(section.samples).sort(), samples, `${url}: a sample per supported field`);
  }
});

test('every documented field is honoured, accepted at its default, or refused naming it', async () => {
  const s = await build();
  const tables = readmeTables();
  for (const [url, section] of Object.entries(SECTIONS)) {
    const openai = url.startsWith('/v1/');
    const send = async (body: Json) => {
      const before = s.engine.requests.length;
      const res = await s.inject({ method: 'POST', url, ...json(body) });
      return { res, req: s.engine.requests.length > before ? s.engine.requests.at(-1) : undefined };
    };
    const refused = async (field: string, value: unknown) => {
      const { res } = await send(withField(section.base, field, value));
      const what = `${url} ${field}=${JSON.stringify(value)}`;
      assert.equal(res.statusCode, openai ? 400 : 422, `${what}: ${res.body}`);
      const err = openai ? res.json().error : res.json();
      assert.equal(err.code, 'UNSUPPORTED_PARAMETER', what);
      const param = field.replace('[]', '.0');
      assert.match(openai ? err.message : err.error, new RegExp(`^\`${param.replaceAll('.', '\\.')}\``), what);
      if (openai) assert.equal(err.param, param, what);
    };
    for (const row of tables.get(url)!) {
      const what = `${url} ${row.field}`;
      const sample = section.samples[row.field];
      if (sample) {
        const { res, req } = await send({ ...withField(sample.base ?? section.base, row.field, sample.value), ...sample.extra });
        assert.equal(res.statusCode, 200, `${what}: ${res.body}`);
        if (sample.check) assert.ok(sample.check(req, res), `${what} is not honoured: ${JSON.stringify(req)?.slice(0, 300)} ${res.body.slice(0, 300)}`);
        if (sample.refused !== undefined) await refused(row.field, sample.refused);
        continue;
      }
      const rule = ruleOf(section, row.field)!;
      const accepted = rule.accepted === 'absent or null' ? [null] : [null, ...rule.accepted.split(' or ').map((v) => JSON.parse(v))];
      for (const value of accepted) {
        const { res } = await send(withField(section.base, row.field, value));
        assert.equal(res.statusCode, 200, `${what}=${JSON.stringify(value)}: ${res.body}`);
      }
      await refused(row.field, rule.accepted === 'false' ? true : rule.accepted === '1' ? 2 : 'something else');
    }
  }
});

test('a field no table lists is refused as UNKNOWN_FIELD on every body and nested object, with the known fields', async () => {
  const s = await build();
  for (const [url, section] of Object.entries(SECTIONS)) {
    const objects = ['', ...fieldPaths(section.schema).filter((p) => fieldPaths(section.schema).some((q) => q.startsWith(`${p}.`)))];
    for (const parent of objects) {
      const field = `${parent ? `${parent}.` : ''}no_such_field`;
      const body = field.startsWith('messages[]') || parent === ''
        ? withField(section.base, field, 1)
        : REQUIRED_BASE[parent] ? withField(REQUIRED_BASE[parent], field, 1) // with the object's required fields
          : withField({ ...section.base, ...(parent === 'stream_options' ? { stream: true } : {}) }, field, 1);
      const res = await s.inject({ method: 'POST', url, ...json(body) });
      const openai = url.startsWith('/v1/');
      assert.equal(res.statusCode, openai ? 400 : 422, `${url} ${field}: ${res.body}`);
      const err = openai ? res.json().error : res.json();
      assert.equal(err.code, 'UNKNOWN_FIELD', `${url} ${field}`);
      assert.match(openai ? err.message : err.error, /^unknown field `[\w.]*no_such_field`; known fields/, `${url} ${field}`);
    }
  }
});
