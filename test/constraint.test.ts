/**
 * Constrained decoding without a model: the regex subset (parse, match, refusals), JSON schemas as automata,
 * token masks over the fixture vocabularies (byte-level pieces that split characters), and random "models"
 * (seeded random logits) sampling under each grammar until EOS: every output matches, parses and validates.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { LazyDfa, matches } from '../src/engine/constraint/automaton.ts';
import { anyJsonObject, jsonSchemaNode } from '../src/engine/constraint/json-schema.ts';
import { parseRegex } from '../src/engine/constraint/regex.ts';
import { Grammar, TokenVocabulary } from '../src/engine/constraint/tokens.ts';
import { DEFAULT_SAMPLING, Sampler, Xoshiro128 } from '../src/engine/sampling.ts';
import { isServeError } from '../src/errors.ts';
import type { TextTokenizer } from '../src/text/tokenizer.ts';
import { Ajv, fixtureTokenizer } from './helpers/app.ts';

const dfa = (re: string) => new LazyDfa(parseRegex(re));

test('the regex subset: full matches of literals, classes, escapes, groups, alternation and quantifiers', () => {
  const table: [string, string[], string[]][] = [
    ['a(b|c)*d', ['ad', 'abcbd'], ['a', 'abx', 'bd', 'xad']],
    ['[0-9]{2,4}', ['12', '1234'], ['1', '12345', '1a']],
    ['\\d+(\\.\\d+)?', ['3', '3.14'], ['3.', '.5']],
    ['(ab){0,2}', ['', 'ab', 'abab'], ['ababab', 'a']],
    ['x{3,}', ['xxx', 'xxxxx'], ['xx']],
    ['x{3}', ['xxx'], ['xx', 'xxxx']],
    ['[^"\\\\]*', ['abc', 'é', ''], ['"', 'a\\']],
    ['^héllo wörld$', ['héllo wörld'], ['hello world']],
    ['.', ['a', '€', '😀'], ['\n', 'ab', '']],
    ['\\w+@\\w+\\.(com|org)', ['a_1@b.com', 'x@y.org'], ['a@b.net', '@b.com']],
    ['\\s?\\S', ['a', ' a'], [' ', '  a']],
    ['[a-c-]+', ['a-b', '-'], ['d']],
    ['(?:yes|no)(?<tail>!)?', ['yes', 'no!'], ['yes!!']],
    ['a+?b*?', ['a', 'aab'], ['b']],
    ['\\u00e9\\x41\\u{1F600}', ['éA😀'], ['eA😀']],
    ['', [''], ['a']],
  ];
  for (const [re, yes, no] of table) {
    const a = dfa(re);
    for (const s of yes) assert.ok(matches(a, s), `${re} matches ${JSON.stringify(s)}`);
    for (const s of no) assert.ok(!matches(a, s), `${re} does not match ${JSON.stringify(s)}`);
  }
});

test('unsupported regex features are GRAMMAR_UNSUPPORTED naming them, malformed ones GRAMMAR_INVALID', () => {
  const code = (re: string) => {
    try {
      parseRegex(re);
      return 'ok';
    } catch (err) {
      assert.ok(isServeError(err));
      return `${err.code}: ${err.message}`;
    }
  };
  for (const [re, what] of [['a(?=b)', 'lookaround'], ['(?<!a)b', 'lookaround'], ['(a)\\1', 'backreference'], ['\\bword', 'word boundary'],
    ['\\p{L}', 'Unicode property'], ['a^b', 'anchor'], ['a{1001}', 'repetition count'], ['a++', 'possessive']] as const) {
    assert.match(code(re), new RegExp(`^GRAMMAR_UNSUPPORTED: .*${what}`), re);
  }
  for (const re of ['(a', 'a)', '[a', '*a', 'a{3,2}', '[z-a]', '\\']) assert.match(code(re), /^GRAMMAR_INVALID/, re);
});

/** Schemas, each with texts it must accept and reject (as compact JSON). */
const SCHEMAS: { schema: unknown; yes: unknown[]; no: string[] }[] = [
  { schema: { type: 'integer' }, yes: [0, -12, 345], no: ['01', '1.5', '-'] },
  { schema: { type: 'integer', minimum: -3, exclusiveMaximum: 12 }, yes: [-3, 0, 11], no: ['-4', '12', '-0'] },
  { schema: { type: 'integer', minimum: 1 }, yes: [1, 1234], no: ['0', '-1'] },
  { schema: { type: 'number' }, yes: [0, -1.5, 2e10, 3.25e-7], no: ['.5', '1.', '+1'] },
  { schema: { type: 'boolean' }, yes: [true, false], no: ['True'] },
  { schema: { type: ['string', 'null'], maxLength: 3 }, yes: ['', 'a"c', null, 'é\n'], no: ['"abcd"'] },
  { schema: { enum: ['red', 2, null, { a: [1] }] }, yes: ['red', 2, null, { a: [1] }], no: ['"blue"'] },
  { schema: { const: 'x' }, yes: ['x'], no: ['"y"'] },
  { schema: { type: 'string', pattern: '^[A-Z]{2}-\\d{3}$' }, yes: ['AB-123'], no: ['"AB-12"'] },
  { schema: { type: 'string', pattern: '.{1,3}' }, yes: ['a', 'éx!'], no: ['"é\\"x"', '"a"b"', '"\\"', '"a\nb"'] },
  {
    schema: { type: 'object', properties: { name: { type: 'string', minLength: 1, maxLength: 8 }, age: { type: 'integer' }, tags: { type: 'array', items: { type: 'string', maxLength: 4 }, maxItems: 3 } }, required: ['name'] },
    yes: [{ name: 'a' }, { name: 'bob', age: 3 }, { name: 'c', tags: [] }, { name: 'd', age: 1, tags: ['x', 'y'] }],
    no: ['{}', '{"age":3,"name":"a"}', '{"name":""}', '{"name":"a","tags":["a","b","c","d"]}'],
  },
  { schema: { type: 'object', properties: { a: { type: 'boolean' }, b: { type: 'null' } } }, yes: [{}, { a: true }, { b: null }, { a: false, b: null }], no: ['{"b":null,"a":true}'] },
  { schema: { type: 'array', items: { type: 'integer' }, minItems: 2, maxItems: 3 }, yes: [[1, 2], [1, 2, 3]], no: ['[1]', '[1,2,3,4]', '[]'] },
  { schema: { anyOf: [{ type: 'integer' }, { type: 'object', properties: { k: { const: 1 } }, required: ['k'] }] }, yes: [5, { k: 1 }], no: ['{"k":2}'] },
  {
    schema: { $defs: { point: { type: 'object', properties: { x: { type: 'number' }, y: { type: 'number' } }, required: ['x', 'y'] } }, type: 'array', items: { $ref: '#/$defs/point' }, maxItems: 2 },
    yes: [[], [{ x: 1, y: 2 }]], no: ['[{"x":1}]'],
  },
  { schema: { type: 'object', additionalProperties: { type: 'integer' } }, yes: [{}, { a: 1, b: 2 }], no: ['{"a":"x"}'] },
  { schema: {}, yes: [1, 'x', [[{ a: null }]], { a: { b: [true] } }], no: ['{a:1}', "'x'"] },
];

