/**
 * A regular-expression subset → syntax tree (`Node`), for constrained decoding. The whole generated text must
 * match (as outlines: a full match, not a search), so `^` at the start and `$` at the end are accepted and mean
 * nothing more.
 *
 * Supported: literals, `.` (any character but `\n`), classes `[a-z_]` and `[^"\\]`, escapes `\d \D \w \W \s \S`,
 * `\t \n \r \f \v \0`, `\xHH`, `\uHHHH`, `\u{H…}` and escaped punctuation, groups `(…)`, `(?:…)` and named groups
 * `(?<name>…)` (capturing means nothing here), alternation `|`, and the quantifiers `?`, `*`, `+`, `{m}`, `{m,}`,
 * `{m,n}` (lazy `?` suffixes are accepted: without captures they match the same strings). Characters are Unicode
 * code points. Anything else (lookaround, backreferences, `\b`, flags, Unicode property classes, anchors inside
 * the pattern) is GRAMMAR_UNSUPPORTED naming it; a malformed pattern is GRAMMAR_INVALID.
 */
import { fail } from '../../errors.ts';

/** Inclusive code point ranges, sorted and disjoint. */
export type Ranges = readonly (readonly [number, number])[];

export type Node =
  | { readonly kind: 'chars'; readonly ranges: Ranges }
  | { readonly kind: 'seq'; readonly items: readonly Node[] }
  | { readonly kind: 'alt'; readonly items: readonly Node[] }
  /** `item` repeated min to max times (max Infinity: unbounded); `sep`, when given, between repetitions. */
  | { readonly kind: 'repeat'; readonly item: Node; readonly min: number; readonly max: number; readonly sep?: Node };

export const MAX_CODE_POINT = 0x10ffff;
/** The largest count `{m,n}` may write: bigger ones would blow up the automaton. */
export const MAX_REPEAT = 1000;

export const EMPTY: Node = { kind: 'seq', items: [] };
export const chars = (ranges: Ranges): Node => ({ kind: 'chars', ranges: normalize(ranges) });
export const seq = (...items: Node[]): Node => (items.length === 1 ? items[0]! : { kind: 'seq', items });
export const alt = (...items: Node[]): Node => (items.length === 1 ? items[0]! : { kind: 'alt', items });
export const repeat = (item: Node, min: number, max: number, sep?: Node): Node => ({ kind: 'repeat', item, min, max, ...(sep ? { sep } : {}) });
export const optional = (item: Node): Node => repeat(item, 0, 1);
/** The literal string `s`. */
export const literal = (s: string): Node => seq(...[...s].map((c) => chars([[c.codePointAt(0)!, c.codePointAt(0)!]])));

/** Sorted, merged ranges. */
export function normalize(ranges: Ranges): Ranges {
  const sorted = [...ranges].sort((a, b) => a[0] - b[0]);
  const out: [number, number][] = [];
  for (const [lo, hi] of sorted) {
    const last = out.at(-1);
    if (last && lo <= last[1] + 1) last[1] = Math.max(last[1], hi);
    else out.push([lo, hi]);
  }
  return out;
}

/** The code points of `a` that are not in `b`. */
export function subtract(a: Ranges, b: Ranges): Ranges {
  const keep = complement(b);
  const out: [number, number][] = [];
  for (const [lo, hi] of normalize(a)) {
    for (const [klo, khi] of keep) {
      const x = Math.max(lo, klo), y = Math.min(hi, khi);
      if (x <= y) out.push([x, y]);
    }
  }
  return normalize(out);
}

/** The tree with every character set limited to `ranges` (a set left empty matches nothing). */
export function restrict(node: Node, ranges: Ranges): Node {
  const outside = complement(ranges);
  const walk = (n: Node): Node => {
    switch (n.kind) {
      case 'chars': return { kind: 'chars', ranges: subtract(n.ranges, outside) };
      case 'seq': return { kind: 'seq', items: n.items.map(walk) };
      case 'alt': return { kind: 'alt', items: n.items.map(walk) };
      case 'repeat': return { ...n, item: walk(n.item), ...(n.sep ? { sep: walk(n.sep) } : {}) };
    }
  };
  return walk(node);
}

