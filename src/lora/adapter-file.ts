/**
 * A PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors bytes) checked against
 * the base model's linear modules and turned into host float32 pairs already in the device layout
 * (see ModuleLora). No tensors on the device.
 *
 * Tensor names: `base_model.model.<module path>.lora_A[.<adapter name>].weight` ([r, in]) and
 * `.lora_B[...].weight` ([out, r]). The `base_model.model.` prefix is optional.
 *
 * Module path normalisation: PEFT names modules after the model class it wrapped
 * (`transformer.h.0.attn.c_attn` for GPT2LMHeadModel, `model.layers.0.self_attn.q_proj` for
 * LlamaForCausalLM), but an adapter trained on the bare base model (GPT2Model, LlamaModel) says
 * `h.0.attn.c_attn` / `layers.0.self_attn.q_proj`. A file path is matched to a base module by
 * exact path first, then after stripping one leading `transformer.` or `model.` from both sides.
 * Two file paths landing on the same base module are rejected.
 *
 * Selection checks (target_modules, layers_to_transform) and rank/alpha patterns are evaluated
 * on the path exactly as written in the file: that is the name PEFT matched while training.
 *
 * Conv1D (GPT-2, `fan_in_fan_out: true`): A and B are stored as for nn.Linear ([r, in] and
 * [out, r], with in/out of y = x·W); only a merged delta B·A would need transposing to the
 * Conv1D [in, out] weight layout, so nothing changes here. GPT-2's fused `c_attn` has one pair
 * whose B spans the concatenated q|k|v output (out = 3·n_embd).
 */

import { fail, isServeError, ServeError, type ErrorCode } from '../errors.ts';
import type { LinearModule } from '../model/types.ts';
import { parseSafetensors, writeSafetensors, type SafetensorsReader, type WriteTensor } from '../formats/safetensors.ts';
import { nativeAddon } from '../backend/wasm/addon/addon.ts';
import { hostBuffers } from './host-buffers.ts';
import { matchesTarget, parsePeftConfig, scalingFor, type PeftConfig } from './peft-config.ts';

export interface ModuleLora {
  readonly module: LinearModule;
  /** The pair's own rank (lora_A.shape[0]). */
  readonly r: number;
  readonly scaling: number;
  /** Aᵀ: [in, r], row-major (PEFT's lora_A is [r, in]). */
  readonly At: Float32Array;
  /** scaling·Bᵀ: [r, out], row-major (PEFT's lora_B is [out, r]). */
  readonly Bt: Float32Array;
}

export interface AdapterWeights {
  readonly id: string;
  readonly config: PeftConfig;
  /** Sorted by (module.layer, module.key). */
  readonly modules: ModuleLora[];
  /** Largest rank over the modules. */
  readonly rank: number;
  /** Short module names hit (q_proj, c_attn, ...), sorted, unique. */
  readonly targetModules: string[];
  /**
   * Bytes of all A and B as float32. Every At and Bt is a view of one SharedArrayBuffer of exactly this
   * size: posting the weights to a worker thread shares them instead of copying, and a tensor made from
   * them is one memcpy.
   */
  readonly bytes: number;
}

/** Index of the first NaN or ±Infinity, or -1. */
export function firstNonFinite(data: Float32Array): number {
  // x·0 is 0 for every finite x and NaN otherwise: one multiply-add per element, then a scan only if needed.
  let probe = 0;
  for (let i = 0; i < data.length; i++) probe += data[i]! * 0;
  if (probe === 0) return -1;
  return data.findIndex((x) => !Number.isFinite(x));
}

/**
 * The device layout from PEFT's (plain loops): At[i][j] = A[j][i] (A: [r, in]) and Bt[j][o] = s·B[o][j]
 * (B: [out, r]). The model computes y = x·W with W [in, out]; PEFT adds s·B·(A·x) per row, which is
 * x·At·Bt in this layout. Returns whether every element of A and B is finite (checked in the same pass, as
 * firstNonFinite does: x·0 is 0 for finite x, NaN otherwise).
 */
export function toDeviceLayout(A: Float32Array, B: Float32Array, r: number, inF: number, outF: number, s: number, At: Float32Array, Bt: Float32Array): boolean {
  let probe = 0;
  for (let i = 0; i < inF; i++) {
    for (let j = 0; j < r; j++) {
      const a = A[j * inF + i]!;
      At[i * r + j] = a;
      probe += a * 0;
    }
  }
  for (let j = 0; j < r; j++) {
    for (let o = 0; o < outF; o++) {
      const b = B[o * r + j]!;
      Bt[j * outF + o] = s * b;
      probe += b * 0;
    }
  }
  return probe === 0;
}

