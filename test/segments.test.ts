import { test } from 'node:test';
import assert from 'node:assert/strict';
import { findSegments, sortRowsByAdapter } from '../src/lora/segments.ts';

const cases: [string, (number | null)[], [number, number, number | null][]][] = [
  ['empty batch', [], []],
  ['one row', [3], [[0, 1, 3]]],
  ['one base row', [null], [[0, 1, null]]],
  ['all the same', [1, 1, 1], [[0, 3, 1]]],
  ['all different', [0, 1, 2], [[0, 1, 0], [1, 2, 1], [2, 3, 2]]],
  ['runs', [0, 0, 1, 1, 1, 0], [[0, 2, 0], [2, 5, 1], [5, 6, 0]]],
  ['base rows between adapters', [null, 2, 2, null, null], [[0, 1, null], [1, 3, 2], [3, 5, null]]],
  ['0 is not null', [0, null, 0], [[0, 1, 0], [1, 2, null], [2, 3, 0]]],
];

for (const [name, rows, expected] of cases) {
  test(`findSegments: ${name}`, () => {
    assert.deepEqual(findSegments(rows), expected.map(([start, end, adapter]) => ({ start, end, adapter })));
  });
}

test('findSegments: segments tile the batch and match a plain loop', () => {
  const rows = [1, 1, null, 3, 3, 3, 1, null, null, 0];
  const segs = findSegments(rows);
  let row = 0;
  for (const s of segs) {
    assert.equal(s.start, row);
    for (let i = s.start; i < s.end; i++) assert.equal(rows[i], s.adapter);
    row = s.end;
  }
  assert.equal(row, rows.length);
  for (let i = 1; i < segs.length; i++) assert.notEqual(segs[i]!.adapter, segs[i - 1]!.adapter);
});

const sortCases: [string, (number | null)[], number[]][] = [
  ['empty', [], []],
  ['already grouped', [0, 0, 1], [0, 1, 2]],
  ['interleaved, first-appearance order, stable', [1, 0, 1, null, 0, 1], [0, 2, 5, 1, 4, 3]],
  ['base first when it comes first', [null, 2, null, 2], [0, 2, 1, 3]],
];

for (const [name, rows, perm] of sortCases) {
  test(`sortRowsByAdapter: ${name}`, () => {
    const got = sortRowsByAdapter(rows);
    assert.deepEqual(got, perm);
    // A permutation that yields exactly one segment per distinct adapter.
    assert.deepEqual([...got].sort((a, b) => a - b), rows.map((_, i) => i));
    assert.equal(findSegments(got.map((i) => rows[i]!)).length, new Set(rows).size);
  });
}
