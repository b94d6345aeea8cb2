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
 */

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
}

export interface SchedulerLimits {
  readonly maxBatchSize: number;
  readonly maxBatchTokens: number;
  readonly prefillChunk: number;
  readonly loraMode: 'auto' | 'merged' | 'unmerged';
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
  return { decode, prefill, tokens: decode.length + prefill.reduce((n, c) => n + c.length, 0) };
}
