/**
 * The resident base model: a `model_type` registry over the architecture files, and one batched forward
 * step over a KV cache (the KVCache interface below; src/exec/kv.ts implements it). Weights are uploaded once at load and stay on the device for the process' life.
 */
import * as tf from '@tensorflow/tfjs-core';
import { keepWeight, type Weight } from '../backend/weights.ts';
import { checkTensorFits, maxTensorBytes } from '../backend/webgpu/init.ts';
import { fusedKernels } from '../backend/webgpu/kernels/program.ts';
import { stepInput } from '../backend/webgpu/recorded-step.ts';
import { batchSubmits } from '../backend/webgpu/submit.ts';
import { fail } from '../errors.ts';
import { profiler } from '../obs/profile.ts';
import { openCheckpoint, type Checkpoint } from './checkpoint.ts';
import { gpt2Modules, loadGpt2 } from './gpt2.ts';
import { ropeRows, type Linear, type StepLora, type StepShape } from './layers.ts';
import { gemmaModules, loadGemma } from './gemma.ts';
import { llamaModules, loadLlama } from './llama.ts';
import { loadPhi3, phi3Modules } from './phi3.ts';
import type { Family, LinearModule, ModelConfig } from './types.ts';

/**
 * One layer's cache after a step's append, as attention reads it: its keys and values [B, kvHeads, C+T, headDim], or
 * (webgpu) the packed cache [B, kvHeads, capacity, 2·headDim] of which the first `cols` = C+T columns are valid,
 * column j holding its key then its value, with the step's KV state (int32 [1 + B]: C, then each row's first valid
 * column; src/exec/kv.ts), from which the decode attention kernel makes its mask.
 */
export type LayerKV =
  | { readonly k: tf.Tensor4D; readonly v: tf.Tensor4D }
  | { readonly packed: tf.Tensor4D; readonly cols: number; readonly state: tf.Tensor1D };

/** The KV cache of a batch of B rows as the forward uses it: C cached columns per row (left-padded), per layer. */
export interface KVCache {
  /** B. */
  readonly rows: number;
  /** C: cached columns (positions, padded) per row. */
  readonly cols: number;
  /**
   * The additive attention mask for T new tokens per row and G query heads per KV head, [B, 1, T·G, C+T]:
   * 0 where a query may see a key, a large negative number elsewhere. `pad` left-pads each row's new tokens
   * (only on the first forward, C = 0). `window` W (null: none): the query at position i sees only the keys at
   * positions j > i − W.
   */
  mask(T: number, groups: number, pad?: readonly number[], window?: number | null): Float32Array;
  /** Before the first layer of a forward of T new tokens per row: `pad` as for mask (the first forward only). */
  begin(pad?: readonly number[]): void;
  /** Appends one layer's new keys and values (token rows [B·T, kvHeads·headDim]) and returns the layer's whole cache. */
  appendLayer(layer: number, k: tf.Tensor2D, v: tf.Tensor2D): LayerKV;
  /** Once after the last layer of a forward of T new columns (pad as for mask). */
  commit(T: number, pad?: readonly number[]): void;
  /** Instead of commit when the forward failed: forgets what was made for it (the cached columns are as before). */
  abandon(): void;
}

/** What one forward step gives the architecture's block function; `mask` is the layer's (its window's). */
export interface StepContext extends StepShape {
  readonly kv: KVCache;
  readonly positions: tf.Tensor1D; // [N]
  /** longrope: each token's row of the rotary table (ropeRows), [N]; otherwise absent (the row is the position). */
  readonly ropeRows?: tf.Tensor1D;
  readonly lora?: StepLora;
  /** Computes a step-wide value (e.g. rotary cos/sin for these positions) once for all layers. */
  cache<T extends tf.Tensor>(key: string, make: () => T): T;
}

/** An architecture: its weights loaded, and the three pieces of a decoder-only forward. */
export interface Arch {
  /** LoRA-targetable modules, PEFT naming. */
  readonly modules: readonly LinearModule[];
  readonly linears: ReadonlyMap<string, Linear>;
  /** Every device tensor and stored weight the architecture holds. */
  readonly tensors: readonly (tf.Tensor | Weight)[];
  embed(tokens: tf.Tensor1D, positions: tf.Tensor1D): tf.Tensor2D;
  block(layer: number, x: tf.Tensor2D, s: StepContext): tf.Tensor2D;
  head(x: tf.Tensor2D): tf.Tensor2D;
}

