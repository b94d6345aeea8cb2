/**
 * Syntax tree (`Node`, ./regex.ts) → Thompson NFA → a DFA over Unicode code points, determinised lazily: a
 * DFA state is the ε-closed set of NFA states, created the first time a transition reaches it, and each
 * (state, code point) transition is computed once and cached. Only the states generation actually visits are
 * ever built, so a large grammar costs what its outputs touch.
 */
import { fail } from '../../errors.ts';
import type { Node, Ranges } from './regex.ts';

/** The most NFA states a grammar may compile to (each bounded repetition copies its item). */
export const MAX_NFA_STATES = 200_000;
/** The most DFA states one grammar builds before refusing to go on (GRAMMAR_UNSUPPORTED). */
export const MAX_DFA_STATES = 20_000;

/** A deterministic automaton over code points: state 0 is the start, -1 the dead state. */
export interface CharAutomaton {
  /** The state after `cp` from `state` (-1: no match can continue). */
  next(state: number, cp: number): number;
  accepting(state: number): boolean;
  /** Whether some code point in [lo, hi] leaves `state` alive (for a character still being spelled byte by byte). */
  canStep(state: number, lo: number, hi: number): boolean;
}

const CHAR = 0, SPLIT = 1, MATCH = 2;

/** The NFA in flat arrays: kind, and for CHAR its ranges and `out`, for SPLIT `out` and `out2`. */
class Nfa {
  readonly kind: number[] = [];
  readonly out: number[] = [];
  readonly out2: number[] = [];
  readonly ranges: (Ranges | null)[] = [];

  add(kind: number, ranges: Ranges | null = null): number {
    if (this.kind.length >= MAX_NFA_STATES) throw fail('GRAMMAR_UNSUPPORTED', `the grammar is too large (more than ${MAX_NFA_STATES} automaton states)`);
    this.kind.push(kind);
    this.out.push(-1);
    this.out2.push(-1);
    this.ranges.push(ranges);
    return this.kind.length - 1;
  }
}

/** A fragment under construction: its entry state and the dangling exits to patch. */
interface Frag {
  readonly start: number;
  /** [state, which out] pairs to connect to what follows. */
  readonly exits: [number, 0 | 1][];
}

function compile(nfa: Nfa, node: Node): Frag | null {
  const patch = (exits: readonly [number, 0 | 1][], to: number) => {
    for (const [s, w] of exits) (w === 0 ? nfa.out : nfa.out2)[s] = to;
  };
  /** Fragments in sequence; null is the empty string. */
  const concat = (frags: (Frag | null)[]): Frag | null => {
    let acc: Frag | null = null;
    for (const f of frags) {
      if (!f) continue;
      if (!acc) { acc = f; continue; }
      patch(acc.exits, f.start);
      acc = { start: acc.start, exits: f.exits };
    }
    return acc;
  };
  /** Either fragment (null: the empty string). */
  const either = (a: Frag | null, b: Frag | null): Frag => {
    const s = nfa.add(SPLIT);
    const exits: [number, 0 | 1][] = [];
    if (a) { nfa.out[s] = a.start; exits.push(...a.exits); } else exits.push([s, 0]);
    if (b) { nfa.out2[s] = b.start; exits.push(...b.exits); } else exits.push([s, 1]);
    return { start: s, exits };
  };
  /** Zero or more of `item` (one copy of it, looped). */
  const star = (item: Frag | null): Frag | null => {
    if (!item) return null;
    const loop = nfa.add(SPLIT); // out: another repetition, out2: leave
    patch(item.exits, loop);
    nfa.out[loop] = item.start;
    // enter: either nothing, or the first item (whose end reaches the loop)
    const enter = nfa.add(SPLIT);
    nfa.out[enter] = item.start;
    return { start: enter, exits: [[enter, 1], [loop, 1]] };
  };

  /** `item (sep item)*`, optional when `optional`: one copy of item and sep, looped. */
  const loop = (item: Frag | null, sepFrag: Frag | null, optional: boolean): Frag | null => {
    if (!item) return sepFrag ? star(sepFrag) : null;
    const back = nfa.add(SPLIT); // out: another repetition, out2: leave
    patch(item.exits, back);
    if (sepFrag) { nfa.out[back] = sepFrag.start; patch(sepFrag.exits, item.start); } else nfa.out[back] = item.start;
    if (!optional) return { start: item.start, exits: [[back, 1]] };
    const enter = nfa.add(SPLIT);
    nfa.out[enter] = item.start;
    return { start: enter, exits: [[enter, 1], [back, 1]] };
  };

  switch (node.kind) {
    case 'chars': {
      const s = nfa.add(CHAR, node.ranges);
      return { start: s, exits: [[s, 0]] };
    }
    case 'seq':
      return concat(node.items.map((n) => compile(nfa, n)));
    case 'alt': {
      let acc = compile(nfa, node.items[node.items.length - 1]!);
      for (let k = node.items.length - 2; k >= 0; k--) acc = either(compile(nfa, node.items[k]!), acc);
      return acc;
    }
    case 'repeat': {
      const { item, min, max, sep } = node;
      if (max === 0) return null;
      if (max === Infinity && min <= 1) return loop(compile(nfa, item), sep ? compile(nfa, sep) : null, min === 0);
      const one = () => compile(nfa, item);
      const sepOne = sep ? () => compile(nfa, sep) : null;
      // the first item, then (sep item) for the others: min-1 required, then optional ones or a loop
      const rest: (Frag | null)[] = [];
      const next = () => concat([sepOne ? sepOne() : null, one()]);
      for (let k = 1; k < min; k++) rest.push(next());
      if (max === Infinity) {
        rest.push(star(next()));
      } else {
        // nested optionals: (s x (s x (s x)?)?)? — each optional only when the previous one was taken
        let tail: Frag | null = null;
        for (let k = Math.max(min, 1); k < max; k++) tail = either(concat([next(), tail]), null);
        rest.push(tail);
      }
      const body = concat([one(), ...rest]);
      return min === 0 ? either(body, null) : body;
    }
  }
}

