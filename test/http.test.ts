/**
 * The HTTP layer over a scripted engine and in-memory adapters (test/helpers/app.ts). Every
 * response is also checked against openapi.yaml by the helper's inject().
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { request as httpRequest } from 'undici';
import { fail } from '../src/errors.ts';
import { BASE_MODEL, build, fixtureTokenizer, sseData } from './helpers/app.ts';
import { multipart } from './helpers/store-app.ts';

const json = (body: unknown) => ({ payload: JSON.stringify(body), headers: { 'content-type': 'application/json' } });

const CONFIG = JSON.stringify({ r: 8, lora_alpha: 16, target_modules: ['q_proj'], peft_type: 'LORA' });

// ------------------------------------------------------------------------------------------------
// POST /generate

test('POST /generate: generated text, TGI headers, defaults passed to the engine', async () => {
  const s = await build();
  const res = await s.inject({ method: 'POST', url: '/generate', ...json({ inputs: 'The weather today' }) });
  assert.equal(res.statusCode, 200);
  assert.deepEqual(res.json(), { generated_text: ' Hello world' });
  for (const h of ['x-queue-time', 'x-inference-time', 'x-time-per-token', 'x-total-time']) assert.match(String(res.headers[h]), /^\d+$/, h);
  assert.equal(res.headers['x-queue-time'], '2');
  assert.equal(res.headers['x-inference-time'], '30');
  assert.equal(res.headers['x-generated-tokens'], '3');
  assert.equal(res.headers['x-adapter-id'], undefined);
  const req = s.engine.requests[0]!;
  assert.deepEqual(req.inputIds, fixtureTokenizer('llama').encode('The weather today'));
  assert.equal(res.headers['x-prompt-tokens'], String(req.inputIds.length));
  assert.equal(req.maxNewTokens, 20);
  assert.equal(req.adapterId, null);
  assert.equal(req.sampling.doSample, false);
  assert.deepEqual(req.stop, []);
  assert.ok(req.signal instanceof AbortSignal);
  assert.equal(req.timeoutMs, undefined);
});

test('POST /generate: details, prefill with decoder_input_details, top_tokens, seed', async () => {
  const s = await build();
  const res = await s.inject({
    method: 'POST', url: '/generate',
    ...json({ inputs: 'Hi', parameters: { details: true, decoder_input_details: true, top_n_tokens: 2, do_sample: true, seed: 7, max_new_tokens: 5, stop: ['x'] } }),
  });
  assert.equal(res.statusCode, 200);
  const d = res.json().details;
  assert.equal(d.finish_reason, 'eos_token');
  assert.equal(d.generated_tokens, 3);
  assert.equal(d.seed, 7);
  assert.deepEqual(d.tokens.at(-1), { id: 2, text: '</s>', logprob: -0.5, special: true });
  assert.equal(d.prefill[0].logprob, null);
  assert.equal(d.prefill.length, d.prompt_tokens);
  assert.equal(d.top_tokens.length, 3);
  assert.equal(d.top_tokens[0].length, 2);
  const req = s.engine.requests[0]!;
  assert.equal(req.maxNewTokens, 5);
  assert.deepEqual(req.stop, ['x']);
  assert.equal(req.decoderInputDetails, true);
  assert.equal(req.sampling.seed, 7);

  const plain = await s.inject({ method: 'POST', url: '/generate', ...json({ inputs: 'Hi', parameters: { details: true } }) });
  assert.deepEqual(plain.json().details.prefill, []);
  assert.equal(plain.json().details.top_tokens, undefined);
  assert.equal(plain.json().details.seed, null);
});

test('POST /generate: return_full_text prepends the prompt, truncate keeps the last tokens', async () => {
  const s = await build();
  const res = await s.inject({ method: 'POST', url: '/generate', ...json({ inputs: 'The river is high', parameters: { return_full_text: true, truncate: 2 } }) });
  assert.equal(res.json().generated_text, 'The river is high Hello world');
  const full = fixtureTokenizer('llama').encode('The river is high');
  assert.deepEqual(s.engine.requests[0]!.inputIds, full.slice(-2));
});

test('POST /generate: adapter_id at the top level or in parameters; conflicts and bad ids are rejected', async () => {
  const s = await build();
  const gen = (body: object) => s.inject({ method: 'POST', url: '/generate', ...json({ inputs: 'Hi', ...body }) });

  assert.equal((await gen({ adapter_id: 'demo' })).headers['x-adapter-id'], 'demo');
  assert.equal((await gen({ parameters: { adapter_id: 'org/style' } })).statusCode, 200);
  assert.equal((await gen({ adapter_id: 'demo', parameters: { adapter_id: 'demo' } })).statusCode, 200);
  assert.equal((await gen({ adapter_id: BASE_MODEL })).statusCode, 200);
  assert.equal((await gen({ adapter_id: '' })).statusCode, 200);
  assert.deepEqual(s.engine.requests.map((r) => r.adapterId), ['demo', 'org/style', 'demo', null, null]);

  const conflict = await gen({ adapter_id: 'demo', parameters: { adapter_id: 'org/style' } });
  assert.equal(conflict.statusCode, 422);
  assert.equal(conflict.json().code, 'VALIDATION');
  assert.match(conflict.json().error, /conflicting adapter ids/);

  const bad = await gen({ adapter_id: '../etc' });
  assert.equal(bad.statusCode, 400);
  assert.equal(bad.json().code, 'ADAPTER_INVALID_ID');

  // Unknown adapters are an error, never the base model (TGI #2505).
  const unknown = await gen({ adapter_id: 'nope' });
  assert.equal(unknown.statusCode, 404);
  assert.deepEqual(unknown.json(), { error: 'adapter "nope" not found', error_type: 'adapter_not_found', code: 'ADAPTER_NOT_FOUND' });
});

test('POST /generate: validation errors are 422 {error, error_type, code}', async () => {
  const s = await build();
  const gen = (body: unknown) => s.inject({ method: 'POST', url: '/generate', ...json(body) });
  const cases: [unknown, string, RegExp][] = [
    [{}, 'VALIDATION', /inputs/],
    [{ inputs: 5 }, 'VALIDATION', /inputs/],
    [{ inputs: 'x', parameters: { max_new_tokens: '5' } }, 'VALIDATION', /max_new_tokens/],
    [{ inputs: 'x', parameters: { max_new_tokens: 0 } }, 'VALIDATION', /max_new_tokens/],
    [{ inputs: 'x', parameters: { temperature: 0 } }, 'VALIDATION', /temperature/],
    [{ inputs: 'x', parameters: { top_p: 1.5 } }, 'VALIDATION', /top_p/],
    [{ inputs: 'x', parameters: { top_n_tokens: 9 } }, 'VALIDATION', /top_n_tokens/],
    [{ inputs: 'x', parameters: { stop: ['a', 'b', 'c', 'd', 'e'] } }, 'VALIDATION', /stop/],
    [{ inputs: 'x', parameters: { best_of: 2 } }, 'VALIDATION', /^you must use sampling when `best_of` is > 1$/],
    [{ inputs: 'x', parameters: { best_of: 2, do_sample: true, seed: 1 } }, 'VALIDATION', /^`seed` must not be set when `best_of` > 1$/],
    [{ inputs: 'x', parameters: { best_of: 9, do_sample: true } }, 'VALIDATION', /best_of/],
    [{ inputs: 'x', parameters: { watermark: true } }, 'UNSUPPORTED_PARAMETER', /^`parameters\.watermark`: watermarking is not supported; accepted: false$/],
    [{ inputs: 'x', parameters: { max_new_token: 5 } }, 'UNKNOWN_FIELD', /^unknown field `parameters\.max_new_token`; known fields of `parameters`: .*\bmax_new_tokens\b/],
    [{ inputs: 'x', input: 'y' }, 'UNKNOWN_FIELD', /^unknown field `input`; known fields: adapter_id, inputs, parameters, stream$/],
    [{ inputs: 'x', parameters: { truncate: 1000 } }, 'VALIDATION', /truncate/],
    [{ inputs: 'word '.repeat(100) }, 'INPUT_TOO_LONG', /must have at most 64 tokens/],
    [{ inputs: 'word '.repeat(15), parameters: { max_new_tokens: 80 } }, 'INPUT_TOO_LONG', /must be <= 96/],
  ];
  for (const [body, code, message] of cases) {
    const res = await gen(body);
    assert.equal(res.statusCode, 422, JSON.stringify(body));
    assert.equal(res.json().code, code, JSON.stringify(body));
    assert.equal(res.json().error_type, 'validation');
    assert.match(res.json().error, message);
  }
  assert.equal(s.engine.requests.length, 0);

});

test('POST /generate: a default max_new_tokens that does not fit is shortened', async () => {
  const s = await build({ options: { maxTotalTokens: 70 } });
  const inputs = 'word '.repeat(20);
  const n = fixtureTokenizer('llama').encode(inputs).length;
  assert.ok(n <= 64 && n + 20 > 70, `fixture prompt has ${n} tokens`);
  const res = await s.inject({ method: 'POST', url: '/generate', ...json({ inputs }) });
  assert.equal(res.statusCode, 200);
  assert.equal(s.engine.requests[0]!.maxNewTokens, 70 - n);
});

test('malformed bodies: bad JSON 400, too large 413, wrong content type 415', async () => {
  const s = await build();
  const badJson = await s.inject({ method: 'POST', url: '/generate', payload: '{"inputs":', headers: { 'content-type': 'application/json' } });
  assert.equal(badJson.statusCode, 400);
  assert.equal(badJson.json().code, 'BAD_REQUEST');
  const big = await s.inject({ method: 'POST', url: '/generate', ...json({ inputs: 'x'.repeat(70 * 1024) }) });
  assert.equal(big.statusCode, 413);
  assert.equal(big.json().code, 'PAYLOAD_TOO_LARGE');
  const text = await s.inject({ method: 'POST', url: '/generate', payload: 'hello', headers: { 'content-type': 'text/csv' } });
  assert.equal(text.statusCode, 415);
  assert.equal(text.json().code, 'UNSUPPORTED_MEDIA_TYPE');
});

test('engine rejections keep their catalogue status; 5xx bodies do not leak internals', async () => {
  const s = await build();
  const gen = () => s.inject({ method: 'POST', url: '/generate', ...json({ inputs: 'Hi' }) });

  s.engine.script = { ...s.engine.script, reject: fail('OVERLOADED', 'the queue is full', { retryAfter: 1 }) };
  const overloaded = await gen();
  assert.equal(overloaded.statusCode, 429);
  assert.equal(overloaded.headers['retry-after'], '1');
  assert.equal(overloaded.json().error_type, 'overloaded');

  s.engine.script = { ...s.engine.script, reject: fail('SHUTTING_DOWN', 'the server is shutting down') };
  assert.equal((await gen()).statusCode, 503);

  s.engine.script = { tokens: [{ id: 5, text: 'a' }], finishReason: 'length', failAfter: { tokens: 0, error: fail('GENERATION', 'generation failed') } };
  const failed = await gen();
  assert.equal(failed.statusCode, 424);
  assert.equal(failed.json().code, 'GENERATION');

  s.engine.script = { ...s.engine.script, failAfter: undefined, reject: new Error('secret /opt/model path') as never };
  const internal = await gen();
  assert.equal(internal.statusCode, 500);
  assert.deepEqual(internal.json(), { error: 'internal server error', error_type: 'internal', code: 'INTERNAL' });
  assert.doesNotMatch(internal.body, /secret/);

  s.engine.script = { ...s.engine.script, reject: fail('BACKEND_UNAVAILABLE', 'libtensorflow.so not found in /usr/lib') };
  const backend = await gen();
  assert.equal(backend.statusCode, 500);
  assert.deepEqual(backend.json(), { error: 'internal server error', error_type: 'backend', code: 'BACKEND_UNAVAILABLE' });
});

// ------------------------------------------------------------------------------------------------
// POST /generate_stream

test('POST /generate_stream: TGI SSE framing, last event carries generated_text and details', async () => {
  const s = await build();
  const res = await s.inject({ method: 'POST', url: '/generate_stream', ...json({ inputs: 'Hi', adapter_id: 'demo', parameters: { return_full_text: true } }) });
  assert.equal(res.statusCode, 200);
  assert.match(String(res.headers['content-type']), /^text\/event-stream/);
  assert.equal(res.headers['x-adapter-id'], 'demo');
  assert.ok(res.body.startsWith('data:{"index":1,'), res.body);
  assert.ok(res.body.endsWith('\n\n'));
  assert.doesNotMatch(res.body, /\[DONE\]/);
  const events = sseData(res.body).map((d) => JSON.parse(d));
  assert.deepEqual(events.map((e) => e.index), [1, 2, 3]);
  assert.deepEqual(events[0], { index: 1, token: { id: 10, text: ' Hello', logprob: -0.5, special: false }, generated_text: null, details: null });
  const last = events[2];
  assert.deepEqual(last.token, { id: 2, text: '</s>', logprob: -0.5, special: true });
  assert.equal(last.generated_text, 'Hi Hello world');
  assert.deepEqual(last.details, { finish_reason: 'eos_token', generated_tokens: 3, seed: null, input_length: s.engine.requests[0]!.inputIds.length });
});

test('POST /generate_stream: top_tokens per event; errors mid-stream as data:{error, error_type}', async () => {
  const s = await build();
  const top = await s.inject({ method: 'POST', url: '/generate_stream', ...json({ inputs: 'Hi', parameters: { top_n_tokens: 2 } }) });
  assert.equal(JSON.parse(sseData(top.body)[0]!).top_tokens.length, 2);

  s.engine.script = { ...s.engine.script, failAfter: { tokens: 1, error: fail('GENERATION', 'the device ran out of memory') } };
  const res = await s.inject({ method: 'POST', url: '/generate_stream', ...json({ inputs: 'Hi' }) });
  assert.equal(res.statusCode, 200);
  const events = sseData(res.body).map((d) => JSON.parse(d));
  assert.equal(events.length, 2);
  assert.equal(events[0].index, 1);
  assert.deepEqual(events[1], { error: 'the device ran out of memory', error_type: 'generation', code: 'GENERATION' });
});

test('POST /generate_stream: errors before the first event are plain JSON errors', async () => {
  const s = await build();
  const unknown = await s.inject({ method: 'POST', url: '/generate_stream', ...json({ inputs: 'Hi', adapter_id: 'nope' }) });
  assert.equal(unknown.statusCode, 404);
  assert.equal(unknown.json().code, 'ADAPTER_NOT_FOUND');
  const prefill = await s.inject({ method: 'POST', url: '/generate_stream', ...json({ inputs: 'Hi', parameters: { decoder_input_details: true } }) });
  assert.equal(prefill.statusCode, 422);
  s.engine.script = { ...s.engine.script, reject: fail('OVERLOADED', 'full', { retryAfter: 2 }) };
  const overloaded = await s.inject({ method: 'POST', url: '/generate_stream', ...json({ inputs: 'Hi' }) });
  assert.equal(overloaded.statusCode, 429);
  assert.equal(overloaded.headers['retry-after'], '2');
});

// ------------------------------------------------------------------------------------------------
// OpenAI-compatible

test('POST /v1/completions: response shape, model selects the adapter, temperature 0 is greedy', async () => {
  const s = await build();
  const res = await s.inject({ method: 'POST', url: '/v1/completions', ...json({ model: 'demo', prompt: 'Hi', temperature: 0 }) });
  assert.equal(res.statusCode, 200);
  const body = res.json();
  assert.match(body.id, /^cmpl-/);
  assert.equal(body.object, 'text_completion');
  assert.equal(body.model, 'demo');
  assert.deepEqual(body.choices, [{ index: 0, text: ' Hello world', logprobs: null, finish_reason: 'stop' }]);
  const req = s.engine.requests[0]!;
  assert.deepEqual(body.usage, { prompt_tokens: req.inputIds.length, completion_tokens: 3, total_tokens: req.inputIds.length + 3 });
  assert.equal(req.adapterId, 'demo');
  assert.equal(req.sampling.doSample, false);
  assert.equal(req.maxNewTokens, 16);

  await s.inject({ method: 'POST', url: '/v1/completions', ...json({ model: BASE_MODEL, prompt: ['Hi'], max_tokens: 4, seed: 3, top_p: 0.9 }) });
  const sampled = s.engine.requests[1]!;
  assert.equal(sampled.adapterId, null);
  assert.equal(sampled.sampling.doSample, true);
  assert.equal(sampled.sampling.seed, 3);
  assert.equal(sampled.sampling.topP, 0.9);
  assert.equal(sampled.maxNewTokens, 4);
});

test('POST /v1/completions: logprobs, echo, and stop sequences left out of the text', async () => {
  const s = await build();
  s.engine.script = { tokens: [{ id: 10, text: ' Hello' }, { id: 11, text: ' world' }, { id: 12, text: ' STOP' }], finishReason: 'stop_sequence' };
  const res = await s.inject({ method: 'POST', url: '/v1/completions', ...json({ prompt: 'Hi', stop: ' STOP', logprobs: 1, echo: true }) });
  const choice = res.json().choices[0];
  assert.equal(choice.text, 'Hi Hello world');
  assert.equal(choice.finish_reason, 'stop');
  // With echo, the prompt's tokens come first (offsets from 0, the first with null logprobs), then the generated ones.
  const prompt = fixtureTokenizer('llama').encode('Hi').map((id) => `t${id}`);
  assert.deepEqual(choice.logprobs.tokens, [...prompt, ' Hello', ' world', ' STOP']);
  assert.deepEqual(choice.logprobs.text_offset.slice(prompt.length), [2, 8, 14]);
  assert.equal(choice.logprobs.text_offset[0], 0);
  assert.equal(choice.logprobs.token_logprobs[0], null);
  assert.equal(choice.logprobs.top_logprobs[0], null);
  assert.deepEqual(choice.logprobs.top_logprobs[1], { [prompt[1]!]: -1 });
  assert.deepEqual(choice.logprobs.top_logprobs[prompt.length], { ' Hello': -0.5 });
  assert.deepEqual(s.engine.requests[0]!.stop, [' STOP']);
  assert.equal(s.engine.requests[0]!.decoderInputDetails, true);

  // Streamed: the echoed prompt is the first chunk, with the prompt's logprobs; then the tokens (each chunk checked against openapi.yaml).
  const streamed = await s.inject({ method: 'POST', url: '/v1/completions', ...json({ prompt: 'Hi', stop: ' STOP', logprobs: 1, echo: true, stream: true }) });
  const chunks = sseData(streamed.body).slice(0, -1).map((d) => JSON.parse(d).choices[0]);
  assert.equal(chunks[0].text, 'Hi');
  assert.deepEqual(chunks[0].logprobs.tokens, prompt);
  assert.equal(chunks[0].logprobs.token_logprobs[0], null);
  assert.deepEqual(chunks.flatMap((c) => c.logprobs?.tokens ?? []), choice.logprobs.tokens);
  assert.equal(chunks.map((c) => c.text).join(''), choice.text);
});

test('POST /v1/completions stream: data: chunks, finish_reason, usage, [DONE]', async () => {
  const s = await build();
  s.engine.script = { tokens: [{ id: 10, text: ' Hello' }, { id: 11, text: ' world' }, { id: 12, text: ' STOP' }], finishReason: 'stop_sequence' };
  const res = await s.inject({ method: 'POST', url: '/v1/completions', ...json({ prompt: 'Hi', stop: [' STOP'], stream: true, stream_options: { include_usage: true } }) });
  assert.equal(res.statusCode, 200);
  assert.match(String(res.headers['content-type']), /^text\/event-stream/);
  assert.ok(res.body.startsWith('data: {'));
  assert.ok(res.body.endsWith('data: [DONE]\n\n'));
  const data = sseData(res.body);
  assert.equal(data.at(-1), '[DONE]');
  const chunks = data.slice(0, -1).map((d) => JSON.parse(d));
  const withChoices = chunks.filter((c) => c.choices.length > 0);
  assert.equal(withChoices.map((c) => c.choices[0].text).join(''), ' Hello world');
  assert.equal(withChoices.at(-1).choices[0].finish_reason, 'stop');
  assert.ok(withChoices.slice(0, -1).every((c) => c.choices[0].finish_reason === null && c.usage === null));
  const usage = chunks.at(-1);
  assert.deepEqual(usage.choices, []);
  assert.equal(usage.usage.completion_tokens, 3);
  assert.ok(chunks.every((c) => c.id === chunks[0].id && c.object === 'text_completion'));
});

test('OpenAI routes answer errors as {error: {message, type, param, code}}, validation errors with 400', async () => {
  const s = await build();
  const suffix = await s.inject({ method: 'POST', url: '/v1/completions', ...json({ prompt: 'Hi', suffix: 'end' }) });
  assert.equal(suffix.statusCode, 400);
  assert.deepEqual(suffix.json(), { error: { message: '`suffix`: insertion (suffix) is not supported; accepted: ""', type: 'validation', param: 'suffix', code: 'UNSUPPORTED_PARAMETER' } });
  const schema = await s.inject({ method: 'POST', url: '/v1/completions', ...json({ prompt: 5 }) });
  assert.equal(schema.statusCode, 400);
  assert.equal(schema.json().error.code, 'VALIDATION');
  assert.equal(schema.json().error.param, 'prompt');
  const typo = await s.inject({ method: 'POST', url: '/v1/chat/completions', ...json({ messages: [{ role: 'user', content: 'Hi' }], max_token: 5 }) });
  assert.equal(typo.statusCode, 400);
  assert.equal(typo.json().error.code, 'UNKNOWN_FIELD');
  assert.equal(typo.json().error.param, 'max_token');
  assert.match(typo.json().error.message, /^unknown field `max_token`; known fields: .*\bmax_tokens\b/);
  const long = await s.inject({ method: 'POST', url: '/v1/completions', ...json({ prompt: 'word '.repeat(15), max_tokens: 80 }) });
  assert.equal(long.statusCode, 400);
  assert.equal(long.json().error.code, 'INPUT_TOO_LONG');
  assert.match(long.json().error.message, /^`prompt` tokens \+ `max_tokens` must be <= 96\. Given: \d+ `prompt` tokens and 80 `max_tokens`$/);
  const chat = await s.inject({ method: 'POST', url: '/v1/chat/completions', ...json({ messages: [{ role: 'user', content: 'word '.repeat(100) }] }) });
  assert.equal(chat.statusCode, 400);
  assert.match(chat.json().error.message, /^`messages` must have at most 64 tokens\. Given: \d+$/);
  const unknown = await s.inject({ method: 'POST', url: '/v1/completions', ...json({ prompt: 'Hi', model: 'nope' }) });
  assert.equal(unknown.statusCode, 404);
  assert.equal(unknown.json().error.type, 'adapter_not_found');

  s.engine.script = { ...s.engine.script, failAfter: { tokens: 1, error: fail('TIMEOUT', 'the request timed out') } };
  const mid = await s.inject({ method: 'POST', url: '/v1/completions', ...json({ prompt: 'Hi', stream: true }) });
  const data = sseData(mid.body);
  assert.equal(data.at(-1), '[DONE]');
  assert.deepEqual(JSON.parse(data.at(-2)!), { error: { message: 'the request timed out', type: 'timeout', param: null, code: 'TIMEOUT' } });
});

test('POST /v1/chat/completions: chat template, response, stream with role chunk and [DONE]', async () => {
  const s = await build();
  const messages = [{ role: 'system', content: 'Be brief.' }, { role: 'user', content: [{ type: 'text', text: 'Hi' }] }];
  const res = await s.inject({ method: 'POST', url: '/v1/chat/completions', ...json({ model: 'org/style', messages, logprobs: true, top_logprobs: 1 }) });
  assert.equal(res.statusCode, 200);
  const body = res.json();
  assert.equal(body.object, 'chat.completion');
  assert.equal(body.model, 'org/style');
  assert.deepEqual(body.choices[0].message, { role: 'assistant', content: ' Hello world' });
  assert.equal(body.choices[0].finish_reason, 'stop');
  assert.deepEqual(body.choices[0].logprobs.content[0].bytes, [...Buffer.from(' Hello')]);
  assert.equal(body.choices[0].logprobs.content[0].top_logprobs.length, 1);
  const tok = fixtureTokenizer('llama');
  const prompt = tok.applyChatTemplate([{ role: 'system', content: 'Be brief.' }, { role: 'user', content: 'Hi' }], { addGenerationPrompt: true });
  const req = s.engine.requests[0]!;
  assert.deepEqual(req.inputIds, tok.encode(prompt, { addSpecialTokens: false }));
  assert.equal(req.maxNewTokens, 96 - req.inputIds.length);

  const stream = await s.inject({ method: 'POST', url: '/v1/chat/completions', ...json({ messages, stream: true, max_tokens: 8 }) });
  const data = sseData(stream.body);
  assert.equal(data.at(-1), '[DONE]');
  const chunks = data.slice(0, -1).map((d) => JSON.parse(d));
  assert.deepEqual(chunks[0].choices[0].delta, { role: 'assistant', content: '' });
  assert.equal(chunks.map((c) => c.choices[0].delta.content ?? '').join(''), ' Hello world');
  assert.equal(chunks.at(-1).choices[0].finish_reason, 'stop');
  assert.ok(chunks.every((c) => c.object === 'chat.completion.chunk'));
});

test('POST /v1/chat/completions: no chat template, bad content and tools are clear 400s', async () => {
  const noTemplate = await build({ tokenizer: 'gpt2' });
  const res = await noTemplate.inject({ method: 'POST', url: '/v1/chat/completions', ...json({ messages: [{ role: 'user', content: 'Hi' }] }) });
  assert.equal(res.statusCode, 400);
  assert.match(res.json().error.message, /no chat template/);

  const s = await build();
  const image = await s.inject({ method: 'POST', url: '/v1/chat/completions', ...json({ messages: [{ role: 'user', content: [{ type: 'image_url' }] }] }) });
  assert.equal(image.statusCode, 400);
  assert.match(image.json().error.message, /only text content parts/);
  assert.equal(image.json().error.param, 'messages.0.content.0');
  const tools = await s.inject({ method: 'POST', url: '/v1/chat/completions', ...json({ messages: [{ role: 'user', content: 'Hi' }], tools: [{ type: 'function' }] }) });
  assert.equal(tools.statusCode, 400);
  assert.equal(tools.json().error.code, 'UNSUPPORTED_PARAMETER');
  const role = await s.inject({ method: 'POST', url: '/v1/chat/completions', ...json({ messages: [{ role: 'wizard', content: 'Hi' }] }) });
  assert.equal(role.statusCode, 400);
  assert.match(role.json().error.message, /Unknown role/);
});

test('GET /v1/models: the base model and every adapter with its parent', async () => {
  const s = await build();
  const res = await s.inject({ method: 'GET', url: '/v1/models' });
  const body = res.json();
  assert.equal(body.object, 'list');
  assert.deepEqual(body.data.map((m: { id: string; parent?: string }) => [m.id, m.parent]), [[BASE_MODEL, undefined], ['demo', BASE_MODEL], ['org/style', BASE_MODEL]]);
  assert.ok(body.data.every((m: { object: string; owned_by: string; created: number }) => m.object === 'model' && m.owned_by && Number.isInteger(m.created)));
});

// ------------------------------------------------------------------------------------------------
// Adapters

test('GET /adapters and /adapters/{id} (org/name ids, encoded slash, invalid ids)', async () => {
  const s = await build();
  const list = await s.inject({ method: 'GET', url: '/adapters' });
  assert.deepEqual(list.json().adapters.map((a: { id: string }) => a.id), ['demo', 'org/style']);
  assert.equal(list.json().cache.max_device_adapters, 16);
  const one = await s.inject({ method: 'GET', url: '/adapters/org/style' });
  assert.equal(one.json().id, 'org/style');
  assert.deepEqual(one.json().target_modules, ['q_proj', 'v_proj']);
  assert.equal((await s.inject({ method: 'GET', url: '/adapters/org%2Fstyle' })).json().id, 'org/style');
  const missing = await s.inject({ method: 'GET', url: '/adapters/nope' });
  assert.equal(missing.statusCode, 404);
  assert.equal(missing.json().code, 'ADAPTER_NOT_FOUND');
  for (const bad of ['/adapters/a/b/c', '/adapters/..%2Fsecret', '/adapters/.hidden']) {
    const res = await s.inject({ method: 'GET', url: bad });
    assert.equal(res.statusCode, 400, bad);
    assert.equal(res.json().code, 'ADAPTER_INVALID_ID', bad);
  }
});

test('PUT /adapters/{id}: multipart upload, missing part 422, oversize 413, bad config 422, not multipart 415', async () => {
  const s = await build();
  const weights = Buffer.alloc(1000, 7);
  const ok = await s.inject({ method: 'PUT', url: '/adapters/org/new', ...multipart([
    { name: 'config', filename: 'adapter_config.json', content: CONFIG },
    { name: 'weights', filename: 'adapter_model.safetensors', content: weights },
  ]) });
  assert.equal(ok.statusCode, 200, ok.body);
  assert.equal(ok.json().id, 'org/new');
  assert.equal(ok.json().source, 'upload');
  assert.deepEqual(s.adapters.uploads[0]!.config, JSON.parse(CONFIG));
  assert.deepEqual(Buffer.from(s.adapters.uploads[0]!.weights), weights);

  // config as a plain text field works too
  const field = await s.inject({ method: 'PUT', url: '/adapters/x', ...multipart([{ name: 'config', content: CONFIG }, { name: 'weights', filename: 'w', content: weights }]) });
  assert.equal(field.statusCode, 200);

  const missing = await s.inject({ method: 'PUT', url: '/adapters/x', ...multipart([{ name: 'config', filename: 'c.json', content: CONFIG }]) });
  assert.equal(missing.statusCode, 422);
  assert.match(missing.json().error, /missing part "weights"/);

  const big = await s.inject({ method: 'PUT', url: '/adapters/x', ...multipart([
    { name: 'config', filename: 'c.json', content: CONFIG }, { name: 'weights', filename: 'w', content: Buffer.alloc(5000) },
  ]) });
  assert.equal(big.statusCode, 413);
  assert.equal(big.json().code, 'ADAPTER_TOO_LARGE');
  const together = await s.inject({ method: 'PUT', url: '/adapters/x', ...multipart([
    { name: 'config', filename: 'c.json', content: CONFIG + ' '.repeat(2000) }, { name: 'weights', filename: 'w', content: Buffer.alloc(3000) },
  ]) });
  assert.equal(together.statusCode, 413);

  const badJson = await s.inject({ method: 'PUT', url: '/adapters/x', ...multipart([{ name: 'config', filename: 'c', content: '{r:' }, { name: 'weights', filename: 'w', content: weights }]) });
  assert.equal(badJson.statusCode, 422);
  assert.equal(badJson.json().code, 'ADAPTER_INVALID_CONFIG');
  const invalid = await s.inject({ method: 'PUT', url: '/adapters/x', ...multipart([{ name: 'config', filename: 'c', content: '{}' }, { name: 'weights', filename: 'w', content: weights }]) });
  assert.equal(invalid.json().code, 'ADAPTER_INVALID_CONFIG');
  const extra = await s.inject({ method: 'PUT', url: '/adapters/x', ...multipart([{ name: 'other', filename: 'o', content: 'x' }]) });
  assert.equal(extra.statusCode, 422);

  const notMultipart = await s.inject({ method: 'PUT', url: '/adapters/x', ...json({ config: {} }) });
  assert.equal(notMultipart.statusCode, 415);
  assert.match(notMultipart.json().error, /multipart\/form-data/);
  const badId = await s.inject({ method: 'PUT', url: '/adapters/a/b/c', ...multipart([{ name: 'config', content: CONFIG }]) });
  assert.equal(badId.statusCode, 400);
});

test('DELETE /adapters/{id}, POST /adapters/{id}/load?pin=true and /unload', async () => {
  const s = await build();
  const load = await s.inject({ method: 'POST', url: '/adapters/org/style/load?pin=true' });
  assert.equal(load.statusCode, 200);
  assert.deepEqual([load.json().state, load.json().tier, load.json().pinned], ['ready', 'device', true]);
  const unload = await s.inject({ method: 'POST', url: '/adapters/org/style/unload' });
  assert.equal(unload.json().pinned, false);
  assert.equal((await s.inject({ method: 'POST', url: '/adapters/demo/load' })).json().pinned, false);
  const badPin = await s.inject({ method: 'POST', url: '/adapters/demo/load?pin=yes' });
  assert.equal(badPin.statusCode, 422);
  const noAction = await s.inject({ method: 'POST', url: '/adapters/demo' });
  assert.equal(noAction.statusCode, 404);
  assert.equal(noAction.json().code, 'NOT_FOUND');
  assert.equal((await s.inject({ method: 'POST', url: '/adapters/nope/load' })).statusCode, 404);

  const del = await s.inject({ method: 'DELETE', url: '/adapters/demo' });
  assert.deepEqual(del.json(), { id: 'demo', deleted: true });
  const again = await s.inject({ method: 'DELETE', url: '/adapters/demo' });
  assert.equal(again.statusCode, 404);
  assert.equal(again.json().code, 'ADAPTER_NOT_FOUND');
});

// ------------------------------------------------------------------------------------------------
// Service routes, auth, 404

test('GET /health: 503 NOT_READY before ready(), 200 after', async () => {
  const s = await build();
  s.setReady(false);
  const before = await s.inject({ method: 'GET', url: '/health' });
  assert.equal(before.statusCode, 503);
  assert.equal(before.json().code, 'NOT_READY');
  s.setReady(true);
  const after = await s.inject({ method: 'GET', url: '/health' });
  assert.equal(after.statusCode, 200);
  assert.deepEqual(after.json(), { status: 'ok' });
});

test('GET /info, GET /metrics, GET /openapi.yaml', async () => {
  const s = await build();
  const info = (await s.inject({ method: 'GET', url: '/info' })).json();
  assert.equal(info.model_id, BASE_MODEL);
  assert.equal(info.model_sha, null, 'a model folder has no Hub commit');
  assert.equal(info.max_input_tokens, 64);
  assert.equal(info.max_total_tokens, 96);
  assert.equal(info.chat_template, true);
  assert.equal(info.lora.max_loaded_adapters, 16);
  assert.equal(info.webgpu_adapter, null, 'not on webgpu');
  const metrics = await s.inject({ method: 'GET', url: '/metrics' });
  assert.match(String(metrics.headers['content-type']), /^text\/plain/);
  assert.match(metrics.body, /lora_serve_http_requests_total\{route="\/info",method="GET",status="200"\} 1/);
  assert.match(metrics.body, /lora_serve_tfjs_memory_bytes 1234/);
  const doc = await s.inject({ method: 'GET', url: '/openapi.yaml' });
  assert.match(doc.body, /^openapi: 3\.1\.0/);
});

test('GET /info names the WebGPU adapter and its limits on the webgpu backend', async () => {
  const webgpuAdapter = {
    vendor: 'mesa', architecture: 'software', device: 'llvmpipe', description: 'llvmpipe: Mesa 25.0.7', software: true,
    maxStorageBufferBindingSize: 128 * 2 ** 20, maxBufferSize: 2 ** 32 - 1,
  };
  const s = await build({ info: { backend: 'webgpu', webgpuAdapter } });
  const info = (await s.inject({ method: 'GET', url: '/info' })).json();
  assert.equal(info.backend, 'webgpu');
  assert.deepEqual(info.webgpu_adapter, {
    vendor: 'mesa', architecture: 'software', device: 'llvmpipe', description: 'llvmpipe: Mesa 25.0.7', software: true,
    max_storage_buffer_binding_size: 128 * 2 ** 20, max_buffer_size: 2 ** 32 - 1,
  });
});

test('--api-key: Bearer required everywhere but /health (and /metrics with --metrics-public)', async () => {
  const s = await build({ options: { apiKey: 'sesame' } });
  const gen = (headers: Record<string, string>) => s.inject({ method: 'POST', url: '/generate', payload: JSON.stringify({ inputs: 'Hi' }), headers: { 'content-type': 'application/json', ...headers } });
  const none = await gen({});
  assert.equal(none.statusCode, 401);
  assert.equal(none.json().code, 'UNAUTHORIZED');
  assert.equal(none.headers['www-authenticate'], 'Bearer');
  assert.equal((await gen({ authorization: 'Bearer sesam' })).statusCode, 401);
  assert.equal((await gen({ authorization: 'Bearer sesame-and-more' })).statusCode, 401);
  assert.equal((await gen({ authorization: 'Basic sesame' })).statusCode, 401);
  assert.equal((await gen({ authorization: 'Bearer sesame' })).statusCode, 200);
  assert.equal(s.engine.requests.length, 1);
  const models = await s.inject({ method: 'GET', url: '/v1/models' });
  assert.equal(models.statusCode, 401);
  assert.equal(models.json().error.code, 'UNAUTHORIZED');
  assert.equal((await s.inject({ method: 'GET', url: '/health' })).statusCode, 200);
  assert.equal((await s.inject({ method: 'GET', url: '/metrics' })).statusCode, 401);
  assert.equal((await s.inject({ method: 'GET', url: '/metrics', headers: { authorization: 'Bearer sesame' } })).statusCode, 200);
  const scrape = await build({ options: { apiKey: 'sesame', metricsPublic: true } });
  assert.equal((await scrape.inject({ method: 'GET', url: '/metrics' })).statusCode, 200);
  assert.equal((await s.inject({ method: 'GET', url: '/adapters' })).statusCode, 401);
  assert.equal((await s.inject({ method: 'GET', url: '/openapi.yaml', headers: { authorization: 'Bearer sesame' } })).statusCode, 200);

  const open = await build();
  assert.equal((await open.inject({ method: 'GET', url: '/adapters' })).statusCode, 200);
});

test('unknown routes are 404 NOT_FOUND in the route family\'s error shape', async () => {
  const s = await build();
  const res = await s.inject({ method: 'GET', url: '/nope' });
  assert.equal(res.statusCode, 404);
  assert.equal(res.json().code, 'NOT_FOUND');
  const v1 = await s.inject({ method: 'GET', url: '/v1/nope' });
  assert.equal(v1.json().error.code, 'NOT_FOUND');
});

test('request timeout option reaches the engine', async () => {
  const s = await build({ options: { requestTimeoutMs: 1500 } });
  await s.inject({ method: 'POST', url: '/generate', ...json({ inputs: 'Hi' }) });
  assert.equal(s.engine.requests[0]!.timeoutMs, 1500);
});

// ------------------------------------------------------------------------------------------------
// Client disconnect over a real socket

async function waitFor(cond: () => boolean, ms = 2000): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error('timed out waiting');
    await new Promise((r) => setTimeout(r, 5));
  }
}

test('client disconnect aborts the engine request (streaming and not)', async () => {
  const s = await build({ validate: false });
  s.engine.script = { ...s.engine.script, hang: true };
  await s.app.listen({ host: '127.0.0.1', port: 0 });
  const { port } = s.app.server.address() as { port: number };
  try {
    for (const [url, body] of [['/generate_stream', { inputs: 'Hi' }], ['/v1/completions', { prompt: 'Hi', stream: true }], ['/generate', { inputs: 'Hi' }]] as const) {
      const before = s.engine.requests.length;
      const controller = new AbortController();
      const pending = httpRequest(`http://127.0.0.1:${port}${url}`, {
        method: 'POST', body: JSON.stringify(body), headers: { 'content-type': 'application/json' }, signal: controller.signal,
      });
      if (url === '/generate') {
        await waitFor(() => s.engine.requests.length > before);
        controller.abort();
        await assert.rejects(pending);
      } else {
        const res = await pending;
        assert.equal(res.statusCode, 200);
        const first = await res.body[Symbol.asyncIterator]().next();
        assert.match(String(first.value), /^data:/);
        controller.abort();
      }
      const req = s.engine.requests.at(-1)!;
      await waitFor(() => req.signal!.aborted);
    }
  } finally {
    await s.app.close();
  }
});

// ------------------------------------------------------------------------------------------------
// Tokenizer, model retrieval, documents, HEAD /health

test('POST /tokenize: every token with the piece of the input it covers; POST /detokenize inverts it', async () => {
  const s = await build();
  const tok = fixtureTokenizer('llama');
  const inputs = 'hello wörld';
  const res = await s.inject({ method: 'POST', url: '/tokenize', ...json({ inputs }) });
  assert.equal(res.statusCode, 200);
  const pieces: { id: number; text: string; start: number; stop: number }[] = res.json();
  assert.deepEqual(pieces.map((p) => p.id), tok.encode(inputs));
  assert.equal(pieces.map((p) => p.text).join(''), inputs);
  for (const p of pieces) assert.equal(inputs.slice(p.start, p.stop), p.text);
  assert.equal(pieces[0]!.start, 0);
  assert.equal(pieces.at(-1)!.stop, inputs.length);
  const bare = await s.inject({ method: 'POST', url: '/tokenize', ...json({ inputs, add_special_tokens: false }) });
  assert.deepEqual(bare.json().map((p: { id: number }) => p.id), tok.encode(inputs, { addSpecialTokens: false }));

  const ids = tok.encode(inputs, { addSpecialTokens: false });
  const de = await s.inject({ method: 'POST', url: '/detokenize', ...json({ tokens: ids }) });
  assert.deepEqual(de.json(), { prompt: inputs });
  const bad = await s.inject({ method: 'POST', url: '/detokenize', ...json({ tokens: [1, tok.vocabSize] }) });
  assert.equal(bad.statusCode, 422);
  assert.match(bad.json().error, /^`tokens\.1`: token id \d+ is not below the vocabulary size/);
  const typo = await s.inject({ method: 'POST', url: '/tokenize', ...json({ input: 'x' }) });
  assert.equal(typo.statusCode, 422);
});

test('POST /v1/completions: token-id prompts are used as given; several prompts are one engine request each, in order', async () => {
  const s = await build();
  const tok = fixtureTokenizer('llama');
  const ids = tok.encode('hello world', { addSpecialTokens: false });
  for (const prompt of [ids, [ids]]) {
    const res = await s.inject({ method: 'POST', url: '/v1/completions', ...json({ prompt, echo: true }) });
    assert.equal(res.statusCode, 200);
    assert.deepEqual(s.engine.requests.at(-1)!.inputIds, ids);
    assert.match(res.json().choices[0].text, /^hello world/);
  }
  const other = tok.encode('bye', { addSpecialTokens: false });
  const before = s.engine.requests.length;
  const res = await s.inject({ method: 'POST', url: '/v1/completions', ...json({ prompt: [ids, other], echo: true }) });
  assert.equal(res.statusCode, 200);
  assert.deepEqual(s.engine.requests.slice(before).map((r) => r.inputIds), [ids, other]);
  assert.deepEqual(res.json().choices.map((c: { index: number }) => c.index), [0, 1]);
  assert.match(res.json().choices[1].text, /^bye/);
  const out = await s.inject({ method: 'POST', url: '/v1/completions', ...json({ prompt: [tok.vocabSize] }) });
  assert.equal(out.statusCode, 400);
  assert.equal(out.json().error.param, 'prompt.0');
});

test('GET /v1/models/{id}: the base model or an adapter (ids with a slash, encoded or not); unknown ids 404', async () => {
  const s = await build();
  const base = await s.inject({ method: 'GET', url: `/v1/models/${BASE_MODEL}` });
  assert.equal(base.statusCode, 200);
  assert.equal(base.json().id, BASE_MODEL);
  assert.equal(base.json().parent, undefined);
  for (const url of ['/v1/models/org/style', '/v1/models/org%2Fstyle']) {
    const res = await s.inject({ method: 'GET', url });
    assert.equal(res.statusCode, 200, url);
    assert.deepEqual({ id: res.json().id, parent: res.json().parent, object: res.json().object }, { id: 'org/style', parent: BASE_MODEL, object: 'model' });
  }
  const empty = await s.inject({ method: 'GET', url: '/v1/models/' });
  assert.equal(empty.statusCode, 404);
  assert.equal(empty.json().error.code, 'NOT_FOUND');
  const missing = await s.inject({ method: 'GET', url: '/v1/models/org/missing' });
  assert.equal(missing.statusCode, 404);
  assert.equal(missing.json().error.code, 'ADAPTER_NOT_FOUND');
});

test('GET /openapi.json is the document of /openapi.yaml, Swagger UI at /docs shows it from local files; HEAD /health answers like GET without a body', async () => {
  const s = await build();
  const yaml = await s.inject({ method: 'GET', url: '/openapi.yaml' });
  const jsonDoc = await s.inject({ method: 'GET', url: '/openapi.json' });
  assert.equal(jsonDoc.statusCode, 200);
  const doc = (await import('yaml')).parse(yaml.body);
  assert.deepEqual(jsonDoc.json(), doc);
  // Swagger UI's pages are not API operations: app.inject, not the openapi.yaml-checking inject.
  const page = await s.app.inject({ method: 'GET', url: '/docs/' });
  assert.equal(page.statusCode, 200);
  assert.match(String(page.headers['content-type']), /^text\/html/);
  for (const src of page.body.matchAll(/(?:src|href)="([^"]+)"/g)) {
    assert.doesNotMatch(src[1]!, /^(https?:)?\/\//, `Swagger UI loads ${src[1]} from elsewhere`);
    const asset = await s.app.inject({ method: 'GET', url: new URL(src[1]!, 'http://x/docs/').pathname });
    assert.equal(asset.statusCode, 200, src[1]);
  }
  assert.deepEqual((await s.app.inject({ method: 'GET', url: '/docs/json' })).json(), doc);
  const head = await s.inject({ method: 'HEAD', url: '/health' });
  assert.equal(head.statusCode, 200);
  s.setReady(false);
  const notReady = await s.inject({ method: 'HEAD', url: '/health' });
  assert.equal(notReady.statusCode, 503);
});

test('POST / (TGI compatibility route): stream false answers as /generate, stream true as /generate_stream', async () => {
  const s = await build();
  const plain = await s.inject({ method: 'POST', url: '/', ...json({ inputs: 'Hi', parameters: { details: true }, stream: false }) });
  assert.equal(plain.statusCode, 200);
  assert.equal(plain.json().generated_text, ' Hello world');
  assert.equal(plain.json().details.finish_reason, 'eos_token');
  const absent = await s.inject({ method: 'POST', url: '/', ...json({ inputs: 'Hi' }) });
  assert.equal(absent.json().generated_text, ' Hello world');
  const streamed = await s.inject({ method: 'POST', url: '/', ...json({ inputs: 'Hi', stream: true }) });
  assert.equal(streamed.statusCode, 200);
  assert.match(String(streamed.headers['content-type']), /^text\/event-stream/);
  assert.equal(JSON.parse(sseData(streamed.body).at(-1)!).generated_text, ' Hello world');
  const bad = await s.inject({ method: 'POST', url: '/', ...json({ inputs: 'Hi', stream: true, parameters: { decoder_input_details: true } }) });
  assert.equal(bad.statusCode, 422);
});
