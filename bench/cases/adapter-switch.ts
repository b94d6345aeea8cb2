/**
 * Adapter switch: the latency a single request pays when its adapter is on the device but another
 * one was used last, against the same request when its adapter is already the active one.
 */
import type { BenchCase } from '../case.ts';
import { median } from '../client.ts';

export const adapterSwitch: BenchCase = {
  name: 'adapter-switch',
  title: 'Adapter switch: one request whose adapter is cached but not active vs already active',
  adapters: 2,
  run: (ctx) => ctx.withServer({}, async (api) => {
    const [x, y] = [ctx.adapters.id(0), ctx.adapters.id(1)];
    // One new token: what a switch costs lies in a request's first step (its prefill), and a one-step request varies
    // least (4-token requests varied by ±15 ms from one to the next, which 20 pairs could not average below ±4 ms).
    const one = async (adapter: string, maxNewTokens = 1) => (await api.generate(ctx.prompt(0), { adapter, maxNewTokens })).seconds * 1000;
    await one(x); // load both, warm the kernels
    await one(y);
    const switched: number[] = [];
    const active: number[] = [];
    for (let i = 0; i < ctx.sizes.switchPairs; i++) {
      await one(y, 8); // y becomes the active adapter: the last one the executor ran
      switched.push(await one(x)); // x: on the device, not active
      active.push(await one(x)); // x: active
    }
    const added = switched.map((s, i) => s - active[i]!);
    return [
      { label: 'request latency, adapter already active (median)', value: median(active), unit: 'ms', headline: true },
      { label: 'request latency, adapter cached, not active (median)', value: median(switched), unit: 'ms', headline: true },
      { label: `added by the switch (median of ${added.length} pairs)`, key: 'added', value: median(added), unit: 'ms', target: { op: '<=', value: 1 }, values: added },
    ];
  }),
};
