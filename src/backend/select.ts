/**
 * TensorFlow.js backend selection. The native packages (@tensorflow/tfjs-node-gpu, @tensorflow/tfjs-node)
 * download libtensorflow at install time and are therefore optional: they are imported only when present.
 * `auto` tries tensorflow-gpu (when a CUDA device is usable), then webgpu (when Dawn finds a hardware adapter: a
 * software one such as lavapipe is used only when webgpu is asked for by name), then tensorflow, then wasm, then cpu.
 * webgpu runs in the main thread only: one GPU device per process, so not with executor worker threads.
 * On wasm, matrix products run through the native AVX2/FMA addon when it is built (src/backend/wasm/native-matmul.ts).
 */
import { isMainThread } from 'node:worker_threads';
import * as tf from '@tensorflow/tfjs-core';
import { fail } from '../errors.ts';
import { activeAdapter, initWebGPU, type WebGPUAdapter } from './webgpu/init.ts';
import { nativeMatmulUnavailable } from './wasm/addon/addon.ts';
import { installNativeMatmul } from './wasm/native-matmul.ts';

export const BACKENDS = ['auto', 'tensorflow-gpu', 'webgpu', 'tensorflow', 'wasm', 'cpu'] as const;
export type BackendName = (typeof BACKENDS)[number];

export interface BackendInfo {
  /** What was asked for. */
  readonly requested: BackendName;
  /** What runs: tensorflow-gpu | webgpu | tensorflow | wasm | cpu. */
  readonly name: Exclude<BackendName, 'auto'>;
  /** tf.getBackend() after selection. */
  readonly tfName: string;
  /** Why auto skipped the backends before it. */
  readonly skipped: readonly string[];
  /** Matrix products run in the native addon (wasm backend only). */
  readonly nativeMatmul: boolean;
  /** Why the native matmul is not used, when it was asked for on wasm and is not. */
  readonly nativeMatmulNote?: string;
  /** The WebGPU adapter and its limits (webgpu backend only). */
  readonly adapter?: WebGPUAdapter;
}

export interface BackendOptions {
  /** Use the native matmul addon on the wasm backend when it is available (default true). */
  readonly nativeMatmul?: boolean;
}

let selected: BackendInfo | null = null;

async function tryImport(pkg: string): Promise<unknown> {
  // A variable specifier keeps bundlers and tsc from resolving packages that are not installed.
  return import(pkg);
}

/** The native package registers the 'tensorflow' backend; the GPU build only helps when CUDA is usable. */
async function initNative(gpu: boolean): Promise<void> {
  const pkg = gpu ? '@tensorflow/tfjs-node-gpu' : '@tensorflow/tfjs-node';
  if (gpu && !(await gpuUsable())) {
    throw fail('BACKEND_UNAVAILABLE', 'no CUDA GPU is visible (no /dev/nvidiaN device, or CUDA_VISIBLE_DEVICES hides them); ' +
      'the GPU backend needs the NVIDIA driver, CUDA 11.x and cuDNN 8 (see Dockerfile)');
  }
  try {
    await tryImport(pkg);
  } catch (err) {
    throw fail('BACKEND_UNAVAILABLE', `${pkg} is not installed or failed to load its native library ` +
      `(${(err as Error).message.split('\n')[0]}); install it (npm install ${pkg}) or choose --backend wasm`);
  }
  if (!(await tf.setBackend('tensorflow'))) throw fail('BACKEND_UNAVAILABLE', `${pkg} did not register the tensorflow backend`);
  await tf.ready();
}

/**
 * TensorFlow's GPU build falls back to the CPU, with only a log line, when the driver or CUDA libraries are
 * missing. We require the NVIDIA device nodes to exist and CUDA_VISIBLE_DEVICES not to hide every GPU.
 */
async function gpuUsable(): Promise<boolean> {
  const { existsSync, readdirSync } = await import('node:fs');
  const visible = process.env.CUDA_VISIBLE_DEVICES;
  // Containers keep the host's numbering: a container given GPU 3 only has /dev/nvidia3.
  const gpus = existsSync('/dev') ? readdirSync('/dev').filter((f) => /^nvidia\d+$/.test(f)) : [];
  return existsSync('/dev/nvidiactl') && gpus.length > 0 && visible !== '' && visible !== '-1';
}

async function initWasm(): Promise<void> {
  await import('@tensorflow/tfjs-backend-wasm');
  if (!(await tf.setBackend('wasm'))) throw fail('BACKEND_UNAVAILABLE', 'the wasm backend failed to initialise');
  await tf.ready();
}

async function initCpu(): Promise<void> {
  await import('@tensorflow/tfjs-backend-cpu');
  if (!(await tf.setBackend('cpu'))) throw fail('BACKEND_UNAVAILABLE', 'the cpu backend failed to initialise');
  await tf.ready();
}

/** `byName`: webgpu was asked for explicitly, so a software adapter will do. */
async function initWebgpuBackend(byName: boolean): Promise<void> {
  if (!isMainThread) {
    throw fail('BACKEND_UNAVAILABLE', 'the webgpu backend runs in the main thread only (one GPU device per process): use --workers 1');
  }
  await initWebGPU({ allowSoftware: byName });
}

const INIT: Record<Exclude<BackendName, 'auto'>, (byName: boolean) => Promise<void>> = {
  'tensorflow-gpu': () => initNative(true),
  webgpu: initWebgpuBackend,
  tensorflow: () => initNative(false),
  wasm: initWasm,
  cpu: initCpu,
};

/** Selects (once per process) and initialises the backend. */
export async function initBackend(requested: BackendName = 'auto', opts: BackendOptions = {}): Promise<BackendInfo> {
  if (selected) {
    if (requested === selected.requested || requested === selected.name) return selected;
    throw fail('BACKEND_UNAVAILABLE', `backend already initialised as ${selected.name}; cannot switch to ${requested}`);
  }
  if (!BACKENDS.includes(requested)) {
    throw fail('BACKEND_UNAVAILABLE', `unknown backend "${String(requested)}" (one of ${BACKENDS.join(', ')})`);
  }
  const skipped: string[] = [];
  const order: Exclude<BackendName, 'auto'>[] = requested === 'auto'
    ? ['tensorflow-gpu', 'webgpu', 'tensorflow', 'wasm', 'cpu'] : [requested];
  for (const name of order) {
    try {
      await INIT[name](requested === name);
      const wantNative = name === 'wasm' && opts.nativeMatmul !== false;
      const nativeMatmul = wantNative && installNativeMatmul();
      selected = Object.freeze({
        requested, name, tfName: tf.getBackend(), skipped, nativeMatmul,
        ...(wantNative && !nativeMatmul ? { nativeMatmulNote: nativeMatmulUnavailable() } : {}),
        ...(name === 'webgpu' ? { adapter: activeAdapter()! } : {}),
      });
      return selected;
    } catch (err) {
      if (requested !== 'auto') throw err;
      skipped.push(`${name}: ${(err as Error).message}`);
    }
  }
  throw fail('BACKEND_UNAVAILABLE', `no TensorFlow.js backend could be initialised: ${skipped.join('; ')}`);
}
