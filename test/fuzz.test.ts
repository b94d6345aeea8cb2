/**
 * The short run of the fuzz targets (test/helpers/fuzz.ts): a few hundred to a couple of thousand cases each, with
 * a fixed seed (FUZZ_SEED overrides it; fast-check prints the seed and counterexample of a failure). The long run is
 * `bench/soak/fuzz.ts`. Each run must also have reached both outcomes, so a generator that only ever produces
 * rejects (or only valid input) fails here.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { FUZZ_TARGETS } from './helpers/fuzz.ts';

const SEED = process.env.FUZZ_SEED !== undefined ? Number(process.env.FUZZ_SEED) : 20261204;

for (const target of FUZZ_TARGETS) {
  test(`fuzz ${target.name}: ${target.criterion} (${target.testCases} cases)`, async () => {
    const figures = await target.run({ cases: target.testCases, seed: SEED });
    assert.equal(figures.cases, target.testCases);
    assert.ok(Number(figures.accepted) > 0, `some cases were accepted: ${JSON.stringify(figures)}`);
    assert.ok(Number(figures.rejected) > 0, `some cases were rejected: ${JSON.stringify(figures)}`);
  });
}
