/**
 * The scale-out replay (bench/scale-sim.ts): the LRU tier, the consistent-hash ring and the Zipf ceiling against
 * plain loops and hand-counted cases.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { fitCost, HashRing, LruTier, replay, zipfTopShare } from '../bench/scale-sim.ts';

test('LruTier: hits and evictions as a list kept in recency order', () => {
  const tier = new LruTier(2);
  const seen = [1, 2, 1, 3, 2, 1, 1].map((k) => tier.touch(k));
  // 1 miss, 2 miss, 1 hit, 3 miss (evicts 2), 2 miss (evicts 1), 1 miss (evicts 3), 1 hit
  assert.deepEqual(seen, [false, false, true, false, false, false, true]);
});

test('HashRing: removing a replica moves only its keys, and spreads them', () => {
  const all = new HashRing([0, 1, 2]);
  const two = new HashRing([0, 2]);
  const keys = Array.from({ length: 3000 }, (_, i) => `adapter-${i}`);
  const owners = keys.map((k) => all.owner(k));
  for (const r of [0, 1, 2]) {
    const share = owners.filter((o) => o === r).length / keys.length;
    assert.ok(share > 0.2 && share < 0.47, `replica ${r} owns ${share} of the keys`);
  }
  keys.forEach((k, i) => {
    if (owners[i] !== 1) assert.equal(two.owner(k), owners[i], `${k} moved although its replica stayed`);
    else assert.notEqual(two.owner(k), 1);
  });
});

test('replay: round robin and affinity on a hand-counted stream', () => {
  // Two replicas, tier 1. Round robin: requests 0,2,4 → replica 0 sees [5,5,5]; 1,3,5 → replica 1 sees [7,7,7].
  const stream = [5, 7, 5, 7, 5, 7];
  const rr = replay(stream, 2, 1, 'round-robin');
  assert.equal(rr.hitRate, 4 / 6);
  assert.equal(rr.loadsPer1000, (1000 * 2) / 6);
  assert.equal(rr.maxShare, 1);
  // Alternating A B A B over round robin with tier 1 on one replica: every request misses.
  assert.equal(replay([1, 2, 1, 2], 1, 1, 'round-robin').hitRate, 0);
  // Affinity: each adapter has one replica; with one replica affinity equals round robin.
  const aff = replay(stream, 2, 1, 'affinity');
  const ring = new HashRing([0, 1]);
  const same = ring.owner('adapter-5') === ring.owner('adapter-7');
  assert.equal(aff.hitRate, same ? 0 : 4 / 6);
  assert.equal(aff.maxShare, same ? 2 : 1);
});

test('zipfTopShare: the top slots\' share of Zipf(s) as a plain sum', () => {
  assert.equal(zipfTopShare(4, 1, 4), 1);
  assert.ok(Math.abs(zipfTopShare(4, 1, 1) - 1 / (1 + 1 / 2 + 1 / 3 + 1 / 4)) < 1e-12);
  assert.ok(Math.abs(zipfTopShare(3, 0, 2) - 2 / 3) < 1e-12);
  // 300 adapters, 96 slots: below 0.82, so no routing reaches a 90 % hit rate with independent requests.
  const c = zipfTopShare(300, 1, 96);
  assert.ok(c > 0.81 && c < 0.82, String(c));
});

test('fitCost: recovers base and per-load cost from two points, and never a negative load cost', () => {
  const base = 0.05;
  const perLoad = 0.2;
  const rate = (m: number) => 1 / (base + m * perLoad);
  const fit = fitCost({ missRate: 0.2, rate: rate(0.2) }, { missRate: 0.6, rate: rate(0.6) });
  assert.ok(Math.abs(fit.base - base) < 1e-12 && Math.abs(fit.perLoad - perLoad) < 1e-12);
  const noisy = fitCost({ missRate: 0.2, rate: 10 }, { missRate: 0.6, rate: 12 });
  assert.equal(noisy.perLoad, 0);
  assert.ok(Math.abs(noisy.base - (1 / 10 + 1 / 12) / 2) < 1e-12);
});
