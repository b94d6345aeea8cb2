/**
 * How far start-up has got, for the answers the server gives while it loads (src/server/loading.ts): the
 * phase, the checkpoint tensors read so far (by every copy of the model), and the executor workers started.
 * startRuntime (src/runtime.ts) moves it along; it is plain data, read at request time.
 */

/** Start-up phases, in order. */
export const STARTUP_PHASES = ['checkpoint', 'weights', 'tokenizer', 'adapters', 'ready'] as const;
/**
 * - checkpoint: reading the checkpoint's headers (generating the demo checkpoint on first use) and choosing the backend;
 * - weights: reading the weights onto the device, in this thread or in each executor worker;
 * - tokenizer: loading the tokenizer;
 * - adapters: warming up the adapter load path;
 * - ready: serving.
 */
export type StartupPhase = (typeof STARTUP_PHASES)[number];

/** `loaded` of `total` (0 of 0 until the total is known). */
export interface Count {
  loaded: number;
  total: number;
}

export class StartupProgress {
  phase: StartupPhase = 'checkpoint';
  /**
   * Checkpoint tensors read, over every copy of the model (the total counts each tensor of the checkpoint once per
   * copy; a few are never read: GPT-2's attention-mask buffers, an lm_head tied to the embeddings).
   */
  readonly tensors: Count = { loaded: 0, total: 0 };
  /** Their bytes as float32 (as the device holds them), over every copy. */
  readonly bytes: Count = { loaded: 0, total: 0 };
  /** Executor worker threads that have loaded their copy of the model (0 of 0 when the model runs in this thread). */
  readonly workers: Count = { loaded: 0, total: 0 };

  /**
   * `gate` is awaited as each phase begins: a test seam that holds start-up at a phase (src/server/server.ts
   * passes none).
   */
  constructor(private readonly gate?: (phase: StartupPhase) => void | Promise<void>) {}

  async enter(phase: StartupPhase): Promise<void> {
    this.phase = phase;
    await this.gate?.(phase);
  }

  /** One tensor of `elements` float32 values read by one copy of the model. */
  tensorRead(elements: number): void {
    this.tensors.loaded++;
    this.bytes.loaded += 4 * elements;
  }

  /** The JSON the loading answers carry. */
  json() {
    return {
      phase: this.phase,
      tensors_loaded: this.tensors.loaded, tensors_total: this.tensors.total,
      bytes_loaded: this.bytes.loaded, bytes_total: this.bytes.total,
      workers_started: this.workers.loaded, workers_total: this.workers.total,
    };
  }
}
