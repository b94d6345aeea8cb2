/**
 * From a character automaton to token masks: which vocabulary ids may come next so that the text stays a prefix
 * of something the automaton accepts.
 *
 * Tokens are walked as the UTF-8 bytes they add to the text (`TokenVocabulary`, built once per tokenizer from
 * `TextTokenizer.tokenBytes()`), so byte-level BPE pieces that hold part of a character are handled exactly: a
 * constraint state is an automaton state plus the bytes of an unfinished character (its code point so far, the
 * bytes still needed). A byte sequence that is not valid UTF-8 (a stray continuation byte, an overlong form, a
 * surrogate) never matches. Ids with no bytes (special and added tokens) are never allowed; the EOS ids are
 * allowed exactly when the text is complete: the automaton accepts and no character is unfinished.
 *
 * The allowed ids of a state are found by walking a byte trie of the vocabulary through the automaton (a whole
 * subtree is skipped as soon as its prefix is dead) and cached per state.
 */
import { fail } from '../../errors.ts';
import type { CharAutomaton } from './automaton.ts';

/** Where generation stands in the grammar: an automaton state and an unfinished UTF-8 character. */
export interface ConstraintState {
  readonly dfa: number;
  /** The code point's bits so far. */
  readonly cp: number;
  /** Continuation bytes still needed (0: no unfinished character). */
  readonly need: number;
  /** The unfinished character's total byte length (for the overlong check). */
  readonly len: number;
}

/** What the engine asks of a grammar, per sequence: the engine holds the state. */
export interface TokenConstraint {
  start(): ConstraintState;
  /** allowed[id] === 1 for every id that may come next (EOS ids only when `complete`); null when none may. Do not modify. */
  allowed(state: ConstraintState): Uint8Array | null;
  /** The state after `id`; GRAMMAR_INVALID if `id` was not allowed. */
  advance(state: ConstraintState, id: number): ConstraintState;
  /** The text so far is a full match. */
  complete(state: ConstraintState): boolean;
  /** True for an EOS id. */
  isEos(id: number): boolean;
}

/** A tokenizer's vocabulary as bytes, in a trie stored in flat arrays (node 0 is the root). */
export class TokenVocabulary {
  readonly size: number;
  readonly bytes: readonly (Uint8Array | null)[];
  readonly eosIds: readonly number[];
  /** Node n's edges are edgeStart[n] .. edgeStart[n + 1] - 1: edgeByte[e] leads to node edgeChild[e]. */
  readonly edgeStart: Int32Array;
  readonly edgeByte: Uint8Array;
  readonly edgeChild: Int32Array;
  /** The ids whose bytes end at node n: ids[idStart[n] .. idStart[n + 1] - 1]. */
  readonly idStart: Int32Array;
  readonly ids: Int32Array;

  /** `bytes[id]`: the UTF-8 bytes token `id` adds to the text, null for ids that cannot be constrained. */
  constructor(bytes: readonly (Uint8Array | null)[], eosIds: readonly number[]) {
    this.size = bytes.length;
    this.bytes = bytes;
    this.eosIds = eosIds;
    interface Building { children: Map<number, Building>; ids: number[]; index: number }
    const root: Building = { children: new Map(), ids: [], index: 0 };
    bytes.forEach((b, id) => {
      if (!b || b.length === 0 || eosIds.includes(id)) return;
      let node = root;
      for (const byte of b) {
        let child = node.children.get(byte);
        if (!child) { child = { children: new Map(), ids: [], index: -1 }; node.children.set(byte, child); }
        node = child;
      }
      node.ids.push(id);
    });
    // number the nodes breadth first, then lay their edges and ids out in that order
    const order = [root];
    for (let i = 0; i < order.length; i++) for (const child of order[i]!.children.values()) { child.index = order.length; order.push(child); }
    this.edgeStart = new Int32Array(order.length + 1);
    this.idStart = new Int32Array(order.length + 1);
    this.edgeByte = new Uint8Array(order.length - 1);
    this.edgeChild = new Int32Array(order.length - 1);
    const ids: number[] = [];
    let e = 0;
    order.forEach((node, n) => {
      this.edgeStart[n] = e;
      this.idStart[n] = ids.length;
      for (const [byte, child] of node.children) { this.edgeByte[e] = byte; this.edgeChild[e++] = child.index; }
      ids.push(...node.ids);
    });
    this.edgeStart[order.length] = e;
    this.idStart[order.length] = ids.length;
    this.ids = Int32Array.from(ids);
  }
}

/** The least code point each UTF-8 length may encode (shorter forms are overlong). */
const MIN_CP = [0, 0, 0x80, 0x800, 0x10000];

