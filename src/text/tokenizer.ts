/**
 * Text tokenizer for an HF model folder: a thin wrapper over @huggingface/tokenizers that adds
 * what a server needs and the library leaves out.
 *
 * - Special tokens are added exactly as the files say. The `post_processor` of tokenizer.json
 *   decides by default; an explicit boolean `add_bos_token` / `add_eos_token` in
 *   tokenizer_config.json overrides the BOS / EOS part of it (as transformers' Llama-family
 *   fast tokenizers rebuild their post-processor from these flags). The library itself ignores
 *   both flags, so the wrapper encodes without special tokens and adds the resolved prefix and
 *   suffix ids itself.
 * - Special tokens written in the text (e.g. "<|endoftext|>") encode as their ids: the library
 *   splits every added token out before running the model.
 * - Decoding never applies `clean_up_tokenization_spaces` (the Rust tokenizers that TGI uses do
 *   not either, and it would break incremental decoding).
 * - EOS ids are the union of generation_config.json, config.json and tokenizer_config.json.
 * - Incremental detokenisation follows TGI's `decode_token` (prefix/read offsets, hold back
 *   text ending in U+FFFD).
 */
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { Tokenizer } from '@huggingface/tokenizers';
import { Template } from '@huggingface/jinja';
import { fail, isServeError } from '../errors.ts';
import type { ModelConfig } from '../model/types.ts';

export interface ChatMessage {
  role: string;
  content: string;
  /** The participant's name (OpenAI `messages[].name`), for templates that use it. */
  name?: string;
}

/** The fields of a normalized config.json the tokenizer cares about. */
export type TokenizerModelConfig = Pick<ModelConfig, 'bosTokenId' | 'eosTokenIds' | 'vocabSize'>;

type Json = Record<string, unknown>;

const REPLACEMENT_CHAR = '\uFFFD';
/** A token string no vocabulary contains; used to find where the post-processor puts the text. */
const PROBE = '\uE000\uE001probe\uE002';

/**
 * GPT-2's bytes_to_unicode, inverted: the character a byte-level BPE vocabulary writes → the byte it stands for.
 * Printable Latin-1 bytes stand for themselves; the other 68 bytes are mapped to U+0100 onwards, in byte order.
 */
const BYTE_OF_CHAR: ReadonlyMap<string, number> = (() => {
  const m = new Map<string, number>();
  let shifted = 0;
  for (let b = 0; b < 256; b++) {
    const printable = (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff);
    m.set(String.fromCodePoint(printable ? b : 256 + shifted++), b);
  }
  return m;
})();

/** A decoder section that is ByteLevel, or a Sequence holding one. */
function hasByteLevelDecoder(decoder: unknown): boolean {
  if (!isObject(decoder)) return false;
  if (decoder.type === 'ByteLevel') return true;
  return decoder.type === 'Sequence' && Array.isArray(decoder.decoders) && decoder.decoders.some(hasByteLevelDecoder);
}

