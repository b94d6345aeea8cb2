/**
 * Memory: device bytes of the base model and of one adapter (against the size of its A and B), and
 * whether process RSS, live TensorFlow.js tensors or device bytes grow between 100 requests and many more.
 */
import type { BenchCase } from '../case.ts';
import { drive, metric, type ApiClient } from '../client.ts';

const DEVICE_TIER = 16;
const ADAPTERS = DEVICE_TIER + 8;
const CONCURRENT = 32;
const MiB = 2 ** 20;

/**
 * Request i's adapter: mostly the 16 that fit the device tier, every 25th on the base model, and every
 * 25th one of 8 more adapters, so the run keeps evicting and reloading a little.
 */
function adapterIndex(i: number): number | null {
  if (i % 25 === 24) return null;
  if (i % 25 === 23) return DEVICE_TIER + (Math.floor(i / 25) % 8);
  return i % DEVICE_TIER;
}

async function snapshot(api: ApiClient) {
  const m = await api.metrics();
  return {
    rss: metric(m, 'process_resident_memory_bytes'),
    tensors: metric(m, 'lora_serve_tfjs_tensors'),
    deviceBytes: metric(m, 'lora_serve_tfjs_memory_bytes'),
  };
}

export const memory: BenchCase = {
  name: 'memory',
  title: 'Memory: base and adapter device bytes; RSS, tensors and device bytes after 100 requests vs after many (adapters unloaded)',
  adapters: ADAPTERS,
  run: (ctx) => ctx.withServer({ 'max-loaded-adapters': DEVICE_TIER }, async (api, server) => {
    const { adapters } = ctx;
    const base = await snapshot(api);
    await api.json('POST', `/adapters/${adapters.id(0)}/load`);
    const loaded = await snapshot(api);
    const info = await api.json('GET', `/adapters/${adapters.id(0)}`);
    const expected = adapters.expectedBytes(0);
    const added = loaded.deviceBytes - base.deviceBytes;

    // One-word prompts and one new token: many requests in little time (the prompt is the costly part here).
    const shortPrompt = (i: number) => ctx.prompt(i).split(' ')[0]!;
    const id = (i: number | null) => (i === null ? null : adapters.id(i));
    let sent = 0;
    const requests = async (count: number) => {
      await drive(Array.from({ length: count }, () => {
        const i = sent++;
        return () => api.generate(shortPrompt(i), { adapter: id(adapterIndex(i)), maxNewTokens: 1 });
      }), CONCURRENT);
      // Unload every adapter, which also drops what the executor derived from them (LoRA banks, merged
      // weights): both snapshots then see the same state, the base model alone, whatever ran last.
      for (let a = 0; a < ADAPTERS; a++) await api.json('POST', `/adapters/${adapters.id(a)}/unload`);
      return snapshot(api);
    };
    const early = await requests(100);
    const total = Math.max(ctx.sizes.memoryRequests, 200);
    const late = await requests(total - 100);
    ctx.log(`after 100: ${JSON.stringify(early)}; after ${total}: ${JSON.stringify(late)}`);
    return [
      { label: `base model on the device (tfjs bytes, fresh server, ${server.workers} cop${server.workers > 1 ? 'ies' : 'y'})`, key: 'base', value: base.deviceBytes / MiB, unit: 'MiB', headline: true },
      { label: 'one adapter: bytes reported by /adapters/{id}', value: info.bytes, unit: 'B' },
      { label: `one adapter: device bytes added by its load (${server.workers} cop${server.workers > 1 ? 'ies' : 'y'})`, key: 'adapter-device', value: added, unit: 'B' },
      // Measured on the device (tfjs's byte count, summed over the model copies) against the safetensors header.
      { label: 'one adapter: device bytes per copy vs float32 size of its A and B, deviation', key: 'adapter-deviation', value: 100 * Math.abs(added / server.workers / expected - 1), unit: '%', target: { op: '<=', value: 5 } },
      { label: 'process RSS after 100 requests', value: early.rss / MiB, unit: 'MiB' },
      { label: `process RSS after ${total} requests`, key: 'rss-late', value: late.rss / MiB, unit: 'MiB' },
      { label: 'RSS growth', value: 100 * (late.rss / early.rss - 1), unit: '%', target: { op: '<=', value: 10 } },
      { label: 'live tensors on the fresh server', value: base.tensors, unit: '' },
      { label: 'live tensors after 100 requests', value: early.tensors, unit: '' },
      { label: `live tensors after ${total} requests`, key: 'tensors-late', value: late.tensors, unit: '' },
      { label: 'tensor growth', value: late.tensors - early.tensors, unit: 'tensors', target: { op: '<=', value: 0 } },
      { label: 'device bytes growth', value: late.deviceBytes - early.deviceBytes, unit: 'B', target: { op: '<=', value: 0 } },
    ];
  }),
};
