/**
 * Optional per-phase timing of engine steps (`--profile`; the bench's `profile` case reads it from /metrics).
 *
 * Sections nest: a section's time excludes the sections run inside it, so the phases of a thread add up to
 * the time its steps took. One profiler per thread (module state): the engine's on the main thread, and each
 * executor worker's own, whose totals ride on the worker's replies (src/exec/parallel-executor.ts).
 *
 * Off by default, and then a section costs one boolean test. Kernel phases are exact on the wasm and cpu
 * backends, where every TensorFlow.js kernel runs synchronously inside its section; on the native and GPU
 * backends kernels run asynchronously and their time would land in `logits_download`.
 *
 * The clock is wall time on one stack per thread: while a section awaits (`executor_wait`, `logits_download`), the
 * event loop may run other work (HTTP requests, responses), and that time is charged to the awaiting section. The
 * phases of a thread therefore add up to its steps' wall time, not to its CPU time.
 */

export const STEP_KINDS = ['prefill', 'decode'] as const;
export type StepKind = (typeof STEP_KINDS)[number];

export const PHASES = {
  // Main thread (the engine).
  engine: 'the engine\'s own JavaScript around a step: building items, bookkeeping, emitting tokens',
  sampling: 'sampling the next token from each sequence\'s logits (penalties, top-k/p, logprobs)',
  constraint: 'grammar masks: the token ids a constrained sequence may sample next (src/engine/constraint/)',
  executor_wait: 'waiting for the executor worker threads (their work is in the phases below, per worker)',
  // Wherever the executor runs (main thread, or each worker).
  executor: 'the executor\'s own JavaScript: step inputs, KV rows, masks, worker messages',
  lora_setup: 'building LoRA banks and masks, merging weights (as the step\'s LoRA plan says)',
  base_matmul: 'x·W of every base linear layer (bias included)',
  lora_delta: 'unmerged LoRA: ((x·A) ⊙ mask)·B and its add',
  attention: 'scores, softmax and weighted sum over the KV cache',
  kv_cache: 'appending the step\'s keys and values to the cache',
  lm_head: 'the final norm and the vocabulary projection',
  other_ops: 'embedding, norms, RoPE, activations, residual adds, the step\'s mask',
  logits_download: 'reading the logits back from the device',
} as const;
export type Phase = keyof typeof PHASES;

/** Seconds per step kind and phase (phases never run are absent). */
export type ProfileTotals = Partial<Record<StepKind, Partial<Record<Phase, number>>>>;

class Profiler {
  enabled = false;
  private totals: ProfileTotals = {};
  private kind: StepKind = 'decode';
  private readonly stack: Phase[] = [];
  private mark = 0;

  /** Runs `fn` as one step of `kind`, charged to `phase` (the root section). */
  step<T>(kind: StepKind, phase: Phase, fn: () => Promise<T>): Promise<T> {
    if (!this.enabled) return fn();
    const outer = this.kind;
    this.kind = kind;
    return this.timeAsync(phase, fn).finally(() => { this.kind = outer; });
  }

  /** Runs `fn` with its own time (minus nested sections) charged to `phase`. */
  time<T>(phase: Phase, fn: () => T): T {
    if (!this.enabled) return fn();
    this.enter(phase);
    try {
      return fn();
    } finally {
      this.exit();
    }
  }

  async timeAsync<T>(phase: Phase, fn: () => Promise<T>): Promise<T> {
    if (!this.enabled) return fn();
    this.enter(phase);
    try {
      return await fn();
    } finally {
      this.exit();
    }
  }

  /** A copy of the totals so far. */
  snapshot(): ProfileTotals {
    return JSON.parse(JSON.stringify(this.totals)) as ProfileTotals;
  }

  reset(): void {
    this.totals = {};
  }

  private charge(phase: Phase, now: number): void {
    const k = (this.totals[this.kind] ??= {});
    k[phase] = (k[phase] ?? 0) + (now - this.mark) / 1000;
    this.mark = now;
  }

  private enter(phase: Phase): void {
    const now = performance.now();
    const top = this.stack.at(-1);
    if (top !== undefined) this.charge(top, now);
    else this.mark = now;
    this.stack.push(phase);
  }

  private exit(): void {
    this.charge(this.stack.pop()!, performance.now());
  }
}

/** This thread's profiler. */
export const profiler = new Profiler();

/** Sum of several threads' totals. */
export function addTotals(...all: ProfileTotals[]): ProfileTotals {
  const out: ProfileTotals = {};
  for (const t of all) {
    for (const [kind, phases] of Object.entries(t) as [StepKind, Partial<Record<Phase, number>>][]) {
      const k = (out[kind] ??= {});
      for (const [p, s] of Object.entries(phases) as [Phase, number][]) k[p] = (k[p] ?? 0) + s;
    }
  }
  return out;
}