/** `load` yields between layers (a place to let the event loop run) and returns the architecture. */
const REGISTRY: Record<Family, { load: (c: ModelConfig, ckpt: Checkpoint) => Generator<void, Arch>; modules: (c: ModelConfig) => LinearModule[] }> = {
  gpt2: { load: loadGpt2, modules: gpt2Modules },
  llama: { load: loadLlama, modules: llamaModules },
  phi3: { load: loadPhi3, modules: phi3Modules },
  gemma: { load: loadGemma, modules: gemmaModules },
};

export interface LoadOptions {
  /** A weight larger than this fails with MODEL_TOO_LARGE before it is read (default: the webgpu device's binding limit). */
  readonly maxTensorBytes?: { bytes: number; on: string };
  /** Told of each tensor read (its element count), for start-up progress. */
  readonly onTensor?: (elements: number) => void;
}

/** The LoRA-targetable modules of a model, from its config alone (no weights loaded). */
export function modulesFor(config: ModelConfig): LinearModule[] {
  return REGISTRY[config.family].modules(config);
}

export interface ForwardInput {
  readonly kv: KVCache;
  /** [B·T] token ids, row-major; rows are left-padded to T (pad entries may be any valid id). */
  readonly tokens: Int32Array;
  /** [B·T] absolute positions of each token (pad entries: 0). */
  readonly positions: Int32Array;
  readonly T: number;
  /** Left padding of each row's T tokens (only on a batch's first forward). */
  readonly pad?: readonly number[];
  readonly lora?: StepLora;
  /** Which of the N = B·T token rows get logits (e.g. the last of each row). */
  readonly logitRows: Int32Array;
}

export class CausalLM {
  readonly config: ModelConfig;
  readonly dir: string;
  readonly dtype: string;
  readonly modules: readonly LinearModule[];
  readonly linears: ReadonlyMap<string, Linear>;
  private readonly arch: Arch;

  private constructor(dir: string, config: ModelConfig, dtype: string, arch: Arch) {
    this.dir = dir;
    this.config = config;
    this.dtype = dtype;
    this.arch = arch;
    this.modules = arch.modules;
    this.linears = arch.linears;
  }

  /**
   * Loads a checkpoint directory onto the current TensorFlow.js backend. A weight larger than the backend can
   * bind (`maxTensorBytes`, by default the webgpu device's limit) fails with MODEL_TOO_LARGE before it is read.
   * `onTensor` is told of each tensor read (its element count), for start-up progress.
   */
  static load(dir: string, opts: LoadOptions = {}): CausalLM {
    const loading = CausalLM.loading(dir, opts);
    for (;;) {
      const r = loading.next();
      if (r.done) return r.value;
    }
  }

  /**
   * load(), letting the event loop run between layers, so that a server loading in its own thread still answers
   * requests meanwhile. Nothing else may use TensorFlow.js until it resolves: the tensors made meanwhile would be
   * taken for the model's, and freed with it if loading fails.
   */
  static async loadAsync(dir: string, opts: LoadOptions = {}): Promise<CausalLM> {
    const loading = CausalLM.loading(dir, opts);
    for (;;) {
      const r = loading.next();
      if (r.done) return r.value;
      await new Promise((resolve) => setImmediate(resolve));
    }
  }

  private static *loading(dir: string, opts: LoadOptions): Generator<void, CausalLM> {
    const ckpt = openCheckpoint(dir);
    const limit = opts.maxTensorBytes ?? maxTensorBytes();
    const onTensor = opts.onTensor;
    try {
      const { load } = REGISTRY[ckpt.config.family];
      // tidy disposes everything uploaded so far if loading fails half-way (missing or mis-shaped tensor).
      tf.engine().startScope();
      let arch: Arch;
      try {
        arch = yield* load(ckpt.config, limit || onTensor ? {
          ...ckpt,
          read: (name, shape) => {
            if (shape && limit) checkTensorFits(name, shape, limit);
            const t = ckpt.read(name, shape);
            if (!shape && limit) checkTensorFits(name, t.shape, limit);
            onTensor?.(t.data.length);
            return t;
          },
        } : ckpt);
        for (const t of arch.tensors) keepWeight(t);
      } finally {
        tf.engine().endScope();
      }
      return new CausalLM(dir, ckpt.config, ckpt.dtype, arch);
    } finally {
      ckpt.close();
    }
  }

  /** Device bytes of the base weights. */
  get bytes(): number {
    return this.arch.tensors.reduce((n, t) => n + t.size * 4, 0);
  }