test('JSON schemas become automata of exactly the compact texts they allow', () => {
  for (const { schema, yes, no } of SCHEMAS) {
    const a = new LazyDfa(jsonSchemaNode(schema));
    for (const v of yes) assert.ok(matches(a, JSON.stringify(v)), `${JSON.stringify(schema)} accepts ${JSON.stringify(v)}`);
    for (const t of no) assert.ok(!matches(a, t), `${JSON.stringify(schema)} refuses ${t}`);
  }
  const obj = new LazyDfa(anyJsonObject());
  assert.ok(matches(obj, '{"a":[1,{"b":[[]]}],"c":"d"}'));
  assert.ok(!matches(obj, '[1]') && !matches(obj, '1') && !matches(obj, '{"a":[[[[[1]]]]]}'), 'json_object: an object, at most 5 containers deep');
});

test('unsupported schema keywords are refused naming the keyword and where it is', () => {
  const refusal = (schema: unknown) => {
    try {
      jsonSchemaNode(schema);
      return 'ok';
    } catch (err) {
      assert.ok(isServeError(err));
      return `${err.code}: ${err.message}`;
    }
  };
  assert.match(refusal({ type: 'number', minimum: 0 }), /^GRAMMAR_UNSUPPORTED: schema\.minimum: minimum beside type "number"/);
  assert.match(refusal({ type: 'integer', minimum: -5 }), /^GRAMMAR_UNSUPPORTED: schema: integer bounds/);
  assert.match(refusal({ type: 'integer', minimum: 5, maximum: 4 }), /^GRAMMAR_INVALID/);
  assert.match(refusal({ type: 'integer', multipleOf: 2 }), /^GRAMMAR_UNSUPPORTED: schema\.multipleOf: the keyword multipleOf/);
  assert.match(refusal({ type: 'object', properties: { a: { type: 'string', format: 'email' } } }), /^GRAMMAR_UNSUPPORTED: schema\.properties\.a\.format/);
  assert.match(refusal({ oneOf: [{ type: 'string' }] }), /^GRAMMAR_UNSUPPORTED: schema\.oneOf/);
  assert.match(refusal({ type: 'array', uniqueItems: true }), /^GRAMMAR_UNSUPPORTED: schema\.uniqueItems/);
  assert.match(refusal({ $defs: { a: { $ref: '#/$defs/a' } }, $ref: '#/$defs/a' }), /^GRAMMAR_UNSUPPORTED: .*recursive/);
  assert.match(refusal({ type: 'object', required: ['a'] }), /^GRAMMAR_UNSUPPORTED: schema\.required/);
  assert.match(refusal({ type: 'string', pattern: '(?=a)' }), /^GRAMMAR_UNSUPPORTED/);
  assert.match(refusal({ type: 'strin' }), /^GRAMMAR_UNSUPPORTED: schema\.type/);
  assert.match(refusal({ type: 'string', maxLength: -1 }), /^GRAMMAR_INVALID: schema\.maxLength/);
  assert.match(refusal(false), /^GRAMMAR_INVALID/);
});

