/**
 * What `auto` means for the options that depend on the machine: how many executor workers (model copies) to run and
 * how many device bytes the adapter tier may use. Pure functions of the backend, the model's size and the machine,
 * so the rules are tested without starting anything; the runtime logs the choice and the reason.
 */
import { fail } from './errors.ts';

/** The wasm backend's heap: 4 GiB per instance (32-bit addresses), so per model copy. */
export const WASM_HEAP_BYTES = 4 * 2 ** 30;
/** Share of the memory left beside the model that the adapter tier takes by default. */
export const ADAPTER_SHARE = 0.25;
/** The adapter tier on a backend whose device memory the server cannot query (WebGPU, TensorFlow). */
export const OPAQUE_DEVICE_ADAPTER_BYTES = 2 ** 30;
/** Share of the free host memory that model copies may take when workers are chosen automatically. */
export const WORKER_MEMORY_SHARE = 0.5;
/** Memory a model copy needs beside its weights: KV caches, a step's intermediates, adapters. */
export const COPY_OVERHEAD_BYTES = 512 * 2 ** 20;

export interface Machine {
  readonly cores: number;
  readonly freeMemoryBytes: number;
}

export interface Choice {
  readonly value: number;
  readonly why: string;
}

const mib = (b: number) => `${(b / 2 ** 20).toFixed(0)} MiB`;

/**
 * Workers for `--workers auto`. The wasm and cpu backends compute on one thread per instance, so a second core only
 * does work through a second copy of the model: one copy per core, as many as fit in half of the free memory. Other
 * backends (WebGPU, TensorFlow) run in one instance that uses the device or its own threads.
 */
export function autoWorkers(backend: string, modelBytes: number, m: Machine): Choice {
  if (backend !== 'wasm' && backend !== 'cpu') return { value: 1, why: `the ${backend} backend runs one instance per process` };
  const perCopy = modelBytes + COPY_OVERHEAD_BYTES;
  const fit = Math.floor((WORKER_MEMORY_SHARE * m.freeMemoryBytes) / perCopy);
  const value = Math.max(1, Math.min(m.cores, fit));
  const why = value === m.cores
    ? `one per core (${m.cores}); ${value} cop${value > 1 ? 'ies' : 'y'} of ${mib(perCopy)} fit in half of the free memory`
    : `${fit < 1 ? 'not even one' : `only ${fit}`} cop${fit === 1 ? 'y' : 'ies'} of ${mib(perCopy)} fit in half of the free memory (${mib(m.freeMemoryBytes)} free)`;
  return { value, why };
}

/**
 * Device bytes for `--adapter-device-bytes auto`. On wasm, a quarter of the heap the model leaves free (per copy:
 * every worker holds every resident adapter); on cpu, a quarter of the free host memory, shared by the copies; on
 * backends whose device memory cannot be queried, a fixed 1 GiB.
 */
export function autoAdapterDeviceBytes(backend: string, modelBytes: number, workers: number, m: Machine): Choice {
  if (backend === 'wasm') {
    const left = Math.max(0, WASM_HEAP_BYTES - modelBytes);
    return { value: Math.floor(ADAPTER_SHARE * left), why: `a quarter of the wasm heap left beside the model (${mib(left)})` };
  }
  if (backend === 'cpu') {
    const share = Math.floor((ADAPTER_SHARE * m.freeMemoryBytes) / Math.max(1, workers));
    return { value: share, why: `a quarter of the free host memory (${mib(m.freeMemoryBytes)}), per model copy` };
  }
  return { value: OPAQUE_DEVICE_ADAPTER_BYTES, why: `the ${backend} backend does not report its free memory: a fixed 1 GiB` };
}

/**
 * Refuses, before any weight is read, a model the backend cannot hold: on wasm the weights (as float32) plus
 * COPY_OVERHEAD_BYTES must fit the 4 GiB heap of one instance, else loading would end in a wasm
 * "memory access out of bounds" half-way. Other backends check their own limits while loading.
 */
export function assertModelFits(backend: string, float32Bytes: number): void {
  if (backend !== 'wasm' || float32Bytes + COPY_OVERHEAD_BYTES <= WASM_HEAP_BYTES) return;
  const gib = (b: number) => `${(b / 2 ** 30).toFixed(2)} GiB`;
  throw fail('MODEL_TOO_LARGE', `the model's weights need ${gib(float32Bytes)} as float32; the wasm backend's heap holds ${gib(WASM_HEAP_BYTES)} per `
    + `model copy, of which about ${gib(COPY_OVERHEAD_BYTES)} is needed for the KV cache and a step's intermediates. Serve it with a GPU backend `
    + '(--backend webgpu, or tensorflow-gpu where installed) or a smaller model', { float32Bytes, heapBytes: WASM_HEAP_BYTES });
}
