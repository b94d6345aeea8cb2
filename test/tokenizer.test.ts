import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, writeFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { TextTokenizer } from '../src/text/tokenizer.ts';

// ---------------------------------------------------------------------------------------------
// Inline tokenizer.json builders

/** GPT-2's bytes_to_unicode: byte → printable character. */
function bytesToUnicode(): string[] {
  const bs: number[] = [];
  for (let b = 0x21; b <= 0x7e; b++) bs.push(b);
  for (let b = 0xa1; b <= 0xac; b++) bs.push(b);
  for (let b = 0xae; b <= 0xff; b++) bs.push(b);
  const cs = [...bs];
  let n = 0;
  for (let b = 0; b < 256; b++) {
    if (!bs.includes(b)) {
      bs.push(b);
      cs.push(256 + n++);
    }
  }
  const map: string[] = new Array(256);
  bs.forEach((b, i) => { map[b] = String.fromCharCode(cs[i]!); });
  return map;
}
const B2U = bytesToUnicode();
const sym = (...bytes: number[]): string => bytes.map((b) => B2U[b]).join('');

/** Byte-level BPE: the 256 byte symbols (id = byte), a few merges, <|endoftext|>. */
function byteLevelJson(opts: { withType?: boolean } = {}): Record<string, unknown> {
  const vocab: Record<string, number> = {};
  for (let b = 0; b < 256; b++) vocab[B2U[b]!] = b;
  const merges: [string, string][] = [];
  const merge = (a: string, b: string): void => {
    merges.push([a, b]);
    if (!(a + b in vocab)) vocab[a + b] = Object.keys(vocab).length;
  };
  const G = sym(0x20); // "Ġ"
  merge('h', 'e'); merge('l', 'l'); merge('he', 'll'); merge('hell', 'o');
  merge(G, 'w'); merge('o', 'r'); merge(G + 'w', 'or'); merge(G + 'wor', 'l'); merge(G + 'worl', 'd');
  merge(sym(0xc3), sym(0xa9)); // é as one token
  merge(sym(0x97), sym(0xa5)); // 日 = E6 | 97 A5: a character split across two tokens
  merge(sym(0xf0), sym(0x9f)); merge(sym(0x98), sym(0x80)); // 😀 = F0 9F | 98 80
  const eot = Object.keys(vocab).length;
  const model: Record<string, unknown> = { vocab, merges: merges.map(([a, b]) => `${a} ${b}`) };
  if (opts.withType !== false) Object.assign(model, { type: 'BPE', dropout: null, unk_token: null, continuing_subword_prefix: null, end_of_word_suffix: null, fuse_unk: false });
  return {
    version: '1.0',
    added_tokens: [{ id: eot, content: '<|endoftext|>', single_word: false, lstrip: false, rstrip: false, normalized: true, special: true }],
    normalizer: null,
    pre_tokenizer: { type: 'ByteLevel', add_prefix_space: false, trim_offsets: true, use_regex: true },
    post_processor: { type: 'ByteLevel', add_prefix_space: true, trim_offsets: false, use_regex: true },
    decoder: { type: 'ByteLevel', add_prefix_space: true, trim_offsets: true, use_regex: true },
    model,
  };
}
const EOT = 256 + 13; // 256 bytes + 13 merged tokens

/** SentencePiece-like (Llama 2): ▁ metaspace, byte fallback, <s>/</s>, TemplateProcessing adding <s>. */
function llamaJson(opts: { postProcessor?: boolean } = {}): Record<string, unknown> {
  const vocab: Record<string, number> = { '<unk>': 0, '<s>': 1, '</s>': 2 };
  for (let b = 0; b < 256; b++) vocab[`<0x${b.toString(16).toUpperCase().padStart(2, '0')}>`] = 3 + b;
  for (const c of ['▁', ...'abcdefghijklmnopqrstuvwxyz']) vocab[c] = Object.keys(vocab).length;
  const merges: string[] = [];
  const merge = (a: string, b: string): void => {
    merges.push(`${a} ${b}`);
    if (!(a + b in vocab)) vocab[a + b] = Object.keys(vocab).length;
  };
  merge('▁', 'h'); merge('▁h', 'e'); merge('l', 'l'); merge('▁he', 'll'); merge('▁hell', 'o');
  merge('▁', 'w'); merge('o', 'r'); merge('▁w', 'or'); merge('▁wor', 'l'); merge('▁worl', 'd');
  const special = (id: number, content: string) => ({ id, content, single_word: false, lstrip: false, rstrip: false, normalized: false, special: true });
  return {
    version: '1.0',
    added_tokens: [special(0, '<unk>'), special(1, '<s>'), special(2, '</s>')],
    normalizer: { type: 'Sequence', normalizers: [{ type: 'Prepend', prepend: '▁' }, { type: 'Replace', pattern: { String: ' ' }, content: '▁' }] },
    pre_tokenizer: null,
    post_processor: opts.postProcessor === false ? null : {
      type: 'TemplateProcessing',
      single: [{ SpecialToken: { id: '<s>', type_id: 0 } }, { Sequence: { id: 'A', type_id: 0 } }],
      pair: [{ SpecialToken: { id: '<s>', type_id: 0 } }, { Sequence: { id: 'A', type_id: 0 } }, { SpecialToken: { id: '<s>', type_id: 1 } }, { Sequence: { id: 'B', type_id: 1 } }],
      special_tokens: { '<s>': { id: '<s>', ids: [1], tokens: ['<s>'] } },
    },
    decoder: {
      type: 'Sequence',
      decoders: [
        { type: 'Replace', pattern: { String: '▁' }, content: ' ' },
        { type: 'ByteFallback' },
        { type: 'Fuse' },
        { type: 'Strip', content: ' ', start: 1, stop: 0 },
      ],
    },
    model: { type: 'BPE', dropout: null, unk_token: '<unk>', continuing_subword_prefix: null, end_of_word_suffix: null, fuse_unk: true, byte_fallback: true, vocab, merges },
  };
}
const LLAMA_TC = { bos_token: '<s>', eos_token: '</s>', unk_token: '<unk>' };

