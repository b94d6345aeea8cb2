/**
 * KV cache for a batch of sequences at different lengths.
 *
 * Per layer, tensors for the whole batch, so that a decode step appends the new column of every row at once (not per
 * sequence). On wasm and cpu a layer is a key and a value tensor [B, kvHeads, C, headDim], appended to by a concat.
 * On webgpu a layer is one packed tensor [B, kvHeads, capacity, 2·headDim] (column j: its key, then its value) with
 * spare columns on the right: a step writes its columns in place with one kernel (kv-append.ts), and the tensor is
 * replaced by a larger copy only when full, growing geometrically, so that appending costs amortised O(1) copied
 * columns instead of a copy of the whole cache per step. Rows are left-padded:
 * row b's valid keys are columns start[b] .. C-1; the attention mask hides the rest. Rows join
 * (after their prefill) by `append` and leave by `keepRows`; leading columns that no row uses any more
 * are trimmed so padding never grows without bound. Packed rows may also leave in place (`retire`: the row stays,
 * free) and be filled in place (`place`: a prefilled row copied into a free one), so that the layers' tensors, which a
 * recorded decode step binds, stay the same (src/exec/tf-executor.ts's slotRows).
 *
 * Sliding windows: a row's valid columns hold consecutive positions ending at column C−1 (rows are aligned on the
 * right), so the distance between two positions is the distance between their columns, and a layer's window is a
 * band of columns in the mask. When every layer slides, the columns that no window of the next query reaches are
 * dropped too, so the cache of a long sequence stays within about 4/3 of the largest window. When some layer
 * attends globally, every column stays: that layer still sees it.
 */
import * as tf from '@tensorflow/tfjs-core';
import { dropLeadingCols, gatherRows } from '../backend/raw-copy.ts';
import { maxTensorBytes } from '../backend/webgpu/init.ts';
import { kvAppendGpu, kvCopyRowGpu } from '../backend/webgpu/kernels/kv-append.ts';
import { fusedKernels, uninitialized } from '../backend/webgpu/kernels/program.ts';
import { stepInput } from '../backend/webgpu/recorded-step.ts';
import type { KVCache, LayerKV } from '../model/model.ts';
import type { ModelConfig } from '../model/types.ts';
import { profiler } from '../obs/profile.ts';

/** An empty KV batch for a model. */
export function newKV(c: ModelConfig): KVBatch {
  return new KVBatch(c.numLayers, c.numKvHeads, c.headDim, lookback(c.layerWindows));
}

/** How many of the latest positions any layer can still attend to: the largest window, or null when a layer is global. */
function lookback(windows: readonly (number | null)[]): number | null {
  if (windows.length === 0 || windows.some((w) => w === null)) return null;
  return Math.max(...(windows as number[]));
}

/** Packed capacities are multiples of this many columns. */
const CAPACITY_BLOCK = 16;

/**
 * The capacity (columns) a packed layer is given when it must hold `need` columns and holds `current`: at least 1.5×
 * `current`, in blocks of CAPACITY_BLOCK, but no more than a tensor of `bytesPerColumn` per column may bind on the
 * device (`limitBytes`) unless `need` itself is over it.
 */
export function packedCapacity(need: number, current: number, bytesPerColumn: number, limitBytes = maxTensorBytes()?.bytes ?? Infinity): number {
  const grown = Math.ceil(Math.max(need, current * 1.5) / CAPACITY_BLOCK) * CAPACITY_BLOCK;
  return Math.max(need, Math.min(grown, Math.floor(limitBytes / bytesPerColumn)));
}

