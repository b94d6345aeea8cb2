/**
 * What adapter-affinity routing does for N replicas on separate machines, where this 2-core machine cannot run them:
 * a replay of one request stream (adapters drawn by Zipf) through each routing policy into per-replica LRU device
 * tiers. Pure functions; the scale-out bench case runs it beside its measurement of 3 replicas, and
 * test/scale-sim.test.ts checks the pieces against plain loops.
 *
 * Assumptions (also printed by the bench): requests arrive one after another (no batching, so an adapter in use is
 * never pinned past its turn); every replica's tier evicts its least recently used adapter; the affinity policy is
 * plain consistent hashing (HAProxy's `hash-type consistent` without `hash-balance-factor`, which would move some of
 * the hottest replica's requests to the next replica on the ring and lower its hit rate); round robin sends request
 * i to replica i mod N.
 */
import { createHash } from 'node:crypto';

/** An LRU set of `capacity` keys: `touch` says whether the key was resident, then makes it the most recent. */
export class LruTier {
  private readonly keys = new Map<number, true>();

  constructor(readonly capacity: number) {}

  touch(key: number): boolean {
    const hit = this.keys.delete(key);
    this.keys.set(key, true);
    if (this.keys.size > this.capacity) this.keys.delete(this.keys.keys().next().value!);
    return hit;
  }
}

const point = (s: string): number => createHash('sha256').update(s).digest().readUInt32BE(0);

/**
 * A consistent-hash ring: `points` points per replica; a key goes to the replica owning the first point at or after
 * the key's hash (wrapping). Removing a replica moves only the keys it owned.
 */
export class HashRing {
  private readonly ring: { at: number; replica: number }[];

  constructor(readonly replicas: readonly number[], points = 100) {
    this.ring = replicas.flatMap((r) => Array.from({ length: points }, (_, p) => ({ at: point(`replica${r}#${p}`), replica: r })))
      .sort((a, b) => a.at - b.at);
  }

  owner(key: string): number {
    const h = point(key);
    let lo = 0;
    let hi = this.ring.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (this.ring[mid]!.at < h) lo = mid + 1;
      else hi = mid;
    }
    return this.ring[lo % this.ring.length]!.replica;
  }
}

export type Routing = 'affinity' | 'round-robin';

export interface Replay {
  /** Device-tier hits ÷ requests. */
  readonly hitRate: number;
  /** Adapter loads into a device tier per 1000 requests. */
  readonly loadsPer1000: number;
  /** The busiest replica's share of requests ÷ the mean share (1: even). */
  readonly maxShare: number;
}

/** Replays `stream` (adapter indices) through `routing` to `n` replicas, each with an LRU tier of `tier` adapters. */
export function replay(stream: readonly number[], n: number, tier: number, routing: Routing): Replay {
  const tiers = Array.from({ length: n }, () => new LruTier(tier));
  const served = new Array<number>(n).fill(0);
  const ring = routing === 'affinity' ? new HashRing(Array.from({ length: n }, (_, i) => i)) : null;
  const owner = new Map<number, number>();
  let hits = 0;
  stream.forEach((adapter, i) => {
    let r = i % n;
    if (ring) {
      r = owner.get(adapter) ?? ring.owner(`adapter-${adapter}`);
      owner.set(adapter, r);
    }
    served[r]!++;
    if (tiers[r]!.touch(adapter)) hits++;
  });
  return { hitRate: hits / stream.length, loadsPer1000: (1000 * (stream.length - hits)) / stream.length, maxShare: Math.max(...served) / (stream.length / n) };
}

/**
 * The share of requests that the `slots` most popular adapters take under Zipf(s) over `adapters`: no routing and
 * no eviction policy can serve a larger share from `slots` device slots in total, when requests are independent.
 */
export function zipfTopShare(adapters: number, s: number, slots: number): number {
  let top = 0;
  let all = 0;
  for (let k = 1; k <= adapters; k++) {
    const p = 1 / k ** s;
    all += p;
    if (k <= slots) top += p;
  }
  return top / all;
}

/**
 * Aggregate requests/s of `n` replicas from a per-replica cost model fitted to two measurements: a replica spends
 * `base` seconds per request plus `perLoad` seconds per adapter load, `1 / rate = base + missRate · perLoad`.
 * The two measured points (miss rate, per-replica requests/s) give base and perLoad; a negative perLoad (noise:
 * the policy with more loads was not slower) is taken as 0.
 */
export function fitCost(a: { missRate: number; rate: number }, b: { missRate: number; rate: number }): { base: number; perLoad: number } {
  const dm = b.missRate - a.missRate;
  const perLoad = dm === 0 ? 0 : Math.max(0, (1 / b.rate - 1 / a.rate) / dm);
  const base = dm === 0 || perLoad === 0 ? (1 / a.rate + 1 / b.rate) / 2 : 1 / a.rate - a.missRate * perLoad;
  return { base, perLoad };
}