/** One byte on from `s`, or null when the bytes stop being valid UTF-8 or the automaton dies. */
function stepByte(a: CharAutomaton, s: ConstraintState, b: number): ConstraintState | null {
  let cp: number, need: number, len: number;
  if (s.need === 0) {
    if (b < 0x80) { cp = b; need = 0; len = 1; } else if (b >= 0xc2 && b <= 0xdf) { cp = b & 0x1f; need = 1; len = 2; } else if (b >= 0xe0 && b <= 0xef) { cp = b & 0x0f; need = 2; len = 3; } else if (b >= 0xf0 && b <= 0xf4) { cp = b & 0x07; need = 3; len = 4; } else return null;
  } else {
    if ((b & 0xc0) !== 0x80) return null;
    cp = (s.cp << 6) | (b & 0x3f);
    need = s.need - 1;
    len = s.len;
  }
  if (need > 0) {
    // reject overlong and out-of-range forms as soon as the second byte shows them
    if (s.need !== 0 && need === len - 2) {
      const min = MIN_CP[len]! >> (6 * need), max = 0x10ffff >> (6 * need);
      if (cp < min || cp > max || (len === 3 && cp >= (0xd800 >> 6) && cp <= (0xdfff >> 6))) return null;
    }
    // the character is still open: some way to finish it must keep the automaton alive
    const shift = 6 * need;
    const lo = cp * 2 ** shift;
    if (!a.canStep(s.dfa, Math.max(lo, MIN_CP[len]!), Math.min(lo + 2 ** shift - 1, 0x10ffff))) return null;
    return { dfa: s.dfa, cp, need, len };
  }
  if (cp < MIN_CP[len]! || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return null;
  const dfa = a.next(s.dfa, cp);
  return dfa < 0 ? null : { dfa, cp: 0, need: 0, len: 0 };
}

/** The most masks one grammar keeps; past it the cache starts over. */
export const MAX_CACHED_MASKS = 4096;
/** The most bytes of masks one grammar keeps (a mask is one byte per vocabulary id): fewer masks for large vocabularies. */
export const MASK_CACHE_BYTES = 8 << 20;

/** A character automaton over a vocabulary: the token masks of its states, cached (see the file comment). */
export class Grammar implements TokenConstraint {
  private readonly masks = new Map<string, Uint8Array | null>();
  /** MAX_CACHED_MASKS, or fewer so that they fit in MASK_CACHE_BYTES (at least 64). */
  private readonly maxMasks: number;

  constructor(readonly automaton: CharAutomaton, readonly vocab: TokenVocabulary) {
    this.maxMasks = Math.min(MAX_CACHED_MASKS, Math.max(64, Math.floor(MASK_CACHE_BYTES / Math.max(1, vocab.size))));
  }

  /** Masks in the cache: the constraint states seen (since the cache last started over). */
  get cachedMasks(): number {
    return this.masks.size;
  }

  start(): ConstraintState {
    return { dfa: 0, cp: 0, need: 0, len: 0 };
  }

  complete(s: ConstraintState): boolean {
    return s.need === 0 && this.automaton.accepting(s.dfa);
  }

  isEos(id: number): boolean {
    return this.vocab.eosIds.includes(id);
  }

  allowed(s: ConstraintState): Uint8Array | null {
    const key = `${s.dfa}:${s.cp}:${s.need}:${s.len}`;
    let mask = this.masks.get(key);
    if (mask === undefined) {
      mask = this.computeMask(s);
      if (this.masks.size >= this.maxMasks) this.masks.clear();
      this.masks.set(key, mask);
    }
    return mask;
  }

  advance(s: ConstraintState, id: number): ConstraintState {
    const bytes = this.vocab.bytes[id];
    let cur: ConstraintState | null = bytes && bytes.length > 0 ? s : null;
    for (const b of bytes ?? []) {
      if (!cur) break;
      cur = stepByte(this.automaton, cur, b);
    }
    if (!cur) throw fail('GRAMMAR_INVALID', `token ${id} does not continue the grammar`);
    return cur;
  }

  /** Walks the vocabulary trie from `s`: every id whose bytes keep the text a live prefix (null: none). */
  private computeMask(s: ConstraintState): Uint8Array | null {
    const mask = new Uint8Array(this.vocab.size);
    const a = this.automaton;
    const { edgeStart, edgeByte, edgeChild, idStart, ids } = this.vocab;
    let any = false;
    /** Marks node n's ids and goes on below it from automaton state `dfa` (no unfinished character) or `st`. */
    const reach = (n: number, dfa: number, st: ConstraintState | null): void => {
      for (let i = idStart[n]!; i < idStart[n + 1]!; i++) mask[ids[i]!] = 1;
      if (idStart[n + 1]! > idStart[n]!) any = true;
      if (edgeStart[n + 1]! === edgeStart[n]!) return;
      if (st) walk(n, st);
      else walkAt(n, dfa);
    };
    /** From a state with no unfinished character: ASCII bytes step the automaton directly. */
    const walkAt = (n: number, dfa: number): void => {
      for (let e = edgeStart[n]!; e < edgeStart[n + 1]!; e++) {
        const byte = edgeByte[e]!;
        if (byte < 0x80) {
          const to = a.next(dfa, byte);
          if (to >= 0) reach(edgeChild[e]!, to, null);
        } else {
          const next = stepByte(a, { dfa, cp: 0, need: 0, len: 0 }, byte);
          if (next) reach(edgeChild[e]!, next.dfa, next.need === 0 ? null : next);
        }
      }
    };
    const walk = (n: number, st: ConstraintState): void => {
      if (st.need === 0) return walkAt(n, st.dfa);
      for (let e = edgeStart[n]!; e < edgeStart[n + 1]!; e++) {
        const next = stepByte(a, st, edgeByte[e]!);
        if (next) reach(edgeChild[e]!, next.dfa, next.need === 0 ? null : next);
      }
    };
    walk(0, s);
    if (this.complete(s)) for (const id of this.vocab.eosIds) if (id < mask.length) { mask[id] = 1; any = true; }
    return any ? mask : null;
  }
}