export class KVBatch implements KVCache {
  /**
   * Per layer, the tensors holding its columns, [B, kvHeads, capacity, D] each; [] while the batch holds no column.
   * Split: the keys and the values, D = headDim, capacity = cols. Packed: one tensor, D = 2·headDim, capacity ≥ cols,
   * the columns from cols on spare (their contents undefined, never read).
   */
  private layers: tf.Tensor4D[][];
  /** Columns (cached positions, padded) per row. */
  cols = 0;
  /** First valid column of each row. */
  start: number[] = [];
  /** Per row: freed by retire() (its sequence left), until place() fills it. */
  private free: boolean[] = [];
  /** Packed: the forward under way's KV state on the device (stateData), made at its first append, freed at commit. */
  private stepState: tf.Tensor1D | null = null;
  /** The left padding of the forward under way (begin()), on a first forward only. */
  private stepPad: number[] | null = null;

  /**
   * `reach`: the number of latest positions a query can attend to in any layer (the largest window when every layer
   * slides), or null (a global layer: every column is kept). `packed`: layers packed with spare capacity and appended
   * to in place (webgpu only), else split. `limitBytes`: the most bytes one packed layer may have (the device's binding
   * limit); spare columns are given up to stay within it.
   */
  constructor(readonly numLayers: number, readonly kvHeads: number, readonly headDim: number, readonly reach: number | null = null,
    readonly packed = fusedKernels(), private readonly limitBytes = maxTensorBytes()?.bytes ?? Infinity) {
    this.layers = Array.from({ length: numLayers }, () => []);
  }

  get rows(): number {
    return this.start.length;
  }

  /** Columns the layers' tensors have room for: cols, or more when packed. */
  get capacity(): number {
    return this.layers[0]![0]?.shape[2] ?? 0;
  }

  /** Adds `rows` empty rows (before a prefill forward into this batch). */
  addEmptyRows(rows: number): void {
    if (this.cols !== 0) throw new Error('addEmptyRows: only on an empty KV batch');
    for (let i = 0; i < rows; i++) {
      this.start.push(0);
      this.free.push(false);
    }
  }

  /**
   * Appends this step's keys/values for one layer, as the projections give them: token rows [B·T, kvHeads·headDim],
   * rows (b, t). Returns the layer's whole cache. The caller calls `commit(T, pad)` once after the last layer.
   */
  appendLayer(layer: number, k: tf.Tensor2D, v: tf.Tensor2D): LayerKV {
    if (this.packed) return profiler.time('kv_cache', () => this.writeCols(layer, k, v));
    // The transposes are freed here, not left to the caller's scope.
    return profiler.time('kv_cache', () => tf.tidy(() => this.appendCols(layer, this.toHeads(k), this.toHeads(v))) as LayerKV);
  }

  /** Token rows [B·T, kvHeads·headDim] → [B, kvHeads, T, headDim], the split layers' layout. */
  private toHeads(x: tf.Tensor2D): tf.Tensor4D {
    const B = this.rows;
    const T = x.shape[0] / B;
    return tf.transpose(tf.reshape(x, [B, T, this.kvHeads, this.headDim]), [0, 2, 1, 3]);
  }

  private appendCols(layer: number, k: tf.Tensor4D, v: tf.Tensor4D): LayerKV {
    const [oldK, oldV] = this.layers[layer]!;
    const newK = oldK ? tf.concat4d([oldK, k], 2) : tf.keep(k.clone());
    const newV = oldV ? tf.concat4d([oldV, v], 2) : tf.keep(v.clone());
    tf.keep(newK);
    tf.keep(newV);
    oldK?.dispose();
    oldV?.dispose();
    this.layers[layer] = [newK, newV];
    return { k: newK, v: newV };
  }

  /**
   * Packed: writes the T new columns in place after the C cached ones, first growing the layer when it has no room;
   * attention then reads the layer in place (a first forward's too: its columns are then the whole cache).
   */
  private writeCols(layer: number, k: tf.Tensor2D, v: tf.Tensor2D): LayerKV {
    const T = k.shape[0] / this.rows;
    const cols = this.cols + T;
    let cache = this.layers[layer]![0];
    if (!cache || cache.shape[2] < cols) cache = this.grow(layer, cols);
    const state = this.state();
    kvAppendGpu(cache, k, v, state, this.cols);
    return { packed: cache, cols, state };
  }

