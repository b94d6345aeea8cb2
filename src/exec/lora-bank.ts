/**
 * LoRA on the device: adapters uploaded once in the layout of adapter-file.ts (scaling folded into B), the per-step
 * "bank" that applies many adapters to one batch unmerged, and merged weights W' = W + s·Aᵀ·Bᵀ.
 *
 * Layout. The model computes y = x·W with W [in, out]. PEFT stores A [r, in], B [out, r] and applies
 * y += s·B·(A·x) per row, i.e. y += x·Aᵀ·(s·Bᵀ). We store At = Aᵀ [in, r] and Bt = s·Bᵀ [r, out].
 * For GPT-2's Conv1D (fan_in_fan_out) A and B are stored as for Linear, so nothing differs here: only a
 * merged delta is "transposed", and in our [in, out] layout At·Bt already is that transposed delta.
 */
import * as tf from '@tensorflow/tfjs-core';
import type { Linear, StepLora, UnmergedLora } from '../model/layers.ts';
import { fusedKernels } from '../backend/webgpu/kernels/program.ts';
import { stepInput } from '../backend/webgpu/recorded-step.ts';
import type { ExecAdapter } from '../engine/executor.ts';
import { addToWeight, storeWeight, type Weight } from '../backend/weights.ts';
import type { AdapterWeights } from '../lora/adapter-file.ts';

export interface DeviceModule {
  /** Aᵀ: [in, r]. */
  readonly At: tf.Tensor2D;
  /** s·Bᵀ: [r, out]. */
  readonly Bt: tf.Tensor2D;
  readonly r: number;
}

export interface DeviceAdapter {
  readonly id: string;
  readonly key: string;
  readonly rank: number;
  /** Float32 bytes of every At and Bt: exactly the sum of the adapter's A and B sizes. */
  readonly bytes: number;
  /** Keyed by LinearModule.key. */
  readonly modules: ReadonlyMap<string, DeviceModule>;
}

export function uploadAdapter(w: AdapterWeights, key: string): DeviceAdapter {
  const modules = new Map<string, DeviceModule>();
  let bytes = 0;
  try {
    for (const m of w.modules) {
      // The host arrays are already in this layout (and never written again, so a backend that keeps a
      // reference to them instead of copying, as the cpu backend does, is safe).
      modules.set(m.module.key, { At: tf.tensor2d(m.At, [m.module.inFeatures, m.r]), Bt: tf.tensor2d(m.Bt, [m.r, m.module.outFeatures]), r: m.r });
      bytes += (m.At.length + m.Bt.length) * 4;
    }
  } catch (err) {
    disposeAdapter({ id: w.id, key, rank: w.rank, bytes, modules });
    throw err;
  }
  return { id: w.id, key, rank: w.rank, bytes, modules };
}

export function disposeAdapter(a: DeviceAdapter): void {
  for (const m of a.modules.values()) {
    m.At.dispose();
    m.Bt.dispose();
  }
}

/**
 * For one Linear and k adapters: A [in, k·R] (adapter a's Aᵀ in columns a·R … a·R+r, zero-padded to R) and
 * B [k·R, out] (its s·Bᵀ restricted to this linear's columns of the module output, zero rows past r).
 * Null when no adapter targets the linear's module.
 */
function linearBank(lin: Linear, adapters: readonly DeviceAdapter[], R: number): { A: tf.Tensor2D; B: tf.Tensor2D } | null {
  const key = lin.module.key;
  if (!adapters.some((a) => a.modules.has(key))) return null;
  const [inF, outF] = lin.W.shape;
  const whole = outF === lin.module.outFeatures;
  return tf.tidy(() => {
    const As: tf.Tensor2D[] = [];
    const Bs: tf.Tensor2D[] = [];
    for (const a of adapters) {
      const m = a.modules.get(key);
      if (!m) {
        As.push(tf.zeros([inF, R]));
        Bs.push(tf.zeros([R, outF]));
        continue;
      }
      const Bt = whole ? m.Bt : tf.slice(m.Bt, [0, lin.moduleOffset], [m.r, outF]); // this linear's columns
      As.push(m.r === R ? m.At : tf.pad(m.At, [[0, 0], [0, R - m.r]]));
      Bs.push(m.r === R ? Bt : tf.pad(Bt, [[0, R - m.r], [0, 0]]));
    }
    return { A: As.length === 1 ? tf.clone(As[0]!) : tf.concat2d(As, 1), B: Bs.length === 1 ? tf.clone(Bs[0]!) : tf.concat2d(Bs, 0) };
  });
}

/**
 * A single adapter whose tensors already have the bank layout (k = 1, R = r, the linear covers the whole module)
 * is used as it is, without copies: switching to a cached adapter then costs one mask tensor.
 */
function sharedBank(lin: Linear, a: DeviceAdapter): { A: tf.Tensor2D; B: tf.Tensor2D } | null {
  const m = a.modules.get(lin.module.key);
  if (!m || m.r !== a.rank || lin.W.shape[1] !== lin.module.outFeatures) return null;
  return { A: m.At, B: m.Bt };
}

