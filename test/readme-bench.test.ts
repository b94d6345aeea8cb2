/**
 * The README's Performance table is the rendering of the committed results files (bench/readme.ts), so every figure
 * in it comes from a bench run; and the renderer marks targets, missing runs and references as it says.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { readReport, renderReadme, renderTable, RESULTS, type Report } from '../bench/readme.ts';

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