  /**
   * Once before the first layer of a forward: `pad` (a first forward's left padding of each row's new tokens; see mask())
   * makes the KV state's first valid columns, which the webgpu kernels mask with, before commit records it.
   */
  begin(pad?: readonly number[]): void {
    this.stepPad = this.cols === 0 && pad ? pad.slice() : null;
  }

  /**
   * The KV state of the forward under way, as the webgpu kernels read it (int32 [1 + B]): the columns cached before
   * it, then each row's first valid column (on a first forward, its left padding given to begin()). A recorded step's
   * replay writes it (name `kv.state`).
   */
  stateData(): Int32Array {
    return Int32Array.from([this.cols, ...(this.stepPad ?? this.start)]);
  }

  private state(): tf.Tensor1D {
    return (this.stepState ??= tf.keep(tf.tensor1d(stepInput('kv.state', this.stateData()), 'int32')));
  }

  /**
   * Packed: gives every layer room for `T` more columns now, growing as a forward's append would (packedCapacity), so
   * that the next forward of T new columns writes in place, and (webgpu) the step can be recorded. The old cache goes
   * back to tfjs's pool at the next submit (the growth's copies are queued before the step). Nothing to do when split
   * or empty.
   */
  reserve(T: number): void {
    if (!this.packed || this.cols === 0) return;
    for (let l = 0; l < this.numLayers; l++) {
      const cache = this.layers[l]![0];
      if (cache && cache.shape[2] < this.cols + T) this.grow(l, this.cols + T);
    }
  }

  /** Device bytes of one packed column of `rows` rows (keys and values of every KV head). */
  private columnBytes(rows: number): number {
    return rows * this.kvHeads * 2 * this.headDim * 4;
  }

  /**
   * `want` columns, or fewer when packed layers of `rows` rows that wide would not bind on the device (the caller keeps
   * at least the cached columns).
   */
  private fitCapacityFor(want: number, rows: number): number {
    return Math.min(want, Math.floor(this.limitBytes / this.columnBytes(rows)));
  }

  /** Packed: replaces a layer's tensor by one with room for `need` columns (packedCapacity), its columns copied. */
  private grow(layer: number, need: number): tf.Tensor4D {
    const old = this.layers[layer]![0];
    const held = old?.shape[2] ?? 0;
    const capacity = packedCapacity(need, held, this.columnBytes(this.rows), this.limitBytes);
    const next = tf.keep(old ? tf.pad(old, [[0, 0], [0, 0], [0, capacity - held], [0, 0]])
      : uninitialized<tf.Tensor4D>([this.rows, this.kvHeads, capacity, 2 * this.headDim]));
    old?.dispose();
    this.layers[layer] = [next];
    return next;
  }

  /**
   * The additive attention mask for a forward of T new tokens per row, [B, 1, T*G, C+T] with query rows
   * ordered (t, g) for G query heads per KV head: 0 where row b's query t (column C+t) may see key column j,
   * a large negative number elsewhere. Causal: start ≤ j ≤ C+t. With a sliding `window` W also C+t − W < j, as
   * transformers' sliding_window_overlay (masking_utils.py: `kv_idx > q_idx - sliding_window`) and'ed with its
   * causal_mask_function (`kv_idx <= q_idx`). `pad[b]` left-pads row b's new tokens, which is allowed only on the
   * first forward of a batch (C = 0).
   */
  mask(T: number, groups: number, pad?: readonly number[], window: number | null = null): Float32Array {
    const B = this.rows;
    const C = this.cols;
    const width = C + T;
    const out = new Float32Array(B * T * groups * width).fill(-1e9);
    for (let b = 0; b < B; b++) {
      const first = C === 0 ? (pad?.[b] ?? 0) : this.start[b]!;
      for (let t = 0; t < T; t++) {
        const from = window === null ? first : Math.max(first, C + t - window + 1);
        for (let g = 0; g < groups; g++) {
          const base = ((b * T + t) * groups + g) * width;
          out.fill(0, base + from, base + C + t + 1);
        }
      }
    }
    return out;
  }

