/**
 * Request fields that real clients send but whose feature the server does not implement. Each is
 * accepted when its value asks for what the server does anyway (its default: `watermark: false`,
 * `tools: []`) and refused with UNSUPPORTED_PARAMETER, naming the
 * field, otherwise. `null` counts as absent. Fields the schemas do not know at all are refused by
 * validation (UNKNOWN_FIELD, with the list of known ones). README "HTTP API" lists every
 * field with its status; test/api-fields.test.ts checks the README, the schemas and this table agree.
 */
import { fail } from '../errors.ts';

export interface DefaultOnly {
  /** The accepted values, as the error message and the README write them. */
  readonly accepted: string;
  readonly accepts: (v: unknown) => boolean;
  /** What is not implemented. */
  readonly feature: string;
}

const absent = (feature: string): DefaultOnly => ({ accepted: 'absent or null', accepts: () => false, feature });
const only = (value: unknown, feature: string): DefaultOnly =>
  ({ accepted: JSON.stringify(value), accepts: (v) => JSON.stringify(v) === JSON.stringify(value), feature });
const emptyList = (feature: string): DefaultOnly => ({ accepted: '[]', accepts: (v) => Array.isArray(v) && v.length === 0, feature });
const oneOf = (values: readonly unknown[], feature: string): DefaultOnly =>
  ({ accepted: values.map((v) => JSON.stringify(v)).join(' or '), accepts: (v) => values.includes(v), feature });

/** TGI / LoRAX `parameters`. */
export const TGI_PARAMETERS = {
  watermark: only(false, 'watermarking'),
  return_k_alternatives: absent('LoRAX alternative tokens (use top_n_tokens)'),
  apply_chat_template: only(false, 'chat templates on /generate (use /v1/chat/completions)'),
} as const satisfies Record<string, DefaultOnly>;

export const COMPLETION_FIELDS = {
  suffix: only('', 'insertion (suffix)'),
} as const satisfies Record<string, DefaultOnly>;

export const CHAT_FIELDS = {
  tools: emptyList('tool calling'),
  tool_choice: oneOf(['none', 'auto'], 'tool calling'),
  functions: emptyList('function calling'),
  function_call: oneOf(['none', 'auto'], 'function calling'),
  audio: absent('audio output'),
  modalities: only(['text'], 'modalities other than text'),
  prediction: absent('predicted outputs'),
  reasoning_effort: absent('reasoning effort'),
  verbosity: absent('verbosity'),
  web_search_options: absent('web search'),
  store: only(false, 'storing completions'),
  service_tier: oneOf(['auto', 'default'], 'service tiers'),
  moderation: absent('moderated completions'),
} as const satisfies Record<string, DefaultOnly>;

export const STREAM_OPTIONS = {
  include_obfuscation: only(false, 'stream obfuscation'),
} as const satisfies Record<string, DefaultOnly>;

/** One message of /v1/chat/completions. */
export const MESSAGE_FIELDS = {
  tool_calls: emptyList('tool calling'),
  tool_call_id: absent('tool calling'),
  function_call: absent('function calling'),
  refusal: absent('refusal messages'),
  audio: absent('audio'),
} as const satisfies Record<string, DefaultOnly>;

/** Throws UNSUPPORTED_PARAMETER for the first field of `obj` in `table` whose value is not accepted; `path` prefixes the field in messages. */
export function refuseUnsupported(obj: object | null | undefined, table: Readonly<Record<string, DefaultOnly>>, path = ''): void {
  if (!obj) return;
  for (const [name, value] of Object.entries(obj)) {
    const rule = table[name];
    if (!rule || value === null || value === undefined || rule.accepts(value)) continue;
    const param = path + name;
    throw fail('UNSUPPORTED_PARAMETER', `\`${param}\`: ${rule.feature} is not supported; accepted: ${rule.accepted}`, { param });
  }
}