/** toDeviceLayout in the native addon when it is built (the same loops, compiled), else in JavaScript. */
const layout: typeof toDeviceLayout = (...args) => (nativeAddon()?.layout ?? toDeviceLayout)(...args);

/** A PEFT adapter of rank 1 with zero weights on every base module (AdapterManager.warmUp runs the load path on it). */
export function syntheticAdapter(base: { modules: readonly LinearModule[] }): { config: Record<string, unknown>; weights: Uint8Array } {
  const tensors: Record<string, WriteTensor> = {};
  for (const m of base.modules) {
    tensors[`base_model.model.${m.path}.lora_A.weight`] = { shape: [1, m.inFeatures], data: new Float32Array(m.inFeatures) };
    tensors[`base_model.model.${m.path}.lora_B.weight`] = { shape: [m.outFeatures, 1], data: new Float32Array(m.outFeatures) };
  }
  const names = [...new Set(base.modules.map((m) => m.name))].sort();
  return { config: { peft_type: 'LORA', r: 1, lora_alpha: 1, target_modules: names, bias: 'none' }, weights: writeSafetensors(tensors) };
}

const PICKLE_PROTOCOL_MIN = 2;
const PICKLE_PROTOCOL_MAX = 5;

/**
 * Throws ADAPTER_PICKLE when the bytes look like a PyTorch `.bin` (a zip archive since torch 1.6,
 * a raw pickle before) instead of safetensors. A safetensors file has `{` at byte 8 (the start
 * of its JSON header), which a zip (`PK\x03\x04`) or pickle (`\x80 <protocol>`) never has there,
 * so the check cannot misfire on a safetensors header whose length happens to start with 0x80.
 */
export function assertNotPickle(bytes: Uint8Array): void {
  if (bytes.length > 8 && bytes[8] === 0x7b) return;
  const zip = bytes.length >= 4 && bytes[0] === 0x50 && bytes[1] === 0x4b && bytes[2] === 0x03 && bytes[3] === 0x04;
  const pickle = bytes.length >= 2 && bytes[0] === 0x80 && bytes[1]! >= PICKLE_PROTOCOL_MIN && bytes[1]! <= PICKLE_PROTOCOL_MAX;
  if (zip || pickle) {
    throw fail('ADAPTER_PICKLE', 'adapter weights are a PyTorch pickle (adapter_model.bin), which is never loaded; convert them to adapter_model.safetensors');
  }
}

/** `[base_model.model.]<path>.<lora_A|lora_B>[.<adapter name>].weight` */
const LORA_TENSOR = /^(?:base_model\.model\.)?(.+)\.(lora_A|lora_B)(?:\.([^.]+))?\.weight$/;
/** Markers of tensors this server cannot apply, with the reason. */
const UNSUPPORTED_TENSORS: readonly (readonly [marker: RegExp, why: string])[] = [
  [/(^|\.)lora_magnitude_vector(\.|$)/, 'DoRA magnitude vector (lora_magnitude_vector) is not supported'],
  [/(^|\.)lora_embedding_[AB](\.|$)/, 'embedding LoRA (lora_embedding_A/B) is not supported'],
  [/(^|\.)lora_[AB](\.[^.]+)?\.bias$/, 'LoRA bias (lora_bias) is not supported'],
  [/(^|\.)modules_to_save(\.|$)/, 'modules_to_save weights are not supported'],
];
const MODEL_PREFIX = /^(?:transformer|model)\./;

const normalisePath = (p: string) => p.replace(MODEL_PREFIX, '');

interface PairNames {
  A?: string;
  B?: string;
}

function byLayerThenKey(a: { module: LinearModule }, b: { module: LinearModule }): number {
  return a.module.layer - b.module.layer || (a.module.key < b.module.key ? -1 : a.module.key > b.module.key ? 1 : 0);
}

/** One module's LoRA pair as the file names it, resolved to a base module and checked against it. */
interface FoundPair {
  readonly module: LinearModule;
  readonly r: number;
  readonly scaling: number;
  readonly aName: string;
  readonly bName: string;
}

type Bad = (code: ErrorCode, msg: string, details?: Record<string, unknown>) => ServeError;

/**
 * Steps 1 and 2 of every adapter read: groups the tensors into A/B pairs per module path, resolves each to a
 * base module and checks it against the config and the module's shapes.
 */