  /** After a forward of T new columns (see mask() for pad); then drops the columns no window reaches any more. */
  commit(T: number, pad?: readonly number[]): void {
    this.dropState();
    if (pad && pad.some((p) => p > 0)) {
      if (this.cols !== 0) throw new Error('KVBatch: left padding is only allowed on the first forward');
      this.start = pad.slice();
    }
    this.cols += T;
    this.start = this.start.map((s, b) => (this.free[b] ? this.cols : s)); // a free row has no valid column
    const trim = this.trimmable(this.start, this.free);
    if (trim === 0) return;
    this.layers = this.layers.map((ts) => ts.map((t) => {
      const kept = tf.keep(dropLeadingCols(t, trim));
      t.dispose();
      return kept;
    }));
    this.start = this.start.map((s) => Math.max(0, s - trim));
    this.cols -= trim;
  }

  /**
   * The leading columns to drop for rows starting at `start` (`free`: the rows that hold no sequence, which no trim
   * waits for): those before every other row's first column, and (when every layer slides) those out of reach of
   * the next query, at column C: it sees columns j > C − reach. Dropped only once they are a quarter of the cache, so
   * the copy is amortised over many steps.
   */
  private trimmable(start: readonly number[], free: readonly boolean[]): number {
    const held = start.filter((_, b) => !free[b]);
    if (held.length === 0) return 0;
    const unreachable = this.reach === null ? 0 : Math.max(0, this.cols - this.reach + 1);
    const unused = Math.max(Math.min(...held), unreachable);
    return unused > 0 && unused * 4 >= this.cols ? unused : 0;
  }

  /** Moves the rows of `other` into this batch (after them), padding the shorter on the left. Disposes `other`. */
  append(other: KVBatch): void {
    if (other.rows === 0) return other.dispose();
    if (other.packed !== this.packed) {
      other.dispose();
      throw new Error('KVBatch.append: one batch is packed, the other split');
    }
    if (this.rows === 0) {
      this.take(other);
      return;
    }
    const cols = Math.max(this.cols, other.cols);
    // Both as wide as this batch with its spare columns (packed; split batches have none), so that a longer running
    // batch joined by a shorter one is not copied twice; no wider than binds on the device.
    const spare = this.capacity - this.cols;
    const capacity = this.packed ? Math.max(cols, this.fitCapacityFor(cols + spare, this.rows + other.rows)) : cols;
    const a = this.padTo(cols - this.cols, capacity);
    const b = other.padTo(cols - other.cols, capacity);
    this.layers = a.layers.map((ts, l) => ts.map((t, i) => {
      const u = b.layers[l]![i]!;
      const joined = tf.keep(tf.concat4d([t, u], 0));
      t.dispose();
      u.dispose();
      return joined;
    }));
    this.start = [...a.start, ...b.start];
    this.free = [...a.free, ...b.free];
    this.cols = cols;
    other.layers = other.layers.map(() => []);
    other.start = [];
    other.free = [];
    other.cols = 0;
  }

  /**
   * Frees row b (its sequence left) without moving any row: the row keeps its place, none of its columns valid (its
   * first valid column is cols, after every step too), and no trim waits for it. Its columns are written by the steps
   * that decode it until place() gives it a new sequence or keepRows() drops it; nothing reads them for anyone else.
   */
  retire(b: number): void {
    if (!Number.isInteger(b) || b < 0 || b >= this.rows) throw new Error(`KVBatch.retire: no row ${b}`);
    this.start[b] = this.cols;
    this.free[b] = true;
  }

  /** Whether place() can move row `from` of `other` into a row of this batch: both packed, its columns no more than these. */
  fits(other: KVBatch, from: number): boolean {
    const len = other.cols - (other.start[from] ?? other.cols);
    return this.packed && other.packed && this.cols > 0 && len >= 1 && len <= this.cols;
  }

