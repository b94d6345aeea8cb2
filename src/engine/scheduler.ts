/**
 * The pure scheduling decision of one engine step (vLLM v1 style): given the running, prefilling and
 * waiting sequences, which of them run this step, with how many prompt tokens each. No I/O, no tensors.
 *
 * Rules:
 * - Every running sequence decodes one token each step (iteration-level continuous batching: a request
 *   joins at the next step and leaves as soon as it finishes).
 * - Token budget per step: `maxBatchTokens` = decode rows + prefill tokens. Sequences already being
 *   prefilled continue first; then waiting sequences are admitted in arrival order (FIFO across adapters,
 *   so no adapter is starved) while the batch has room (`maxBatchSize`) and the budget allows.
 * - Prompts longer than `prefillChunk` are prefilled in chunks of at most `prefillChunk` tokens, one chunk
 *   per step, so running sequences keep decoding between chunks.
 * - `merged` lora mode can only run one adapter at a time: a waiting sequence whose adapter differs from
 *   the running batch's waits (head of line: later arrivals do not overtake it) until the batch drains.
 * - Waiting sequences only appear here once their adapter is resident: an adapter that is loading never
 *   blocks requests for other adapters.
 * - The step's LoRA plan (merged or unmerged, per executor call) comes from `planLora()` below.
 */
import type { LoraPlan } from './executor.ts';

/** How LoRA is applied (`--lora-mode`): always merged (one adapter at a time), never merged, or decided per step. */
export const LORA_MODES = ['auto', 'merged', 'unmerged'] as const;
export type LoraMode = (typeof LORA_MODES)[number];

/** `auto`: consecutive steps with one sole adapter before it is merged. */
export const MERGE_AFTER = 32;

export interface SchedSeq {
  readonly seq: number;
  /** The adapter's device key, ExecAdapter.key (null: base). */
  readonly adapter: string | null;
  readonly promptLength: number;
  /** Prompt tokens already prefilled. */
  readonly prefilled: number;
}

export interface SchedulerInput {
  readonly running: readonly SchedSeq[];
  /** Partially prefilled (chunked) sequences, oldest first. */
  readonly prefilling: readonly SchedSeq[];
  /** Ready to start, in arrival order. */
  readonly waiting: readonly SchedSeq[];
  /** The LoRA hysteresis state after the previous step (INITIAL_LORA_STATE at start). */
  readonly lora?: LoraState;
}

export interface SchedulerLimits {
  readonly maxBatchSize: number;
  readonly maxBatchTokens: number;
  readonly prefillChunk: number;
  readonly loraMode: LoraMode;
  /** auto: consecutive sole-adapter steps before merging (default MERGE_AFTER). */
  readonly mergeAfter?: number;
}

export interface PrefillChunk {
  readonly seq: number;
  readonly start: number;
  readonly length: number;
  /** The chunk ends the prompt. */
  readonly last: boolean;
}

export interface SchedulerOutput {
  /** Sequences decoding one token this step. */
  readonly decode: readonly number[];
  /** Prompt chunks to prefill this step. */
  readonly prefill: readonly PrefillChunk[];
  /** Total tokens this step. */
  readonly tokens: number;
  /** How the decode and the prefill call apply LoRA, and the state the next step starts from. */
  readonly lora: LoraStep;
}

