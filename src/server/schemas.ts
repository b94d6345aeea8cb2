/**
 * Every request and response body of the HTTP API, written once with TypeBox. Routes validate
 * requests and serialise responses with them; openapi.yaml is generated from them (a schema's
 * `title` makes it a named component). Field names follow TGI/LoRAX and OpenAI exactly.
 *
 * Request schemas check types and structure only; value ranges of the sampling parameters are
 * checked by src/server/params.ts (one place, TGI's rules). Request objects are closed
 * (`additionalProperties: false`): an unknown field is refused (UNKNOWN_FIELD) rather than ignored,
 * so a typo never silently falls back to a default. Fields that clients send but whose feature is
 * not implemented are declared here (typed loosely, `Unknown`) and accepted only at their default
 * value (src/server/fields.ts).
 */
import { Type, type Static, type TOptional, type TSchema, type TUnknown } from '@sinclair/typebox';
import { STARTUP_PHASES } from '../startup.ts';
import { CHAT_FIELDS, COMPLETION_FIELDS, MESSAGE_FIELDS, STREAM_OPTIONS, TGI_PARAMETERS, type DefaultOnly as DefaultOnlyRule } from './fields.ts';
/** TGI's `--max-stop-sequences` default. */
export const MAX_STOP_SEQUENCES = 4;
/** TGI's `--max-top-n-tokens` default: the most alternatives a token reports. */
export const MAX_TOP_N_TOKENS = 5;
/** OpenAI's default `max_tokens` of /v1/completions. */
export const COMPLETION_DEFAULT_MAX_TOKENS = 16;
/** The most sequences one request may generate (OpenAI `n` and `best_of`, TGI `best_of`). */
export const MAX_CHOICES = 8;
/** The most sequences one /v1/completions request may generate over all its prompts (prompts × best_of). */
export const MAX_PROMPT_SEQUENCES = 32;

const Nullable = <T extends TSchema>(schema: T) => Type.Union([schema, Type.Null()]);
/** A string enum (`{type: string, enum: [...]}`), typed as the union of its values. */
const Enum = <const T extends readonly string[]>(values: T, options: { title?: string; description?: string } = {}) =>
  Type.Unsafe<T[number]>({ type: 'string', enum: [...values], ...options });
/** Optional, and `null` means absent (JSON clients send both). */
const Opt = <T extends TSchema>(schema: T) => Type.Optional(Nullable(schema));
/** A request object: unknown fields are refused. */
export const Closed = { additionalProperties: false } as const;
/** Fields accepted only at their default value (src/server/fields.ts), typed loosely: the table checks the value. */
const defaultOnly = <T extends Record<string, DefaultOnlyRule>>(table: T) => Object.fromEntries(Object.entries(table).map(([name, rule]) =>
  [name, Type.Optional(Type.Unknown({ description: `Not supported (${rule.feature}): accepted only as ${rule.accepted}` }))])) as { [K in keyof T]: TOptional<TUnknown> };

// ------------------------------------------------------------------------------------------------
// Errors

/** The start-up progress the 503 NOT_READY answers carry while the server loads (src/server/loading.ts, src/startup.ts). */
export const Loading = Type.Object({
  phase: Enum(STARTUP_PHASES),
  tensors_loaded: Type.Integer({ description: 'Checkpoint tensors read, over every copy of the model (one per executor worker)' }),
  tensors_total: Type.Integer({ description: 'The checkpoint\'s tensors times the copies (a few may never be read: GPT-2 mask buffers, a tied lm_head)' }),
  bytes_loaded: Type.Integer({ description: 'Their bytes as float32' }),
  bytes_total: Type.Integer(),
  workers_started: Type.Integer({ description: 'Executor workers that have loaded their copy' }),
  workers_total: Type.Integer({ description: '0 when the model runs in the server\'s thread (--workers 1)' }),
}, { title: 'Loading', description: 'Only on 503 NOT_READY while the server starts (every route but /metrics answers so until the model is loaded)' });

const LoadingField = Type.Optional(Loading);