  /**
   * Packed: copies row `from` of `other` (its valid columns) into row b of this batch, ending at this batch's last
   * column (rows are aligned on the right), in place, one dispatch per layer. The layers' tensors stay the same, so a
   * recorded step that binds them still replays (a row joining by append() replaces them). `other` is left as it was.
   */
  place(b: number, other: KVBatch, from: number): void {
    if (!this.fits(other, from) || !Number.isInteger(b) || b < 0 || b >= this.rows) throw new Error(`KVBatch.place: row ${from} of the other batch does not fit row ${b}`);
    const first = other.start[from]!;
    const len = other.cols - first;
    const at = this.cols - len;
    profiler.time('kv_cache', () => {
      for (let l = 0; l < this.numLayers; l++) kvCopyRowGpu(this.layers[l]![0]!, b, at, other.layers[l]![0]!, from, first, len);
    });
    this.start[b] = at;
    this.free[b] = false;
  }

  /** Keeps only the given rows (in this order), then trims columns no remaining row uses. */
  keepRows(rows: readonly number[]): void {
    if (rows.length === this.rows && rows.every((r, i) => r === i)) return;
    if (rows.length === 0) {
      this.clear();
      return;
    }
    const more = rows.length > this.rows;
    const start = rows.map((r) => this.start[r]!);
    const free = rows.map((r) => this.free[r]!);
    const trim = this.trimmable(start, free);
    this.layers = this.layers.map((ts) => ts.map((t) => {
      const g = gatherRows(t, rows);
      const kept = tf.keep(trim > 0 ? dropLeadingCols(g, trim) : g);
      if (trim > 0) g.dispose();
      t.dispose();
      return kept;
    }));
    this.start = start.map((s) => Math.max(0, s - trim));
    this.free = free;
    this.cols -= trim;
    // More rows (a fork) at the same capacity may no longer bind: drop spare columns until they do.
    if (this.packed && more) {
      const fit = Math.max(this.cols, this.fitCapacityFor(this.capacity, rows.length));
      if (fit < this.capacity) this.padTo(0, fit);
    }
  }

  clear(): void {
    this.dropState();
    for (const ts of this.layers) tf.dispose(ts);
    this.layers = this.layers.map(() => []);
    this.start = [];
    this.free = [];
    this.cols = 0;
  }

  dispose(): void {
    this.clear();
  }

  /** A forward failed after appending: its state is forgotten (its columns beyond cols are spare again). */
  abandon(): void {
    this.dropState();
  }

  private dropState(): void {
    this.stepState?.dispose();
    this.stepState = null;
    this.stepPad = null;
  }

  private take(other: KVBatch): void {
    this.clear();
    this.layers = other.layers;
    this.start = other.start.slice();
    this.free = other.free.slice();
    this.cols = other.cols;
    other.layers = other.layers.map(() => []);
    other.start = [];
    other.free = [];
    other.cols = 0;
  }

  /**
   * Pads n columns on the left and, packed, spare columns on the right up to `capacity` columns in all (split: cols + n),
   * in place; returns this.
   */
  private padTo(n: number, capacity: number): KVBatch {
    const right = capacity - n - this.capacity;
    if (n === 0 && right === 0) return this;
    this.layers = this.layers.map((ts) => ts.map((t) => {
      // Fewer spare columns than now (right < 0): those beyond cols are undefined, so they are cut, not copied.
      const kept = right < 0 ? tf.slice(t, [0, 0, 0, 0], [-1, -1, t.shape[2] + right, -1]) : t;
      const padded = tf.keep(n === 0 && right < 0 ? kept : tf.pad(kept, [[0, 0], [0, 0], [n, Math.max(0, right)], [0, 0]]));
      if (kept !== t && kept !== padded) kept.dispose();
      t.dispose();
      return padded;
    }));
    this.start = this.start.map((s) => s + n);
    this.cols += n;
    return this;
  }
}
