/**
 * OpenAI-compatible routes (as vLLM and LoRAX expose them): the adapter id goes in `model`,
 * `temperature: 0` is greedy (the default, 1, samples), stop sequences are not part of the text,
 * streams end with `data: [DONE]`. Errors are `{error: {message, type, param, code}}`.
 */
import { randomUUID } from 'node:crypto';
import type { FastifyInstance } from 'fastify';
import type { GenerationResult, PrefillToken, TokenInfo, TopToken } from '../../engine/types.ts';
import { fail, type ErrorCode } from '../../errors.ts';
import type { ChatMessage as TemplateMessage } from '../../text/tokenizer.ts';
import { NAME } from '../../version.ts';
import type { AppDeps } from '../app.ts';
import { CHAT_FIELDS, COMPLETION_FIELDS, MESSAGE_FIELDS, refuseUnsupported, STREAM_OPTIONS, type DefaultOnly } from '../fields.ts';
import { openAIConstraint } from '../grammar.ts';
import { fitLengths, logitBias, openAISampling } from '../params.ts';
import {
  COMPLETION_DEFAULT_MAX_TOKENS, ChatCompletion, ChatCompletionRequest, ChatCompletionStreamEvent, Completion, CompletionRequest, CompletionStreamEvent, MAX_PROMPT_SEQUENCES, ModelCard, ModelList,
  type ChatCompletionRequestBody, type CompletionRequestBody,
} from '../schemas.ts';
import {
  checkTokenIds, choiceRequests, finiteLogprob, generateAll, RESULT_HEADERS, openAIErrorBody, resolveAdapter, resultHeaders, streamGeneration, withoutStop,
} from './common.ts';
import { GENERATION_ERRORS } from './generate.ts';

/** What the OpenAI routes can fail with: a generation's errors, and a bad `logit_bias`. */
const OPENAI_ERRORS: readonly ErrorCode[] = [...GENERATION_ERRORS, 'LOGIT_BIAS_INVALID'];
/** /v1/chat/completions adds a bad `response_format`. */
const CHAT_ERRORS: readonly ErrorCode[] = [...OPENAI_ERRORS, 'GRAMMAR_INVALID', 'GRAMMAR_UNSUPPORTED'];

function stopList(stop: CompletionRequestBody['stop']): string[] {
  if (stop === undefined || stop === null) return [];
  return (typeof stop === 'string' ? [stop] : stop).filter((s) => s.length > 0);
}

const finishReason = (r: GenerationResult) => (r.finishReason === 'length' ? 'length' : 'stop');

/**
 * Each prompt counted once (its choices share it), the tokens of every sequence generated (best_of's discarded ones too).
 * `results` holds the sequences of each prompt in turn, `perPrompt` of them each.
 */
function usage(results: readonly GenerationResult[], perPrompt = results.length) {
  const prompt = promptTokens(results, perPrompt);
  const completion = results.reduce((n, r) => n + r.generatedTokens, 0);
  return { prompt_tokens: prompt, completion_tokens: completion, total_tokens: prompt + completion };
}

/** The prompt tokens of each prompt once, out of `results` holding `perPrompt` sequences of each prompt in turn. */
function promptTokens(results: readonly GenerationResult[], perPrompt: number): number {
  return results.reduce((n, r, i) => n + (i % perPrompt === 0 ? r.promptTokens : 0), 0);
}

/** The sum of a sequence's token logprobs (log P of the whole completion given the prompt). */
function cumulativeLogprob(r: GenerationResult): number {
  return r.tokens.reduce((sum, t) => sum + t.logprob, 0);
}

/**
 * The indices of the `n` choices to return out of `results`: all of them in order when there are n, else
 * best_of's rule: the n with the highest cumulative logprob, best first (ties: the earlier choice).
 */
function bestChoices(results: readonly GenerationResult[], n: number): number[] {
  const order = results.map((_, i) => i);
  if (results.length === n) return order;
  const score = results.map(cumulativeLogprob);
  return order.sort((a, b) => score[b]! - score[a]! || a - b).slice(0, n);
}