/** Samples under `grammar` from seeded random logits until EOS or `maxTokens`; the ids and the decoded text. */
function randomWalk(tok: TextTokenizer, grammar: Grammar, seed: number, maxTokens: number): { ids: number[]; text: string; ended: boolean } {
  const rng = new Xoshiro128(seed);
  const sampler = new Sampler({ ...DEFAULT_SAMPLING, doSample: true, seed });
  const V = tok.vocabSize + 3; // a model vocabulary larger than the tokenizer's: the extra ids are never allowed
  let state = grammar.start();
  const ids: number[] = [];
  for (let step = 0; step < maxTokens; step++) {
    const logits = Float32Array.from({ length: V }, () => rng.nextFloat() * 8);
    const allowed = grammar.allowed(state);
    assert.ok(allowed, 'a live state always allows some token');
    const id = sampler.sample(logits, [], 0, allowed).id;
    assert.ok(id < tok.vocabSize && allowed[id] === 1);
    if (grammar.isEos(id)) {
      assert.ok(grammar.complete(state), 'EOS only where the text is complete');
      return { ids, text: tok.decode(ids), ended: true };
    }
    ids.push(id);
    state = grammar.advance(state, id);
  }
  return { ids, text: tok.decode(ids), ended: false };
}

for (const flavour of ['gpt2', 'llama'] as const) {
  test(`${flavour} vocabulary: random logits under each grammar give text that matches, parses and validates`, () => {
    const tok = fixtureTokenizer(flavour);
    const vocab = new TokenVocabulary(tok.tokenBytes(), tok.eosTokenIds);
    const ajv = new Ajv({ strict: false });
    let ended = 0, runs = 0;
    const check = (grammar: Grammar, accept: (text: string) => void, seeds: number) => {
      for (let seed = 1; seed <= seeds; seed++) {
        const out = randomWalk(tok, grammar, seed, 400);
        runs++;
        // A walk cut at maxTokens may stop inside a character: only its last one may be incomplete.
        const whole = out.ended ? out.text : out.text.replace(/\uFFFD$/, '');
        assert.ok(!whole.includes('\uFFFD'), `no broken character: ${JSON.stringify(out.text)}`);
        if (!out.ended) continue;
        ended++;
        accept(out.text);
      }
    };
    for (const re of ['(yes|no|maybe)', '[0-9]{3}-[a-z]+', '(é|ü|€|😀){1,4}', '\\d{1,3}(\\.\\d{1,3}){3}']) {
      const a = dfa(re);
      check(new Grammar(a, vocab), (text) => assert.ok(new RegExp(`^(?:${re})$`, 'u').test(text), `${re}: ${JSON.stringify(text)}`), 10);
    }
    for (const { schema } of SCHEMAS) {
      const validate = ajv.compile(schema as object);
      check(new Grammar(new LazyDfa(jsonSchemaNode(schema)), vocab), (text) => {
        const value = JSON.parse(text);
        assert.ok(validate(value), `${JSON.stringify(schema)}: ${text} ${JSON.stringify(validate.errors)}`);
      }, 10);
    }
    const objects = new Grammar(new LazyDfa(anyJsonObject()), vocab);
    check(objects, (text) => assert.equal(typeof JSON.parse(text), 'object'), 10);
    assert.ok(ended > runs / 2, `most random walks end (${ended} of ${runs})`);
  });
}

test('byte-level pieces that split a character: masks allow a lead byte only when some completion stays alive', () => {
  const tok = fixtureTokenizer('gpt2');
  const bytes = tok.tokenBytes();
  const vocab = new TokenVocabulary(bytes, tok.eosTokenIds);
  const g = new Grammar(dfa('é'), vocab);
  const allowed = g.allowed(g.start())!;
  const ids = [...allowed.keys()].filter((i) => allowed[i] === 1);
  // 'é' is C3 A9: the lone byte C3 (and any piece that spells é whole) and nothing else
  assert.ok(ids.length >= 1);
  for (const id of ids) assert.ok(bytes[id]![0] === 0xc3, `id ${id}`);
  const c3 = ids.find((id) => bytes[id]!.length === 1)!;
  const next = g.advance(g.start(), c3);
  assert.equal(next.need, 1);
  const after = g.allowed(next)!;
  assert.deepEqual([...after.keys()].filter((i) => after[i] === 1).map((i) => [...bytes[i]!]), [[0xa9]]);
  assert.equal(g.allowed(g.advance(next, after.indexOf(1)))!.indexOf(1), tok.eosTokenIds[0], 'then only EOS');
});
