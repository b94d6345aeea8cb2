/**
 * Several choices per request (OpenAI `n` and `best_of`, TGI `best_of`) and prompt logprobs (`echo` with
 * `logprobs`), over a real socket on the real runtime with the demo model's shape (written to a temp folder).
 * Each check compares with something computed separately: choices with single requests of the derived seeds,
 * best_of's pick with the logprobs of those single requests, echo's logprobs with the plain-loop reference.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import * as tf from '@tensorflow/tfjs-core';
import { request as http } from 'undici';
import { DEMO_LLAMA } from '../src/demo/index.ts';
import { choiceSeed } from '../src/server/routes/common.ts';
import { listeningServer, type ListeningServer } from './helpers/listening.ts';
import { argmax, fixtureCheckpoint, setupBackend, tempDir } from './helpers/tf.ts';
import { logSoftmax, referenceForward, type GetTensor } from './reference/forward.ts';

const tmp = tempDir();
let server: ListeningServer;
let config: Record<string, unknown>;
let get: GetTensor;

before(async () => {
  await setupBackend();
  ({ config, get } = await fixtureCheckpoint(join(tmp.dir, 'model'), DEMO_LLAMA));
  server = await listeningServer(tmp.dir, { logLevel: 'info', workers: 1 });
});
after(async () => {
  await server.close();
  tmp.cleanup();
});

type Json = Record<string, any>;

async function post(path: string, body: unknown): Promise<{ status: number; json: Json }> {
  const res = await http(server.url + path, { method: 'POST', body: JSON.stringify(body), headers: { 'content-type': 'application/json' } });
  return { status: res.statusCode, json: (await res.body.json()) as Json };
}

/** An SSE response's `data:` payloads, parsed (but `[DONE]`). */
async function events(path: string, body: unknown): Promise<Json[]> {
  const res = await http(server.url + path, { method: 'POST', body: JSON.stringify(body), headers: { 'content-type': 'application/json' } });
  assert.equal(res.statusCode, 200);
  const text = await res.body.text();
  return text.split('\n\n').filter((f) => f.startsWith('data: ')).map((f) => f.slice(6)).filter((d) => d !== '[DONE]').map((d) => JSON.parse(d));
}

const PROMPT = 'The quick brown fox';

/** Sequences prefilled so far (rows of prefill passes), from /metrics. */
async function prefillRows(): Promise<number> {
  const text = await (await http(`${server.url}/metrics`)).body.text();
  const line = text.split('\n').find((l) => /^lora_serve_batch_size_sum\{[^}]*kind="prefill"/.test(l));
  return line ? Number(line.split(' ').at(-1)) : 0;
}
const sum = (xs: readonly number[]) => xs.reduce((a, b) => a + b, 0);

test('greedy n=2 gives two identical choices; usage counts the prompt once and every choice\'s tokens', async () => {
  const one = await post('/v1/completions', { prompt: PROMPT, max_tokens: 6, temperature: 0, ignore_eos: true });
  const two = await post('/v1/completions', { prompt: PROMPT, max_tokens: 6, temperature: 0, ignore_eos: true, n: 2 });
  assert.equal(two.status, 200, JSON.stringify(two.json));
  assert.deepEqual(two.json.choices.map((c: Json) => c.index), [0, 1]);
  assert.deepEqual(two.json.choices.map((c: Json) => c.text), [one.json.choices[0].text, one.json.choices[0].text]);
  assert.deepEqual(two.json.usage, {
    prompt_tokens: one.json.usage.prompt_tokens, completion_tokens: 12, total_tokens: one.json.usage.prompt_tokens + 12,
  });
  const logged = server.lines.filter((l) => l.msg === 'request' && l.url === '/v1/completions').at(-1)!;
  assert.deepEqual([logged.choices, logged.generated_tokens, logged.prompt_tokens], [2, 12, one.json.usage.prompt_tokens], 'the log line counts every choice');
  const chat = await post('/v1/chat/completions', { messages: [{ role: 'user', content: 'hi' }], max_tokens: 5, temperature: 0, ignore_eos: true, n: 2 });
  assert.equal(chat.status, 200, JSON.stringify(chat.json));
  assert.equal(chat.json.choices.length, 2);
  assert.equal(chat.json.choices[0].message.content, chat.json.choices[1].message.content);
  assert.equal(chat.json.usage.completion_tokens, 10);
});