/**
 * `n` (and `best_of`, on /v1/completions): between 1 and MAX_CHOICES (the schema), best_of ≥ n, and
 * no best_of > n when streaming (the choices to return are known only at the end). How many sequences to generate.
 */
function choiceCount(b: { n?: number | null; best_of?: number | null; stream?: boolean | null }): { n: number; generate: number } {
  const n = b.n ?? 1;
  const bestOf = b.best_of ?? n;
  if (bestOf < n) throw fail('VALIDATION', `\`best_of\` must be >= \`n\`. Given: best_of ${bestOf}, n ${n}`, { param: 'best_of' });
  if (b.stream && bestOf > n) throw fail('VALIDATION', '`best_of` > `n` cannot be streamed (the best are known only at the end)', { param: 'best_of' });
  return { n, generate: bestOf };
}

/** Envelope fields shared by a response and its chunks. */
function envelope(prefix: string, model: string) {
  return { id: `${prefix}-${randomUUID().replaceAll('-', '')}`, created: Math.floor(Date.now() / 1000), model };
}

// --- logprobs ------------------------------------------------------------------------------------

/**
 * Legacy completions logprobs: each token, its logprob and its alternatives by text (the token itself
 * included), and its offset in the choice's text. With `echo`, the prompt's tokens come first, from offset 0
 * (the first with null logprob and alternatives: nothing predicts it); generated ones start at `start`.
 */
class CompletionLogprobs {
  private offset = 0;
  constructor(private readonly start: number) {}

  of(tokens: readonly TokenInfo[], prompt: readonly PrefillToken[] = []) {
    const out = { tokens: [] as string[], token_logprobs: [] as (number | null)[], top_logprobs: [] as (Record<string, number> | null)[], text_offset: [] as number[] };
    let promptOffset = 0;
    for (const t of prompt) {
      out.tokens.push(t.text);
      out.token_logprobs.push(t.logprob === null ? null : finiteLogprob(t.logprob));
      out.top_logprobs.push(t.logprob === null ? null : alternatives(t.text, t.logprob, t.top));
      out.text_offset.push(promptOffset);
      promptOffset += t.text.length;
    }
    for (const t of tokens) {
      out.tokens.push(t.text);
      out.token_logprobs.push(finiteLogprob(t.logprob));
      out.top_logprobs.push(alternatives(t.text, t.logprob, t.top));
      out.text_offset.push(this.start + this.offset);
      this.offset += t.text.length;
    }
    return out;
  }
}

/** A token's alternatives by text, best first, the token itself included (by its own logprob when it is not among them). */
function alternatives(text: string, logprob: number, top: readonly TopToken[] | undefined): Record<string, number> {
  const out: Record<string, number> = {};
  for (const x of top ?? []) out[x.text] ??= finiteLogprob(x.logprob);
  out[text] ??= finiteLogprob(logprob);
  return out;
}

function chatLogprobs(tokens: readonly TokenInfo[]) {
  const entry = (t: { text: string; logprob: number }) => ({ token: t.text, logprob: finiteLogprob(t.logprob), bytes: [...Buffer.from(t.text, 'utf8')] });
  return { content: tokens.map((t) => ({ ...entry(t), top_logprobs: (t.top ?? []).map(entry) })) };
}

// --- chat ----------------------------------------------------------------------------------------

function templateMessages(messages: ChatCompletionRequestBody['messages']): TemplateMessage[] {
  return messages.map((m, i) => {
    refuseUnsupported(m, MESSAGE_FIELDS, `messages.${i}.`);
    let content: string;
    if (m.content === undefined || m.content === null) content = '';
    else if (typeof m.content === 'string') content = m.content;
    else {
      content = m.content.map((part, j) => {
        if (part.type !== 'text' || typeof part.text !== 'string') {
          const param = `messages.${i}.content.${j}`;
          throw fail('UNSUPPORTED_PARAMETER', `\`${param}\`: only text content parts are supported (got type "${part.type}")`, { param });
        }
        return part.text;
      }).join('\n');
    }
    return { role: m.role, content, ...(m.name ? { name: m.name } : {}) };
  });
}