  /**
   * One forward step: T new tokens for each of the B rows of `kv` (which grows by T columns).
   * Returns logits [logitRows.length, vocab].
   */
  forward(input: ForwardInput): tf.Tensor2D {
    const { kv, T } = input;
    const B = kv.rows;
    const N = B * T;
    if (input.tokens.length !== N || input.positions.length !== N) {
      throw new Error(`forward: expected ${N} tokens and positions, got ${input.tokens.length}/${input.positions.length}`);
    }
    const c = this.config;
    this.checkInputs(input.tokens, input.positions);
    const G = c.numHeads / c.numKvHeads;
    // Time not spent in a nested section (matmuls, LoRA, attention, KV, head) is the other kernels.
    // A decode step is one command-buffer submit on webgpu (its readback submits it).
    if (fusedKernels()) batchSubmits(T === 1);
    let logits: tf.Tensor2D;
    kv.begin(input.pad);
    try {
      logits = profiler.time('other_ops', () => this.run(input, B, T, G));
    } catch (err) {
      kv.abandon();
      throw err;
    }
    kv.commit(T, input.pad);
    return logits;
  }

  /** Refuses positions outside the model's and token ids outside its vocabulary (INPUT_TOO_LONG, VALIDATION). */
  checkInputs(tokens: Int32Array, positions: Int32Array): void {
    const c = this.config;
    for (let i = 0; i < tokens.length; i++) {
      const p = positions[i]!;
      if (p < 0 || p >= c.maxPositions) throw fail('INPUT_TOO_LONG', `position ${p} exceeds the model's ${c.maxPositions} positions`);
      const t = tokens[i]!;
      if (t < 0 || t >= c.vocabSize) throw fail('VALIDATION', `token id ${t} is outside the vocabulary (${c.vocabSize})`);
    }
  }

  private run(input: ForwardInput, B: number, T: number, G: number): tf.Tensor2D {
    const { kv } = input;
    const c = this.config;
    const N = B * T;
    // Step-wide values (rotary tables for these positions, masks) outlive the per-layer scopes below.
    const memo = new Map<string, tf.Tensor>();
    const cache = <U extends tf.Tensor>(key: string, make: () => U): U => {
      let v = memo.get(key);
      if (!v) memo.set(key, (v = tf.keep(make())));
      return v as U;
    };
    try {
      return tf.tidy(() => {
        const host = this.stepInputs(input.tokens, input.positions, B, T);
        const upload = (name: string): tf.Tensor1D => tf.tensor1d(stepInput(name, host.get(name)!), 'int32');
        const tokens = upload('tokens');
        const positions = upload('positions');
        const ropeRows = host.has('rope.rows') ? upload('rope.rows') : undefined;
        let x = this.arch.embed(tokens, positions); // [N, d]
        for (let l = 0; l < c.numLayers; l++) {
          const window = c.layerWindows[l] ?? null;
          const mask = (): tf.Tensor4D => this.layerMask(kv, window, T, G, input.pad, cache);
          const ctx: StepContext = { B, T, mask, window, kv, positions, ropeRows, lora: input.lora, cache };
          // Each layer's intermediates are freed as soon as it is done, so the next layer reuses the same
          // (cache-warm) heap blocks instead of touching fresh memory, and a step's memory is one layer's worth.
          const prev = x;
          x = tf.tidy(() => this.arch.block(l, prev, ctx));
          prev.dispose();
        }
        const rows = input.logitRows.length === N ? x : tf.gather(x, tf.tensor1d(stepInput('logit.rows', input.logitRows), 'int32'));
        return profiler.time('lm_head', () => this.arch.head(rows)); // [R, V]
      });
    } finally {
      for (const t of memo.values()) t.dispose();
    }
  }

  /**
   * The host values a forward of B rows of T tokens uploads, by name (recorded-step.ts's stepInput): `tokens`,
   * `positions` and, with longrope, `rope.rows` (each token's row of the rotary table), int32 [B·T] each.
   */
  stepInputs(tokens: Int32Array, positions: Int32Array, B: number, T: number): Map<string, Int32Array> {
    const out = new Map([['tokens', tokens], ['positions', positions]]);
    const long = this.config.rope?.long;
    if (long) out.set('rope.rows', ropeRows(positions, B, T, { after: long.after, offset: this.config.maxPositions }));
    return out;
  }

  /**
   * A layer's mask [B, 1, T·G, C+T], made once per step for each distinct window. A window of at least C+T masks
   * nothing this step (the farthest key is C+T−1 positions back), so such layers share the causal mask.
   */
  private layerMask(kv: KVCache, window: number | null, T: number, G: number, pad: readonly number[] | undefined,
    cache: StepContext['cache']): tf.Tensor4D {
    const w = window !== null && window < kv.cols + T ? window : null;
    return cache(`mask:${w}`, () => tf.tensor4d(kv.mask(T, G, pad, w), [kv.rows, 1, T * G, kv.cols + T]));
  }

  dispose(): void {
    for (const t of this.arch.tensors) t.dispose();
  }
}
