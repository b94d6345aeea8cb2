/**
 * A JSON-schema subset → syntax tree (`Node`) of the JSON texts that satisfy it, as outlines'
 * `build_regex_from_schema` does. The texts are compact: no whitespace anywhere (JSON.parse reads them as any
 * JSON), object properties in the order the schema lists them.
 *
 * Supported keywords:
 * - `type` (one or a list of `string`, `integer`, `number`, `boolean`, `null`, `object`, `array`), `enum`, `const`
 *   (their values written with JSON.stringify), `anyOf` (any branch), `allOf` with one schema, `$ref` to
 *   `#/$defs/…` or `#/definitions/…` (not recursive);
 * - strings: `minLength`, `maxLength`, `pattern` (the regex subset of ./regex.ts, matched against the whole string
 *   as outlines does, and written unescaped: the pattern's characters are limited to those a JSON string holds
 *   as they are, so a pattern that needs `"`, `\` or a control character cannot produce it). A string's characters are any but `"`, `\` and U+0000–U+001F, or the escapes `\" \\ \/ \b \f \n \r
 *   \t` (no `\u` escapes, so each unit is one character and the length bounds count characters as ajv does);
 * - numbers: integers `-?(0|[1-9][0-9]*)`, with `minimum`/`maximum` (and their exclusive forms) when they bound a
 *   range of at most MAX_INTEGER_RANGE values or are a minimum of 0 or 1 alone; numbers with an optional fraction
 *   and exponent (no bounds);
 * - objects: `properties` (each present at most once, in order: the `required` ones always, the others
 *   optionally), `required`, `additionalProperties` (without `properties`: `false` is `{}`, a schema or `true` is a
 *   map of any keys to such values; with `properties` no other key is generated, which satisfies any value);
 * - arrays: `items`, `minItems`, `maxItems`;
 * - annotations, ignored: `title`, `description`, `default`, `examples`, `$schema`, `$id`, `$comment`,
 *   `deprecated`, `readOnly`, `writeOnly`, `$defs`, `definitions`.
 *
 * Any other keyword (`minimum`, `format`, `oneOf`, `patternProperties`, `uniqueItems`, …) is GRAMMAR_UNSUPPORTED
 * naming it and its place. The schema's own objects and arrays nest as deep as it says; a part that allows any
 * value (`{}`, `true`, an object without properties, an array without items) allows JSON only as deep as keeps
 * the whole within MAX_JSON_DEPTH nested containers (scalars only below that). OpenAI's `json_object` is
 * `anyJsonObject()`, under the same bound.
 */
import { fail } from '../../errors.ts';
import { alt, chars, complement, EMPTY, literal, optional, parseRegex, repeat, restrict, seq, type Node } from './regex.ts';

/** How many containers (objects, arrays) deep free-form JSON may nest, the outermost included. */
export const MAX_JSON_DEPTH = 5;
/** The most values an integer's minimum..maximum may hold (they are listed). */
export const MAX_INTEGER_RANGE = 1000;

const IGNORED = new Set(['title', 'description', 'default', 'examples', '$schema', '$id', '$comment', 'deprecated', 'readOnly', 'writeOnly', '$defs', 'definitions']);
const BY_TYPE: Readonly<Record<string, readonly string[]>> = {
  string: ['minLength', 'maxLength', 'pattern'],
  integer: ['minimum', 'maximum', 'exclusiveMinimum', 'exclusiveMaximum'],
  number: [],
  boolean: [],
  null: [],
  object: ['properties', 'required', 'additionalProperties'],
  array: ['items', 'minItems', 'maxItems'],
};
const GENERIC = new Set(['type', 'enum', 'const', 'anyOf', 'allOf', '$ref']);

const DIGITS = chars([[0x30, 0x39]]);
const digits = repeat(DIGITS, 1, Infinity);
const NATURAL = alt(literal('0'), seq(chars([[0x31, 0x39]]), repeat(DIGITS, 0, Infinity)));
const INTEGER = seq(optional(literal('-')), NATURAL);
const NUMBER = seq(INTEGER, optional(seq(literal('.'), digits)), optional(seq(chars([[0x45, 0x45], [0x65, 0x65]]), optional(chars([[0x2b, 0x2b], [0x2d, 0x2d]])), digits)));
/** The characters a JSON string holds unescaped. */
const PLAIN = complement([[0, 0x1f], [0x22, 0x22], [0x5c, 0x5c]]);
/** One character of a JSON string: unescaped, or a short escape. */
const STRING_CHAR = alt(chars(PLAIN), seq(literal('\\'), chars([[0x22, 0x22], [0x2f, 0x2f], [0x5c, 0x5c], [0x62, 0x62], [0x66, 0x66], [0x6e, 0x6e], [0x72, 0x72], [0x74, 0x74]])));
const QUOTE = literal('"');
const STRING = seq(QUOTE, repeat(STRING_CHAR, 0, Infinity), QUOTE);
const BOOLEAN = alt(literal('true'), literal('false'));
const NULL = literal('null');

