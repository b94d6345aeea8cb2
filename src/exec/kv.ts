/**
 * KV cache for a batch of sequences at different lengths.
 *
 * One tensor per layer for the whole batch, [B, kvHeads, C, headDim], so that a decode step appends the
 * new column for every row with one concat per layer (not one per sequence). Rows are left-padded:
 * row b's valid keys are columns start[b] .. C-1; the attention mask hides the rest. Rows join
 * (after their prefill) by `append` and leave by `keepRows`; leading columns that no row uses any more
 * are trimmed so padding never grows without bound.
 */
import * as tf from '@tensorflow/tfjs-core';
import { dropLeadingCols, gatherRows } from '../backend/raw-copy.ts';
import type { KVCache } from '../model/model.ts';
import type { ModelConfig } from '../model/types.ts';
import { profiler } from '../obs/profile.ts';

/** An empty KV batch for a model. */
export function newKV(c: ModelConfig): KVBatch {
  return new KVBatch(c.numLayers, c.numKvHeads, c.headDim);
}

export class KVBatch implements KVCache {
  /** Per layer [B, kvHeads, C, headDim]; null while the batch holds no column. */
  private k: (tf.Tensor4D | null)[];
  private v: (tf.Tensor4D | null)[];
  /** Columns (cached positions, padded) per row. */
  cols = 0;
  /** First valid column of each row. */
  start: number[] = [];

  constructor(readonly numLayers: number, readonly kvHeads: number, readonly headDim: number) {
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
   * ordered (t, g) for G query heads per KV head: 0 where row b's query t may see key column j
   * (start ≤ j ≤ C+t), a large negative number elsewhere. `pad[b]` left-pads row b's new tokens, which is
   * allowed only on the first forward of a batch (C = 0).
   */
  mask(T: number, groups: number, pad?: readonly number[]): Float32Array {
    const B = this.rows;
    const C = this.cols;
    const width = C + T;
    const out = new Float32Array(B * T * groups * width).fill(-1e9);
    for (let b = 0; b < B; b++) {
      const first = C === 0 ? (pad?.[b] ?? 0) : this.start[b]!;
      for (let t = 0; t < T; t++) {
        for (let g = 0; g < groups; g++) {
          const base = ((b * T + t) * groups + g) * width;
          out.fill(0, base + first, base + C + t + 1);
        }
      }
    }
    return out;
  }

  /** After a forward of T new columns (see mask() for pad). */
  commit(T: number, pad?: readonly number[]): void {
    if (pad && pad.some((p) => p > 0)) {
      if (this.cols !== 0) throw new Error('KVBatch: left padding is only allowed on the first forward');
      this.start = pad.slice();
    }
    this.cols += T;
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
    // Trim leading columns no remaining row uses, once they are a quarter of the cache (amortised).
    const unused = Math.min(...start);
    const trim = unused * 4 >= this.cols ? unused : 0;
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
    this.start = start.map((s) => s - trim);
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