test('sampled n=3 with a seed: choice i is what a single request with seed + i gives (one shared prefill, no tensor left)', async () => {
  const body = { prompt: PROMPT, max_tokens: 8, temperature: 1.5, ignore_eos: true, seed: 1234 };
  const tensors = tf.memory().numTensors;
  const prefilled = await prefillRows();
  const three = await post('/v1/completions', { ...body, n: 3 });
  assert.equal(await prefillRows() - prefilled, 1, 'the three choices share one prefill');
  assert.equal(tf.memory().numTensors, tensors, 'no tensor leaked');
  assert.equal(three.status, 200, JSON.stringify(three.json));
  const singles = await Promise.all([0, 1, 2].map((i) => post('/v1/completions', { ...body, seed: choiceSeed(1234, i) })));
  assert.deepEqual(three.json.choices.map((c: Json) => c.text), singles.map((s) => s.json.choices[0].text));
  assert.deepEqual([0, 1, 2].map((i) => choiceSeed(1234, i)), [1234, 1235, 1236]);
  assert.equal(new Set(singles.map((s) => s.json.choices[0].text)).size, 3, 'three different samples (the check would be empty otherwise)');
  // Far above 2^53 the derivation stays exact and distinct.
  assert.deepEqual([1, 2].map((i) => choiceSeed(2 ** 60, i)), [1, 2]);
});

test('best_of=4, n=2 returns the two sequences with the highest cumulative logprob, checked against single requests', async () => {
  const body = { prompt: PROMPT, max_tokens: 6, temperature: 1.5, ignore_eos: true, seed: 99, logprobs: 0 };
  const best = await post('/v1/completions', { ...body, n: 2, best_of: 4 });
  assert.equal(best.status, 200, JSON.stringify(best.json));
  const singles = await Promise.all([0, 1, 2, 3].map((i) => post('/v1/completions', { ...body, seed: choiceSeed(99, i) })));
  const scored = singles.map((s) => ({ text: s.json.choices[0].text, score: sum(s.json.choices[0].logprobs.token_logprobs) }));
  const expected = [...scored].sort((a, b) => b.score - a.score).slice(0, 2).map((s) => s.text);
  assert.deepEqual(best.json.choices.map((c: Json) => c.text), expected);
  assert.deepEqual(best.json.choices.map((c: Json) => c.index), [0, 1]);
  assert.equal(best.json.usage.completion_tokens, 24, 'every generated sequence counts');

  const refused = await post('/v1/completions', { ...body, n: 3, best_of: 2 });
  assert.equal(refused.status, 400);
  assert.equal(refused.json.error.param, 'best_of');
  const streamed = await post('/v1/completions', { ...body, n: 1, best_of: 2, stream: true });
  assert.equal(streamed.status, 400);
  assert.equal(streamed.json.error.param, 'best_of');
  const tooMany = await post('/v1/completions', { ...body, n: 9 });
  assert.equal(tooMany.status, 400);
  assert.equal(tooMany.json.error.code, 'VALIDATION');
});

test('streaming n=2: chunks carry each choice\'s index, and each choice streams what the unstreamed request returns', async () => {
  const body = { prompt: PROMPT, max_tokens: 6, temperature: 1.2, ignore_eos: true, seed: 5, n: 2 };
  const whole = await post('/v1/completions', body);
  const chunks = await events('/v1/completions', { ...body, stream: true, stream_options: { include_usage: true } });
  const texts = ['', ''];
  for (const c of chunks) for (const ch of c.choices) texts[ch.index] += ch.text;
  assert.deepEqual(texts, whole.json.choices.map((c: Json) => c.text));
  assert.deepEqual(chunks.filter((c) => c.choices[0]?.finish_reason).map((c) => c.choices[0].index).sort(), [0, 1]);
  assert.deepEqual(chunks.at(-1)!.usage, whole.json.usage);

  const chat = await events('/v1/chat/completions', { messages: [{ role: 'user', content: 'hi' }], max_tokens: 4, temperature: 0, ignore_eos: true, n: 2, stream: true });
  const roles = chat.filter((c) => c.choices[0].delta.role === 'assistant').map((c) => c.choices[0].index).sort();
  assert.deepEqual(roles, [0, 1], 'each choice opens with its role chunk');
});

test('TGI best_of: the answer has the highest mean token logprob, the other sequence is in best_of_sequences', async () => {
  const res = await post('/generate', { inputs: PROMPT, parameters: { best_of: 3, do_sample: true, temperature: 1.5, max_new_tokens: 5, details: true, decoder_input_details: true } });
  assert.equal(res.status, 200, JSON.stringify(res.json));
  const d = res.json.details;
  assert.equal(d.best_of_sequences.length, 2);
  const mean = (s: Json) => sum(s.tokens.map((t: Json) => t.logprob)) / s.tokens.length;
  for (const other of d.best_of_sequences) {
    assert.ok(mean(d) >= mean(other), `${mean(d)} < ${mean(other)}`);
    assert.deepEqual(other.prefill, d.prefill, 'every sequence reports the prompt\'s logprobs');
    assert.notEqual(other.seed, d.seed);
  }
  assert.ok(d.prefill.length > 1);
});

