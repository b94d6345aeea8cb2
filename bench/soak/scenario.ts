/**
 * What a reliability scenario reports (the shape `bench/soak/fuzz.ts` reports too), and the small tools every
 * scenario uses to decide it: a tally of violations and the statistics of the figures.
 */

/** One scenario's outcome: its criterion, whether it held, and the figures it was judged on. */
export interface ScenarioResult {
  readonly name: string;
  /** What must hold, in words. */
  readonly criterion: string;
  readonly passed: boolean;
  readonly figures: Record<string, number | string>;
  /** The first violations seen, and caveats about the figures. */
  readonly notes?: string[];
  /** Set on a result carried over from an earlier run (`npm run soak -- --merge`): that run's commit, start and load. */
  readonly run?: { readonly commit: string; readonly started: string; readonly load?: { readonly start: number; readonly end: number } };
}

/** How big a run is: `short` inside `npm test`, `long` for `npm run soak`. */
export type Size = 'short' | 'long';

export interface ScenarioContext {
  readonly size: Size;
  /** Where servers write their logs and adapter folders. */
  readonly workDir: string;
  /** Requests of the mixed soak (default: 50,000 long, 1,500 short). */
  readonly soakRequests?: number;
  readonly log: (msg: string) => void;
}

export interface Scenario {
  readonly name: string;
  readonly criterion: string;
  run(ctx: ScenarioContext): Promise<ScenarioResult>;
}

/**
 * Violations of a criterion, counted by kind; the first few are kept as examples. A scenario passes when
 * there are none.
 */
export class Violations {
  private readonly counts = new Map<string, number>();
  private readonly examples: string[] = [];

  /** Records one violation of `kind`, with `detail` as an example while fewer than 8 are kept. */
  add(kind: string, detail: string): void {
    this.counts.set(kind, (this.counts.get(kind) ?? 0) + 1);
    if (this.examples.length < 8) this.examples.push(`${kind}: ${detail}`);
  }

  /** `add(kind, detail())` unless `ok`; returns `ok`. */
  check(ok: boolean, kind: string, detail: () => string): boolean {
    if (!ok) this.add(kind, detail());
    return ok;
  }

  count(kind: string): number {
    return this.counts.get(kind) ?? 0;
  }

  get total(): number {
    let n = 0;
    for (const c of this.counts.values()) n += c;
    return n;
  }

  /** The result of a scenario judged by these violations (and nothing else). */
  result(s: Pick<Scenario, 'name' | 'criterion'>, figures: Record<string, number | string>, notes: string[] = []): ScenarioResult {
    const counted = Object.fromEntries([...this.counts].map(([k, v]) => [`violations: ${k}`, v]));
    return { name: s.name, criterion: s.criterion, passed: this.total === 0, figures: { ...figures, ...counted }, notes: [...this.examples, ...notes] };
  }
}

/** The bench's percentile (bench/client.ts), which the scenarios' latency criteria use too. */
export { percentile } from '../client.ts';

/** Least-squares slope of y over x (0 with fewer than two points). */
export function slope(points: readonly (readonly [x: number, y: number])[]): number {
  const n = points.length;
  if (n < 2) return 0;
  const mx = points.reduce((s, [x]) => s + x, 0) / n;
  const my = points.reduce((s, [, y]) => s + y, 0) / n;
  let num = 0;
  let den = 0;
  for (const [x, y] of points) {
    num += (x - mx) * (y - my);
    den += (x - mx) ** 2;
  }
  return den === 0 ? 0 : num / den;
}

/** Rounds for the report: 3 significant decimals at most. */
export function round(x: number, digits = 3): number {
  return Number.isFinite(x) ? Number(x.toFixed(digits)) : x;
}

export const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));