/** Every code point not in `ranges`. */
export function complement(ranges: Ranges): Ranges {
  const out: [number, number][] = [];
  let next = 0;
  for (const [lo, hi] of normalize(ranges)) {
    if (lo > next) out.push([next, lo - 1]);
    next = hi + 1;
  }
  if (next <= MAX_CODE_POINT) out.push([next, MAX_CODE_POINT]);
  return out;
}

const DIGIT: Ranges = [[0x30, 0x39]];
const WORD: Ranges = normalize([[0x30, 0x39], [0x41, 0x5a], [0x5f, 0x5f], [0x61, 0x7a]]);
/** JavaScript's `\s`. */
const SPACE: Ranges = normalize([[0x09, 0x0d], [0x20, 0x20], [0xa0, 0xa0], [0x1680, 0x1680], [0x2000, 0x200a], [0x2028, 0x2029], [0x202f, 0x202f], [0x205f, 0x205f], [0x3000, 0x3000], [0xfeff, 0xfeff]]);
const CLASS_ESCAPES: Readonly<Record<string, Ranges>> = {
  d: DIGIT, D: complement(DIGIT), w: WORD, W: complement(WORD), s: SPACE, S: complement(SPACE),
};
const CHAR_ESCAPES: Readonly<Record<string, number>> = { t: 9, n: 10, v: 11, f: 12, r: 13, '0': 0 };
const unsupported = (what: string, pattern: string) =>
  fail('GRAMMAR_UNSUPPORTED', `regex ${JSON.stringify(pattern)}: ${what} is not supported in a grammar`);

