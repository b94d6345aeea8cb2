/**
 * Structured-output request fields → the engine's `TokenConstraint` (src/engine/constraint/): TGI
 * `parameters.grammar` (`regex`, `json`), OpenAI `response_format` (`json_object`, `json_schema`). Compiled
 * grammars are cached by their source (with their token masks), so repeated requests share them; the token
 * vocabulary is read once per tokenizer.
 */
import { LRUCache } from 'lru-cache';
import { LazyDfa } from '../engine/constraint/automaton.ts';
import { anyJsonObject, jsonSchemaNode } from '../engine/constraint/json-schema.ts';
import { parseRegex, type Node } from '../engine/constraint/regex.ts';
import { Grammar, TokenVocabulary, type TokenConstraint } from '../engine/constraint/tokens.ts';
import { fail, isServeError } from '../errors.ts';
import type { TextTokenizer } from '../text/tokenizer.ts';

/** Compiled grammars kept per tokenizer (least recently used dropped first). */
export const GRAMMAR_CACHE_SIZE = 32;

/** What a request asks its output to match. */
export type GrammarSpec =
  | { readonly type: 'regex'; readonly pattern: string }
  | { readonly type: 'json_schema'; readonly schema: unknown }
  | { readonly type: 'json_object' };

interface Compiled {
  readonly vocab: TokenVocabulary;
  readonly cache: LRUCache<string, Grammar>;
}

const perTokenizer = new WeakMap<TextTokenizer, Compiled>();

function nodeOf(spec: GrammarSpec): Node {
  switch (spec.type) {
    case 'regex': return parseRegex(spec.pattern);
    case 'json_schema': return jsonSchemaNode(spec.schema);
    case 'json_object': return anyJsonObject();
  }
}

/**
 * The constraint for `spec` over `tokenizer`'s vocabulary. Errors (GRAMMAR_INVALID, GRAMMAR_UNSUPPORTED) name
 * `param`, the request field that holds the grammar.
 */
export function grammarFor(tokenizer: TextTokenizer, spec: GrammarSpec, param: string): TokenConstraint {
  let c = perTokenizer.get(tokenizer);
  if (!c) {
    c = { vocab: new TokenVocabulary(tokenizer.tokenBytes(), tokenizer.eosTokenIds), cache: new LRUCache({ max: GRAMMAR_CACHE_SIZE }) };
    perTokenizer.set(tokenizer, c);
  }
  const key = JSON.stringify(spec);
  let g = c.cache.get(key);
  if (!g) {
    try {
      g = new Grammar(new LazyDfa(nodeOf(spec)), c.vocab);
      if (!g.allowed(g.start())) throw fail('GRAMMAR_INVALID', 'the grammar matches no text this vocabulary can write');
    } catch (err) {
      if (isServeError(err) && (err.code === 'GRAMMAR_INVALID' || err.code === 'GRAMMAR_UNSUPPORTED')) {
        throw fail(err.code, `\`${param}\`: ${err.message}`, { param });
      }
      throw err;
    }
    c.cache.set(key, g);
  }
  return g;
}

/** TGI `parameters.grammar` and LoRAX `parameters.response_format` → the constraint (at most one of them). */
export function tgiConstraint(
  tokenizer: TextTokenizer,
  p: { grammar?: { type: 'regex' | 'json'; value: unknown } | null; response_format?: { type: 'json_object'; schema?: unknown } | null },
): TokenConstraint | undefined {
  if (p.grammar && p.response_format) {
    throw fail('VALIDATION', '`parameters.grammar` and `parameters.response_format` both constrain the output; give one', { param: 'parameters.response_format' });
  }
  if (p.response_format) {
    const schema = p.response_format.schema;
    const spec: GrammarSpec = schema === undefined || schema === null ? { type: 'json_object' } : { type: 'json_schema', schema };
    return grammarFor(tokenizer, spec, 'parameters.response_format.schema');
  }
  if (!p.grammar) return undefined;
  const param = 'parameters.grammar.value';
  const { type, value } = p.grammar;
  if (type === 'regex') {
    if (typeof value !== 'string') throw fail('GRAMMAR_INVALID', `\`${param}\`: a regex grammar's value must be a string`, { param });
    return grammarFor(tokenizer, { type: 'regex', pattern: value }, param);
  }
  let schema = value;
  if (typeof value === 'string') {
    // TGI also takes the schema as a JSON string
    try {
      schema = JSON.parse(value);
    } catch {
      throw fail('GRAMMAR_INVALID', `\`${param}\`: a json grammar's value must be a JSON schema (an object, or a string holding one)`, { param });
    }
  }
  return grammarFor(tokenizer, { type: 'json_schema', schema }, param);
}

/** OpenAI `response_format` → the constraint (none for `text`). */
export function openAIConstraint(
  tokenizer: TextTokenizer,
  rf: { type: 'text' | 'json_object' | 'json_schema'; json_schema?: { schema?: unknown } | null } | null | undefined,
): TokenConstraint | undefined {
  if (!rf || rf.type === 'text') return undefined;
  if (rf.type === 'json_object') return grammarFor(tokenizer, { type: 'json_object' }, 'response_format');
  const schema = rf.json_schema?.schema;
  const spec: GrammarSpec = schema === undefined || schema === null ? { type: 'json_object' } : { type: 'json_schema', schema };
  return grammarFor(tokenizer, spec, 'response_format.json_schema.schema');
}
