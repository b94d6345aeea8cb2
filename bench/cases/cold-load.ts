/**
 * Cold adapter load: POST /adapters/{id}/load of an adapter that is on disk only, until it is ready on the device.
 * Timed twice: with the adapter files in the OS page cache (written by the harness shortly before, as after an
 * upload or a recent read), and, where this process may drop the page cache (root on Linux), with the cache dropped
 * before each load, so the files come from the disk. Both run on a server that warmed its load path at start.
 */
import { writeFileSync } from 'node:fs';
import type { BenchCase, Figure } from '../case.ts';
import { percentile } from '../client.ts';

/** Drops the OS page cache (clean pages only); false where this process may not. */
function dropPageCache(): boolean {
  try {
    writeFileSync('/proc/sys/vm/drop_caches', '1');
    return true;
  } catch {
    return false;
  }
}

export const coldLoad: BenchCase = {
  name: 'cold-load',
  title: 'Cold adapter load: disk → ready on the device (POST /adapters/{id}/load), files in the page cache and not',
  adapters: 81, // 1 untimed + 40 timed loads of each kind (FULL sizes)
  run: (ctx) => ctx.withServer({}, async (api) => {
    // Untimed: requests that warm the HTTP path at both ends (this process' client is fresh too, and its first
    // requests run its code before it is compiled), then adapter 0's load. Each timed adapter is then loaded for the
    // first time since the server started.
    for (let i = 0; i < 50; i++) await api.json('GET', '/health');
    const load = async (i: number, before?: () => void): Promise<number> => {
      before?.();
      const t0 = performance.now();
      const info = await api.json('POST', `/adapters/${ctx.adapters.id(i)}/load`);
      const t = performance.now() - t0;
      if (info.state !== 'ready') throw new Error(`${info.id} is ${info.state} after load`);
      return t;
    };
    const n = ctx.sizes.loads;
    await load(0);
    const cached: number[] = [];
    for (let i = 1; i <= n; i++) cached.push(await load(i));
    const figures: Figure[] = [
      { label: `load p50, files in the page cache (${n} adapters)`, key: 'p50', value: percentile(cached, 50), unit: 'ms', target: { op: '<=', value: 10 }, values: cached },
      { label: 'load p95, files in the page cache', key: 'p95', value: percentile(cached, 95), unit: 'ms', headline: true },
    ];
    const dropped: number[] = [];
    if (dropPageCache()) {
      for (let i = n + 1; i <= 2 * n; i++) dropped.push(await load(i, dropPageCache));
      figures.push(
        { label: `load p50, page cache dropped before each load (${dropped.length} adapters)`, key: 'dropped-p50', value: percentile(dropped, 50), unit: 'ms', values: dropped, headline: true },
        { label: 'load p95, page cache dropped before each load', key: 'dropped-p95', value: percentile(dropped, 95), unit: 'ms', headline: true },
      );
    } else {
      const note = 'not run: this process may not drop the page cache (/proc/sys/vm/drop_caches needs root on Linux)';
      ctx.log(note);
      figures.push({ label: 'load p50, page cache dropped before each load', key: 'dropped-p50', value: NaN, unit: 'ms', note, headline: true });
    }
    return figures;
  }),
};
