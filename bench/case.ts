/** What a benchmark case is, what it gets, what it reports; and the side-by-side round runner. */
import { median, type ApiClient, type Throughput } from './client.ts';
import type { ServerFlags } from './server.ts';
import type { AdapterPool } from './setup.ts';

/** How much work each case does (`--quick` and `--rounds` change them). */
export interface Sizes {
  /** Rounds of every side-by-side comparison (median reported). */
  readonly rounds: number;
  /** max_new_tokens of throughput requests. */
  readonly newTokens: number;
  /** Requests run one at a time for the batching gain's baseline. */
  readonly sequential: number;
  /** Cold loads timed. */
  readonly loads: number;
  /** Switch/active request pairs timed. */
  readonly switchPairs: number;
  /** Streamed requests timed on the idle server. */
  readonly ttftIdle: number;
  /** Requests of the memory case (snapshots after 100 and after this many). */
  readonly memoryRequests: number;
}

export interface Target {
  readonly op: '>=' | '<=';
  readonly value: number;
}

/**
 * One reported number, measured by this run. With a target it is met or missed. Figures of other systems are never
 * figures: they live in bench/references.ts, keyed by `${case}/${key}`.
 */
export interface Figure {
  readonly label: string;
  readonly value: number;
  readonly unit: string;
  readonly target?: Target;
  /** Names the figure across runs whose labels differ (counts in labels) and for references; unique in its case. */
  readonly key?: string;
  /** Shown in the README's Performance table (figures with a target always are). */
  readonly headline?: boolean;
  /** Why the value is missing (NaN), e.g. a variant this machine cannot run. */
  readonly note?: string;
  /** The values a median or percentile was taken over: one per round, or one per sample. */
  readonly values?: readonly number[];
}

export interface CaseContext {
  readonly sizes: Sizes;
  /** The checkpoint the servers run (for cases that compute in the harness itself). */
  readonly modelDir: string;
  /** Whether servers get the cases' tuning flags (`--tuned`), or run on the server's defaults. */
  readonly tuned: boolean;
  readonly adapters: AdapterPool;
  /** The i-th prompt (~32 tokens; distinct for i < 64). */
  prompt(i: number): string;
  /**
   * Runs `fn` against a fresh server started with the harness's flags plus `flags` (what the case measures, such as
   * a device tier smaller than its adapters), plus `tuning` in a tuned run (settings a user would choose for the
   * workload, left at the server's defaults otherwise), then stops it.
   */
  withServer<T>(flags: ServerFlags, fn: (api: ApiClient, server: ServerRun) => Promise<T>, tuning?: ServerFlags): Promise<T>;
  /**
   * The same with `count` servers (replicas) of the same flags, started one after the other; `fn` gets each one's
   * client and what it runs.
   */
  withServers<T>(count: number, flags: ServerFlags, fn: (apis: ApiClient[], servers: ServerRun[]) => Promise<T>): Promise<T>;
  log(msg: string): void;
}

/** A started server as the case sees it. */
export interface ServerRun {
  /** Its GET /info. */
  readonly info: Record<string, unknown>;
  /** Copies of the model it runs (its executor workers; 1 in process). */
  readonly workers: number;
  /** host:port it listens on. */
  readonly address: string;
  /** Ends the process at once (SIGKILL), as a crash or an OOM kill would. */
  kill(): void;
}

export interface BenchCase {
  readonly name: string;
  readonly title: string;
  /** Generated adapters the case uses (bench-000 ...). */
  readonly adapters: number;
  /** The one backend the case measures: a run on another backend leaves it out unless it is named. */
  readonly backend?: string;
  run(ctx: CaseContext): Promise<Figure[]>;
}

export const met = (f: Figure): boolean | undefined =>
  f.target === undefined || !Number.isFinite(f.value) ? undefined : f.target.op === '>=' ? f.value >= f.target.value : f.value <= f.target.value;

/**
 * Measures each configuration once per round, alternating the order every round (ABC, CBA, ...) so
 * drift hits all of them alike, after one untimed warm-up round of every configuration (the first full-size
 * batches of a fresh server run slower, which would penalise whichever configuration went first).
 * Returns tokens/s per configuration per timed round.
 */
export async function sideBySide<K extends string>(
  rounds: number, configs: Record<K, () => Promise<Throughput>>, log: (msg: string) => void,
): Promise<Record<K, number[]>> {
  const names = Object.keys(configs) as K[];
  const out = Object.fromEntries(names.map((k) => [k, [] as number[]])) as Record<K, number[]>;
  for (const k of names) {
    const t = await configs[k]();
    log(`warm-up ${k}: ${t.tokens} tokens in ${t.seconds.toFixed(2)} s (not counted)`);
  }
  for (let r = 0; r < rounds; r++) {
    for (const k of r % 2 === 0 ? names : [...names].reverse()) {
      const t = await configs[k]();
      out[k].push(t.tokensPerSecond);
      log(`round ${r + 1}/${rounds} ${k}: ${t.tokens} tokens in ${t.seconds.toFixed(2)} s = ${t.tokensPerSecond.toFixed(1)} tok/s`);
    }
  }
  return out;
}

/** Median over rounds of the per-round ratio a/b (each round's pair was measured side by side). */
export function ratioFigure(label: string, a: readonly number[], b: readonly number[], extra: Partial<Figure> = {}): Figure {
  const values = a.map((x, i) => x / b[i]!);
  return { label, value: median(values), unit: '×', values, ...extra };
}

export function rateFigure(label: string, perRound: readonly number[], extra: Partial<Figure> = {}): Figure {
  return { label, value: median(perRound), unit: 'tok/s', values: perRound, ...extra };
}
