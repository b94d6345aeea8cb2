/**
 * Figures of other systems that the bench table shows beside ours. They are not measured by this harness: each
 * names its source, and the results JSON keeps them apart from the measured figures.
 */
export interface Reference {
  readonly system: string;
  readonly source: string;
  /** By `${case}/${Figure.key}`. */
  readonly values: Readonly<Record<string, number>>;
}

export const REFERENCES: readonly Reference[] = [{
  system: 'llama.cpp',
  source: 'llama-server built for its CPU, 2 threads, same model (f32), 32 LoRA adapters r=8 on q/k/v/o, 32-token greedy '
    + 'answers, on the 2-core machine of issue 5 of this project (wave 1), which may differ from the machine of a run; '
    + 'given with that issue, not measured by this harness',
  values: {
    'batching/sequential': 60,
    'batching/base': 295,
    'batching/one': 317,
    'batching/mixed': 59,
    'batching/mixed-ratio': 59 / 317,
    'batching/gain': 59 / 60,
  },
}];

/** The reference value of one figure, per system (absent: none). */
export function referenceOf(caseName: string, key: string | undefined): { system: string; value: number }[] {
  if (key === undefined) return [];
  return REFERENCES.flatMap((r) => (`${caseName}/${key}` in r.values ? [{ system: r.system, value: r.values[`${caseName}/${key}`]! }] : []));
}
