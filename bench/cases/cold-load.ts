/** Cold adapter load: POST /adapters/{id}/load of an adapter that is on disk only, until it is ready on the device. */
import type { BenchCase } from '../case.ts';
import { percentile } from '../client.ts';

export const coldLoad: BenchCase = {
  name: 'cold-load',
  title: 'Cold adapter load: disk → ready on the device (POST /adapters/{id}/load)',
  adapters: 64,
  run: (ctx) => ctx.withServer({}, async (api) => {
    const ms: number[] = [];
    // Untimed: requests that warm the HTTP path at both ends (this process' client is fresh too, and its first
    // requests run its code before it is compiled), then adapter 0's load. Each timed adapter is then loaded for the
    // first time since the server started.
    for (let i = 0; i < 50; i++) await api.json('GET', '/health');
    for (let i = 0; i <= ctx.sizes.loads; i++) {
      const t0 = performance.now();
      const info = await api.json('POST', `/adapters/${ctx.adapters.id(i)}/load`);
      const t = performance.now() - t0;
      if (info.state !== 'ready') throw new Error(`${info.id} is ${info.state} after load`);
      if (i > 0) ms.push(t);
    }
    return [
      { label: `load p50 (${ms.length} adapters)`, value: percentile(ms, 50), unit: 'ms', target: { op: '<=', value: 10 }, values: ms },
      { label: 'load p95', value: percentile(ms, 95), unit: 'ms' },
    ];
  }),
};
