/**
 * The short run of the fuzz targets (test/helpers/fuzz.ts): a few hundred to a couple of thousand cases each, with
 * a fixed seed (FUZZ_SEED overrides it; fast-check prints the seed and counterexample of a failure). The long run is
 * `bench/soak/fuzz.ts`. Each run must also have reached both outcomes, so a generator that only ever produces
 * rejects (or only valid input) fails here.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { matchesTarget, parsePeftConfig, rankFor, scalingFor } from '../src/lora/peft-config.ts';
import { bounded, CATASTROPHIC, FUZZ_TARGETS, PATTERN_MS } from './helpers/fuzz.ts';

const SEED = process.env.FUZZ_SEED !== undefined ? Number(process.env.FUZZ_SEED) : 20261204;

for (const target of FUZZ_TARGETS) {
  test(`fuzz ${target.name}: ${target.criterion} (${target.testCases} cases)`, async () => {
    const figures = await target.run({ cases: target.testCases, seed: SEED });
    assert.equal(figures.cases, target.testCases);
    assert.ok(Number(figures.accepted) > 0, `some cases were accepted: ${JSON.stringify(figures)}`);
    assert.ok(Number(figures.rejected) > 0, `some cases were rejected: ${JSON.stringify(figures)}`);
  });
}

test(`catastrophic-backtracking patterns in exclude_modules, rank_pattern and alpha_pattern are matched in < ${PATTERN_MS} ms of CPU (RE2)`, () => {
  // In JavaScript's RegExp, `(a+)+$` against 30 a's and a "!" already takes seconds; here 400 and 2000 characters.
  for (const re of CATASTROPHIC) {
    // exclude_modules is matched as target_modules is (a full match), and is not refused for selecting embeddings.
    const cfg = parsePeftConfig({ r: 2, lora_alpha: 4, target_modules: ['q_proj'], exclude_modules: re, rank_pattern: { [re]: 4 }, alpha_pattern: { [re]: 8 } }, { maxRank: 8 });
    for (const subject of ['a'.repeat(400) + '!', 'a'.repeat(2000) + '!', 'x'.repeat(400) + 'x', `model.${'layers.'.repeat(100)}0.q_proj`]) {
      bounded(`${re} on ${subject.length} characters`, () => matchesTarget(cfg, subject));
      bounded(`rank_pattern ${re} on ${subject.length} characters`, () => rankFor(cfg, subject));
      bounded(`alpha_pattern ${re} on ${subject.length} characters`, () => scalingFor(cfg, subject, 2));
    }
  }
});