function isObject(v: unknown): v is Json {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** tokenizer_config.json writes special tokens as a string or as `{ "content": ..., "__type": "AddedToken" }`. */
function tokenContent(v: unknown): string | null {
  if (typeof v === 'string') return v;
  if (isObject(v) && typeof v.content === 'string') return v.content;
  return null;
}

/** `eos_token_id` is a number or a list of numbers (generation_config.json, config.json). */
function idList(v: unknown): number[] {
  if (typeof v === 'number' && Number.isInteger(v) && v >= 0) return [v];
  if (Array.isArray(v)) return v.filter((x): x is number => typeof x === 'number' && Number.isInteger(x) && x >= 0);
  return [];
}

function firstId(v: unknown): number | null {
  const ids = idList(v);
  return ids.length > 0 ? ids[0]! : null;
}

/**
 * Fill the gaps the library trips over: it requires the five pipeline keys to exist, iterates
 * `added_tokens`, and only infers a BPE model without `"type"` when `continuing_subword_prefix`
 * and `unk_token` are present. The real gpt2 tokenizer.json has no `"type"` in its model
 * section, so a model with `merges` gets `type: "BPE"` here.
 */
function patchTokenizerJson(raw: unknown): Json {
  if (!isObject(raw)) throw fail('TOKENIZER_INVALID', 'tokenizer.json must be a JSON object');
  const model = raw.model;
  if (!isObject(model)) throw fail('TOKENIZER_INVALID', 'tokenizer.json has no "model" section');
  let patchedModel = model;
  if (typeof model.type !== 'string') {
    if (Array.isArray(model.merges) && isObject(model.vocab)) patchedModel = { ...model, type: 'BPE' };
    else if (Array.isArray(model.vocab)) patchedModel = { ...model, type: 'Unigram' };
    else if (isObject(model.vocab)) patchedModel = { ...model, type: 'WordPiece' };
    else throw fail('TOKENIZER_INVALID', 'tokenizer.json model has no "type" and no recognisable vocabulary');
  }
  if (raw.added_tokens !== undefined && !Array.isArray(raw.added_tokens)) {
    throw fail('TOKENIZER_INVALID', 'tokenizer.json "added_tokens" must be a list');
  }
  return {
    ...raw,
    model: patchedModel,
    normalizer: raw.normalizer ?? null,
    pre_tokenizer: raw.pre_tokenizer ?? null,
    post_processor: raw.post_processor ?? null,
    decoder: raw.decoder ?? null,
    added_tokens: raw.added_tokens ?? [],
  };
}

async function readJson(path: string, required: boolean, code: 'TOKENIZER_INVALID' | 'CONFIG_INVALID'): Promise<unknown> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (err) {
    if (!required && (err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw fail(code, `cannot read ${path}: ${(err as Error).message}`);
  }
  try {
    return JSON.parse(text);
  } catch (err) {
    throw fail(code, `${path} is not valid JSON: ${(err as Error).message}`);
  }
}

async function readTextIfPresent(path: string): Promise<string | undefined> {
  try {
    return await readFile(path, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw fail('TOKENIZER_INVALID', `cannot read ${path}: ${(err as Error).message}`);
  }
}

/** The raw fields of config.json, for `load()` without a normalized config. */
function rawModelConfig(cfg: unknown): TokenizerModelConfig | undefined {
  if (!isObject(cfg)) return undefined;
  return {
    bosTokenId: firstId(cfg.bos_token_id),
    eosTokenIds: idList(cfg.eos_token_id),
    vocabSize: typeof cfg.vocab_size === 'number' ? cfg.vocab_size : Number.MAX_SAFE_INTEGER,
  };
}

/** `chat_template` is a string, or a list of `{ name, template }` (the one named "default" wins). */
function pickChatTemplate(v: unknown): string | null {
  if (typeof v === 'string') return v;
  if (Array.isArray(v)) {
    const named = v.filter((t): t is { name: string; template: string } =>
      isObject(t) && typeof t.name === 'string' && typeof t.template === 'string');
    return (named.find((t) => t.name === 'default') ?? named[0])?.template ?? null;
  }
  return null;
}

export class TextTokenizer {
  /** Number of ids the tokenizer can produce (max id + 1). */
  readonly vocabSize: number;
  readonly bosTokenId: number | null;
  readonly eosTokenIds: readonly number[];
  readonly chatTemplate: string | null;

  private readonly tok: Tokenizer;
  private readonly prefixIds: readonly number[];
  private readonly suffixIds: readonly number[];
  private readonly specialIds: ReadonlySet<number>;
  /** Special tokens as strings for the chat template (bos_token, eos_token, ...). */
  private readonly templateVars: Readonly<Record<string, string>>;
  private readonly pieceCache = new Map<number, string>();
  private compiledTemplate: Template | null = null;
  private bytesOfTokens: readonly (Uint8Array | null)[] | null = null;

  private constructor(
    tok: Tokenizer,
    tokenizerConfig: Json,
    generationConfig: Json,
    modelConfig: TokenizerModelConfig | undefined,
    chatTemplate: string | null,
    /** The decoder is byte-level (GPT-2 style): vocabulary strings spell bytes in bytes_to_unicode's alphabet. */
    private readonly byteLevel: boolean,
  ) {
    this.tok = tok;
    this.vocabSize = tok.model?.vocab.length ?? 0;
    if (this.vocabSize === 0) throw fail('TOKENIZER_INVALID', 'tokenizer.json has an empty vocabulary');
    if (modelConfig && this.vocabSize > modelConfig.vocabSize) {
      throw fail('TOKENIZER_INVALID',
        `tokenizer produces ids up to ${this.vocabSize - 1} but the model's vocab_size is ${modelConfig.vocabSize}`);
    }

    const idOf = (token: unknown): number | null => {
      const content = tokenContent(token);
      if (content === null) return null;
      return tok.token_to_id(content) ?? null;
    };

    // BOS: the tokenizer's own token first, then generation_config.json, then config.json.
    const bosFromTokenizer = idOf(tokenizerConfig.bos_token);
    this.bosTokenId = bosFromTokenizer ?? firstId(generationConfig.bos_token_id) ?? modelConfig?.bosTokenId ?? null;

    // EOS: union of generation_config.json, config.json and tokenizer_config.json, first seen first.
    const eosFromTokenizer = idOf(tokenizerConfig.eos_token);
    const eos = [
      ...idList(generationConfig.eos_token_id),
      ...(modelConfig?.eosTokenIds ?? []),
      ...(eosFromTokenizer === null ? [] : [eosFromTokenizer]),
    ];
    this.eosTokenIds = Object.freeze([...new Set(eos)].filter((id) => id < this.vocabSize));

    // Special ids: added tokens marked special, the special tokens named in tokenizer_config.json, BOS and EOS.
    const special = new Set<number>();
    for (const [id, added] of tok.get_added_tokens_decoder()) if (added.special) special.add(id);
    const vars: Record<string, string> = {};
    for (const key of ['bos_token', 'eos_token', 'unk_token', 'sep_token', 'pad_token', 'cls_token', 'mask_token']) {
      const content = tokenContent(tokenizerConfig[key]);
      if (content === null) continue;
      vars[key] = content;
      const id = tok.token_to_id(content);
      if (id !== undefined) special.add(id);
    }
    if (Array.isArray(tokenizerConfig.additional_special_tokens)) {
      for (const t of tokenizerConfig.additional_special_tokens) {
        const id = idOf(t);
        if (id !== null) special.add(id);
      }
    }
    if (this.bosTokenId !== null) special.add(this.bosTokenId);
    for (const id of this.eosTokenIds) special.add(id);
    this.specialIds = special;
    // Templates reference bos_token/eos_token; fall back to the resolved ids' strings.
    if (vars.bos_token === undefined && this.bosTokenId !== null) {
      const s = tok.id_to_token(this.bosTokenId);
      if (s !== undefined) vars.bos_token = s;
    }
    if (vars.eos_token === undefined && this.eosTokenIds.length > 0) {
      const s = tok.id_to_token(this.eosTokenIds[0]!);
      if (s !== undefined) vars.eos_token = s;
    }
    this.templateVars = Object.freeze(vars);
    this.chatTemplate = chatTemplate;

    // Special tokens around the text: what the post-processor adds, with explicit
    // add_bos_token / add_eos_token from tokenizer_config.json taking precedence.
    let prefix: number[] = [];
    let suffix: number[] = [];
    if (tok.post_processor) {
      const out = tok.post_processor.post_process([PROBE], null, true).tokens;
      const at = out.indexOf(PROBE);
      if (at < 0) throw fail('TOKENIZER_INVALID', 'tokenizer.json post_processor does not keep the input sequence');
      const toId = (t: string): number => {
        const id = tok.token_to_id(t);
        if (id === undefined) throw fail('TOKENIZER_INVALID', `post_processor adds "${t}", which is not in the vocabulary`);
        return id;
      };
      prefix = out.slice(0, at).map(toId);
      suffix = out.slice(at + 1).map(toId);
    }
    const addBos = tokenizerConfig.add_bos_token;
    if (typeof addBos === 'boolean') {
      const bos = bosFromTokenizer ?? this.bosTokenId;
      if (addBos && bos === null) throw fail('TOKENIZER_INVALID', 'add_bos_token is true but there is no bos_token');
      if (bos !== null) {
        prefix = prefix.filter((id) => id !== bos);
        if (addBos) prefix.unshift(bos);
      }
    }
    const addEos = tokenizerConfig.add_eos_token;
    if (typeof addEos === 'boolean') {
      const eosId = eosFromTokenizer ?? this.eosTokenIds[0] ?? null;
      if (addEos && eosId === null) throw fail('TOKENIZER_INVALID', 'add_eos_token is true but there is no eos_token');
      if (eosId !== null) {
        suffix = suffix.filter((id) => id !== eosId);
        if (addEos) suffix.push(eosId);
      }
    }
    this.prefixIds = Object.freeze(prefix);
    this.suffixIds = Object.freeze(suffix);
  }

  /**
   * Load from a model folder: tokenizer.json (required), tokenizer_config.json,
   * generation_config.json, chat_template.jinja / chat_template.json (optional). Without
   * `modelConfig`, the BOS/EOS ids and vocab_size of config.json are read raw.
   */
  static async load(dir: string, modelConfig?: TokenizerModelConfig): Promise<TextTokenizer> {
    const tokenizerPath = join(dir, 'tokenizer.json');
    let tokenizerText: string;
    try {
      tokenizerText = await readFile(tokenizerPath, 'utf8');
    } catch (err) {
      const missing = (err as NodeJS.ErrnoException).code === 'ENOENT';
      throw fail('TOKENIZER_INVALID', missing
        ? `no tokenizer.json in ${dir} (only fast tokenizers saved as tokenizer.json are supported)`
        : `cannot read ${tokenizerPath}: ${(err as Error).message}`);
    }
    let tokenizerJson: unknown;
    try {
      tokenizerJson = JSON.parse(tokenizerText);
    } catch (err) {
      throw fail('TOKENIZER_INVALID', `${tokenizerPath} is not valid JSON: ${(err as Error).message}`);
    }
    const [tokenizerConfig, generationConfig, config, jinja, templateJson] = await Promise.all([
      readJson(join(dir, 'tokenizer_config.json'), false, 'TOKENIZER_INVALID'),
      readJson(join(dir, 'generation_config.json'), false, 'CONFIG_INVALID'),
      modelConfig ? Promise.resolve(undefined) : readJson(join(dir, 'config.json'), false, 'CONFIG_INVALID'),
      readTextIfPresent(join(dir, 'chat_template.jinja')),
      readJson(join(dir, 'chat_template.json'), false, 'TOKENIZER_INVALID'),
    ]);
    // Newer transformers save the template beside tokenizer_config.json; that file wins.
    let tc = isObject(tokenizerConfig) ? tokenizerConfig : {};
    const separate = jinja ?? (isObject(templateJson) ? pickChatTemplate(templateJson.chat_template) : null);
    if (separate !== null && separate !== undefined) tc = { ...tc, chat_template: separate };
    return TextTokenizer.fromJSON(
      tokenizerJson as object,
      tc,
      isObject(generationConfig) ? generationConfig : undefined,
      modelConfig ?? rawModelConfig(config),
    );
  }

  static fromJSON(
    tokenizerJson: object,
    tokenizerConfig?: object,
    generationConfig?: object,
    modelConfig?: TokenizerModelConfig,
  ): TextTokenizer {
    const tj = patchTokenizerJson(tokenizerJson);
    const tc: Json = isObject(tokenizerConfig) ? tokenizerConfig : {};
    const gc: Json = isObject(generationConfig) ? generationConfig : {};
    let tok: Tokenizer;
    try {
      tok = new Tokenizer(tj, tc);
    } catch (err) {
      throw fail('TOKENIZER_INVALID', `cannot build the tokenizer from tokenizer.json: ${(err as Error).message}`);
    }
    return new TextTokenizer(tok, tc, gc, modelConfig, pickChatTemplate(tc.chat_template), hasByteLevelDecoder(tj.decoder));
  }

  /** Token ids for `text`; special tokens are added as the files say unless `addSpecialTokens` is false. */
  encode(text: string, opts: { addSpecialTokens?: boolean } = {}): number[] {
    const ids = this.tok.encode(text, { add_special_tokens: false }).ids
      // Without an unk token the library yields undefined for unknown pieces; the Rust tokenizers drop them.
      .filter((id: number | undefined): id is number => typeof id === 'number');
    if (opts.addSpecialTokens === false) return ids;
    return [...this.prefixIds, ...ids, ...this.suffixIds];
  }

  decode(ids: readonly number[], opts: { skipSpecialTokens?: boolean } = {}): string {
    const vocab = this.tok.model!.vocab;
    const kept = ids.filter((id) =>
      Number.isInteger(id) && id >= 0 && id < this.vocabSize && vocab[id] !== undefined &&
      !(opts.skipSpecialTokens && this.specialIds.has(id)));
    if (kept.length === 0) return '';
    return this.tok.decode(kept, { skip_special_tokens: false, clean_up_tokenization_spaces: false });
  }

  /**
   * Each token of `text` with its piece of the text (TGI's /tokenize): `[start, stop)` are UTF-16
   * offsets into the decoded text, which is the input unless the tokenizer normalises it. A token
   * that ends inside a multi-byte character has an empty piece and the next one carries the
   * character. Added special tokens (e.g. BOS) are empty pieces where they are added.
   */
  pieces(text: string, opts: { addSpecialTokens?: boolean } = {}): { id: number; text: string; start: number; stop: number }[] {
    const add = opts.addSpecialTokens !== false;
    const decoder = this.createDecoder();
    const out: { id: number; text: string; start: number; stop: number }[] = [];
    let pos = 0;
    const added = (id: number) => ({ id, text: '', start: pos, stop: pos });
    if (add) out.push(...this.prefixIds.map(added));
    const ids = this.encode(text, { addSpecialTokens: false });
    ids.forEach((id, i) => {
      const piece = decoder.push(id) + (i === ids.length - 1 ? decoder.flush() : '');
      out.push({ id, text: piece, start: pos, stop: pos + piece.length });
      pos += piece.length;
    });
    if (add) out.push(...this.suffixIds.map(added));
    return out;
  }

  /** The text of one token as TGI reports it in details (the token decoded alone, specials kept). */
  tokenText(id: number): string {
    let s = this.pieceCache.get(id);
    if (s === undefined) {
      s = this.decode([id]);
      this.pieceCache.set(id, s);
    }
    return s;
  }

  /**
   * The UTF-8 bytes each id adds to generated text (constrained decoding walks them), computed once; null for
   * special and added tokens and ids the text cannot be built from. With a byte-level decoder the bytes are read
   * off the vocabulary string (so a piece holding part of a character has its exact bytes); otherwise a
   * `<0xHH>` byte-fallback piece is that byte, and any other piece is its text decoded after a plain ASCII
   * token (so a SentencePiece `▁` keeps its space), or null when that text is not valid UTF-8 alone (U+FFFD).
   */
  tokenBytes(): readonly (Uint8Array | null)[] {
    if (this.bytesOfTokens) return this.bytesOfTokens;
    const vocab = this.tok.model!.vocab as (string | undefined)[];
    const added = new Set(this.tok.get_added_tokens_decoder().keys());
    const utf8 = new TextEncoder();
    const anchor = this.encode('a', { addSpecialTokens: false })[0];
    const anchorText = anchor === undefined ? '' : this.decode([anchor]);
    const bytesOf = (id: number): Uint8Array | null => {
      const piece = vocab[id];
      if (piece === undefined || added.has(id) || this.specialIds.has(id)) return null;
      if (this.byteLevel) {
        const out = [...piece].map((c) => BYTE_OF_CHAR.get(c));
        if (out.every((b) => b !== undefined)) return Uint8Array.from(out as number[]);
      }
      const byte = /^<0x([0-9A-Fa-f]{2})>$/.exec(piece);
      if (byte) return Uint8Array.of(parseInt(byte[1]!, 16));
      const text = anchor === undefined ? this.decode([id]) : this.decode([anchor, id]).slice(anchorText.length);
      return text.includes(REPLACEMENT_CHAR) && !piece.includes(REPLACEMENT_CHAR) ? null : utf8.encode(text);
    };
    this.bytesOfTokens = Array.from({ length: this.vocabSize }, (_, id) => bytesOf(id));
    return this.bytesOfTokens;
  }

  isSpecial(id: number): boolean {
    return this.specialIds.has(id);
  }

  /** Render a chat with the model's template (`bos_token`, `eos_token`, ... are available to it). */
  applyChatTemplate(messages: ChatMessage[], opts: { addGenerationPrompt?: boolean } = {}): string {
    if (this.chatTemplate === null) {
      throw fail('VALIDATION', 'this model has no chat template; use a completion route with a plain prompt');
    }
    if (this.compiledTemplate === null) {
      try {
        this.compiledTemplate = new Template(this.chatTemplate);
      } catch (err) {
        throw fail('TOKENIZER_INVALID', `the model's chat template cannot be parsed: ${(err as Error).message}`);
      }
    }
    try {
      return this.compiledTemplate.render({
        ...this.templateVars,
        messages: messages.map((m) => ({ role: m.role, content: m.content })),
        add_generation_prompt: opts.addGenerationPrompt ?? false,
      });
    } catch (err) {
      if (isServeError(err)) throw err;
      // raise_exception(...) in templates (e.g. "roles must alternate") lands here: the request is at fault.
      throw fail('VALIDATION', `chat template error: ${(err as Error).message}`);
    }
  }

  /**
   * An incremental detokeniser. `prefixIds` are a few ids of left context (e.g. the last prompt
   * tokens) that are decoded but never emitted, so tokenizers that strip a leading space keep
   * the space of the first generated token.
   */
  createDecoder(opts: { skipSpecialTokens?: boolean; prefixIds?: readonly number[] } = {}): IncrementalDecoder {
    return new IncrementalDecoder(
      (ids) => this.decode(ids, { skipSpecialTokens: opts.skipSpecialTokens }),
      opts.prefixIds ?? [],
    );
  }
}

/**
 * TGI's `decode_token` as an object: decode `ids[prefix:read]` and `ids[prefix:]`; the
 * difference is new text, emitted only when the longer text does not end in U+FFFD (a
 * multi-byte character cut between byte-level tokens). Then prefix := read, read := end.
 */
export class IncrementalDecoder {
  private readonly ids: number[];
  private prefixOffset = 0;
  private readOffset: number;
  private emitted = '';

  constructor(private readonly decodeFn: (ids: readonly number[]) => string, prefixIds: readonly number[]) {
    this.ids = [...prefixIds];
    this.readOffset = this.ids.length;
  }

  /** All text emitted so far. */
  get text(): string {
    return this.emitted;
  }

  /** Add one token; returns the text that became stable (possibly ""). */
  push(id: number): string {
    this.ids.push(id);
    return this.step(false);
  }

  /** At the end of generation: whatever is still held back (e.g. an incomplete character). */
  flush(): string {
    return this.step(true);
  }

  private step(final: boolean): string {
    if (this.readOffset >= this.ids.length) return '';
    const prefixText = this.decodeFn(this.ids.slice(this.prefixOffset, this.readOffset));
    const newText = this.decodeFn(this.ids.slice(this.prefixOffset));
    if (newText.length > prefixText.length && (final || !newText.endsWith(REPLACEMENT_CHAR))) {
      const delta = newText.slice(prefixText.length);
      this.prefixOffset = this.readOffset;
      this.readOffset = this.ids.length;
      this.emitted += delta;
      return delta;
    }
    return '';
  }
}