const TEXTS = ['hello world', 'héllo wörld', '日本語', 'emoji 😀!', 'café 日本 😀😀 é', 'a\nb\tc  d'];

function decodeIncrementally(tok: TextTokenizer, ids: number[], opts: Parameters<TextTokenizer['createDecoder']>[0] = {}): string[] {
  const dec = tok.createDecoder(opts);
  const pieces = ids.map((id) => dec.push(id));
  pieces.push(dec.flush());
  assert.equal(dec.text, pieces.join(''));
  return pieces;
}

// ---------------------------------------------------------------------------------------------

test('byte-level BPE: round trip incl. multi-byte UTF-8, merges used', () => {
  const tok = TextTokenizer.fromJSON(byteLevelJson());
  assert.equal(tok.vocabSize, EOT + 1);
  for (const text of TEXTS) {
    const ids = tok.encode(text);
    assert.equal(tok.decode(ids), text, text);
  }
  assert.deepEqual(tok.encode('hello world').map((id) => tok.tokenText(id)), ['hello', ' world']);
  assert.equal(tok.encode('é').length, 1);
  assert.equal(tok.encode('日').length, 2);
  assert.equal(tok.encode('😀').length, 2);
  assert.equal(tok.decode([]), '');
});

test('gpt2-style tokenizer.json without "type" in its model is read as BPE', () => {
  const typed = TextTokenizer.fromJSON(byteLevelJson());
  const untyped = TextTokenizer.fromJSON(byteLevelJson({ withType: false }));
  for (const text of TEXTS) {
    assert.deepEqual(untyped.encode(text), typed.encode(text), text);
    assert.equal(untyped.decode(untyped.encode(text)), text);
  }
  assert.equal(untyped.encode('hello').length, 1);
});

test('byte-level tokenizer with a ByteLevel post-processor adds nothing', () => {
  const tok = TextTokenizer.fromJSON(byteLevelJson());
  assert.deepEqual(tok.encode('hello'), tok.encode('hello', { addSpecialTokens: false }));
  assert.equal(tok.bosTokenId, null);
});

test('special tokens written in the text encode as their ids', () => {
  const tok = TextTokenizer.fromJSON(byteLevelJson());
  const ids = tok.encode('hello<|endoftext|> world');
  assert.deepEqual(ids, [...tok.encode('hello'), EOT, ...tok.encode(' world')]);
  assert.equal(tok.decode(ids), 'hello<|endoftext|> world');
  assert.equal(tok.decode(ids, { skipSpecialTokens: true }), 'hello world');
  assert.ok(tok.isSpecial(EOT));
  assert.ok(!tok.isSpecial(ids[0]!));
  assert.equal(tok.tokenText(EOT), '<|endoftext|>');

  const llama = TextTokenizer.fromJSON(llamaJson(), LLAMA_TC);
  const l = llama.encode('<s>hello</s>');
  assert.deepEqual(l.slice(0, 2), [1, 1]); // template BOS + the written one
  assert.equal(l.at(-1), 2);
});

