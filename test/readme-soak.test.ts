/**
 * The README's Reliability table is the rendering of the committed results file of `npm run soak`
 * (bench/soak/readme.ts), so every figure there comes from a run; and the renderer shows results as they are.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { readSoakReport, renderSoakReadme, renderSoakTable } from '../bench/soak/readme.ts';
import { mergeResults, type SoakReport } from '../bench/soak/run.ts';

test('README.md holds exactly the table rendered from bench/results/soak-latest.json (run `npm run soak:readme` after `npm run soak`)', () => {
  const readme = readFileSync('README.md', 'utf8');
  assert.equal(readme, renderSoakReadme(readme, readSoakReport()));
  assert.ok(readSoakReport(), 'bench/results/soak-latest.json is committed');
});

test('the rendering: the run, one row per result with its figures, FAIL marked, notes listed', () => {
  const report: SoakReport = {
    started: '2026-12-04T23:00:00.000Z', seconds: 600, size: 'long', machine: { cpu: 'CPU', cores: 2, memoryBytes: 2 ** 34 }, load: { start: 1.5, end: 2 },
    git: { commit: 'abcdef0123', dirty: false }, args: ['--requests', '100'], complete: true, notes: ['shared machine'],
    results: [
      { name: 'bursts', criterion: 'a | b', passed: true, figures: { 'refused 429': 7, 'p95 s': 0.5 } },
      { name: 'soak', criterion: 'c', passed: false, figures: { requests: 100 }, notes: ['wrong answer: x'] },
    ],
  };
  const table = renderSoakTable(report);
  assert.match(table, /^Run: commit abcdef0, started 2026-12-04 23:00 UTC, 10\.0 min, long versions; CPU, 2 cores, 16 GiB, load average 1\.5 at the start and 2 at the end; `npm run soak -- --requests 100`\. 1 of 2 scenarios passed\.$/m);
  assert.match(table, /^\| bursts \| a \\\| b \| refused 429: 7; p95 s: 0\.5 \| pass \|$/m);
  assert.match(table, /^\| soak \| c \| requests: 100 \| \*\*FAIL\*\* \|$/m);
  assert.match(table, /^- shared machine$/m);
  assert.match(table, /^- soak: wrong answer: x$/m);
  assert.match(renderSoakTable({ ...report, complete: false }), /1 of 2 scenarios passed \(the run was cut short after these\)\.$/m);
  assert.match(renderSoakTable(null), /Not run yet/);
  const carried = renderSoakTable({ ...report, results: [{ ...report.results[0]!, run: { commit: '0123456789', started: '2026-12-04T20:00:00.000Z', load: { start: 9.9, end: 10 } } }, report.results[1]!] });
  assert.match(carried, /1 of 2 scenarios passed\. 1 of them come from an earlier run, as marked in their row\.$/m);
  assert.match(carried, /^\| bursts \| .* \| pass \(run of commit 0123456, started 2026-12-04 20:00 UTC, load average 9\.9 to 10\) \|$/m);
});

test('--merge keeps the earlier results of scenarios not run, marked with their run, and replaces the others', () => {
  const earlier = {
    started: '2026-12-04T20:00:00.000Z', git: { commit: 'aaaaaaa111', dirty: false }, load: { start: 1, end: 2 },
    results: [
      { name: 'bursts', criterion: 'b', passed: true, figures: { n: 1 } },
      { name: 'fuzz x', criterion: 'f', passed: false, figures: { n: 2 } },
      { name: 'soak', criterion: 's', passed: true, figures: { n: 3 }, run: { commit: 'bbbbbbb222', started: '2026-12-03T10:00:00.000Z' } },
    ],
  } as unknown as SoakReport;
  const merged = mergeResults(earlier, [{ name: 'fuzz x', criterion: 'f', passed: true, figures: { n: 4 } }, { name: 'fuzz y', criterion: 'g', passed: true, figures: {} }]);
  assert.deepEqual(merged[0]!.run, { commit: 'aaaaaaa111', started: '2026-12-04T20:00:00.000Z', load: { start: 1, end: 2 } });
  assert.deepEqual(merged.map((r) => [r.name, r.figures.n, r.run?.commit]), [
    ['bursts', 1, 'aaaaaaa111'], ['fuzz x', 4, undefined], ['soak', 3, 'bbbbbbb222'], ['fuzz y', undefined, undefined],
  ]);
  assert.deepEqual(mergeResults(null, merged.slice(1, 2)).map((r) => r.name), ['fuzz x']);
});
