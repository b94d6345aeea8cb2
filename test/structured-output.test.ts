/**
 * Structured output and logit_bias end to end, over a real socket on the GPT-2 and Llama fixtures (random
 * weights: only the constraint makes the output valid): TGI `grammar` (regex, json) on /generate and
 * /generate_stream, LoRAX `response_format`, OpenAI `response_format` (json_object, json_schema); every output
 * that ends parses and validates (ajv); mixed batches of constrained and unconstrained requests; coded refusals.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import * as tf from '@tensorflow/tfjs-core';
import { request as http } from 'undici';
import { TINY_GPT2, TINY_LLAMA, writeCheckpoint, type CheckpointOptions } from '../src/demo/index.ts';
import { grammarFor } from '../src/server/grammar.ts';
import { Ajv } from './helpers/app.ts';
import { listeningServer, type ListeningServer } from './helpers/listening.ts';
import { generate as generateOn, request, type Outcome } from './helpers/runtime.ts';
import { setupBackend, tempDir } from './helpers/tf.ts';

type Json = Record<string, any>;

const SCHEMAS: object[] = [
  { type: 'object', properties: { name: { type: 'string', minLength: 1, maxLength: 6 }, age: { type: 'integer', minimum: 0, maximum: 120 }, ok: { type: 'boolean' } }, required: ['name', 'age'] },
  { type: 'array', items: { enum: ['red', 'green', 'blue'] }, minItems: 1, maxItems: 4 },
  { type: 'object', properties: { point: { type: 'object', properties: { x: { type: 'integer', minimum: -9, maximum: 9 }, y: { enum: [0.5, 1.5] } }, required: ['x', 'y'] }, label: { type: ['string', 'null'], maxLength: 3 } }, required: ['point'] },
  { anyOf: [{ type: 'integer', exclusiveMinimum: 0, maximum: 50 }, { type: 'object', properties: { error: { const: 'none' } }, required: ['error'] }] },
  { type: 'object', properties: { tags: { type: 'array', items: { type: 'string', pattern: '[a-z]{2,4}' }, maxItems: 3 }, n: { type: 'null' } } },
];

const FAMILIES: [string, CheckpointOptions][] = [['GPT-2', TINY_GPT2], ['Llama', TINY_LLAMA]];

for (const [family, ckpt] of FAMILIES) {
  describe(`structured output on the ${family} fixture`, () => {
    const tmp = tempDir();
    let server: ListeningServer;
    let baseline: number;
    const ajv = new Ajv({ strict: false });

    before(async () => {
      await setupBackend();
      await writeCheckpoint(join(tmp.dir, 'model'), ckpt);
      baseline = tf.memory().numTensors;
      server = await listeningServer(tmp.dir, { workers: 1 });
    });
    after(async () => {
      await server?.close();
      assert.equal(tf.memory().numTensors, baseline, 'tensors back to their baseline after close');
      tmp.cleanup();
    });

    async function post(path: string, body: unknown): Promise<{ status: number; json: Json; text: string }> {
      const res = await http(`${server.url}${path}`, { method: 'POST', body: JSON.stringify(body), headers: { 'content-type': 'application/json' } });
      const text = await res.body.text();
      let json: Json = {};
      try { json = JSON.parse(text); } catch { /* SSE */ }
      return { status: res.statusCode, json, text };
    }
    const generate = (parameters: Json, inputs = 'The answer is') =>
      post('/generate', { inputs, parameters: { max_new_tokens: 100, details: true, ...parameters } });

    test('TGI regex grammar on /generate and /generate_stream: the whole output matches, EOS once it does', async () => {
      for (const [pattern, seeds] of [['(yes|no)!', [1]], ['[0-9]{3}-[a-z]{2,5}', [1, 2, 3]], ['\\d{1,3}(\\.\\d{1,3}){3}', [4, 5]], ['(é|ü|€){2}x', [6]]] as const) {
        for (const seed of seeds) {
          const r = await generate({ grammar: { type: 'regex', value: pattern }, do_sample: true, seed });
          assert.equal(r.status, 200, r.text);
          assert.equal(r.json.details.finish_reason, 'eos_token', `${pattern}: ${r.text}`);
          assert.match(r.json.generated_text, new RegExp(`^(?:${pattern})$`, 'u'));
        }
      }
      const greedy = await generate({ grammar: { type: 'regex', value: '[a-z]{1,4}( [a-z]{1,4}){0,2}\\.' } });
      assert.equal(greedy.json.details.finish_reason, 'eos_token');
      const stream = await post('/generate_stream', { inputs: 'The answer is', parameters: { max_new_tokens: 100, grammar: { type: 'regex', value: '[a-z]{1,4}( [a-z]{1,4}){0,2}\\.' } } });
      const events = stream.text.split('\n').filter((l) => l.startsWith('data:')).map((l) => JSON.parse(l.slice(5)));
      const last = events.at(-1);
      assert.equal(last.generated_text, greedy.json.generated_text, 'streamed text = the unstreamed greedy text');
      assert.equal(last.details.finish_reason, 'eos_token');
    });

    test('JSON: TGI grammar json, LoRAX response_format and OpenAI json_schema outputs parse and validate', async () => {
      let n = 0;
      for (const [i, schema] of SCHEMAS.entries()) {
        const validate = ajv.compile(schema);
        for (const seed of [1, 2]) {
          const outputs: [string, string][] = [];
          const tgi = await generate({ grammar: { type: 'json', value: seed === 1 ? schema : JSON.stringify(schema) }, do_sample: true, seed });
          assert.equal(tgi.status, 200, tgi.text);
          outputs.push([tgi.json.details.finish_reason, tgi.json.generated_text]);
          const lorax = await generate({ response_format: { type: 'json_object', schema }, do_sample: true, seed: seed + 10 });
          outputs.push([lorax.json.details.finish_reason, lorax.json.generated_text]);
          const chat = await post('/v1/chat/completions', {
            messages: [{ role: 'user', content: `Schema ${i}` }], max_tokens: 90, seed,
            response_format: { type: 'json_schema', json_schema: { name: `s${i}`, schema, strict: true } },
          });
          if (family === 'GPT-2') {
            // the GPT-2 fixture has no chat template: the chat route refuses before any constraint applies
            assert.equal(chat.status, 400, chat.text);
          } else {
            assert.equal(chat.status, 200, chat.text);
            outputs.push([chat.json.choices[0].finish_reason === 'stop' ? 'eos_token' : 'length', chat.json.choices[0].message.content]);
          }
          for (const [finish, text] of outputs) {
            assert.equal(finish, 'eos_token', `schema ${i} seed ${seed}: ${text}`);
            const value = JSON.parse(text);
            assert.ok(validate(value), `schema ${i}: ${text}: ${JSON.stringify(validate.errors)}`);
            n++;
          }
        }
      }
      assert.ok(n >= SCHEMAS.length * 4);
    });

    test('several choices under a grammar (TGI best_of, OpenAI n; one shared prefill): every choice parses and validates on its own; the prompt is not constrained', async () => {
      const schema = SCHEMAS[0]!;
      const validate = ajv.compile(schema);
      const inputs = 'The answer is';
      const tgi = await generate({ grammar: { type: 'json', value: schema }, do_sample: true, best_of: 3, return_full_text: true, decoder_input_details: true }, inputs);
      assert.equal(tgi.status, 200, tgi.text);
      const sequences = [tgi.json, ...tgi.json.details.best_of_sequences];
      assert.equal(sequences.length, 3);
      for (const q of sequences) {
        const details = q.details ?? q;
        assert.equal(details.finish_reason, 'eos_token', q.generated_text);
        assert.ok(q.generated_text.startsWith(inputs), 'return_full_text: the prompt, unconstrained, comes first');
        const value = JSON.parse(q.generated_text.slice(inputs.length));
        assert.ok(validate(value), `${q.generated_text}: ${JSON.stringify(validate.errors)}`);
        assert.equal(details.prefill.length, server.runtime.tokenizer.encode(inputs).length, 'prompt logprobs for every prompt token');
      }
      if (family === 'GPT-2') return; // no chat template
      const chat = await post('/v1/chat/completions', {
        messages: [{ role: 'user', content: 'JSON please' }], max_tokens: 90, n: 3, seed: 5,
        response_format: { type: 'json_schema', json_schema: { name: 'person', schema } },
      });
      assert.equal(chat.status, 200, chat.text);
      assert.equal(chat.json.choices.length, 3);
      for (const c of chat.json.choices) {
        assert.equal(c.finish_reason, 'stop', c.message.content);
        assert.ok(validate(JSON.parse(c.message.content)), `${c.message.content}: ${JSON.stringify(validate.errors)}`);
      }
    });

    test('json_object: any JSON object (OpenAI response_format on the Llama chat route, LoRAX without a schema)', async () => {
      for (const seed of [1, 2, 3]) {
        const r = await generate({ response_format: { type: 'json_object' }, do_sample: true, seed, max_new_tokens: 110 });
        if (r.json.details.finish_reason !== 'eos_token') continue; // free-form strings may run to the limit
        const v = JSON.parse(r.json.generated_text);
        assert.ok(typeof v === 'object' && v !== null && !Array.isArray(v), r.json.generated_text);
      }
      if (family === 'Llama') {
        const c = await post('/v1/chat/completions', { messages: [{ role: 'user', content: 'JSON please' }], temperature: 0, max_tokens: 90, response_format: { type: 'json_object' } });
        assert.equal(c.status, 200, c.text);
        const { content } = c.json.choices[0].message;
        if (c.json.choices[0].finish_reason === 'stop') assert.equal(typeof JSON.parse(content), 'object');
        else assert.ok(content.startsWith('{'), 'cut at the limit: the start of an object');
      }
    });

    test('hitting the token limit first: finish_reason length and a prefix of a valid output', async () => {
      const r = await generate({ grammar: { type: 'json', value: SCHEMAS[0] }, max_new_tokens: 3, do_sample: true, seed: 1 });
      assert.equal(r.json.details.finish_reason, 'length');
      assert.ok(r.json.generated_text.startsWith('{"'), r.json.generated_text);
    });

    test('a mixed batch: unconstrained requests equal their solo answers, constrained ones validate', async () => {
      const prompts = ['Once upon a time', 'The model reads', 'An adapter changes', 'Hello there'];
      const plain = (inputs: string) => generate({ max_new_tokens: 20 }, inputs);
      const solo: Json[] = [];
      for (const p of prompts) solo.push((await plain(p)).json);
      const validate = ajv.compile(SCHEMAS[0]!);
      const all = await Promise.all(prompts.flatMap((p, i) => [
        plain(p),
        generate({ grammar: { type: 'json', value: SCHEMAS[0] }, do_sample: true, seed: i + 1 }, p),
        generate({ grammar: { type: 'regex', value: '[0-9]{3}-[a-z]{2,5}' } }, p),
      ]));
      prompts.forEach((_, i) => {
        const [u, j, re] = [all[3 * i]!.json, all[3 * i + 1]!.json, all[3 * i + 2]!.json];
        assert.deepEqual(u.details.tokens.map((t: Json) => t.id), solo[i].details.tokens.map((t: Json) => t.id), `prompt ${i}: batched = solo`);
        assert.equal(u.generated_text, solo[i].generated_text);
        assert.equal(j.details.finish_reason, 'eos_token', j.generated_text);
        assert.ok(validate(JSON.parse(j.generated_text)), j.generated_text);
        assert.match(re.generated_text, /^[0-9]{3}-[a-z]{2,5}$/);
      });
    });

    test('one batch from the first step (submitted in one tick to the engine): free rows equal their solo runs', async () => {
      const { engine, tokenizer } = server.runtime;
      const json = grammarFor(tokenizer, { type: 'json_schema', schema: SCHEMAS[1] }, 'schema');
      const digits = grammarFor(tokenizer, { type: 'regex', pattern: '[0-9]{2,6}' }, 'regex');
      const prompts = ['Once upon a time', 'The model reads', 'An adapter changes'].map((p) => tokenizer.encode(p));
      const free = (ids: number[]) => request(ids, { maxNewTokens: 24 });
      const solo: Outcome[] = [];
      for (const ids of prompts) solo.push(await generateOn(server.runtime, free(ids)));
      const runs = prompts.flatMap((ids, i) => [
        generateOn(server.runtime, free(ids)),
        generateOn(server.runtime, request(ids, { maxNewTokens: 60, constraint: json, sampling: { doSample: true, seed: i + 1 } })),
        generateOn(server.runtime, request(ids, { maxNewTokens: 60, constraint: digits })),
      ]);
      assert.equal(engine.stats().waiting, 9, 'all nine wait for the same first step');
      const out = await Promise.all(runs);
      const validate = ajv.compile(SCHEMAS[1]!);
      prompts.forEach((_, i) => {
        const [f, j, d] = [out[3 * i]!, out[3 * i + 1]!, out[3 * i + 2]!];
        assert.deepEqual(f.tokens.map((t) => t.id), solo[i]!.tokens.map((t) => t.id), `prompt ${i}: free row = solo`);
        assert.equal(j.result!.finishReason, 'eos_token', j.text);
        assert.ok(validate(JSON.parse(j.text)), j.text);
        assert.equal(d.result!.finishReason, 'eos_token', d.text);
        assert.match(d.text, /^[0-9]{2,6}$/);
      });
    });

    test('logit_bias: +100 forces a token under greedy decoding, -100 bans it; bad keys and biases are LOGIT_BIAS_INVALID', async () => {
      const complete = (extra: Json) => post('/v1/completions', { prompt: 'The answer is', max_tokens: 4, temperature: 0, logprobs: 1, ...extra });
      const base = await complete({});
      assert.equal(base.status, 200, base.text);
      const tokens = (r: { json: Json }) => r.json.choices[0].logprobs.tokens as string[];
      const forced = await complete({ logit_bias: { 42: 100 } });
      const tok = server.runtime.tokenizer;
      assert.deepEqual(tokens(forced), Array(4).fill(tok.tokenText(42)));
      const first = (await generate({ max_new_tokens: 1 })).json.details.tokens[0].id as number; // the same greedy step
      const banned = await complete({ logit_bias: { [first]: -100 } });
      assert.notEqual(banned.json.choices[0].text, base.json.choices[0].text);
      const choices = await complete({ logit_bias: { 42: 100 }, n: 2, temperature: 1, seed: 3, echo: true });
      assert.equal(choices.status, 200, choices.text);
      for (const c of choices.json.choices) {
        assert.deepEqual(c.logprobs.tokens.slice(-4), Array(4).fill(tok.tokenText(42)), 'every choice carries the bias');
        assert.ok(c.text.startsWith('The answer is'), 'echo');
      }
      for (const [bias, param] of [[{ 999999: 1 }, 'logit_bias.999999'], [{ 5: 101 }, 'logit_bias.5'], [{ abc: 1 }, 'logit_bias.abc'], [{ '-1': 1 }, 'logit_bias.-1']] as const) {
        const r = await complete({ logit_bias: bias });
        assert.equal(r.status, 400, r.text);
        assert.equal(r.json.error.code, 'LOGIT_BIAS_INVALID');
        assert.equal(r.json.error.param, param);
      }
    });

    test('bad and unsupported grammars are coded 400s naming the field, and the server keeps serving', async () => {
      const cases: [Json, string, string][] = [
        [{ grammar: { type: 'regex', value: 'a(?=b)' } }, 'GRAMMAR_UNSUPPORTED', 'parameters.grammar.value'],
        [{ grammar: { type: 'regex', value: '(a' } }, 'GRAMMAR_INVALID', 'parameters.grammar.value'],
        [{ grammar: { type: 'regex', value: 3 } }, 'GRAMMAR_INVALID', 'parameters.grammar.value'],
        [{ grammar: { type: 'json', value: { type: 'number', minimum: 0 } } }, 'GRAMMAR_UNSUPPORTED', 'parameters.grammar.value'],
        [{ grammar: { type: 'json', value: '{not json' } }, 'GRAMMAR_INVALID', 'parameters.grammar.value'],
        [{ response_format: { type: 'json_object', schema: { type: 'string', format: 'email' } } }, 'GRAMMAR_UNSUPPORTED', 'parameters.response_format.schema'],
      ];
      for (const [parameters, code, param] of cases) {
        const r = await generate(parameters);
        assert.equal(r.status, 400, r.text);
        assert.equal(r.json.code, code, r.text);
        assert.match(r.json.error, new RegExp(`^\`${param.replaceAll('.', '\\.')}\``));
      }
      if (family === 'Llama') {
        const r = await post('/v1/chat/completions', { messages: [{ role: 'user', content: 'x' }], response_format: { type: 'json_schema', json_schema: { schema: { type: 'object', patternProperties: {} } } } });
        assert.equal(r.status, 400, r.text);
        assert.equal(r.json.error.code, 'GRAMMAR_UNSUPPORTED');
        assert.equal(r.json.error.param, 'response_format.json_schema.schema');
        assert.match(r.json.error.message, /patternProperties/);
      }
      const ok = await generate({ max_new_tokens: 3 });
      assert.equal(ok.status, 200);
    });
  });
}
