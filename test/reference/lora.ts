/**
 * Ground truth for the LoRA math, written as plain loops in float64 straight from the PEFT
 * definitions (huggingface/peft `tuners/lora/layer.py`, `config.py`). Test code only: it shares
 * nothing with src/ so that the fast path and this file can disagree.
 *
 *   forward:  y = base(x) + scale · B·(A·x)          A: [r, in], B: [out, r] (row-major)
 *   merged:   W' = W + scale · B·A                    ([out, in]; transposed to [in, out] for Conv1D)
 *   scale:    lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora
 */

import type { GetTensor } from './forward.ts';

/** A LoRA delta for one module, applied as y += scale * B·(A·x): A [r, in], B [out, r] in PEFT layout (row-major Float32Array). */
export interface RefLora {
  A: Float32Array;
  B: Float32Array;
  r: number;
  inFeatures: number;
  outFeatures: number;
  scale: number;
}

/** keyed by PEFT module path, e.g. 'transformer.h.0.attn.c_attn' or 'model.layers.1.self_attn.q_proj' */
export type RefLoraMap = ReadonlyMap<string, RefLora>;

function checkLora(l: RefLora): void {
  if (l.A.length !== l.r * l.inFeatures) {
    throw new Error(`reference LoRA: A has ${l.A.length} values, expected r·in = ${l.r}·${l.inFeatures}`);
  }
  if (l.B.length !== l.outFeatures * l.r) {
    throw new Error(`reference LoRA: B has ${l.B.length} values, expected out·r = ${l.outFeatures}·${l.r}`);
  }
}

/**
 * delta[o] = scale · Σ_j B[o, j] · (Σ_i A[j, i] · x[i])
 * x: [in] → delta: [out].
 */
export function refLoraDelta(x: Float64Array, l: RefLora): Float64Array {
  checkLora(l);
  if (x.length !== l.inFeatures) {
    throw new Error(`reference LoRA: input has ${x.length} features, adapter expects ${l.inFeatures}`);
  }
  // t = A·x  [r]
  const t = new Float64Array(l.r);
  for (let j = 0; j < l.r; j++) {
    let sum = 0;
    for (let i = 0; i < l.inFeatures; i++) sum += l.A[j * l.inFeatures + i]! * x[i]!;
    t[j] = sum;
  }
  // delta = scale · B·t  [out]
  const delta = new Float64Array(l.outFeatures);
  for (let o = 0; o < l.outFeatures; o++) {
    let sum = 0;
    for (let j = 0; j < l.r; j++) sum += l.B[o * l.r + j]! * t[j]!;
    delta[o] = l.scale * sum;
  }
  return delta;
}

/**
 * The merged weight W + scale·B·A in W's own layout.
 *   'linear' (nn.Linear, W [out, in]):  W'[o, i] = W[o, i] + scale · Σ_j B[o, j]·A[j, i]
 *   'conv1d' (GPT-2 Conv1D, W [in, out], PEFT fan_in_fan_out): W'[i, o] = W[i, o] + scale · Σ_j B[o, j]·A[j, i]
 */
export function refMergedWeight(W: Float32Array, layout: 'linear' | 'conv1d', l: RefLora): Float64Array {
  checkLora(l);
  const nIn = l.inFeatures;
  const nOut = l.outFeatures;
  if (W.length !== nIn * nOut) {
    throw new Error(`reference LoRA: weight has ${W.length} values, expected in·out = ${nIn}·${nOut}`);
  }
  const merged = new Float64Array(nIn * nOut);
  for (let o = 0; o < nOut; o++) {
    for (let i = 0; i < nIn; i++) {
      let ba = 0;
      for (let j = 0; j < l.r; j++) ba += l.B[o * l.r + j]! * l.A[j * nIn + i]!;
      const at = layout === 'linear' ? o * nIn + i : i * nOut + o;
      merged[at] = W[at]! + l.scale * ba;
    }
  }
  return merged;
}

/**
 * The first key of a PEFT `rank_pattern` / `alpha_pattern` dict (in object order) that applies to
 * `modulePath`, as PEFT's `re.match(r"(.*\.)?(" + key + r")$", module_name)`; undefined if none.
 */
export function refPatternKey(pattern: Record<string, unknown> | null | undefined, modulePath: string): string | undefined {
  if (pattern == null) return undefined;
  for (const key of Object.keys(pattern)) {
    if (new RegExp('^(.*\\.)?(' + key + ')$').test(modulePath)) return key;
  }
  return undefined;
}

/** The first of `names` the getter has, or undefined. A getter signals "missing" by throwing (or by `has`). */
function firstPresent(get: GetTensor, names: readonly string[]): { name: string; tensor: ReturnType<GetTensor> } | undefined {
  for (const name of names) {
    if (get.has !== undefined && !get.has(name)) continue;
    let tensor: ReturnType<GetTensor> | undefined;
    try {
      tensor = get(name);
    } catch {
      tensor = undefined;
    }
    if (tensor != null) return { name, tensor };
  }
  return undefined;
}

/**
 * Builds the reference LoRA map of a PEFT adapter for the given module paths (modules for which
 * the adapter has no tensors are left out; a path with only one of lora_A / lora_B is an error).
 *
 * - tensors: `base_model.model.<path>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r], or the
 *   same with the adapter name kept: `.lora_A.default.weight`.
 * - r = lora_A.shape[0]. (PEFT builds each layer with `rank_pattern`'s r, so the tensors of any
 *   adapter PEFT can load have exactly that rank; the pattern therefore adds nothing here.)
 * - lora_alpha = the value of the first matching `alpha_pattern` key (see refPatternKey), else
 *   `lora_alpha` (PEFT default 8).
 * - scale = lora_alpha / r, or lora_alpha / sqrt(r) when `use_rslora`.
 */
export function refLoraFromPeft(
  config: Record<string, any>,
  getAdapterTensor: GetTensor,
  modulePaths: readonly string[],
): RefLoraMap {
  if (config.use_dora === true) throw new Error('reference LoRA: use_dora is unsupported in reference');
  const map = new Map<string, RefLora>();
  for (const path of modulePaths) {
    const base = `base_model.model.${path}`;
    const a = firstPresent(getAdapterTensor, [`${base}.lora_A.weight`, `${base}.lora_A.default.weight`]);
    const b = firstPresent(getAdapterTensor, [`${base}.lora_B.weight`, `${base}.lora_B.default.weight`]);
    if (a === undefined && b === undefined) continue;
    if (a === undefined || b === undefined) {
      throw new Error(`reference LoRA: ${path} has only one of lora_A / lora_B`);
    }
    if (a.tensor.shape.length !== 2 || b.tensor.shape.length !== 2) {
      throw new Error(`reference LoRA: ${path}: lora_A and lora_B must be 2-D`);
    }
    const [r, inFeatures] = a.tensor.shape as [number, number];
    const [outFeatures, rB] = b.tensor.shape as [number, number];
    if (rB !== r) throw new Error(`reference LoRA: ${path}: lora_A rank ${r} but lora_B rank ${rB}`);

    const alphaKey = refPatternKey(config.alpha_pattern, path);
    const alpha = Number(alphaKey !== undefined ? config.alpha_pattern[alphaKey] : (config.lora_alpha ?? 8));
    const scale = config.use_rslora === true ? alpha / Math.sqrt(r) : alpha / r;

    const lora: RefLora = { A: a.tensor.data, B: b.tensor.data, r, inFeatures, outFeatures, scale };
    checkLora(lora);
    map.set(path, lora);
  }
  return map;
}
