/**
 * Per-request adapter merging (LoRAX `merged_adapters`) at the adapter level: which sources can be merged, the
 * merged adapter as a PEFT adapter (adapter_config.json + safetensors bytes, then loaded like any adapter), and
 * the id it is cached under. The math of one tensor is src/lora/merge.ts.
 *
 * As LoRAX's `merge_adapters` (predibase/lorax `server/lorax_server/utils/merges/strategies.py`):
 * - Each module any source has is merged over the sources that have it, with their weights. lora_A and lora_B
 *   are merged separately, each by the strategy, so the merged adapter keeps the sources' rank r and its
 *   delta is merge(B)·merge(A): with `linear`, (Σ_i w_i·B_i)·(Σ_j w_j·A_j), cross terms included, not Σ_i w_i·B_i·A_i.
 * - The sources must declare the same `r`.
 * - The merged adapter_config.json is the first source's with `target_modules` the union, so the first
 *   source's lora_alpha, r and use_rslora give every module's scaling (the others' alphas are not used).
 * - A single id is that adapter, not merged (LoRAX's `load_and_merge_adapters`): the HTTP layer sends it as a
 *   plain adapter id.
 * Beyond LoRAX: each module's tensors must have one shape across the sources (LoRAX's torch.stack would fail),
 * and sources with rank_pattern or alpha_pattern are refused (LoRAX's LoraConfig reads neither, so it would
 * scale such modules by lora_alpha/r); both are MERGE_INCOMPATIBLE. Each source is checked against the base
 * model as any adapter is (ADAPTER_* errors); their base_model_name_or_path may differ, as in LoRAX.
 */
import { createHash } from 'node:crypto';
import { fail } from '../errors.ts';
import { writeSafetensors, type WriteTensor } from '../formats/safetensors.ts';
import type { LinearModule } from '../model/types.ts';
import type { PeftPair } from './adapter-file.ts';
import { dareStream, mergeTaskTensors, type MergeMath } from './merge.ts';
import type { PeftConfig } from './peft-config.ts';
import type { MergeSpec } from './types.ts';

/** Merged adapters' ids start with this; no adapter id can (ids.ts allows no `:`). */
export const MERGE_ID_PREFIX = 'merge:';

/** DARE's seed when the request gives none (`parameters.seed`). */
export const DEFAULT_MERGE_SEED = 0;

export const isMergeId = (id: string): boolean => id.startsWith(MERGE_ID_PREFIX);

/** The fields of a spec that change the merged weights: density, sign method and seed only where the strategy uses them. */
function canonical(spec: MergeSpec): Record<string, unknown> {
  const { strategy } = spec;
  return {
    ids: spec.ids, weights: spec.weights, strategy,
    ...(strategy !== 'linear' ? { density: spec.density } : {}),
    ...(strategy === 'ties' || strategy === 'dare_ties' ? { majority_sign_method: spec.majoritySignMethod } : {}),
    ...(strategy === 'dare_linear' || strategy === 'dare_ties' ? { seed: spec.seed } : {}),
  };
}

const hash16 = (text: string) => createHash('sha256').update(text).digest('hex').slice(0, 16);

/**
 * The merged adapter's cache id: `merge:` and 16 hex of sha256 over the parameters that change its weights (ids in
 * order, weights, strategy, and density, sign method and seed where the strategy uses them).
 */
export function mergeId(spec: MergeSpec): string {
  return MERGE_ID_PREFIX + hash16(JSON.stringify(canonical(spec)));
}

/** The merged adapter's version: the parameters and the content versions of the sources it was computed from. */
export function mergeVersion(spec: MergeSpec, sourceVersions: readonly string[]): string {
  return hash16(JSON.stringify({ ...canonical(spec), versions: sourceVersions }));
}

/** One source adapter as read for a merge: its config as the file has it, parsed, and its pairs in PEFT layout. */
export interface MergeSource {
  readonly id: string;
  readonly rawConfig: unknown;
  readonly config: PeftConfig;
  readonly pairs: readonly PeftPair[];
}

const incompatible = (msg: string) => fail('MERGE_INCOMPATIBLE', `cannot merge adapters: ${msg}`);

/** LoRAX's `_validate_lora_configs` (one r), and no rank or alpha patterns. */
function checkSources(sources: readonly MergeSource[]): void {
  const ranks = new Set(sources.map((s) => s.config.r));
  if (ranks.size > 1) {
    throw incompatible(`their configs have different ranks (${sources.map((s) => `"${s.id}": r=${s.config.r}`).join(', ')})`);
  }
  for (const s of sources) {
    if (s.config.rankPattern.length > 0 || s.config.alphaPattern.length > 0) {
      throw incompatible(`"${s.id}" has rank_pattern or alpha_pattern (a merged adapter has one lora_alpha / r for every module)`);
    }
  }
}

/** Config fields of the first source that would select or scale modules differently from the merged target list. */
const DROPPED_CONFIG_FIELDS = ['layers_to_transform', 'layers_pattern', 'exclude_modules', 'rank_pattern', 'alpha_pattern'];

/**
 * Merges the sources (in `spec.ids` order) into one PEFT adapter: for every module, A = merge(A_i) and
 * B = merge(B_i) over the sources i that have it (mergeTaskTensors, DARE streams `dareStream(seed, module path,
 * side, i)`), named `base_model.model.<module path>.lora_{A,B}.weight`; the config is the first source's with
 * `target_modules` the merged module paths. It yields to the event loop after each module, so that a large merge
 * does not stall the steps of running requests.
 */
export async function mergeSources(sources: readonly MergeSource[], spec: MergeSpec): Promise<{ config: Record<string, unknown>; weights: Uint8Array }> {
  if (sources.length !== spec.ids.length) throw new Error('mergeSources: one source per id');
  checkSources(sources);
  const math: MergeMath = { strategy: spec.strategy, density: spec.density, majoritySignMethod: spec.majoritySignMethod };

  const byModule = new Map<string, { module: LinearModule; from: { i: number; pair: PeftPair }[] }>();
  sources.forEach((s, i) => {
    for (const pair of s.pairs) {
      const m = byModule.get(pair.module.path) ?? { module: pair.module, from: [] };
      m.from.push({ i, pair });
      byModule.set(pair.module.path, m);
    }
  });

  const tensors: Record<string, WriteTensor> = {};
  for (const [path, { module, from }] of byModule) {
    const r = from[0]!.pair.r;
    const odd = from.find((f) => f.pair.r !== r);
    if (odd) throw incompatible(`module "${path}" has rank ${r} in "${sources[from[0]!.i]!.id}" but ${odd.pair.r} in "${sources[odd.i]!.id}"`);
    const weights = from.map((f) => spec.weights[f.i]!);
    const merge = (side: 'A' | 'B') =>
      mergeTaskTensors(from.map((f) => f.pair[side]), weights, math, (k) => dareStream(spec.seed, path, side, from[k]!.i));
    tensors[`base_model.model.${path}.lora_A.weight`] = { shape: [r, module.inFeatures], data: merge('A') };
    tensors[`base_model.model.${path}.lora_B.weight`] = { shape: [module.outFeatures, r], data: merge('B') };
    await new Promise<void>((resolve) => setImmediate(resolve));
  }

  const config: Record<string, unknown> = { ...(sources[0]!.rawConfig as Record<string, unknown>), target_modules: [...byModule.keys()].sort() };
  for (const field of DROPPED_CONFIG_FIELDS) delete config[field];
  return { config, weights: writeSafetensors(tensors) };
}
