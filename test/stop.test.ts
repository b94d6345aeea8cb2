import { test } from 'node:test';
import assert from 'node:assert/strict';
import { StopMatcher } from '../src/engine/stop.ts';

/** Feed chunks; collect emitted text until a stop, then flush if none. */
function run(stops: string[], chunks: string[], opts?: { includeStop?: boolean }): { text: string; matched?: string; emits: string[] } {
  const m = new StopMatcher(stops, opts);
  const emits: string[] = [];
  for (const c of chunks) {
    const r = m.push(c);
    emits.push(r.emit);
    if (r.stopped) return { text: emits.join(''), matched: r.matched, emits };
  }
  emits.push(m.flush());
  return { text: emits.join(''), emits };
}

test('no stop sequences: text passes straight through', () => {
  const m = new StopMatcher([]);
  assert.deepEqual(m.push('abc'), { emit: 'abc', stopped: false });
  assert.equal(m.flush(), '');
});

test('a stop inside one chunk cuts the text before it (excluded by default)', () => {
  const r = run(['END'], ['hello END world']);
  assert.equal(r.text, 'hello ');
  assert.equal(r.matched, 'END');
});

test('includeStop keeps the stop sequence (TGI behaviour)', () => {
  const r = run(['END'], ['hello EN', 'D world'], { includeStop: true });
  assert.equal(r.text, 'hello END');
});

test('a stop split across chunks is held back and never shown', () => {
  const r = run(['\n\nUser:'], ['Sure', '.\n', '\nUs', 'er', ': hi']);
  assert.equal(r.text, 'Sure.');
  assert.deepEqual(r.emits, ['Sure', '.', '', '', '']);
  assert.equal(r.matched, '\n\nUser:');
});

test('held-back text that does not become a stop is released', () => {
  const m = new StopMatcher(['abc']);
  assert.deepEqual(m.push('xxab'), { emit: 'xx', stopped: false });
  assert.deepEqual(m.push('d'), { emit: 'abd', stopped: false });
  assert.deepEqual(m.push('a'), { emit: '', stopped: false });
  assert.deepEqual(m.push('ab'), { emit: 'a', stopped: false }); // "aab": only "ab" can still start "abc"
  assert.equal(m.flush(), 'ab');
  assert.equal(m.flush(), '');
});

test('overlapping prefixes: the longest possible start is held', () => {
  // "aab" could be the start of "aabx" at offset 0
  const r = run(['aabx'], ['a', 'a', 'b', 'a', 'a', 'b', 'x', 'tail']);
  assert.equal(r.text, 'aab');
  assert.equal(r.matched, 'aabx');
});

test('several stops: the one completing first wins; then ties go to the one starting first', () => {
  assert.equal(run(['abc', 'b'], ['xabc']).matched, 'b');
  assert.equal(run(['abc', 'b'], ['xabc']).text, 'xa');
  assert.equal(run(['c', 'abc'], ['xabc']).matched, 'abc');
  assert.equal(run(['c', 'abc'], ['xabc']).text, 'x');
  assert.equal(run(['###', '\n'], ['a', '#', '#', 'b\n']).text, 'a##b');
});

test('after a stop, further text is ignored; flush at the end releases a partial match', () => {
  const m = new StopMatcher(['STOP', '']);
  assert.deepEqual(m.push('go ST'), { emit: 'go ', stopped: false });
  assert.equal(m.flush(), 'ST');
  const n = new StopMatcher(['STOP']);
  assert.deepEqual(n.push('STOP'), { emit: '', stopped: true, matched: 'STOP' });
  assert.ok(n.stopped);
  assert.deepEqual(n.push('more'), { emit: '', stopped: true });
  assert.equal(n.flush(), '');
});

test('the streamed text never contains a stop, whatever the chunking', () => {
  const text = 'one two <eos> three';
  for (let cut1 = 0; cut1 <= text.length; cut1++) {
    for (let cut2 = cut1; cut2 <= text.length; cut2++) {
      const r = run(['<eos>'], [text.slice(0, cut1), text.slice(cut1, cut2), text.slice(cut2)]);
      assert.equal(r.text, 'one two ');
      for (const e of r.emits) assert.ok(!e.includes('<'), JSON.stringify(r.emits));
    }
  }
});