test('echo with logprobs: the prompt\'s tokens with their logprobs and alternatives equal the reference\'s, for every choice, streamed or not', async () => {
  const ids: number[] = (await post('/tokenize', { inputs: PROMPT })).json.map((t: Json) => t.id);
  const res = await post('/v1/completions', { prompt: ids, max_tokens: 2, temperature: 0, echo: true, logprobs: 3 });
  assert.equal(res.status, 200, JSON.stringify(res.json));
  const lp = res.json.choices[0].logprobs;
  assert.equal(lp.tokens.length, ids.length + 2);
  assert.equal(lp.token_logprobs[0], null);
  assert.equal(lp.top_logprobs[0], null);
  const ref = referenceForward(config, get, ids).map(logSoftmax);
  for (let t = 1; t < ids.length; t++) {
    const want = ref[t - 1]!;
    assert.ok(Math.abs(lp.token_logprobs[t] - want[ids[t]!]!) < 1e-3, `prompt token ${t}: ${lp.token_logprobs[t]} vs ${want[ids[t]!]}`);
    // The alternatives: the reference's three most likely tokens, by logprob (the token itself is added when not among them).
    const top = [...want.keys()].sort((a, b) => want[b]! - want[a]!).slice(0, 3).map((i) => want[i]!);
    const got = Object.values(lp.top_logprobs[t] as Record<string, number>).sort((a, b) => b - a);
    for (let k = 0; k < 3; k++) assert.ok(Math.abs(got[k]! - top[k]!) < 1e-3, `prompt token ${t}, alternative ${k}`);
  }
  // The generated tokens follow, as without echo; the first is the reference's greedy choice.
  const plain = await post('/v1/completions', { prompt: ids, max_tokens: 2, temperature: 0, logprobs: 3 });
  assert.deepEqual(lp.tokens.slice(ids.length), plain.json.choices[0].logprobs.tokens);
  assert.equal(res.json.choices[0].text, (await post('/detokenize', { tokens: ids })).json.prompt + plain.json.choices[0].text);
  const last = ref.at(-1)!;
  assert.ok(Math.abs(lp.token_logprobs[ids.length] - last[argmax(last)]!) < 1e-3, 'the first generated token is the greedy one');


  // Two choices (sharing the prefill): both echo the prompt's logprobs; streamed, the same per choice, the prompt first.
  const body = { prompt: ids, max_tokens: 3, temperature: 1.2, seed: 8, echo: true, logprobs: 2, n: 2 };
  const two = (await post('/v1/completions', body)).json.choices;
  for (const c of two) assert.deepEqual(c.logprobs.token_logprobs.slice(0, ids.length), lp.token_logprobs.slice(0, ids.length));
  const chunks = await events('/v1/completions', { ...body, stream: true });
  for (const [i, c] of two.entries()) {
    const mine = chunks.flatMap((k) => k.choices).filter((ch) => ch.index === i);
    assert.equal(mine[0].text, (await post('/detokenize', { tokens: ids })).json.prompt, 'the echoed prompt comes first');
    assert.deepEqual(mine.flatMap((ch) => ch.logprobs.tokens), c.logprobs.tokens);
    assert.deepEqual(mine.flatMap((ch) => ch.logprobs.token_logprobs), c.logprobs.token_logprobs);
    assert.deepEqual(mine.flatMap((ch) => ch.logprobs.text_offset), c.logprobs.text_offset);
    assert.equal(mine.map((ch) => ch.text).join(''), c.text);
  }
});

// --- several prompts -----------------------------------------------------------------------------

const PROMPTS = [PROMPT, 'Once upon a time'];

test('two prompts, greedy: choice p is the single request of prompt p; usage sums each prompt once (no tensor left)', async () => {
  const body = { max_tokens: 5, temperature: 0, ignore_eos: true };
  const singles = await Promise.all(PROMPTS.map((prompt) => post('/v1/completions', { ...body, prompt })));
  const tensors = tf.memory().numTensors;
  const both = await post('/v1/completions', { ...body, prompt: PROMPTS });
  assert.equal(tf.memory().numTensors, tensors, 'no tensor leaked');
  assert.equal(both.status, 200, JSON.stringify(both.json));
  assert.deepEqual(both.json.choices.map((c: Json) => c.index), [0, 1]);
  assert.deepEqual(both.json.choices.map((c: Json) => c.text), singles.map((s) => s.json.choices[0].text));
  assert.notEqual(singles[0]!.json.choices[0].text, singles[1]!.json.choices[0].text, 'the prompts answer differently (the check would be empty otherwise)');
  const promptTokens = sum(singles.map((s) => s.json.usage.prompt_tokens));
  assert.deepEqual(both.json.usage, { prompt_tokens: promptTokens, completion_tokens: 10, total_tokens: promptTokens + 10 });

  // Token-id lists: the same as each list alone; echo prefixes each choice with its own prompt.
  const ids = [[3, 4, 5, 6], [100, 101, 102]];
  const idSingles = await Promise.all(ids.map((prompt) => post('/v1/completions', { ...body, prompt, echo: true })));
  const idBoth = await post('/v1/completions', { ...body, prompt: ids, echo: true });
  assert.equal(idBoth.status, 200, JSON.stringify(idBoth.json));
  assert.deepEqual(idBoth.json.choices.map((c: Json) => c.text), idSingles.map((s) => s.json.choices[0].text));
  assert.deepEqual(idBoth.json.usage.prompt_tokens, 7);
});

