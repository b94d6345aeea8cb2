/**
 * Grammar: what structured output costs per decode step on the host (src/engine/constraint/), in the harness, no
 * server. A constrained sequence asks its grammar for the allowed ids at every step: the first time a state is
 * reached that is a walk of the vocabulary's byte trie through the automaton (building the automaton's states on
 * the way), afterwards a cache lookup. Measured on random walks (seeded random logits, masked sampling, at most
 * 64 tokens each) under a JSON schema, `json_object` and a regex, over the bench model's vocabulary and over a
 * synthetic 50,000-token vocabulary (deterministic pieces of 1 to 8 bytes: words, digits, punctuation, spaces,
 * some multi-byte characters and lone UTF-8 bytes), the size of real BPE vocabularies.
 */
import { median } from '../client.ts';
import type { BenchCase, Figure } from '../case.ts';
import { LazyDfa } from '../../src/engine/constraint/automaton.ts';
import { anyJsonObject, jsonSchemaNode } from '../../src/engine/constraint/json-schema.ts';
import { parseRegex, type Node } from '../../src/engine/constraint/regex.ts';
import { Grammar, TokenVocabulary } from '../../src/engine/constraint/tokens.ts';
import { DEFAULT_SAMPLING, Sampler, Xoshiro128 } from '../../src/engine/sampling.ts';
import { TextTokenizer } from '../../src/text/tokenizer.ts';

const SCHEMA = {
  type: 'object',
  properties: {
    name: { type: 'string', maxLength: 16 }, age: { type: 'integer', minimum: 0, maximum: 120 },
    tags: { type: 'array', items: { type: 'string', maxLength: 8 }, maxItems: 4 }, active: { type: 'boolean' },
  },
  required: ['name', 'age'],
};
const GRAMMARS: [string, () => Node][] = [
  ['JSON schema', () => jsonSchemaNode(SCHEMA)],
  ['json_object', anyJsonObject],
  ['regex', () => parseRegex('[A-Z][a-z]{2,10}( [a-z]{1,10}){0,8}\\.')],
];
const WALKS = 20;
const STEPS = 64;

/** A deterministic vocabulary of `size` byte strings (see the file comment); id 0 is EOS. */
function syntheticVocabulary(size: number): TokenVocabulary {
  const rng = new Xoshiro128(7);
  const pick = (s: string) => s[rng.nextUint32() % s.length]!;
  const letters = 'abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ';
  const enc = new TextEncoder();
  const bytes: Uint8Array[] = [Uint8Array.of()];
  for (let id = 1; id < size; id++) {
    const kind = rng.nextUint32() % 10;
    if (kind === 0) { bytes.push(Uint8Array.of(0x80 + (rng.nextUint32() % 0x80))); continue; } // a lone byte
    const len = 1 + (rng.nextUint32() % 8);
    let s = kind < 4 ? ' ' : '';
    for (let i = 0; i < len; i++) s += kind === 4 ? pick('0123456789') : kind === 5 ? pick('{}[]":,.-_ ') : kind === 6 ? pick('éü€中') : pick(letters);
    bytes.push(enc.encode(s));
  }
  return new TokenVocabulary(bytes, [0]);
}

/** Milliseconds of each `allowed()` call over the walks (`grammar` is reused: pass a fresh one for cold figures). */
function walkTimes(grammar: Grammar, size: number): number[] {
  const times: number[] = [];
  for (let w = 0; w < WALKS; w++) {
    const rng = new Xoshiro128(w + 1);
    const sampler = new Sampler({ ...DEFAULT_SAMPLING, doSample: true, seed: w + 1 });
    const logits = new Float32Array(size);
    let state = grammar.start();
    for (let step = 0; step < STEPS; step++) {
      const t0 = performance.now();
      const allowed = grammar.allowed(state);
      times.push(performance.now() - t0);
      if (!allowed) break;
      for (let i = 0; i < size; i++) logits[i] = rng.nextFloat() * 8;
      const id = sampler.sample(logits, [], 0, allowed).id;
      if (grammar.isEos(id)) break;
      state = grammar.advance(state, id);
    }
  }
  return times;
}

export const grammar: BenchCase = {
  name: 'grammar',
  title: 'Grammar: structured output\'s token masks per decode step (first visit of a state, then cached), in the harness',
  adapters: 0,
  async run(ctx) {
    const tok = await TextTokenizer.load(ctx.modelDir);
    const vocabs: [string, () => TokenVocabulary][] = [
      [`bench vocabulary (${tok.vocabSize})`, () => new TokenVocabulary(tok.tokenBytes(), tok.eosTokenIds)],
      ['synthetic 50,000', () => syntheticVocabulary(50_000)],
    ];
    const figures: Figure[] = [];
    for (const [vname, build] of vocabs) {
      const t0 = performance.now();
      const vocab = build();
      figures.push({ label: `${vname}: vocabulary trie built`, value: performance.now() - t0, unit: 'ms', key: `trie-${vocab.size}` });
      for (const [gname, node] of GRAMMARS) {
        const g = new Grammar(new LazyDfa(node()), vocab);
        const cold = walkTimes(g, vocab.size);
        const computed = g.cachedMasks;
        const warm = walkTimes(g, vocab.size); // the same walks again: every state's mask is cached
        const total = cold.reduce((x, y) => x + y, 0);
        ctx.log(`${vname}, ${gname}: ${cold.length} steps, ${computed} masks computed in ${total.toFixed(1)} ms (max ${Math.max(...cold).toFixed(2)} ms)`);
        figures.push(
          { label: `${vname}, ${gname}: time per mask computed (${computed} states over ${cold.length} steps)`, value: total / computed, unit: 'ms', key: `mask-${vocab.size}-${gname}` },
          { label: `${vname}, ${gname}: mask per step, first walks (mean)`, value: total / cold.length, unit: 'ms', key: `cold-${vocab.size}-${gname}`, values: cold },
          { label: `${vname}, ${gname}: mask per step, cached (median)`, value: median(warm), unit: 'ms', key: `warm-${vocab.size}-${gname}` },
        );
      }
    }
    return figures;
  },
};
