/** Test helpers for adapters: an AdapterManager over a temp folder, greedy runs through the executor. */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { AdapterManager } from '../../src/lora/manager.ts';
import { AdapterStore } from '../../src/lora/store.ts';
import type { AdapterLease } from '../../src/lora/types.ts';
import { parseSafetensors } from '../../src/formats/safetensors.ts';
import type { CausalLM } from '../../src/model/model.ts';
import { INITIAL_LORA_STATE, planLora, type LoraMode } from '../../src/engine/scheduler.ts';
import type { TfExecutor } from '../../src/exec/tf-executor.ts';
import { refLoraFromPeft, type RefLoraMap } from '../reference/lora.ts';
import { argmax } from './tf.ts';

export function makeManager(model: CausalLM, dir: string, executor: TfExecutor, opts: Partial<{ maxDeviceAdapters: number; maxDeviceBytes: number; maxHostBytes: number }> = {}): AdapterManager {
  const store = new AdapterStore({ dir, maxAdapterBytes: 64 << 20 });
  return new AdapterManager(store, model, {
    maxRank: 64, maxDeviceAdapters: opts.maxDeviceAdapters ?? 16, maxDeviceBytes: opts.maxDeviceBytes ?? 0, maxHostBytes: opts.maxHostBytes ?? 64 << 20,
  }, executor);
}

/** The plain-loop reference LoRA map for an adapter folder. */
export function refLora(model: CausalLM, adapterDir: string): RefLoraMap {
  const config = JSON.parse(readFileSync(join(adapterDir, 'adapter_config.json'), 'utf8'));
  const st = parseSafetensors(readFileSync(join(adapterDir, 'adapter_model.safetensors')));
  const get = Object.assign((name: string) => ({ shape: st.tensors.get(name)!.shape, data: st.readFloat32(name) }), { has: (n: string) => st.tensors.has(n) });
  return refLoraFromPeft(config, get, model.modules.map((m) => m.path));
}

export interface Job {
  prompt: number[];
  lease: AdapterLease | null;
}

/**
 * Greedy-decodes jobs together (one batch) through an executor; returns tokens and per-step logits. Each call's LoRA
 * plan follows the scheduler's rule for `mode` (default unmerged), as in the engine, from a fresh state.
 */
export async function greedyBatch(ex: TfExecutor, jobs: readonly Job[], newTokens: number, opts: { mode?: LoraMode; seqBase?: number } = {}): Promise<{ tokens: number[][]; logits: Float32Array[][] }> {
  const seqBase = opts.seqBase ?? 0;
  const keys = jobs.map((j) => j.lease?.adapter.key ?? null);
  let state = INITIAL_LORA_STATE;
  const plan = (kind: 'decode' | 'prefill') => {
    const step = planLora(state, { decode: kind === 'decode' ? keys : [], prefill: kind === 'prefill' ? keys : [] }, { loraMode: opts.mode ?? 'unmerged' });
    state = step.state;
    return step[kind];
  };
  const tokens = jobs.map(() => [] as number[]);
  const logits = jobs.map(() => [] as Float32Array[]);
  const take = (s: number, l: Float32Array) => {
    logits[s]!.push(l.slice());
    tokens[s]!.push(argmax(l));
  };
  const res = await ex.prefill(jobs.map((j, i) => ({ seq: seqBase + i, tokens: j.prompt, start: 0, last: true, adapter: j.lease?.adapter ?? null, allLogits: false })), plan('prefill'));
  jobs.forEach((_, i) => take(i, res.logits.get(seqBase + i)!));
  for (let step = 1; step < newTokens; step++) {
    const r = await ex.decode(jobs.map((j, i) => ({ seq: seqBase + i, token: tokens[i]!.at(-1)!, position: j.prompt.length + step - 1, adapter: j.lease?.adapter ?? null })), plan('decode'));
    jobs.forEach((_, i) => take(i, r.logits.get(seqBase + i)!));
  }
  jobs.forEach((_, i) => ex.release(seqBase + i));
  return { tokens, logits };
}