function findPairs(config: PeftConfig, reader: SafetensorsReader, base: { modules: readonly LinearModule[] }, maxRank: number, bad: Bad): FoundPair[] {
  const exact = new Map(base.modules.map((m) => [m.path, m]));
  const normalised = new Map(base.modules.map((m) => [normalisePath(m.path), m]));

  // 1. Group tensor names into A/B pairs per module path as written in the file.
  const pairs = new Map<string, PairNames>();
  const adapterNames = new Set<string>();
  for (const name of reader.tensors.keys()) {
    const unsupported = UNSUPPORTED_TENSORS.find(([marker]) => marker.test(name));
    if (unsupported) throw bad('ADAPTER_UNSUPPORTED', `${unsupported[1]} (tensor "${name}")`);
    const m = LORA_TENSOR.exec(name);
    if (!m) throw bad('ADAPTER_UNSUPPORTED', `unexpected tensor "${name}": only lora_A / lora_B weights are supported`);
    const [, path, which, adapterName] = m as unknown as [string, string, 'lora_A' | 'lora_B', string | undefined];
    adapterNames.add(adapterName ?? '');
    const pair = pairs.get(path) ?? {};
    const side = which === 'lora_A' ? 'A' : 'B';
    if (pair[side] !== undefined) throw bad('ADAPTER_INVALID_CONFIG', `module "${path}" has two ${which} tensors ("${pair[side]}", "${name}")`);
    pair[side] = name;
    pairs.set(path, pair);
  }
  if (pairs.size === 0) throw bad('ADAPTER_INVALID_CONFIG', 'adapter_model.safetensors contains no LoRA tensors');
  if (adapterNames.size > 1) {
    const names = [...adapterNames].map((n) => (n === '' ? '(none)' : n)).join(', ');
    throw bad('ADAPTER_INVALID_CONFIG', `tensors carry several adapter names (${names}); save one adapter per folder`);
  }

  // 2. Resolve each pair to a base module, check it against the config and shapes.
  const found: FoundPair[] = [];
  const claimedBy = new Map<LinearModule, string>();
  for (const [path, pair] of pairs) {
    if (pair.A === undefined || pair.B === undefined) {
      const [has, lacks] = pair.A === undefined ? ['lora_B', 'lora_A'] : ['lora_A', 'lora_B'];
      throw bad('ADAPTER_INVALID_CONFIG', `module "${path}" has ${has} but no ${lacks}`);
    }
    const module = exact.get(path) ?? normalised.get(normalisePath(path));
    if (module === undefined) {
      throw bad('ADAPTER_UNKNOWN_MODULE', `module "${path}" does not exist in the base model (or is not a linear layer)`, { module: path });
    }
    const other = claimedBy.get(module);
    if (other !== undefined) {
      throw bad('ADAPTER_INVALID_CONFIG', `modules "${other}" and "${path}" both resolve to base module "${module.path}"`);
    }
    claimedBy.set(module, path);
    if (!matchesTarget(config, path)) {
      throw bad('ADAPTER_INVALID_CONFIG',
        `module "${path}" has LoRA tensors but is not selected by adapter_config.json ` +
        `(target_modules ${JSON.stringify(config.targetModules)}` +
        (config.layersToTransform !== null ? `, layers_to_transform ${JSON.stringify(config.layersToTransform)}` : '') + ')');
    }

    const aShape = reader.tensors.get(pair.A)!.shape;
    const bShape = reader.tensors.get(pair.B)!.shape;
    const shapeStr = (s: readonly number[]) => `[${s.join(', ')}]`;
    if (aShape.length !== 2 || bShape.length !== 2) {
      throw bad('ADAPTER_SHAPE_MISMATCH', `module "${path}": lora_A and lora_B must be 2-D, got ${shapeStr(aShape)} and ${shapeStr(bShape)}`);
    }
    const [r, aIn] = aShape as [number, number];
    const [bOut, bR] = bShape as [number, number];
    if (r === 0 || r !== bR) {
      throw bad('ADAPTER_SHAPE_MISMATCH', `module "${path}": lora_A ${shapeStr(aShape)} and lora_B ${shapeStr(bShape)} disagree on the rank`, { expected: r, got: bR });
    }
    if (aIn !== module.inFeatures) {
      throw bad('ADAPTER_SHAPE_MISMATCH', `module "${path}": lora_A is ${shapeStr(aShape)}, expected [r, ${module.inFeatures}] (in_features of ${module.path})`, { expected: module.inFeatures, got: aIn });
    }
    if (bOut !== module.outFeatures) {
      throw bad('ADAPTER_SHAPE_MISMATCH', `module "${path}": lora_B is ${shapeStr(bShape)}, expected [${module.outFeatures}, r] (out_features of ${module.path})`, { expected: module.outFeatures, got: bOut });
    }
    if (r > maxRank) {
      throw bad('ADAPTER_RANK_TOO_LARGE', `module "${path}" has rank ${r}, above the server's max LoRA rank ${maxRank}`);
    }

    found.push({ module, r, scaling: scalingFor(config, path, r), aName: pair.A, bName: pair.B });
  }
  return found;
}

/**
 * Parses and checks an adapter (config, then the safetensors against the base model) and runs `use` on the
 * result while the reader is open. Every rejection is a coded ServeError whose message starts with
 * `adapter "<id>": `.
 */