/** The fields accepted only at their default: the route's own and `stream_options`'s. */
function refuseUnsupportedOpenAI(b: CompletionRequestBody | ChatCompletionRequestBody, own: Readonly<Record<string, DefaultOnly>>): void {
  refuseUnsupported(b, own);
  refuseUnsupported(b.stream_options, STREAM_OPTIONS, 'stream_options.');
}

/** A /v1/completions prompt: its token ids, and its text (token ids decoded, for `echo`). */
interface CompletionPrompt { readonly ids: readonly number[]; readonly text: string }

/**
 * The prompts of /v1/completions: a string or token ids (used as given), or a list of them; each of the
 * `generate` sequences of every prompt is one engine request, so prompts × generate is at most MAX_PROMPT_SEQUENCES.
 * (An empty list is refused by the schema.)
 */
function completionPrompts(deps: AppDeps, prompt: CompletionRequestBody['prompt'], generate: number): CompletionPrompt[] {
  const single = typeof prompt === 'string' || typeof prompt[0] === 'number';
  const list = single ? [prompt as string | number[]] : prompt as (string | number[])[];
  if (list.length * generate > MAX_PROMPT_SEQUENCES) {
    throw fail('VALIDATION', `\`prompt\`: ${list.length} prompts × ${generate} sequences each is more than ${MAX_PROMPT_SEQUENCES} sequences per request`, { param: 'prompt' });
  }
  return list.map((p, i) => {
    if (typeof p === 'string') return { ids: deps.tokenizer.encode(p), text: p };
    checkTokenIds(deps, p, single ? 'prompt' : `prompt.${i}`);
    return { ids: p, text: deps.tokenizer.decode(p) };
  });
}

// --- streaming -----------------------------------------------------------------------------------

/**
 * Text deltas without the stop sequence. The engine's stop matcher holds back any text that
 * could still become a stop, so only the last delta can contain it.
 */
class DeltaText {
  private emitted = '';
  constructor(private readonly stops: readonly string[], private prefix = '') {}

  next(text: string, result: GenerationResult | null): string {
    const total = this.emitted + text;
    const kept = result ? withoutStop(total, result, this.stops) : total;
    const delta = this.prefix + kept.slice(this.emitted.length);
    this.emitted = kept;
    this.prefix = '';
    return delta;
  }
}

// --- routes --------------------------------------------------------------------------------------

