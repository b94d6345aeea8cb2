/**
 * The long fuzz run: every target of test/helpers/fuzz.ts (the same properties `npm test` runs briefly) with
 * `cases` cases each and a fresh random seed, one FuzzResult per target. A failure is reported, not thrown: its
 * notes carry fast-check's report (seed, path and counterexample, enough to replay it with FUZZ_SEED in
 * test/fuzz.test.ts or with `seed` here).
 *
 * Run alone: `node --import tsx bench/soak/fuzz.ts [cases]` prints the results as JSON.
 */
import { randomInt } from 'node:crypto';
import { pathToFileURL } from 'node:url';
import { FUZZ_TARGETS } from '../../test/helpers/fuzz.ts';

export interface FuzzResult {
  name: string;
  criterion: string;
  passed: boolean;
  figures: Record<string, number | string>;
  notes?: string[];
}

/** Runs every fuzz target with `cases` cases (`seed`: the same seed for each, else a random one each). */
export async function runFuzz(opts: { cases: number; seed?: number }): Promise<FuzzResult[]> {
  const results: FuzzResult[] = [];
  for (const target of FUZZ_TARGETS) {
    const seed = opts.seed ?? randomInt(2 ** 31);
    const start = performance.now();
    try {
      const figures = await target.run({ cases: opts.cases, seed });
      results.push({ name: `fuzz ${target.name}`, criterion: target.criterion, passed: true, figures: { ...figures, seed } });
    } catch (err) {
      results.push({
        name: `fuzz ${target.name}`,
        criterion: target.criterion,
        passed: false,
        figures: { seed, seconds: +((performance.now() - start) / 1000).toFixed(2) },
        notes: [(err as Error).message ?? String(err)],
      });
    }
  }
  return results;
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? '').href) {
  const cases = Number(process.argv[2] ?? 10_000);
  const results = await runFuzz({ cases });
  console.log(JSON.stringify(results, null, 2));
  process.exitCode = results.every((r) => r.passed) ? 0 : 1;
}