/** Parses `pattern` (see the file comment). */
export function parseRegex(pattern: string): Node {
  const cps = [...pattern];
  let i = 0;
  const invalid = (msg: string) => fail('GRAMMAR_INVALID', `regex ${JSON.stringify(pattern)}: ${msg} at character ${i}`);
  const peek = () => cps[i];
  const eat = (c: string) => (cps[i] === c ? (i++, true) : false);

  const hex = (n: number): number => {
    const s = cps.slice(i, i + n).join('');
    if (s.length !== n || !/^[0-9a-fA-F]+$/.test(s)) throw invalid('bad hex escape');
    i += n;
    return parseInt(s, 16);
  };

  /** After a backslash: a class (ranges) or one code point. */
  const escape = (inClass: boolean): Ranges | number => {
    const c = cps[i++];
    if (c === undefined) throw invalid('trailing backslash');
    if (CLASS_ESCAPES[c]) return CLASS_ESCAPES[c];
    if (CHAR_ESCAPES[c] !== undefined && !(c === '0' && /[0-9]/.test(peek() ?? ''))) return CHAR_ESCAPES[c];
    if (c === 'x') return hex(2);
    if (c === 'u') {
      if (!eat('{')) return hex(4);
      const end = cps.indexOf('}', i);
      if (end < 0) throw invalid('unterminated \\u{');
      const v = hex(end - i);
      i++;
      if (v > MAX_CODE_POINT) throw invalid('code point out of range');
      return v;
    }
    if (c === 'b' && inClass) return 8;
    if (/[1-9]/.test(c) || c === 'k') throw unsupported('a backreference', pattern);
    if (c === 'b' || c === 'B') throw unsupported('a word boundary (\\b, \\B)', pattern);
    if (c === 'p' || c === 'P') throw unsupported('a Unicode property class (\\p, \\P)', pattern);
    if (/[A-Za-z0-9]/.test(c)) throw unsupported(`the escape \\${c}`, pattern);
    return c.codePointAt(0)!;
  };

  const charClass = (): Node => {
    const negate = eat('^');
    const ranges: (readonly [number, number])[] = [];
    let first = true;
    const atom = (): Ranges | number => {
      const c = cps[i++];
      if (c === undefined) throw invalid('unterminated character class');
      if (c === '\\') return escape(true);
      if (c === '[' && peek() === ':') throw unsupported('a POSIX class', pattern);
      return c.codePointAt(0)!;
    };
    while (first || peek() !== ']') {
      if (i >= cps.length) throw invalid('unterminated character class');
      first = false;
      const lo = atom();
      if (typeof lo !== 'number') { ranges.push(...lo); continue; }
      if (peek() === '-' && cps[i + 1] !== ']' && cps[i + 1] !== undefined) {
        i++;
        const hi = atom();
        if (typeof hi !== 'number') throw invalid('a class escape cannot end a range');
        if (hi < lo) throw invalid('range out of order');
        ranges.push([lo, hi]);
      } else {
        ranges.push([lo, lo]);
      }
    }
    i++; // ]
    return chars(negate ? complement(ranges) : ranges);
  };

  const count = (): number | null => {
    const start = i;
    while (/[0-9]/.test(peek() ?? '')) i++;
    if (i === start) return null;
    const n = Number(cps.slice(start, i).join(''));
    if (n > MAX_REPEAT) throw unsupported(`a repetition count above ${MAX_REPEAT}`, pattern);
    return n;
  };

  /** `{m}`, `{m,}`, `{m,n}` after an atom; null (and nothing consumed) when `{` does not start one. */
  const braces = (): [number, number] | null => {
    const start = i;
    i++; // {
    const m = count();
    let n: number | null = m;
    if (m !== null && eat(',')) n = count() ?? Infinity;
    if (m === null || !eat('}')) { i = start; return null; }
    if (n! < m) throw invalid('{m,n} with n < m');
    return [m, n!];
  };

  const atom = (): Node => {
    const c = cps[i++]!;
    if (c === '(') {
      if (eat('?')) {
        if (eat(':')) { /* non-capturing */ } else if (peek() === '<' && cps[i + 1] !== '=' && cps[i + 1] !== '!') {
          const end = cps.indexOf('>', i);
          if (end < 0) throw invalid('unterminated group name');
          i = end + 1;
        } else if (peek() === '=' || peek() === '!' || peek() === '<') {
          throw unsupported('lookaround', pattern);
        } else {
          throw unsupported(`the group (?${peek() ?? ''}`, pattern);
        }
      }
      const inner = alternation();
      if (!eat(')')) throw invalid('missing )');
      return inner;
    }
    if (c === '[') return charClass();
    if (c === '.') return chars(complement([[10, 10]]));
    if (c === '\\') {
      const e = escape(false);
      return typeof e === 'number' ? chars([[e, e]]) : chars(e);
    }
    if (c === '^' || c === '$') throw unsupported(`the anchor ${c} inside the pattern`, pattern);
    if (c === ')' ) throw invalid('unmatched )');
    if (c === '*' || c === '+' || c === '?') throw invalid(`nothing to repeat before ${c}`);
    if (c === '{' && /[0-9]/.test(peek() ?? '')) throw invalid('nothing to repeat before {');
    const cp = c.codePointAt(0)!;
    return chars([[cp, cp]]);
  };

  const quantified = (): Node => {
    let node = atom();
    for (;;) {
      const c = peek();
      let range: [number, number] | null = null;
      if (c === '*') { i++; range = [0, Infinity]; } else if (c === '+') { i++; range = [1, Infinity]; } else if (c === '?') { i++; range = [0, 1]; } else if (c === '{') range = braces();
      if (!range) return node;
      eat('?'); // lazy: the same set of full matches
      if (peek() === '+') throw unsupported('a possessive quantifier', pattern);
      node = repeat(node, range[0], range[1]);
    }
  };

  const sequence = (): Node => {
    const items: Node[] = [];
    while (i < cps.length && peek() !== '|' && peek() !== ')') items.push(quantified());
    return seq(...items);
  };

  function alternation(): Node {
    const items = [sequence()];
    while (eat('|')) items.push(sequence());
    return alt(...items);
  }

  if (eat('^')) { /* the match is anchored anyway */ }
  const stripEnd = cps.at(-1) === '$' && cps.at(-2) !== '\\';
  if (stripEnd) cps.pop();
  const root = alternation();
  if (i < cps.length) throw invalid(cps[i] === ')' ? 'unmatched )' : `unexpected ${cps[i]}`);
  return root;
}