export function openAIRoutes(app: FastifyInstance, deps: AppDeps): void {
  const created = Math.floor(Date.now() / 1000);

  app.post<{ Body: CompletionRequestBody }>('/v1/completions', {
    schema: { summary: 'Text completion (OpenAI-compatible; stream: true answers with server-sent events)', body: CompletionRequest, response: { 200: Completion } },
    config: { doc: { tag: 'OpenAI', errors: OPENAI_ERRORS, headers: RESULT_HEADERS, stream: CompletionStreamEvent } },
  }, async (request, reply) => {
    const b = request.body;
    refuseUnsupportedOpenAI(b, COMPLETION_FIELDS);
    const { n, generate } = choiceCount(b);
    const prompts = completionPrompts(deps, b.prompt, generate);
    const topN = b.logprobs ?? 0;
    const wantLogprobs = b.logprobs !== undefined && b.logprobs !== null;
    const stops = stopList(b.stop);
    const sampling = { ...openAISampling(b, topN), logitBias: logitBias(b.logit_bias, deps.tokenizer.vocabSize) };
    const adapterId = resolveAdapter(deps, b.model);
    // The `generate` sequences of prompt p are reqs[p * generate + j]; each prompt's share one prefill.
    const reqs = prompts.flatMap((prompt) => {
      const { inputIds, maxNewTokens } = fitLengths(deps.options, prompt.ids, {
        maxNew: b.max_tokens, defaultMaxNew: COMPLETION_DEFAULT_MAX_TOKENS,
      });
      return choiceRequests({
        inputIds, adapterId, sampling, maxNewTokens, fields: { input: 'prompt', maxNewTokens: 'max_tokens' },
        stop: stops, decoderInputDetails: (b.echo ?? false) && wantLogprobs, penalizeGeneratedOnly: true, ignoreEos: b.ignore_eos ?? false,
      }, generate);
    });
    const env = { ...envelope('cmpl', b.model || deps.info.modelId), object: 'text_completion' as const };
    const echoes = prompts.map((p) => (b.echo ? p.text : ''));

    if (!b.stream) {
      const results = await generateAll(deps, reply, reqs);
      resultHeaders(reply, results, promptTokens(results, generate));
      return {
        ...env,
        // Prompt p's n choices are indices p * n to p * n + n - 1.
        choices: prompts.flatMap((_, p) => {
          const own = results.slice(p * generate, (p + 1) * generate);
          const echo = echoes[p]!;
          return bestChoices(own, n).map((k, j) => {
            const r = own[k]!;
            return {
              index: p * n + j,
              text: echo + withoutStop(r.text, r, stops),
              logprobs: wantLogprobs ? new CompletionLogprobs(echo.length).of(r.tokens, r.prefill) : null,
              finish_reason: finishReason(r),
            };
          });
        }),
        usage: usage(results, generate),
      };
    }
    const includeUsage = b.stream_options?.include_usage === true;
    // Streamed, generate = n (choiceCount), so request i is choice i, of prompt ⌊i / n⌋.
    const echoOf = (i: number) => echoes[Math.floor(i / n)]!;
    // With logprobs, the echoed prompt is a chunk of its own, with the prompt's logprobs; else it opens the first delta.
    const echoChunk = (i: number) => echoOf(i) !== '' && wantLogprobs;
    return streamGeneration(deps, reply, reqs, { openai: true }, (send) => {
      const deltas = reqs.map((_, i) => new DeltaText(stops, echoChunk(i) ? '' : echoOf(i)));
      const logprobs = reqs.map((_, i) => new CompletionLogprobs(echoOf(i).length));
      const chunk = (index: number, text: string, lp: unknown, finish: string | null) =>
        ({ ...env, choices: [{ index, text, logprobs: lp, finish_reason: finish }], ...(includeUsage ? { usage: null } : {}) });
      return {
        prefill(i, prompt) {
          if (echoChunk(i)) send(chunk(i, echoOf(i), logprobs[i]!.of([], prompt), null));
        },
        token(i, token, text, result) {
          const delta = deltas[i]!.next(text, result);
          if (delta !== '' || result || (wantLogprobs && token)) {
            send(chunk(i, delta, wantLogprobs && token ? logprobs[i]!.of([token]) : null, result ? finishReason(result) : null));
          }
        },
        done(results) {
          if (includeUsage) send({ ...env, choices: [], usage: usage(results, n) });
        },
        error(err) {
          send(openAIErrorBody(err));
        },
      };
    });
  });

  app.post<{ Body: ChatCompletionRequestBody }>('/v1/chat/completions', {
    schema: { summary: 'Chat completion with the model\'s chat template (OpenAI-compatible; stream: true answers with server-sent events)', body: ChatCompletionRequest, response: { 200: ChatCompletion } },
    config: { doc: { tag: 'OpenAI', errors: CHAT_ERRORS, headers: RESULT_HEADERS, stream: ChatCompletionStreamEvent } },
  }, async (request, reply) => {
    const b = request.body;
    refuseUnsupportedOpenAI(b, CHAT_FIELDS);
    const { n } = choiceCount(b);
    if (b.top_logprobs !== undefined && b.top_logprobs !== null && !b.logprobs) {
      throw fail('VALIDATION', '`top_logprobs` needs `logprobs: true`', { param: 'top_logprobs' });
    }
    const stops = stopList(b.stop);
    const sampling = { ...openAISampling(b, b.logprobs ? b.top_logprobs ?? 0 : 0), logitBias: logitBias(b.logit_bias, deps.tokenizer.vocabSize) };
    const constraint = openAIConstraint(deps.tokenizer, b.response_format);
    const adapterId = resolveAdapter(deps, b.model);
    // The template writes the special tokens (e.g. bos_token) itself.
    const prompt = deps.tokenizer.applyChatTemplate(templateMessages(b.messages), { addGenerationPrompt: true });
    const { inputIds, maxNewTokens } = fitLengths(deps.options, deps.tokenizer.encode(prompt, { addSpecialTokens: false }), {
      maxNew: b.max_completion_tokens ?? b.max_tokens, defaultMaxNew: deps.options.maxTotalTokens,
    });
    const reqs = choiceRequests({
      inputIds, adapterId, sampling, ...(constraint ? { constraint } : {}), maxNewTokens, fields: { input: 'messages', maxNewTokens: 'max_tokens' },
      stop: stops, decoderInputDetails: false, penalizeGeneratedOnly: true, ignoreEos: b.ignore_eos ?? false,
    }, n);
    const model = b.model || deps.info.modelId;

    if (!b.stream) {
      const results = await generateAll(deps, reply, reqs);
      resultHeaders(reply, results);
      return {
        ...envelope('chatcmpl', model),
        object: 'chat.completion' as const,
        choices: results.map((r, index) => ({
          index,
          message: { role: 'assistant' as const, content: withoutStop(r.text, r, stops) },
          logprobs: b.logprobs ? chatLogprobs(r.tokens) : null,
          finish_reason: finishReason(r),
        })),
        usage: usage(results),
      };
    }
    const includeUsage = b.stream_options?.include_usage === true;
    const env = { ...envelope('chatcmpl', model), object: 'chat.completion.chunk' as const };
    return streamGeneration(deps, reply, reqs, { openai: true }, (send) => {
      const deltas = reqs.map(() => new DeltaText(stops));
      const chunk = (index: number, delta: object, lp: unknown, finish: string | null) =>
        ({ ...env, choices: [{ index, delta, logprobs: lp, finish_reason: finish }], ...(includeUsage ? { usage: null } : {}) });
      const started = reqs.map(() => false);
      return {
        token(i, token, text, result) {
          if (!started[i]) send(chunk(i, { role: 'assistant', content: '' }, null, null));
          started[i] = true;
          const delta = deltas[i]!.next(text, result);
          if (delta !== '' || result || (b.logprobs && token)) {
            send(chunk(i, delta === '' && result ? {} : { content: delta }, b.logprobs && token ? chatLogprobs([token]) : null, result ? finishReason(result) : null));
          }
        },
        done(results) {
          if (includeUsage) send({ ...env, choices: [], usage: usage(results) });
        },
        error(err) {
          send(openAIErrorBody(err));
        },
      };
    });
  });

  const base = deps.info.modelId;
  /** The base model's card, or an adapter's (its parent is the base). */
  const card = (id: string) => ({ id, object: 'model' as const, created, owned_by: NAME, ...(id === base ? {} : { parent: base }) });

  app.get('/v1/models', {
    schema: { summary: 'The base model and every known adapter (OpenAI-compatible)', response: { 200: ModelList } },
    config: { doc: { tag: 'OpenAI' } },
  }, async () => {
    const ids = (await deps.adapters.ids()).filter((id) => id !== base).sort();
    return { object: 'list' as const, data: [base, ...ids].map(card) };
  });

  // Adapter ids may contain a slash (org/name): a wildcard route.
  app.get<{ Params: { '*': string } }>('/v1/models/*', {
    schema: { response: { 200: ModelCard } },
    config: { doc: { tag: 'OpenAI', operations: [{ path: '/v1/models/{id}', summary: 'The base model or one adapter (OpenAI-compatible)' }], errors: ['ADAPTER_INVALID_ID', 'ADAPTER_NOT_FOUND', 'NOT_FOUND'] } },
  }, async (request) => {
    const id = request.params['*'];
    if (id === '') throw fail('NOT_FOUND', 'no route GET /v1/models/: give a model id, or use GET /v1/models');
    const adapterId = resolveAdapter(deps, id);
    if (adapterId === null) return card(base);
    return card((await deps.adapters.info(adapterId)).id);
  });
}