export const ErrorBody = Type.Object({
  error: Type.String({ description: 'Human-readable message' }),
  error_type: Type.String({ description: 'TGI/LoRAX error type, e.g. validation, overloaded, adapter_not_found' }),
  code: Type.String({ description: 'Stable error code from the catalogue (src/errors.ts), e.g. VALIDATION, ADAPTER_NOT_FOUND' }),
  loading: LoadingField,
}, { title: 'ErrorBody' });

export const OpenAIErrorBody = Type.Object({
  error: Type.Object({
    message: Type.String(),
    type: Type.String({ description: 'The error_type of the catalogue' }),
    param: Nullable(Type.String({ description: 'The request field at fault, when one is (dotted path)' })),
    code: Type.String({ description: 'The catalogue code' }),
  }),
  loading: LoadingField,
}, { title: 'OpenAIErrorBody' });

// ------------------------------------------------------------------------------------------------
// TGI / LoRAX: POST /generate, POST /generate_stream

/** The most source adapters one `merged_adapters` may name. */
export const MAX_MERGED_ADAPTERS = 16;

/** LoRAX `merged_adapters`: types here, values checked by src/server/params.ts (`mergedAdapters`, MERGE_INVALID). */
export const MergedAdapters = Type.Object({
  ids: Type.Array(Type.String(), { description: `The adapters to merge, 1 to ${MAX_MERGED_ADAPTERS} (one id: that adapter, not merged, as LoRAX)` }),
  weights: Opt(Type.Array(Type.Number(), { description: 'One finite weight per id, applied to each lora_A and lora_B; absent or []: all 1' })),
  merge_strategy: Opt(Type.String({ description: 'linear (default), ties, dare_linear or dare_ties' })),
  density: Opt(Type.Number({ description: 'Fraction of each tensor kept, in [0, 1]; required by ties, dare_linear and dare_ties' })),
  majority_sign_method: Opt(Type.String({ description: 'total (default) or frequency; ties and dare_ties' })),
}, { title: 'MergedAdapters', ...Closed });
export type MergedAdaptersBody = Static<typeof MergedAdapters>;

/** TGI `parameters.grammar`: the output must match a regex or a JSON schema (src/server/grammar.ts). */
export const GrammarBody = Type.Object({
  type: Enum(['regex', 'json'], { description: 'regex: `value` is a pattern the whole output matches; json: `value` is a JSON schema (an object, or a string holding one)' }),
  value: Type.Unknown({ description: 'The pattern or the schema' }),
}, { title: 'Grammar', ...Closed });

/** LoRAX `parameters.response_format`. */
export const LoraxResponseFormat = Type.Object({
  type: Enum(['json_object'], { description: 'Only json_object' }),
  schema: Opt(Type.Unknown({ description: 'A JSON schema the output must satisfy; absent or null: any JSON object' })),
}, { title: 'LoraxResponseFormat', ...Closed });

