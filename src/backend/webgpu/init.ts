/**
 * TensorFlow.js's WebGPU backend (@tensorflow/tfjs-backend-webgpu) on Dawn's Node.js bindings (npm `webgpu`, which
 * ships a prebuilt dawn.node). Dawn needs a Vulkan driver (Metal on macOS, D3D12 on Windows).
 *
 * A software adapter (Mesa's lavapipe/llvmpipe, SwiftShader, WARP) runs the GPU code path on the CPU: complete, but
 * slower than the wasm backend, so it is used only when the webgpu backend is asked for by name.
 */
import * as tf from '@tensorflow/tfjs-core';
import { fail } from '../../errors.ts';
import { installCounters } from './counters.ts';
import { installRecorder } from './recorded-step.ts';
import { installErrorGuard } from './guard.ts';

/** The adapter the webgpu backend runs on, and the limits that decide which tensors fit. */
export interface WebGPUAdapter {
  readonly vendor: string;
  readonly architecture: string;
  readonly device: string;
  readonly description: string;
  /** A CPU implementation (lavapipe/llvmpipe, SwiftShader, WARP) rather than a GPU. */
  readonly software: boolean;
  /** Bytes of the largest buffer a kernel can bind: the largest tensor the backend can run on. */
  readonly maxStorageBufferBindingSize: number;
  /** Bytes of the largest buffer the device can allocate. */
  readonly maxBufferSize: number;
}

/** The parts of Dawn's GPUAdapter read here (the `webgpu` package types them against @webgpu/types). */
interface AdapterLike {
  readonly info?: { vendor?: string; architecture?: string; device?: string; description?: string; isFallbackAdapter?: boolean };
  readonly isFallbackAdapter?: boolean;
  readonly limits: { maxStorageBufferBindingSize: number; maxBufferSize: number };
}

interface GpuLike {
  requestAdapter(options?: { powerPreference?: 'high-performance' | 'low-power' }): Promise<AdapterLike | null>;
}

const SOFTWARE = /llvmpipe|lavapipe|swiftshader|software|warp|basic render driver/i;

/** Whether an adapter runs on the CPU: the adapter says so, or its names are those of a known software driver. */
export function isSoftwareAdapter(a: Pick<WebGPUAdapter, 'vendor' | 'architecture' | 'device' | 'description'> & { fallback?: boolean }): boolean {
  return a.fallback === true || a.architecture === 'software' || SOFTWARE.test(`${a.vendor} ${a.architecture} ${a.device} ${a.description}`);
}

let gpu: GpuLike | null = null;

/** Dawn's GPU object, installed as navigator.gpu (where tfjs-backend-webgpu looks for it) on first use. */
async function dawn(): Promise<GpuLike> {
  if (gpu) return gpu;
  let mod: { create(flags: string[]): unknown; globals: object };
  try {
    mod = await import('webgpu');
  } catch (err) {
    throw fail('BACKEND_UNAVAILABLE', `the webgpu package (Dawn) failed to load: ${(err as Error).message.split('\n')[0]}`);
  }
  // GPUBufferUsage, GPUMapMode, ... which tfjs-backend-webgpu reads as globals.
  for (const [k, v] of Object.entries(mod.globals)) if (!(k in globalThis)) Object.defineProperty(globalThis, k, { value: v, configurable: true, writable: true });
  const created = mod.create([]) as GpuLike;
  const g = globalThis as { navigator?: object };
  // Node.js 21+ defines a navigator without gpu; Node.js 20 none.
  if (g.navigator === undefined) Object.defineProperty(globalThis, 'navigator', { value: {}, configurable: true, writable: true });
  Object.defineProperty(g.navigator!, 'gpu', { value: created, configurable: true });
  gpu = created;
  return gpu;
}

/**
 * The adapter Dawn picks for tfjs (tfjs asks for 'high-performance'), or null when there is none (no Vulkan
 * driver). Throws BACKEND_UNAVAILABLE when Dawn itself does not load.
 */
export async function probeAdapter(): Promise<WebGPUAdapter | null> {
  const adapter = await (await dawn()).requestAdapter({ powerPreference: 'high-performance' });
  if (!adapter) return null;
  const i = adapter.info ?? {};
  const names = { vendor: i.vendor ?? '', architecture: i.architecture ?? '', device: i.device ?? '', description: i.description ?? '' };
  return {
    ...names,
    software: isSoftwareAdapter({ ...names, fallback: i.isFallbackAdapter ?? adapter.isFallbackAdapter }),
    maxStorageBufferBindingSize: adapter.limits.maxStorageBufferBindingSize,
    maxBufferSize: adapter.limits.maxBufferSize,
  };
}

