/**
 * Grouping the rows of a batch by adapter (LoRAX `find_segments`): the LoRA kernels run once
 * per segment of consecutive rows that share an adapter. `null` is the base model (no adapter).
 */

export interface Segment {
  /** First row of the run. */
  readonly start: number;
  /** One past the last row of the run. */
  readonly end: number;
  readonly adapter: number | null;
}

/**
 * Maximal runs of equal adapters, in row order. As a loop: start a new segment at row 0 and at
 * every row whose adapter differs from the previous row's.
 */
export function findSegments(rowAdapters: readonly (number | null)[]): Segment[] {
  const segments: Segment[] = [];
  let start = 0;
  for (let i = 1; i <= rowAdapters.length; i++) {
    if (i === rowAdapters.length || rowAdapters[i] !== rowAdapters[start]) {
      segments.push({ start, end: i, adapter: rowAdapters[start]! });
      start = i;
    }
  }
  return segments;
}

/**
 * A permutation `perm` (new position → original row) that makes equal adapters contiguous:
 * groups appear in order of each adapter's first row, and rows keep their order within a group.
 * `findSegments(perm.map((i) => rowAdapters[i]))` then yields one segment per distinct adapter.
 */
export function sortRowsByAdapter(rowAdapters: readonly (number | null)[]): number[] {
  const groups = new Map<number | null, number[]>();
  rowAdapters.forEach((adapter, row) => {
    const group = groups.get(adapter);
    if (group) group.push(row);
    else groups.set(adapter, [row]);
  });
  return [...groups.values()].flat();
}