export const GenerateParameters = Type.Object({
  adapter_id: Opt(Type.String({ description: 'LoRA adapter id (name or org/name); absent, "" or the base model id: the base model' })),
  max_new_tokens: Opt(Type.Integer({ minimum: 1, description: 'Default: the server\'s --max-new-tokens' })),
  do_sample: Opt(Type.Boolean()),
  temperature: Opt(Type.Number({ description: '> 0; setting it (or top_k, top_p, typical_p) turns sampling on' })),
  top_k: Opt(Type.Integer()),
  top_p: Opt(Type.Number({ description: '(0, 1]' })),
  typical_p: Opt(Type.Number({ description: '(0, 1]' })),
  repetition_penalty: Opt(Type.Number({ description: '> 0' })),
  frequency_penalty: Opt(Type.Number({ description: '[-2, 2]' })),
  presence_penalty: Opt(Type.Number({ description: '[-2, 2]' })),
  seed: Opt(Type.Integer({ description: 'The sampling seed; with merged_adapters, also the seed of DARE\'s drop masks' })),
  stop: Opt(Type.Array(Type.String({ minLength: 1 }), { maxItems: MAX_STOP_SEQUENCES })),
  return_full_text: Opt(Type.Boolean({ description: 'Prepend the prompt to generated_text' })),
  truncate: Opt(Type.Integer({ minimum: 1, description: 'Keep only the last N prompt tokens' })),
  details: Opt(Type.Boolean()),
  decoder_input_details: Opt(Type.Boolean({ description: 'Prompt token logprobs in details.prefill (not on /generate_stream)' })),
  top_n_tokens: Opt(Type.Integer({ description: `0-${MAX_TOP_N_TOKENS}` })),
  ignore_eos: Opt(Type.Boolean({ description: 'Extension (as vLLM): keep generating past eos up to max_new_tokens (benchmarks)' })),
  ignore_eos_token: Opt(Type.Boolean({ description: 'LoRAX\'s name of ignore_eos; both must agree' })),
  merged_adapters: Opt(MergedAdapters),
  grammar: Opt(GrammarBody),
  response_format: Opt(LoraxResponseFormat),
  adapter_source: Opt(Type.String({
    description: 'LoRAX: where adapter_id (or each id of merged_adapters) comes from: "local" (--adapter-dir, then --adapter-source-url) or "hub" (a Hugging Face Hub repo, ' +
      'downloaded into the Hub cache and cached by commit); absent: the server\'s --adapter-source. "s3" and "pbase" are refused',
  })),
  api_token: Opt(Type.String({ description: 'LoRAX: the Hugging Face token to fetch a private or gated Hub adapter with (default: the server\'s HF_TOKEN)' })),
  best_of: Opt(Type.Integer({ minimum: 1, maximum: MAX_CHOICES, description: `Generate this many sequences and answer with the one of the highest mean token logprob, the others in details.best_of_sequences; > 1 needs sampling, no seed, /generate (TGI's rules)` })),
  ...defaultOnly(TGI_PARAMETERS),
}, { title: 'GenerateParameters', ...Closed });

export const GenerateRequest = Type.Object({
  inputs: Type.String(),
  adapter_id: Opt(Type.String({ description: 'LoRAX: may be given here or in parameters; both must agree' })),
  parameters: Opt(GenerateParameters),
  stream: Opt(Type.Boolean({ description: 'Sent by TGI/LoRAX clients: false on /generate, true on /generate_stream' })),
}, { title: 'GenerateRequest', ...Closed });
export type GenerateRequestBody = Static<typeof GenerateRequest>;

export const FinishReason = Enum(['length', 'eos_token', 'stop_sequence'], { title: 'FinishReason' });

export const Token = Type.Object({
  id: Type.Integer(),
  text: Type.String(),
  logprob: Type.Number(),
  special: Type.Boolean(),
}, { title: 'Token' });

export const PrefillToken = Type.Object({
  id: Type.Integer(),
  text: Type.String(),
  logprob: Nullable(Type.Number({ description: 'null for the first prompt token' })),
}, { title: 'PrefillToken' });

const SequenceDetails = {
  finish_reason: FinishReason,
  generated_tokens: Type.Integer(),
  seed: Nullable(Type.Integer()),
  prefill: Type.Array(PrefillToken),
  tokens: Type.Array(Token),
  top_tokens: Type.Optional(Type.Array(Type.Array(Token), { description: 'Per generated token, its top_n_tokens alternatives (only when top_n_tokens > 0)' })),
};

/** One of the sequences best_of generated besides the one answered (TGI). */
export const BestOfSequence = Type.Object({
  generated_text: Type.String(),
  ...SequenceDetails,
}, { title: 'BestOfSequence' });

export const Details = Type.Object({
  ...SequenceDetails,
  prompt_tokens: Type.Integer(),
  best_of_sequences: Type.Optional(Type.Array(BestOfSequence, { description: 'With best_of > 1: the other sequences' })),
}, { title: 'Details' });

export const GenerateResponse = Type.Object({
  generated_text: Type.String(),
  details: Type.Optional(Details),
}, { title: 'GenerateResponse' });

export const StreamDetails = Type.Object({
  finish_reason: FinishReason,
  generated_tokens: Type.Integer(),
  seed: Nullable(Type.Integer()),
  input_length: Type.Integer(),
}, { title: 'StreamDetails' });

