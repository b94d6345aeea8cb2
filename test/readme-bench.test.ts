/**
 * The README's Performance table is the rendering of the committed results files (bench/readme.ts), so every figure
 * in it comes from a bench run; and the renderer marks targets, missing runs and references as it says.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { readReport, renderReadme, renderScaleOut, renderScaleOutDoc, renderTable, RESULTS, SCALE_OUT, type Report } from '../bench/readme.ts';

test('README.md holds exactly the table rendered from bench/results (run `npm run bench:readme` after a bench run)', () => {
  const readme = readFileSync('README.md', 'utf8');
  const rendered = renderReadme(readme, readReport(RESULTS.defaults), readReport(RESULTS.tuned));
  assert.equal(readme, rendered);
  assert.ok(readReport(RESULTS.tuned), `${RESULTS.tuned} is committed`);
});

test('the rendering: both runs side by side by figure key, targets met or missed, references apart, missing runs said', () => {
  const run = (value: number, extra: Partial<Report> = {}): Report => ({
    started: '2026-12-04T21:00:00.000Z', seconds: 120, machine: { cpu: 'CPU', cores: 2, memoryBytes: 2 ** 34 },
    backend: { server: 'wasm', workers: 1 }, git: { commit: 'abcdef0123', dirty: false }, args: [],
    cases: [{
      name: 'batching', figures: [
        { label: 'one at a time (4 requests)', key: 'sequential', value: value * 10, unit: 'tok/s', headline: true },
        { label: 'gain', key: 'gain', value, unit: '×', target: { op: '>=', value: 4 } },
        { label: 'not in the README', value: 1, unit: 'ms' },
      ],
    }],
    ...extra,
  });
  const table = renderTable(run(5.5), run(3.25, { backend: { server: 'wasm', workers: 2 } }));
  const row = (label: string) => table.split('\n').find((l) => l.startsWith(`| batching | ${label} |`));
  assert.equal(row('one at a time (4 requests)'), '| batching | one at a time (4 requests) | 55 tok/s | 32.5 tok/s |  | 60 tok/s |');
  assert.equal(row('gain'), '| batching | gain | 5.50× ✓ | 3.25× ✗ MISSED | ≥ 4× | 0.98× |');
  assert.equal(row('not in the README'), undefined);
  assert.match(table, /- Tuned: .*2 workers; `npm run bench`/);
  assert.match(table, /llama\.cpp \(reference\): .*not measured by this harness/);
  const one = renderTable(null, run(5.5));
  assert.match(one, /- Server defaults: not run\./);
  assert.match(one, /\| batching \| gain \| not run \| 5\.50× ✓ \|/);
});

test('docs/scale-out.md holds exactly the tables rendered from bench/results/scale-out.json', () => {
  const doc = readFileSync(SCALE_OUT.doc, 'utf8');
  const report = readReport(SCALE_OUT.results);
  assert.ok(report, `${SCALE_OUT.results} is committed`);
  assert.equal(doc, renderScaleOutDoc(doc, report));
});

test('the scale-out rendering: measured figures with their targets, then one replay row per replica count', () => {
  const report: Report = {
    started: '2026-12-04T21:00:00.000Z', seconds: 60, machine: { cpu: 'CPU', cores: 2, memoryBytes: 2 ** 34 },
    backend: { server: 'wasm', workers: 1 }, git: { commit: 'abcdef0123', dirty: false }, args: ['scale-out'],
    cases: [{
      name: 'scale-out', figures: [
        { label: 'hit rate', key: 'affinity-hit-rate', value: 74.5, unit: '%', target: { op: '>=', value: 90 } },
        { label: 'failed', key: 'kill-failed', value: 0, unit: '', target: { op: '<=', value: 3 } },
        ...[2, 1].flatMap((n) => ['affinity', 'round-robin'].flatMap((p) => [
          { label: 'h', key: `sim-hit-${n}-${p}`, value: 50 + n + (p === 'affinity' ? 10 : 0), unit: '%' },
          { label: 'l', key: `sim-loads-${n}-${p}`, value: 100 * n, unit: 'loads' },
          { label: 's', key: `sim-share-${n}-${p}`, value: 1.25, unit: '×' },
          { label: 'r', key: `sim-rate-${n}-${p}`, value: 40 * n, unit: 'tok/s' },
        ])),
      ],
    }],
  };
  const lines = renderScaleOut(report).split('\n');
  assert.ok(lines.includes('| hit rate | 74.5 % ✗ MISSED | ≥ 90 % |'));
  assert.ok(lines.includes('| failed | 0 ✓ | ≤ 3 |'));
  const rows = lines.filter((l) => /^\| \d+ \|/.test(l));
  assert.deepEqual(rows, [
    '| 1 | 61 % | 51 % | 100 loads | 100 loads | 1.25× | 40 tok/s | 40 tok/s |',
    '| 2 | 62 % | 52 % | 200 loads | 200 loads | 1.25× | 80 tok/s | 80 tok/s |',
  ]);
  assert.match(renderScaleOut(null), /Not run\./);
});