/** "mesa software (llvmpipe: Mesa 25.0.7 ...)": how logs and errors name an adapter. */
export function describeAdapter(a: WebGPUAdapter): string {
  const what = [a.vendor, a.architecture].filter(Boolean).join(' ') || 'unknown adapter';
  const detail = a.description || a.device;
  return `${what}${detail ? ` (${detail})` : ''}${a.software && a.architecture !== 'software' ? ', software' : ''}`;
}

/** The start-up log's description of the adapter and the limits that bound tensor sizes. */
export function adapterSummary(a: WebGPUAdapter): string {
  const mib = (n: number) => `${(n / 2 ** 20).toFixed(0)} MiB`;
  return `${describeAdapter(a)}; maxStorageBufferBindingSize ${mib(a.maxStorageBufferBindingSize)}, maxBufferSize ${mib(a.maxBufferSize)}`;
}

/** The limits of the webgpu backend's device, when that backend is initialised (null otherwise). */
let active: WebGPUAdapter | null = null;

export function activeAdapter(): WebGPUAdapter | null {
  return active;
}

/**
 * Initialises the webgpu backend. `allowSoftware`: accept a software adapter (when the backend was asked for by
 * name; auto wants a GPU).
 */
export async function initWebGPU(opts: { allowSoftware: boolean }): Promise<WebGPUAdapter> {
  const adapter = await probeAdapter();
  if (!adapter) {
    throw fail('BACKEND_UNAVAILABLE', 'Dawn found no WebGPU adapter: it needs a Vulkan driver (the GPU vendor\'s, or Mesa\'s lavapipe: ' +
      'scripts/install-lavapipe.sh) and the Vulkan loader (libvulkan1)');
  }
  if (adapter.software && !opts.allowSoftware) {
    throw fail('BACKEND_UNAVAILABLE', `Dawn's WebGPU adapter is a software one, ${describeAdapter(adapter)}, which runs on the CPU ` +
      'more slowly than the wasm backend (use --backend webgpu to run on it anyway)');
  }
  await import('@tensorflow/tfjs-backend-webgpu');
  if (!(await tf.setBackend('webgpu'))) throw fail('BACKEND_UNAVAILABLE', `the webgpu backend failed to initialise on ${describeAdapter(adapter)}`);
  await tf.ready();
  installCounters(tf.backend());
  installErrorGuard(tf.backend());
  installRecorder(tf.backend());
  // tfjs requests its device with the adapter's limits; the device's are the ones that hold.
  const limits = (tf.backend() as unknown as { device?: { limits?: AdapterLike['limits'] } }).device?.limits;
  active = Object.freeze({
    ...adapter,
    maxStorageBufferBindingSize: limits?.maxStorageBufferBindingSize ?? adapter.maxStorageBufferBindingSize,
    maxBufferSize: limits?.maxBufferSize ?? adapter.maxBufferSize,
  });
  return active;
}

/** The most bytes one tensor may have on the active backend: the webgpu device's binding limit, or null (no limit). */
export function maxTensorBytes(): { readonly bytes: number; readonly on: string } | null {
  const a = active;
  return a ? { bytes: Math.min(a.maxStorageBufferBindingSize, a.maxBufferSize), on: describeAdapter(a) } : null;
}

/** Refuses (MODEL_TOO_LARGE) a float32 tensor of this shape larger than `limit` bytes. */
export function checkTensorFits(name: string, shape: readonly number[], limit: { readonly bytes: number; readonly on: string }): void {
  const bytes = shape.reduce((a, b) => a * b, 1) * 4;
  if (bytes <= limit.bytes) return;
  throw fail('MODEL_TOO_LARGE', `tensor "${name}" [${shape.join(', ')}] needs ${bytes} bytes as float32, more than the ${limit.bytes} bytes ` +
    `one WebGPU buffer binding may hold on ${limit.on} (maxStorageBufferBindingSize); serve this model with another backend (--backend wasm)`,
  { tensor: name, shape: [...shape], bytes, maxStorageBufferBindingSize: limit.bytes });
}