/** One `data:` event of /generate_stream. */
export const StreamResponse = Type.Object({
  index: Type.Integer({ minimum: 1 }),
  token: Token,
  top_tokens: Type.Optional(Type.Array(Token)),
  generated_text: Nullable(Type.String({ description: 'Only on the last event' })),
  details: Nullable(StreamDetails),
}, { title: 'StreamResponse' });

export const GenerateStreamEvent = Type.Union([StreamResponse, ErrorBody], { title: 'GenerateStreamEvent' });

// ------------------------------------------------------------------------------------------------
// OpenAI-compatible

const Stop = Opt(Type.Union([Type.String(), Type.Array(Type.String({ minLength: 1 }), { maxItems: MAX_STOP_SEQUENCES })]));

const OpenAISampling = {
  model: Opt(Type.String({ description: 'An adapter id; the base model id, "" or absent: the base model' })),
  temperature: Opt(Type.Number({ minimum: 0, maximum: 2, description: '0: greedy. Default 1 (sampling)' })),
  top_p: Opt(Type.Number()),
  top_k: Opt(Type.Integer({ description: 'Extension (vLLM, LoRAX)' })),
  repetition_penalty: Opt(Type.Number({ description: 'Extension (vLLM, LoRAX)' })),
  frequency_penalty: Opt(Type.Number()),
  presence_penalty: Opt(Type.Number()),
  ignore_eos: Opt(Type.Boolean({ description: 'Extension (vLLM): keep generating past eos up to max_tokens' })),
  seed: Opt(Type.Integer()),
  stop: Stop,
  stream: Opt(Type.Boolean()),
  stream_options: Opt(Type.Object({
    include_usage: Opt(Type.Boolean()),
    ...defaultOnly(STREAM_OPTIONS),
  }, Closed)),
  user: Opt(Type.String({ description: 'Accepted; an end-user id for the caller\'s records, no effect on the output' })),
  logit_bias: Opt(Type.Record(Type.String(), Type.Number(), { description: 'Token id (a decimal string, below the vocabulary size) → bias in [-100, 100], added to that token\'s logit before sampling' })),
  n: Opt(Type.Integer({ minimum: 1, maximum: MAX_CHOICES, description: 'Choices to return, sampled independently (choice i > 0 with seed + i, mod 2^53)' })),
};

export const CompletionRequest = Type.Object({
  ...OpenAISampling,
  prompt: Type.Union([
    Type.String(),
    Type.Array(Type.String(), { minItems: 1 }),
    Type.Array(Type.Integer({ minimum: 0 }), { minItems: 1 }),
    Type.Array(Type.Array(Type.Integer({ minimum: 0 }), { minItems: 1 }), { minItems: 1 }),
  ], { description: `A prompt (a string or token ids) or a list of prompts, each with its n choices (choice index = prompt index × n + j); prompts × best_of at most ${MAX_PROMPT_SEQUENCES}` }),
  max_tokens: Opt(Type.Integer({ minimum: 1, description: `Default ${COMPLETION_DEFAULT_MAX_TOKENS}` })),
  logprobs: Opt(Type.Integer({ minimum: 0, maximum: MAX_TOP_N_TOKENS })),
  echo: Opt(Type.Boolean({ description: 'Prepend the prompt to the text; with logprobs, the prompt\'s tokens come first in logprobs, the first with null' })),
  best_of: Opt(Type.Integer({ minimum: 1, maximum: MAX_CHOICES, description: 'Generate this many (>= n) and return the n with the highest cumulative logprob; not streamed when > n' })),
  ...defaultOnly(COMPLETION_FIELDS),
}, { title: 'CompletionRequest', ...Closed });
export type CompletionRequestBody = Static<typeof CompletionRequest>;

const ContentPart = Type.Object({
  type: Type.String({ description: 'Only "text"' }),
  text: Type.Optional(Type.String()),
}, Closed);

export const ChatMessage = Type.Object({
  role: Type.String(),
  content: Opt(Type.Union([Type.String(), Type.Array(ContentPart)], { description: 'A string or a list of text parts' })),
  name: Opt(Type.String({ description: 'Passed to the chat template as `message.name`' })),
  ...defaultOnly(MESSAGE_FIELDS),
}, { title: 'ChatMessage', ...Closed });

