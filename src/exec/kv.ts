/**
 * KV cache for a batch of sequences at different lengths.
 *
 * One tensor per layer for the whole batch, [B, kvHeads, C, headDim], so that a decode step appends the
 * new column for every row with one concat per layer (not one per sequence). Rows are left-padded:
 * row b's valid keys are columns start[b] .. C-1; the attention mask hides the rest. Rows join
 * (after their prefill) by `append` and leave by `keepRows`; leading columns that no row uses any more
 * are trimmed so padding never grows without bound.
 *
 * Sliding windows: a row's valid columns hold consecutive positions ending at column C−1 (rows are aligned on the
 * right), so the distance between two positions is the distance between their columns, and a layer's window is a
 * band of columns in the mask. When every layer slides, the columns that no window of the next query reaches are
 * dropped too, so the cache of a long sequence stays within about 4/3 of the largest window. When some layer
 * attends globally, every column stays: that layer still sees it.
 */
import * as tf from '@tensorflow/tfjs-core';
import { dropLeadingCols, gatherRows } from '../backend/raw-copy.ts';
import type { KVCache } from '../model/model.ts';
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

export class KVBatch implements KVCache {
  /** Per layer [B, kvHeads, C, headDim]; null while the batch holds no column. */
  private k: (tf.Tensor4D | null)[];
  private v: (tf.Tensor4D | null)[];
  /** Columns (cached positions, padded) per row. */
  cols = 0;
  /** First valid column of each row. */
  start: number[] = [];

  /**
   * `reach`: the number of latest positions a query can attend to in any layer (the largest window when every layer
   * slides), or null (a global layer: every column is kept).
   */
  constructor(readonly numLayers: number, readonly kvHeads: number, readonly headDim: number, readonly reach: number | null = null) {
    this.k = new Array(numLayers).fill(null);
    this.v = new Array(numLayers).fill(null);
  }

  get rows(): number {
    return this.start.length;
  }

  /** Adds `rows` empty rows (before a prefill forward into this batch). */
  addEmptyRows(rows: number): void {
    if (this.cols !== 0) throw new Error('addEmptyRows: only on an empty KV batch');
    for (let i = 0; i < rows; i++) this.start.push(0);
  }

  /**
   * Appends this step's keys/values ([B, kvHeads, T, headDim]) for one layer and returns the full cache.
   * The caller calls `commit(T, newStart)` once after the last layer.
   */
  appendLayer(layer: number, k: tf.Tensor4D, v: tf.Tensor4D): { k: tf.Tensor4D; v: tf.Tensor4D } {
    return profiler.time('kv_cache', () => this.appendCols(layer, k, v));
  }

  private appendCols(layer: number, k: tf.Tensor4D, v: tf.Tensor4D): { k: tf.Tensor4D; v: tf.Tensor4D } {
    const oldK = this.k[layer];
    const oldV = this.v[layer];
    const newK = oldK ? tf.concat4d([oldK, k], 2) : tf.keep(k.clone());
    const newV = oldV ? tf.concat4d([oldV, v], 2) : tf.keep(v.clone());
    tf.keep(newK);
    tf.keep(newV);
    oldK?.dispose();
    oldV?.dispose();
    this.k[layer] = newK;
    this.v[layer] = newV;
    return { k: newK, v: newV };
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
    if (pad && pad.some((p) => p > 0)) {
      if (this.cols !== 0) throw new Error('KVBatch: left padding is only allowed on the first forward');
      this.start = pad.slice();
    }
    this.cols += T;
    const trim = this.trimmable(this.start);
    if (trim === 0) return;
    for (const cache of [this.k, this.v]) {
      cache.forEach((t, l) => {
        if (!t) return;
        cache[l] = tf.keep(dropLeadingCols(t, trim));
        t.dispose();
      });
    }
    this.start = this.start.map((s) => Math.max(0, s - trim));
    this.cols -= trim;
  }

  /**
   * The leading columns to drop for rows starting at `start`: those before every row's first column, and (when
   * every layer slides) those out of reach of the next query, at column C: it sees columns j > C − reach. Dropped
   * only once they are a quarter of the cache, so the copy is amortised over many steps.
   */
  private trimmable(start: readonly number[]): number {
    if (start.length === 0) return 0;
    const unreachable = this.reach === null ? 0 : Math.max(0, this.cols - this.reach + 1);
    const unused = Math.max(Math.min(...start), unreachable);
    return unused > 0 && unused * 4 >= this.cols ? unused : 0;
  }

  /** Moves the rows of `other` into this batch (after them), padding the shorter on the left. Disposes `other`. */
  append(other: KVBatch): void {
    if (other.rows === 0) return other.dispose();
    if (this.rows === 0) {
      this.take(other);
      return;
    }
    const cols = Math.max(this.cols, other.cols);
    const a = this.padLeft(cols - this.cols);
    const b = other.padLeft(cols - other.cols);
    for (let l = 0; l < this.numLayers; l++) {
      const k = tf.keep(tf.concat4d([a.k[l]!, b.k[l]!], 0));
      const v = tf.keep(tf.concat4d([a.v[l]!, b.v[l]!], 0));
      a.k[l]!.dispose(); a.v[l]!.dispose(); b.k[l]!.dispose(); b.v[l]!.dispose();
      this.k[l] = k;
      this.v[l] = v;
    }
    this.start = [...a.start, ...b.start];
    this.cols = cols;
    other.k.fill(null);
    other.v.fill(null);
    other.start = [];
    other.cols = 0;
  }

  /** Keeps only the given rows (in this order), then trims columns no remaining row uses. */
  keepRows(rows: readonly number[]): void {
    if (rows.length === this.rows && rows.every((r, i) => r === i)) return;
    if (rows.length === 0) {
      this.clear();
      return;
    }
    const start = rows.map((r) => this.start[r]!);
    const trim = this.trimmable(start);
    for (let l = 0; l < this.numLayers; l++) {
      for (const cache of [this.k, this.v]) {
        const t = cache[l];
        if (!t) continue;
        const g = gatherRows(t, rows);
        cache[l] = tf.keep(trim > 0 ? dropLeadingCols(g, trim) : g);
        if (trim > 0) g.dispose();
        t.dispose();
      }
    }
    this.start = start.map((s) => Math.max(0, s - trim));
    this.cols -= trim;
  }

  clear(): void {
    for (let l = 0; l < this.numLayers; l++) {
      this.k[l]?.dispose();
      this.v[l]?.dispose();
      this.k[l] = null;
      this.v[l] = null;
    }
    this.start = [];
    this.cols = 0;
  }

  dispose(): void {
    this.clear();
  }

  private take(other: KVBatch): void {
    this.clear();
    this.k = other.k.slice();
    this.v = other.v.slice();
    this.start = other.start.slice();
    this.cols = other.cols;
    other.k.fill(null);
    other.v.fill(null);
    other.start = [];
    other.cols = 0;
  }

  /** Pads n columns on the left (in place); returns this. */
  private padLeft(n: number): KVBatch {
    if (n === 0) return this;
    for (let l = 0; l < this.numLayers; l++) {
      const k = this.k[l]!;
      const v = this.v[l]!;
      this.k[l] = tf.keep(tf.pad(k, [[0, 0], [0, 0], [n, 0], [0, 0]]));
      this.v[l] = tf.keep(tf.pad(v, [[0, 0], [0, 0], [n, 0], [0, 0]]));
      k.dispose();
      v.dispose();
    }
    this.start = this.start.map((s) => s + n);
    this.cols += n;
    return this;
  }
}