test('two prompts × n=2 (and best_of=3): choice p·n + j is choice j of prompt p alone', async () => {
  const body = { max_tokens: 6, temperature: 1.5, ignore_eos: true, seed: 7, logprobs: 0 };
  for (const extra of [{ n: 2 }, { n: 2, best_of: 3 }]) {
    const singles = await Promise.all(PROMPTS.map((prompt) => post('/v1/completions', { ...body, ...extra, prompt })));
    const both = await post('/v1/completions', { ...body, ...extra, prompt: PROMPTS });
    assert.equal(both.status, 200, JSON.stringify(both.json));
    assert.deepEqual(both.json.choices.map((c: Json) => c.index), [0, 1, 2, 3]);
    assert.deepEqual(both.json.choices.map((c: Json) => c.text), singles.flatMap((s) => s.json.choices.map((c: Json) => c.text)));
    assert.deepEqual(both.json.choices.map((c: Json) => c.logprobs), singles.flatMap((s) => s.json.choices.map((c: Json) => c.logprobs)));
    const generated = 2 * (extra.best_of ?? 2) * 6;
    assert.deepEqual(both.json.usage.completion_tokens, generated, 'every generated sequence of every prompt counts');
    assert.deepEqual(both.json.usage.prompt_tokens, sum(singles.map((s) => s.json.usage.prompt_tokens)));
  }
});

test('streaming two prompts × n=2 (with echo, with and without logprobs): chunks carry index p·n + j and reassemble to the unstreamed result', async () => {
  for (const extra of [{}, { logprobs: 1 }]) {
    const body = { prompt: PROMPTS, max_tokens: 5, temperature: 1.2, ignore_eos: true, seed: 11, n: 2, echo: true, ...extra };
    const whole = await post('/v1/completions', body);
    assert.equal(whole.status, 200, JSON.stringify(whole.json));
    assert.ok(whole.json.choices[2].text.startsWith(PROMPTS[1]), 'choice 2 echoes the second prompt');
    const chunks = await events('/v1/completions', { ...body, stream: true, stream_options: { include_usage: true } });
    const texts = ['', '', '', ''];
    const tokens: string[][] = [[], [], [], []];
    for (const c of chunks) for (const ch of c.choices) {
      texts[ch.index] += ch.text;
      tokens[ch.index]!.push(...(ch.logprobs?.tokens ?? []));
    }
    assert.deepEqual(texts, whole.json.choices.map((c: Json) => c.text));
    if ('logprobs' in extra) assert.deepEqual(tokens, whole.json.choices.map((c: Json) => c.logprobs.tokens), 'each choice streams its prompt\'s tokens, then its own');
    assert.deepEqual(chunks.filter((c) => c.choices[0]?.finish_reason).map((c) => c.choices[0].index).sort(), [0, 1, 2, 3]);
    assert.deepEqual(chunks.at(-1)!.usage, whole.json.usage);
  }
});

test('several prompts: an empty list, too many sequences, a bad token id in a later prompt are coded 400s; the server still answers', async () => {
  const empty = await post('/v1/completions', { prompt: [] });
  assert.equal(empty.status, 400);
  assert.equal(empty.json.error.code, 'VALIDATION');
  assert.match(empty.json.error.param, /^prompt/);
  const many = await post('/v1/completions', { prompt: Array.from({ length: 9 }, () => 'a'), n: 2, best_of: 4, max_tokens: 1 });
  assert.equal(many.status, 400);
  assert.deepEqual(many.json.error, {
    message: '`prompt`: 9 prompts × 4 sequences each is more than 32 sequences per request', type: 'validation', param: 'prompt', code: 'VALIDATION',
  });
  const badId = await post('/v1/completions', { prompt: [[1, 2], [3, 1_000_000]], max_tokens: 1 });
  assert.equal(badId.status, 400);
  assert.equal(badId.json.error.param, 'prompt.1.1');
  const fine = await post('/v1/completions', { prompt: Array.from({ length: 8 }, () => 'a'), best_of: 4, max_tokens: 1 });
  assert.equal(fine.status, 200, JSON.stringify(fine.json));
  assert.equal(fine.json.choices.length, 8);
});