export const ChatCompletionRequest = Type.Object({
  ...OpenAISampling,
  messages: Type.Array(ChatMessage, { minItems: 1 }),
  max_tokens: Opt(Type.Integer({ minimum: 1, description: 'Default: the rest of the context (--max-total-tokens minus the prompt)' })),
  max_completion_tokens: Opt(Type.Integer({ minimum: 1, description: 'Newer name of max_tokens; wins when both are given' })),
  logprobs: Opt(Type.Boolean()),
  top_logprobs: Opt(Type.Integer({ minimum: 0, maximum: MAX_TOP_N_TOKENS })),
  parallel_tool_calls: Opt(Type.Boolean({ description: 'Accepted; no effect (tool calling is not supported)' })),
  metadata: Opt(Type.Record(Type.String(), Type.String(), { description: 'Accepted; tags for stored completions, no effect here' })),
  prompt_cache_key: Opt(Type.String({ description: 'Accepted; a cache-routing hint, no effect on the output' })),
  prompt_cache_retention: Opt(Type.String({ description: 'Accepted; a prompt-cache hint, no effect on the output' })),
  prompt_cache_options: Opt(Type.Record(Type.String(), Type.Unknown(), { description: 'Accepted; prompt-cache hints, no effect on the output' })),
  safety_identifier: Opt(Type.String({ description: 'Accepted; an end-user id for the caller\'s records, no effect on the output' })),
  response_format: Opt(Type.Object({
    type: Enum(['text', 'json_object', 'json_schema'], { description: 'text: no constraint; json_object: any JSON object; json_schema: JSON valid against json_schema.schema' }),
    json_schema: Opt(Type.Object({
      name: Opt(Type.String({ description: 'Accepted; a name for the caller\'s records' })),
      description: Opt(Type.String({ description: 'Accepted; no effect on the output' })),
      schema: Opt(Type.Unknown({ description: 'The JSON schema (the subset of the README); absent: any JSON object' })),
      strict: Opt(Type.Boolean({ description: 'Accepted; the schema is always enforced' })),
    }, Closed)),
  }, { title: 'ResponseFormat', ...Closed })),
  ...defaultOnly(CHAT_FIELDS),
}, { title: 'ChatCompletionRequest', ...Closed });
export type ChatCompletionRequestBody = Static<typeof ChatCompletionRequest>;

export const OpenAIFinishReason = Enum(['stop', 'length'], { title: 'OpenAIFinishReason' });

export const Usage = Type.Object({
  prompt_tokens: Type.Integer(),
  completion_tokens: Type.Integer(),
  total_tokens: Type.Integer(),
}, { title: 'Usage' });

export const CompletionLogprobs = Type.Object({
  tokens: Type.Array(Type.String()),
  token_logprobs: Type.Array(Nullable(Type.Number()), { description: 'null for the first prompt token (echo)' }),
  top_logprobs: Type.Array(Nullable(Type.Record(Type.String(), Type.Number())), { description: 'null for the first prompt token (echo)' }),
  text_offset: Type.Array(Type.Integer()),
}, { title: 'CompletionLogprobs' });

export const CompletionChoice = Type.Object({
  index: Type.Integer(),
  text: Type.String(),
  logprobs: Nullable(CompletionLogprobs),
  finish_reason: Nullable(OpenAIFinishReason),
}, { title: 'CompletionChoice' });

const OpenAIEnvelope = {
  id: Type.String(),
  created: Type.Integer({ description: 'Unix seconds' }),
  model: Type.String(),
};

export const Completion = Type.Object({
  ...OpenAIEnvelope,
  object: Type.Literal('text_completion'),
  choices: Type.Array(CompletionChoice),
  usage: Usage,
}, { title: 'Completion' });

export const CompletionChunk = Type.Object({
  ...OpenAIEnvelope,
  object: Type.Literal('text_completion'),
  choices: Type.Array(CompletionChoice),
  usage: Type.Optional(Nullable(Usage)),
}, { title: 'CompletionChunk' });

const TopLogprob = Type.Object({
  token: Type.String(),
  logprob: Type.Number(),
  bytes: Type.Array(Type.Integer()),
});