/** Row n selects columns slot·R … slot·R+R of adapter `rowSlots[n]` (none for a base row). */
function maskData(rowSlots: readonly (number | null)[], k: number, R: number): Float32Array {
  const K = k * R;
  const out = new Float32Array(rowSlots.length * K);
  rowSlots.forEach((slot, n) => {
    if (slot !== null) out.fill(1, n * K + slot * R, n * K + (slot + 1) * R);
  });
  return out;
}

/** The adapter-specific part of a step's LoRA: built once per set of adapters, reused across steps. */
export interface LoraBank {
  readonly adapters: readonly DeviceAdapter[];
  readonly R: number;
  /** owned: false when A and B are the adapter's own tensors (not disposed with the bank). */
  readonly linears: ReadonlyMap<string, { A: Weight; B: Weight; owned: boolean }>;
  readonly bytes: number;
}

/** The bank's A and B of every linear some adapter targets; owned: false when they are the adapter's own tensors. */
function bankTensors(linears: Iterable<Linear>, adapters: readonly DeviceAdapter[], R: number): Map<string, { A: tf.Tensor2D; B: tf.Tensor2D; owned: boolean }> {
  const out = new Map<string, { A: tf.Tensor2D; B: tf.Tensor2D; owned: boolean }>();
  for (const lin of linears) {
    const shared = adapters.length === 1 ? sharedBank(lin, adapters[0]!) : null;
    const made = shared ? null : linearBank(lin, adapters, R);
    if (shared) out.set(lin.key, { ...shared, owned: false });
    else if (made) out.set(lin.key, { ...made, owned: true });
  }
  return out;
}

/** A bank for a set of adapters; its own A and B are stored in the backend's weight layout (storeWeight). */
export function buildBank(linears: Iterable<Linear>, adapters: readonly DeviceAdapter[]): LoraBank {
  const R = Math.max(1, ...adapters.map((a) => a.rank));
  const out = new Map<string, { A: Weight; B: Weight; owned: boolean }>();
  let bytes = 0;
  for (const [key, { A, B, owned }] of bankTensors(linears, adapters, R)) {
    if (!owned) {
      out.set(key, { A, B, owned });
      continue;
    }
    const stored = { A: storeWeight(A), B: storeWeight(B), owned };
    out.set(key, stored);
    bytes += (stored.A.size + stored.B.size) * 4;
  }
  return { adapters, R, linears: out, bytes };
}

export function disposeBank(bank: LoraBank): void {
  for (const { A, B, owned } of bank.linears.values()) {
    if (!owned) continue;
    A.dispose();
    B.dispose();
  }
}

/**
 * The StepLora for N rows: rowSlots[n] is the index into bank.adapters of row n's adapter (null: base).
 * The returned masks (and slots) belong to the caller (dispose with disposeStepLora).
 */
export function stepLora(bank: LoraBank, rowSlots: readonly (number | null)[]): StepLora {
  const k = bank.adapters.length;
  const unmerged = new Map<string, UnmergedLora>();
  if (bank.linears.size === 0) return { unmerged };
  // One mask for every linear of the step (all banks share the k·R column layout).
  const mask = tf.tensor2d(maskData(rowSlots, k, bank.R), [rowSlots.length, k * bank.R]);
  const slots = fusedKernels() ? tf.tensor1d(stepInput('lora.slots', slotData(rowSlots)), 'int32') : undefined;
  for (const [key, { A, B }] of bank.linears) unmerged.set(key, { A, B, mask, rank: bank.R, slots });
  return { unmerged };
}

/** The slots the fused kernels read, int32 [N]: each row's adapter index in the bank, −1 for none (the base). */
export function slotData(rowSlots: readonly (number | null)[]): Int32Array {
  return Int32Array.from(rowSlots, (s) => s ?? -1);
}

export function disposeStepLora(s: StepLora): void {
  const seen = new Set<Weight | tf.Tensor>();
  for (const u of s.unmerged?.values() ?? []) {
    seen.add(u.mask);
    if (u.slots) seen.add(u.slots);
  }
  for (const m of s.merged?.values() ?? []) seen.add(m);
  for (const t of seen) t.dispose();
}

/**
 * Merged weights for one adapter: W' = W + At·Bt for every linear it targets (computed from the pristine
 * W, which stays untouched, so switching back to the base is exact).
 */
export function mergeWeights(linears: ReadonlyMap<string, Linear>, adapter: DeviceAdapter): Map<string, Weight> {
  const parts = bankTensors(linears.values(), [adapter], Math.max(1, adapter.rank));
  const merged = new Map<string, Weight>();
  try {
    for (const [key, { A, B }] of parts) {
      const delta = tf.matMul(A, B) as tf.Tensor2D;
      try {
        merged.set(key, addToWeight(linears.get(key)!.W, delta));
      } finally {
        delta.dispose();
      }
    }
  } catch (err) {
    for (const w of merged.values()) w.dispose();
    throw err;
  } finally {
    for (const { A, B, owned } of parts.values()) if (owned) { A.dispose(); B.dispose(); }
  }
  return merged;
}
