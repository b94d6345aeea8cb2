/** Merged overhead: one adapter merged into the weights should decode as fast as the base model. */
import { ratioFigure, rateFigure, sideBySide, type BenchCase } from '../case.ts';
import { drive } from '../client.ts';

const CONCURRENT = 8;
/** Requests per client per timed round (closed loop): a round of one wave took ~1.3 s, too short to resolve 2 %. */
const PER_CLIENT = 4;

export const mergedOverhead: BenchCase = {
  name: 'merged-overhead',
  title: `Merged overhead: ${CONCURRENT} concurrent clients (${PER_CLIENT} requests each per round), one adapter served merged vs the base model`,
  adapters: 1,
  run: (ctx) => ctx.withServer({ 'lora-mode': 'merged' }, async (api) => {
    const batch = (adapter: string | null, maxNewTokens = ctx.sizes.newTokens, perClient = PER_CLIENT) =>
      drive(Array.from({ length: CONCURRENT * perClient }, (_, i) => () => api.generate(ctx.prompt(i % CONCURRENT), { adapter, maxNewTokens })), CONCURRENT);
    await batch(ctx.adapters.id(0), 2, 1); // load and merge the adapter, warm the kernels
    await batch(null, 2, 1);
    const r = await sideBySide(ctx.sizes.rounds, { merged: () => batch(ctx.adapters.id(0)), base: () => batch(null) }, ctx.log);
    return [
      rateFigure(`${CONCURRENT} concurrent, base model`, r.base, { headline: true }),
      rateFigure(`${CONCURRENT} concurrent, one adapter merged`, r.merged, { headline: true }),
      ratioFigure('merged ÷ base', r.merged, r.base, { target: { op: '>=', value: 0.98 } }),
    ];
  }),
};