test('Llama-like: BOS from the TemplateProcessing post-processor; add_bos_token overrides it', () => {
  const withPp = TextTokenizer.fromJSON(llamaJson(), LLAMA_TC);
  const body = withPp.encode('hello world', { addSpecialTokens: false });
  assert.deepEqual(withPp.encode('hello world'), [1, ...body]);
  assert.equal(withPp.decode(body), 'hello world');
  assert.equal(withPp.decode([1, ...body]), '<s> hello world');
  assert.equal(withPp.decode([1, ...body], { skipSpecialTokens: true }), 'hello world');
  assert.equal(withPp.bosTokenId, 1);

  // tokenizer_config says no BOS: none, though the post-processor would add one
  const off = TextTokenizer.fromJSON(llamaJson(), { ...LLAMA_TC, add_bos_token: false });
  assert.deepEqual(off.encode('hello world'), body);

  // no post-processor: add_bos_token true adds it, absent adds nothing
  const on = TextTokenizer.fromJSON(llamaJson({ postProcessor: false }), { ...LLAMA_TC, add_bos_token: true });
  assert.deepEqual(on.encode('hello world'), [1, ...body]);
  const none = TextTokenizer.fromJSON(llamaJson({ postProcessor: false }), LLAMA_TC);
  assert.deepEqual(none.encode('hello world'), body);

  // add_eos_token
  const eos = TextTokenizer.fromJSON(llamaJson(), { ...LLAMA_TC, add_bos_token: true, add_eos_token: true });
  assert.deepEqual(eos.encode('hello world'), [1, ...body, 2]);
  assert.deepEqual(eos.encode('hello world', { addSpecialTokens: false }), body);
});

test('Llama-like: byte fallback round trip', () => {
  const tok = TextTokenizer.fromJSON(llamaJson(), LLAMA_TC);
  for (const text of TEXTS.filter((t) => !/[\t\n]|  /.test(t))) {
    assert.equal(tok.decode(tok.encode(text), { skipSpecialTokens: true }), text, text);
  }
  const e = tok.encode('é', { addSpecialTokens: false });
  assert.deepEqual(e, [259 /* ▁ */, 3 + 0xc3, 3 + 0xa9]);
});

test('incremental decoder: concatenation equals the full decode, never a lone U+FFFD', () => {
  for (const tok of [TextTokenizer.fromJSON(byteLevelJson()), TextTokenizer.fromJSON(llamaJson(), LLAMA_TC)]) {
    for (const text of TEXTS) {
      const ids = tok.encode(text, { addSpecialTokens: false });
      const full = tok.decode(ids);
      const pieces = decodeIncrementally(tok, ids);
      assert.equal(pieces.join(''), full, text);
      assert.ok(!full.includes('\uFFFD'));
      for (const p of pieces) assert.ok(!p.includes('\uFFFD'), `piece ${JSON.stringify(p)} of ${text}`);
    }
  }
});

test('incremental decoder holds back the first half of a split character', () => {
  const tok = TextTokenizer.fromJSON(byteLevelJson());
  const ids = tok.encode('日');
  assert.equal(ids.length, 2);
  assert.equal(tok.tokenText(ids[0]!), '\uFFFD'); // a lone byte decodes to U+FFFD on its own
  const dec = tok.createDecoder();
  assert.equal(dec.push(ids[0]!), '');
  assert.equal(dec.push(ids[1]!), '日');
  assert.equal(dec.flush(), '');
});

test('incremental decoder: random id sequences give the full decode', () => {
  let s = 12345;
  const rand = (n: number): number => { s = (Math.imul(s, 1103515245) + 12345) >>> 0; return s % n; };
  for (const tok of [TextTokenizer.fromJSON(byteLevelJson()), TextTokenizer.fromJSON(llamaJson(), LLAMA_TC)]) {
    for (let trial = 0; trial < 200; trial++) {
      const ids = Array.from({ length: 1 + rand(12) }, () => rand(tok.vocabSize));
      assert.equal(decodeIncrementally(tok, ids).join(''), tok.decode(ids), JSON.stringify(ids));
      assert.equal(decodeIncrementally(tok, ids, { skipSpecialTokens: true }).join(''),
        tok.decode(ids, { skipSpecialTokens: true }), JSON.stringify(ids));
    }
  }
});

test('incremental decoder keeps the leading space of a metaspace token given left context', () => {
  const tok = TextTokenizer.fromJSON(llamaJson(), LLAMA_TC);
  const prompt = tok.encode('hello');
  const all = tok.encode('hello world');
  const generated = all.slice(prompt.length);
  assert.equal(tok.decode(generated), 'world'); // decoded alone, the space is stripped
  assert.equal(decodeIncrementally(tok, generated, { prefixIds: prompt.slice(-5) }).join(''), ' world');
  assert.equal(decodeIncrementally(tok, generated).join(''), 'world');
});