/** A JSON object of any keys whose values are `value`. */
const mapOf = (value: Node): Node => seq(literal('{'), repeat(seq(STRING, literal(':'), value), 0, Infinity, literal(',')), literal('}'));
const listOf = (item: Node, min = 0, max = Infinity): Node => seq(literal('['), repeat(item, min, max, literal(',')), literal(']'));

/** Any JSON value with at most `depth` containers nested (0: scalars only). */
export function anyJson(depth: number): Node {
  const scalars = [STRING, NUMBER, BOOLEAN, NULL];
  if (depth <= 0) return alt(...scalars);
  const inner = anyJson(depth - 1);
  return alt(...scalars, mapOf(inner), listOf(inner));
}

/** Any JSON object (OpenAI `json_object`), MAX_JSON_DEPTH containers deep at most. */
export function anyJsonObject(): Node {
  return mapOf(anyJson(MAX_JSON_DEPTH - 1));
}

type Schema = Record<string, unknown>;
const isObject = (v: unknown): v is Schema => typeof v === 'object' && v !== null && !Array.isArray(v);

/** The JSON texts valid against `schema` (see the file comment). `where` names the schema in messages. */
export function jsonSchemaNode(schema: unknown, where = 'schema'): Node {
  const root = schema;
  const refs: string[] = [];
  const unsupported = (path: string, what: string) => fail('GRAMMAR_UNSUPPORTED', `${where}${path}: ${what} is not supported in a grammar`);
  const invalid = (path: string, what: string) => fail('GRAMMAR_INVALID', `${where}${path}: ${what}`);
  const count = (s: Schema, key: string, path: string): number | undefined => {
    const v = s[key];
    if (v === undefined) return undefined;
    if (typeof v !== 'number' || !Number.isInteger(v) || v < 0) throw invalid(`${path}.${key}`, 'must be a non-negative integer');
    return v;
  };

  const resolve = (ref: unknown, path: string): unknown => {
    const m = typeof ref === 'string' ? /^#\/(\$defs|definitions)\/([^/]+)$/.exec(ref) : null;
    if (!m) throw unsupported(`${path}.$ref`, `the reference ${JSON.stringify(ref)} (only "#/$defs/name" and "#/definitions/name" are)`);
    const defs = isObject(root) ? root[m[1]!] : undefined;
    const name = m[2]!.replaceAll('~1', '/').replaceAll('~0', '~');
    if (!isObject(defs) || !(name in defs)) throw invalid(`${path}.$ref`, `${ref} does not exist`);
    if (refs.includes(ref as string)) throw unsupported(`${path}.$ref`, `the recursive reference ${ref}`);
    return defs[name];
  };

  const node = (s: unknown, path: string, depth: number): Node => {
    if (s === true || (isObject(s) && Object.keys(s).every((k) => IGNORED.has(k)))) return anyJson(depth);
    if (s === false) throw invalid(path, 'the schema false matches nothing');
    if (!isObject(s)) throw invalid(path, 'a schema must be an object or a boolean');
    if (s.$ref !== undefined) {
      const others = Object.keys(s).filter((k) => k !== '$ref' && !IGNORED.has(k));
      if (others.length > 0) throw unsupported(`${path}.${others[0]}`, 'a keyword beside $ref');
      const target = resolve(s.$ref, path);
      refs.push(s.$ref as string);
      try {
        return node(target, `${path}(${s.$ref})`, depth);
      } finally {
        refs.pop();
      }
    }
    const types = s.type === undefined ? null : Array.isArray(s.type) ? s.type : [s.type];
    for (const key of Object.keys(s)) {
      if (IGNORED.has(key) || GENERIC.has(key)) continue;
      const owner = Object.entries(BY_TYPE).find(([, keys]) => keys.includes(key))?.[0];
      if (!owner) throw unsupported(`${path}.${key}`, `the keyword ${key}`);
      if (types !== null && !types.includes(owner)) throw unsupported(`${path}.${key}`, `${key} beside type ${JSON.stringify(s.type)}`);
    }
    if (s.const !== undefined) return literal(JSON.stringify(s.const));
    if (s.enum !== undefined) {
      if (!Array.isArray(s.enum) || s.enum.length === 0) throw invalid(`${path}.enum`, 'must be a non-empty list');
      return alt(...s.enum.map((v) => literal(JSON.stringify(v))));
    }
    if (s.allOf !== undefined) {
      if (!Array.isArray(s.allOf) || s.allOf.length !== 1) throw unsupported(`${path}.allOf`, 'allOf with other than one schema');
      return node(s.allOf[0], `${path}.allOf.0`, depth);
    }
    if (s.anyOf !== undefined) {
      if (!Array.isArray(s.anyOf) || s.anyOf.length === 0) throw invalid(`${path}.anyOf`, 'must be a non-empty list');
      return alt(...s.anyOf.map((b, i) => node(b, `${path}.anyOf.${i}`, depth)));
    }
    const list = types ?? Object.keys(BY_TYPE).filter((t) => BY_TYPE[t]!.some((k) => k in s));
    if (list.length === 0) return anyJson(depth);
    return alt(...list.map((t) => typed(s, String(t), path, depth)));
  };

  const typed = (s: Schema, type: string, path: string, depth: number): Node => {
    switch (type) {
      case 'string': {
        const min = count(s, 'minLength', path) ?? 0;
        const max = count(s, 'maxLength', path) ?? Infinity;
        if (max < min) throw invalid(path, 'maxLength < minLength');
        if (s.pattern !== undefined) {
          if (s.minLength !== undefined || s.maxLength !== undefined) throw unsupported(`${path}.pattern`, 'pattern with minLength or maxLength');
          if (typeof s.pattern !== 'string') throw invalid(`${path}.pattern`, 'must be a string');
          return seq(QUOTE, restrict(parseRegex(s.pattern), PLAIN), QUOTE);
        }
        return seq(QUOTE, repeat(STRING_CHAR, min, max), QUOTE);
      }
      case 'integer': return integer(s, path);
      case 'number': return NUMBER;
      case 'boolean': return BOOLEAN;
      case 'null': return NULL;
      case 'object': return object(s, path, depth);
      case 'array': {
        const min = count(s, 'minItems', path) ?? 0;
        const max = count(s, 'maxItems', path) ?? Infinity;
        if (max < min) throw invalid(path, 'maxItems < minItems');
        const item = s.items === undefined ? anyJson(depth - 1) : node(s.items, `${path}.items`, Math.max(0, depth - 1));
        return listOf(item, min, max);
      }
      default: throw unsupported(`${path}.type`, `the type ${JSON.stringify(type)}`);
    }
  };

  /** Integers within the bounds: all of them when unbounded, `0|[1-9][0-9]*` from 0 (or from 1) up, else a listed range. */
  const integer = (s: Schema, path: string): Node => {
    const bound = (key: string, exclusive: string, dir: 1 | -1): number => {
      const v = s[key], x = s[exclusive];
      for (const [k, b] of [[key, v], [exclusive, x]] as const) {
        if (b !== undefined && (typeof b !== 'number' || !Number.isFinite(b))) throw invalid(`${path}.${k}`, 'must be a number');
      }
      const inclusive = v === undefined ? -dir * Infinity : dir > 0 ? Math.ceil(v as number) : Math.floor(v as number);
      const strict = x === undefined ? -dir * Infinity : dir > 0 ? Math.floor(x as number) + 1 : Math.ceil(x as number) - 1;
      return dir > 0 ? Math.max(inclusive, strict) : Math.min(inclusive, strict);
    };
    const lo = bound('minimum', 'exclusiveMinimum', 1);
    const hi = bound('maximum', 'exclusiveMaximum', -1);
    if (lo > hi) throw invalid(path, 'no integer is within minimum and maximum');
    if (lo === -Infinity && hi === Infinity) return INTEGER;
    if (hi === Infinity && (lo === 0 || lo === 1)) return lo === 0 ? NATURAL : seq(chars([[0x31, 0x39]]), repeat(DIGITS, 0, Infinity));
    if (hi - lo < MAX_INTEGER_RANGE) return alt(...Array.from({ length: hi - lo + 1 }, (_, k) => literal(String(lo + k))));
    throw unsupported(path, `integer bounds other than a range of at most ${MAX_INTEGER_RANGE} values or a minimum of 0 or 1 alone`);
  };

  const object = (s: Schema, path: string, depth: number): Node => {
    const props = s.properties;
    const required = s.required ?? [];
    if (props !== undefined && !isObject(props)) throw invalid(`${path}.properties`, 'must be an object');
    if (!Array.isArray(required) || required.some((r) => typeof r !== 'string')) throw invalid(`${path}.required`, 'must be a list of names');
    const names = Object.keys(props ?? {});
    const missing = required.find((r) => !names.includes(r as string));
    if (missing !== undefined) throw unsupported(`${path}.required`, `a required property (${missing}) that properties does not define`);
    if (names.length === 0) {
      const extra = s.additionalProperties;
      if (extra === false) return literal('{}');
      return mapOf(extra === undefined || extra === true ? anyJson(depth - 1) : node(extra, `${path}.additionalProperties`, depth - 1));
    }
    const member = (name: string) => seq(literal(`${JSON.stringify(name)}:`), node(props![name], `${path}.properties.${name}`, Math.max(0, depth - 1)));
    const isRequired = names.map((n) => required.includes(n));
    /** Members from k on, each after a comma: required ones always, the others optionally. */
    const rest = (k: number): Node => seq(...names.slice(k).map((n, j) => (isRequired[k + j] ? seq(literal(','), member(n)) : optional(seq(literal(','), member(n))))));
    // The first member present is written without a comma: one branch per member that can come first.
    const branches: Node[] = [];
    for (let f = 0; f < names.length; f++) {
      branches.push(seq(member(names[f]!), rest(f + 1)));
      if (isRequired[f]) break;
    }
    if (!isRequired.includes(true)) branches.push(EMPTY);
    return seq(literal('{'), alt(...branches), literal('}'));
  };

  return node(schema, '', MAX_JSON_DEPTH);
}