function inRanges(ranges: Ranges, cp: number): boolean {
  let lo = 0, hi = ranges.length - 1;
  while (lo <= hi) {
    const mid = (lo + hi) >> 1;
    const r = ranges[mid]!;
    if (cp < r[0]) hi = mid - 1;
    else if (cp > r[1]) lo = mid + 1;
    else return true;
  }
  return false;
}

/** The lazily determinised automaton of a syntax tree (see the file comment). */
export class LazyDfa implements CharAutomaton {
  private readonly nfa = new Nfa();
  private readonly match: number;
  /** DFA state → its NFA CHAR states (the closure, without SPLITs), and whether it holds MATCH. */
  private readonly sets: Int32Array[] = [];
  private readonly accepts: boolean[] = [];
  private readonly index = new Map<string, number>();
  /** Transitions on code points below 128 per state (-2: not computed yet), and a map for the others. */
  private readonly ascii: Int32Array[] = [];
  private readonly trans: Map<number, number>[] = [];

  constructor(root: Node) {
    const frag = compile(this.nfa, root);
    this.match = this.nfa.add(MATCH);
    const start = frag ? frag.start : this.match;
    if (frag) for (const [s, w] of frag.exits) (w === 0 ? this.nfa.out : this.nfa.out2)[s] = this.match;
    this.intern(this.closure([start]));
  }

  accepting(state: number): boolean {
    return state >= 0 && this.accepts[state]!;
  }

  canStep(state: number, lo: number, hi: number): boolean {
    if (state < 0) return false;
    for (const s of this.sets[state]!) {
      for (const [a, b] of this.nfa.ranges[s]!) if (a <= hi && b >= lo) return true;
    }
    return false;
  }

  next(state: number, cp: number): number {
    if (state < 0) return -1;
    if (cp < 128) {
      const row = this.ascii[state]!;
      let to = row[cp]!;
      if (to === -2) row[cp] = to = this.compute(state, cp);
      return to;
    }
    const t = this.trans[state]!;
    let to = t.get(cp);
    if (to === undefined) t.set(cp, to = this.compute(state, cp));
    return to;
  }

  private compute(state: number, cp: number): number {
    const targets: number[] = [];
    for (const s of this.sets[state]!) if (inRanges(this.nfa.ranges[s]!, cp)) targets.push(this.nfa.out[s]!);
    return targets.length === 0 ? -1 : this.intern(this.closure(targets));
  }

  /** The ε-closure of `from`: its CHAR and MATCH states, sorted. */
  private closure(from: readonly number[]): number[] {
    const { kind, out, out2 } = this.nfa;
    const seen = new Set<number>();
    const stack = [...from];
    const kept: number[] = [];
    while (stack.length > 0) {
      const s = stack.pop()!;
      if (s < 0 || seen.has(s)) continue;
      seen.add(s);
      if (kind[s] === SPLIT) { stack.push(out[s]!, out2[s]!); continue; }
      kept.push(s);
    }
    return kept.sort((a, b) => a - b);
  }

  private intern(states: number[]): number {
    if (states.length === 0) return -1;
    const key = states.join(',');
    let id = this.index.get(key);
    if (id === undefined) {
      if (this.sets.length >= MAX_DFA_STATES) throw fail('GRAMMAR_UNSUPPORTED', `the grammar is too large (more than ${MAX_DFA_STATES} automaton states visited)`);
      id = this.sets.length;
      this.index.set(key, id);
      this.sets.push(Int32Array.from(states.filter((s) => s !== this.match)));
      this.accepts.push(states.includes(this.match));
      this.trans.push(new Map());
      this.ascii.push(new Int32Array(128).fill(-2));
    }
    return id;
  }
}

/** Whether the automaton accepts `text` exactly. */
export function matches(a: CharAutomaton, text: string): boolean {
  let s = 0;
  for (const c of text) {
    s = a.next(s, c.codePointAt(0)!);
    if (s < 0) return false;
  }
  return a.accepting(s);
}