function withPairs<T>(
  input: { id: string; config: unknown; weights: Uint8Array },
  base: { modules: readonly LinearModule[] },
  maxRank: number,
  use: (config: PeftConfig, reader: SafetensorsReader, found: FoundPair[], bad: Bad) => T,
): T {
  const { id } = input;
  const bad: Bad = (code, msg, details) => fail(code, `adapter "${id}": ${msg}`, details);
  const withId = (err: unknown): unknown =>
    isServeError(err) ? new ServeError(err.code, `adapter "${id}": ${err.message}`, err.details, { cause: err }) : err;

  let config: PeftConfig;
  let reader: SafetensorsReader;
  try {
    config = parsePeftConfig(input.config, { maxRank });
    assertNotPickle(input.weights);
    reader = parseSafetensors(input.weights, 'adapter_model.safetensors');
  } catch (err) {
    throw withId(err);
  }
  try {
    return use(config, reader, findPairs(config, reader, base, maxRank, bad), bad);
  } catch (err) {
    if (isServeError(err) && err.message.startsWith(`adapter "${id}": `)) throw err;
    throw withId(err);
  } finally {
    reader.close();
  }
}

/** Throws ADAPTER_NON_FINITE naming the first tensor of `tensors` with a NaN or infinite element. */
function assertFinite(tensors: readonly (readonly [name: string, data: Float32Array])[], bad: Bad): void {
  for (const [tensor, data] of tensors) {
    const i = firstNonFinite(data);
    if (i >= 0) throw bad('ADAPTER_NON_FINITE', `tensor "${tensor}" contains ${data[i]} at element ${i}`);
  }
}

/** One module's LoRA pair in PEFT's own layout (copies), for adapter merging (src/lora/merged-adapter.ts). */
export interface PeftPair {
  readonly module: LinearModule;
  readonly r: number;
  /** lora_A: [r, in], row-major. */
  readonly A: Float32Array;
  /** lora_B: [out, r], row-major. */
  readonly B: Float32Array;
}

/**
 * The same checks as loadAdapterWeights, returning each module's A and B as the file has them (no transposition,
 * no scaling), sorted by (module.layer, module.key).
 */
export function readPeftPairs(
  input: { id: string; config: unknown; weights: Uint8Array },
  base: { modules: readonly LinearModule[] },
  opts: { maxRank: number },
): { config: PeftConfig; pairs: PeftPair[] } {
  return withPairs(input, base, opts.maxRank, (config, reader, found, bad) => {
    const pairs = found.map(({ module, r, aName, bName }) => {
      const A = reader.readFloat32(aName);
      const B = reader.readFloat32(bName);
      assertFinite([[aName, A], [bName, B]], bad);
      return { module, r, A, B };
    });
    pairs.sort(byLayerThenKey);
    return { config, pairs };
  });
}

/**
 * Validates config and weights against the base model and returns the host-side A/B pairs.
 * Every rejection is a coded ServeError whose message starts with `adapter "<id>": `.
 */
export function loadAdapterWeights(
  input: { id: string; config: unknown; weights: Uint8Array },
  base: { modules: readonly LinearModule[] },
  /** alloc: where the host copy goes (default: a spare, pre-touched buffer when there is one; see host-buffers.ts). */
  opts: { maxRank: number; alloc?: (bytes: number) => SharedArrayBuffer },
): AdapterWeights {
  return withPairs(input, base, opts.maxRank, (config, reader, found, bad) => {
    // 3. Read the values (finite only) into one shared buffer, in the device layout.
    const floats = found.reduce((n, f) => n + f.r * (f.module.inFeatures + f.module.outFeatures), 0);
    // Pre-touched when one of this size is spare (host-buffers.ts).
    const shared = (opts.alloc ?? ((n) => hostBuffers.take(n)))(floats * 4);
    let offset = 0;
    const view = (n: number) => {
      const v = new Float32Array(shared, offset * 4, n);
      offset += n;
      return v;
    };
    const modules: ModuleLora[] = [];
    for (const { module, r, scaling, aName, bName } of found) {
      const A = reader.viewFloat32(aName); // read only, before the reader closes
      const B = reader.viewFloat32(bName);
      const At = view(module.inFeatures * r);
      const Bt = view(r * module.outFeatures);
      if (!layout(A, B, r, module.inFeatures, module.outFeatures, scaling, At, Bt)) assertFinite([[aName, A], [bName, B]], bad);
      modules.push({ module, r, scaling, At, Bt });
    }

    modules.sort(byLayerThenKey);
    return {
      id: input.id,
      config,
      modules,
      rank: Math.max(...modules.map((m) => m.r)),
      targetModules: [...new Set(modules.map((m) => m.module.name))].sort(),
      bytes: shared.byteLength,
    };
  });
}