export function schedule(input: SchedulerInput, limits: SchedulerLimits): SchedulerOutput {
  const decode = input.running.map((s) => s.seq);
  let budget = limits.maxBatchTokens - decode.length;
  let slots = limits.maxBatchSize - input.running.length - input.prefilling.length;
  const prefill: PrefillChunk[] = [];
  const chunk = (s: SchedSeq): PrefillChunk | null => {
    const left = s.promptLength - s.prefilled;
    const length = Math.min(left, limits.prefillChunk, budget);
    if (length <= 0) return null;
    return { seq: s.seq, start: s.prefilled, length, last: length === left };
  };

  for (const s of input.prefilling) {
    const c = chunk(s);
    if (!c) break;
    prefill.push(c);
    budget -= c.length;
  }

  const active = new Set([...input.running, ...input.prefilling].map((s) => s.adapter));
  for (const s of input.waiting) {
    if (slots <= 0 || budget <= 0) break;
    if (limits.loraMode === 'merged' && active.size > 0 && !(active.size === 1 && active.has(s.adapter))) break;
    const c = chunk(s);
    // A prompt that fits the chunk size but not what is left of the budget waits for the next step rather
    // than being split, unless it is the only prefill of the step (then it is chunked to fit).
    if (!c || (!c.last && s.promptLength <= limits.prefillChunk && prefill.length > 0)) break;
    prefill.push(c);
    budget -= c.length;
    slots--;
    active.add(s.adapter);
  }
  const adapterOf = new Map([...input.prefilling, ...input.waiting].map((x) => [x.seq, x.adapter]));
  const lora = planLora(input.lora ?? INITIAL_LORA_STATE, {
    decode: input.running.map((x) => x.adapter), prefill: prefill.map((c) => adapterOf.get(c.seq)!),
  }, limits);
  return { decode, prefill, tokens: decode.length + prefill.reduce((n, c) => n + c.length, 0), lora };
}

/**
 * What `auto` remembers between steps (dLoRA's insight, with hysteresis): the adapter whose merged weights the
 * executors hold, and the adapter that has been the only one of every row for `steps` consecutive steps.
 * Adapters are named by device key (ExecAdapter.key).
 */
export interface LoraState {
  readonly merged: string | null;
  readonly sole: { readonly key: string; readonly steps: number } | null;
}

export const INITIAL_LORA_STATE: LoraState = { merged: null, sole: null };

export interface LoraStep {
  readonly decode: LoraPlan;
  readonly prefill: LoraPlan;
  readonly state: LoraState;
}

/**
 * The LoRA plan of one step, from its rows' adapters (null: base) per executor call, and the next state.
 *
 * The rule: a call whose rows all use one adapter X runs merged (W + s·B·A) when
 * - `merged` mode, always;
 * - `auto` mode, when X is already the merged adapter, or X has been the sole adapter of every row of the step
 *   for `mergeAfter` consecutive steps, this one included (a merge costs a matmul and a copy of W per targeted
 *   linear, which only pays back over many steps, so short single-adapter moments stay unmerged);
 * - `unmerged` mode, never.
 * Any other call with adapter rows runs unmerged, one with none runs without LoRA. A step with base rows or more
 * than one adapter (decode and prefill together) resets the streak. One adapter's merged weights are kept at a time:
 * merging another replaces them.
 */
export function planLora(state: LoraState, rows: { readonly decode: readonly (string | null)[]; readonly prefill: readonly (string | null)[] },
  limits: { readonly loraMode: LoraMode; readonly mergeAfter?: number }): LoraStep {
  const all = [...rows.decode, ...rows.prefill];
  const stepSole = soleAdapter(all);
  const sole = stepSole === null ? null : { key: stepSole, steps: state.sole?.key === stepSole ? state.sole.steps + 1 : 1 };
  let merged = state.merged;
  const plan = (keys: readonly (string | null)[]): LoraPlan => {
    if (!keys.some((k) => k !== null)) return { kind: 'none' };
    const x = soleAdapter(keys);
    const merge = x !== null && (limits.loraMode === 'merged' ||
      (limits.loraMode === 'auto' && (x === merged || (sole?.key === x && sole.steps >= (limits.mergeAfter ?? MERGE_AFTER)))));
    if (!merge) return { kind: 'unmerged' };
    merged = x;
    return { kind: 'merged', key: x };
  };
  const decode = plan(rows.decode);
  const prefill = plan(rows.prefill);
  return { decode, prefill, state: { merged, sole } };
}

/** The adapter every row uses, or null (no rows, a base row, or several adapters). */
function soleAdapter(keys: readonly (string | null)[]): string | null {
  const first = keys[0] ?? null;
  return first !== null && keys.every((k) => k === first) ? first : null;
}