export const ChatLogprobs = Type.Object({
  content: Type.Array(Type.Object({ ...TopLogprob.properties, top_logprobs: Type.Array(TopLogprob) })),
}, { title: 'ChatLogprobs' });

export const ChatCompletion = Type.Object({
  ...OpenAIEnvelope,
  object: Type.Literal('chat.completion'),
  choices: Type.Array(Type.Object({
    index: Type.Integer(),
    message: Type.Object({ role: Type.Literal('assistant'), content: Type.String() }),
    logprobs: Nullable(ChatLogprobs),
    finish_reason: OpenAIFinishReason,
  })),
  usage: Usage,
}, { title: 'ChatCompletion' });

export const ChatCompletionChunk = Type.Object({
  ...OpenAIEnvelope,
  object: Type.Literal('chat.completion.chunk'),
  choices: Type.Array(Type.Object({
    index: Type.Integer(),
    delta: Type.Object({ role: Type.Optional(Type.Literal('assistant')), content: Type.Optional(Type.String()) }),
    logprobs: Nullable(ChatLogprobs),
    finish_reason: Nullable(OpenAIFinishReason),
  })),
  usage: Type.Optional(Nullable(Usage)),
}, { title: 'ChatCompletionChunk' });

export const CompletionStreamEvent = Type.Union([CompletionChunk, OpenAIErrorBody], { title: 'CompletionStreamEvent' });
export const ChatCompletionStreamEvent = Type.Union([ChatCompletionChunk, OpenAIErrorBody], { title: 'ChatCompletionStreamEvent' });

export const ModelCard = Type.Object({
  id: Type.String(),
  object: Type.Literal('model'),
  created: Type.Integer(),
  owned_by: Type.String(),
  parent: Type.Optional(Type.String({ description: 'Adapters: the base model id' })),
}, { title: 'ModelCard' });

export const ModelList = Type.Object({
  object: Type.Literal('list'),
  data: Type.Array(ModelCard),
}, { title: 'ModelList' });

// ------------------------------------------------------------------------------------------------
// Tokenizer: POST /tokenize (TGI), POST /detokenize (vLLM)

export const TokenizeRequest = Type.Object({
  inputs: Type.String(),
  add_special_tokens: Opt(Type.Boolean({ description: 'Default true: special tokens (e.g. BOS) added as the tokenizer files say' })),
}, { title: 'TokenizeRequest', ...Closed });
export type TokenizeRequestBody = Static<typeof TokenizeRequest>;

export const TokenizeResponse = Type.Array(Type.Object({
  id: Type.Integer(),
  text: Type.String({ description: 'The piece of the input this token covers (empty for added special tokens)' }),
  start: Type.Integer({ description: 'UTF-16 offset of the piece in the decoded input' }),
  stop: Type.Integer({ description: 'Exclusive end offset' }),
}, { title: 'SimpleToken' }), { title: 'TokenizeResponse' });

export const DetokenizeRequest = Type.Object({
  tokens: Type.Array(Type.Integer({ minimum: 0 }), { description: 'Token ids, each below the tokenizer\'s vocabulary size' }),
  skip_special_tokens: Opt(Type.Boolean({ description: 'Default false' })),
}, { title: 'DetokenizeRequest', ...Closed });
export type DetokenizeRequestBody = Static<typeof DetokenizeRequest>;

export const DetokenizeResponse = Type.Object({ prompt: Type.String({ description: 'The decoded text' }) }, { title: 'DetokenizeResponse' });

// ------------------------------------------------------------------------------------------------
// Adapters

export const AdapterInfo = Type.Object({
  id: Type.String({ description: 'The adapter id; a Hub adapter loaded by a request is listed as hub:org/name@<commit>' }),
  state: Enum(['available', 'loading', 'ready', 'failed']),
  tier: Enum(['device', 'host', 'disk', 'remote']),
  source: Nullable(Enum(['disk', 'upload', 'remote', 'hub'])),
  version: Nullable(Type.String({ description: 'Content hash of config + weights' })),
  bytes: Nullable(Type.Integer({ description: 'Float32 bytes of every A and B' })),
  rank: Nullable(Type.Integer()),
  alpha: Nullable(Type.Number()),
  target_modules: Nullable(Type.Array(Type.String())),
  pinned: Type.Boolean(),
  active_requests: Type.Integer(),
  last_used: Nullable(Type.String({ description: 'ISO time' })),
  error: Nullable(Type.Object({ code: Type.String(), message: Type.String() })),
}, { title: 'AdapterInfo' });