test('eos ids: union of generation_config, config and tokenizer_config, deduplicated', () => {
  const tok = TextTokenizer.fromJSON(
    byteLevelJson(),
    { eos_token: { content: '<|endoftext|>', __type: 'AddedToken' } },
    { eos_token_id: [EOT, 7], bos_token_id: EOT },
    { bosTokenId: null, eosTokenIds: [9, 7], vocabSize: EOT + 1 },
  );
  assert.deepEqual(tok.eosTokenIds, [EOT, 7, 9]);
  assert.equal(tok.bosTokenId, EOT);
  assert.ok(tok.isSpecial(7) && tok.isSpecial(9));

  assert.deepEqual(TextTokenizer.fromJSON(byteLevelJson(), {}, { eos_token_id: 5 }).eosTokenIds, [5]);
  assert.deepEqual(TextTokenizer.fromJSON(byteLevelJson(), { eos_token: '<|endoftext|>' }).eosTokenIds, [EOT]);
  assert.deepEqual(TextTokenizer.fromJSON(byteLevelJson()).eosTokenIds, []);
});

test('a tokenizer larger than the model vocabulary is rejected', () => {
  assert.throws(
    () => TextTokenizer.fromJSON(byteLevelJson(), {}, {}, { bosTokenId: null, eosTokenIds: [], vocabSize: 100 }),
    (err: { code?: string }) => err.code === 'TOKENIZER_INVALID',
  );
});

test('chat template: rendered with bos/eos and add_generation_prompt; errors are VALIDATION', () => {
  const template =
    "{{ bos_token }}{% for m in messages %}{% if m.role == 'system' and not loop.first %}{{ raise_exception('system must come first') }}{% endif %}" +
    "<|{{ m.role }}|>{{ m.content }}{{ eos_token }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}";
  const tok = TextTokenizer.fromJSON(llamaJson(), { ...LLAMA_TC, chat_template: template });
  assert.equal(tok.chatTemplate, template);
  const msgs = [{ role: 'system', content: 'Be brief.' }, { role: 'user', content: 'Hi' }];
  assert.equal(tok.applyChatTemplate(msgs), '<s><|system|>Be brief.</s><|user|>Hi</s>');
  assert.equal(tok.applyChatTemplate(msgs, { addGenerationPrompt: true }), '<s><|system|>Be brief.</s><|user|>Hi</s><|assistant|>');
  assert.throws(() => tok.applyChatTemplate([msgs[1]!, msgs[0]!]),
    (err: { code?: string; message?: string }) => err.code === 'VALIDATION' && /system must come first/.test(err.message ?? ''));

  const named = TextTokenizer.fromJSON(llamaJson(), { ...LLAMA_TC, chat_template: [{ name: 'tool_use', template: 'x' }, { name: 'default', template: 'ok' }] });
  assert.equal(named.applyChatTemplate(msgs), 'ok');

  const plain = TextTokenizer.fromJSON(byteLevelJson());
  assert.equal(plain.chatTemplate, null);
  assert.throws(() => plain.applyChatTemplate(msgs), (err: { code?: string }) => err.code === 'VALIDATION');
});

test('load(): reads the folder; missing or broken tokenizer.json is TOKENIZER_INVALID', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'tok-'));
  try {
    await assert.rejects(TextTokenizer.load(dir), (err: { code?: string; message?: string }) =>
      err.code === 'TOKENIZER_INVALID' && /tokenizer\.json/.test(err.message ?? ''));
    await writeFile(join(dir, 'tokenizer.json'), '{"model": ');
    await assert.rejects(TextTokenizer.load(dir), (err: { code?: string }) => err.code === 'TOKENIZER_INVALID');
    await writeFile(join(dir, 'tokenizer.json'), '{"added_tokens": []}');
    await assert.rejects(TextTokenizer.load(dir), (err: { code?: string; message?: string }) =>
      err.code === 'TOKENIZER_INVALID' && /model/.test(err.message ?? ''));

    await writeFile(join(dir, 'tokenizer.json'), JSON.stringify(byteLevelJson({ withType: false })));
    await writeFile(join(dir, 'config.json'), JSON.stringify({ model_type: 'gpt2', vocab_size: EOT + 1, bos_token_id: EOT, eos_token_id: EOT }));
    await writeFile(join(dir, 'generation_config.json'), JSON.stringify({ eos_token_id: [EOT, 3] }));
    await writeFile(join(dir, 'chat_template.jinja'), '{% for m in messages %}{{ m.content }}{% endfor %}');
    const tok = await TextTokenizer.load(dir);
    assert.deepEqual(tok.eosTokenIds, [EOT, 3]);
    assert.equal(tok.bosTokenId, EOT);
    assert.equal(tok.decode(tok.encode('héllo')), 'héllo');
    assert.equal(tok.applyChatTemplate([{ role: 'user', content: 'x' }]), 'x');
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});