export const AdapterCache = Type.Object({
  device_adapters: Type.Integer(),
  device_bytes: Type.Integer(),
  host_adapters: Type.Integer(),
  host_bytes: Type.Integer(),
  max_device_adapters: Type.Integer(),
  max_device_bytes: Type.Integer({ description: '0: no byte limit' }),
  max_host_bytes: Type.Integer(),
}, { title: 'AdapterCache' });

export const AdapterList = Type.Object({
  adapters: Type.Array(AdapterInfo),
  cache: AdapterCache,
}, { title: 'AdapterList' });

export const AdapterDeleted = Type.Object({
  id: Type.String(),
  deleted: Type.Literal(true),
}, { title: 'AdapterDeleted' });

export const AdapterUpload = Type.Object({
  config: Type.String({ format: 'binary', description: 'adapter_config.json' }),
  weights: Type.String({ format: 'binary', description: 'adapter_model.safetensors' }),
}, { title: 'AdapterUpload' });

export const LoadQuery = Type.Object({
  pin: Type.Optional(Enum(['true', 'false'], { description: 'Keep it on the device until unloaded' })),
});
export type LoadQueryString = Static<typeof LoadQuery>;

// ------------------------------------------------------------------------------------------------
// Service

export const Health = Type.Object({ status: Type.Literal('ok') }, { title: 'Health' });

export const Info = Type.Object({
  model_id: Type.String(),
  model_sha: Nullable(Type.String({ description: 'TGI: the Hugging Face Hub commit served, for a model given as org/name; null for a folder' })),
  model_type: Type.String({ description: 'config.json model_type, e.g. llama, gpt2' }),
  model_dtype: Type.String(),
  backend: Type.String({ description: 'TensorFlow.js backend in use' }),
  native_matmul: Type.Boolean({ description: 'Matrix products run in the native AVX2/FMA addon (wasm backend, --native-matmul)' }),
  webgpu_adapter: Nullable(Type.Object({
    vendor: Type.String(),
    architecture: Type.String(),
    device: Type.String(),
    description: Type.String(),
    software: Type.Boolean({ description: 'A CPU implementation of WebGPU (lavapipe/llvmpipe, SwiftShader), not a GPU' }),
    max_storage_buffer_binding_size: Type.Integer({ description: 'Bytes of the largest tensor a kernel can bind: larger weights are refused at load (MODEL_TOO_LARGE)' }),
    max_buffer_size: Type.Integer({ description: 'Bytes of the largest buffer the device can allocate' }),
  }, { description: 'The WebGPU adapter (webgpu backend); null on the other backends' })),
  version: Type.String(),
  workers: Type.Integer({ description: 'Copies of the model, one per executor worker thread (--workers; auto resolved)' }),
  chat_template: Type.Boolean({ description: 'Whether /v1/chat/completions is usable' }),
  max_input_tokens: Type.Integer(),
  max_total_tokens: Type.Integer(),
  max_new_tokens: Type.Integer({ description: 'Default max_new_tokens of /generate' }),
  max_stop_sequences: Type.Integer(),
  max_top_n_tokens: Type.Integer(),
  max_batch_size: Type.Integer(),
  max_batch_total_tokens: Type.Integer(),
  max_queue: Type.Integer(),
  prefill_chunk: Type.Integer(),
  max_adapter_bytes: Type.Integer(),
  lora: Type.Object({
    mode: Type.String({ description: 'auto | merged | unmerged' }),
    max_rank: Type.Integer(),
    max_loaded_adapters: Type.Integer({ description: '0: no count limit' }),
    device_bytes: Type.Integer({ description: 'Per model copy (--adapter-device-bytes; auto resolved); 0: no byte limit' }),
    host_bytes: Type.Integer(),
  }),
}, { title: 'Info' });
