/**
 * The native addon (src/backend/wasm/addon/matmul.cc, built by `npm ci` with node-gyp): loaded once per thread, or null when it
 * is not built or the CPU lacks AVX2/FMA. No TensorFlow.js here: src/backend/wasm/native-matmul.ts plugs its matmul into the wasm
 * backend, src/lora/adapter-file.ts uses its layout loop.
 */
import { createRequire } from 'node:module';

export interface Addon {
  readonly supported: boolean;
  /** packedB: B is in pack's panel layout (never transposed; N a multiple of 16). */
  matmul(heap: Uint8Array, aOffset: number, bOffset: number, cOffset: number, batch: number, M: number, K: number, N: number,
    aBatchStride: number, bBatchStride: number, transposeB: boolean, packedB?: boolean): void;
  /** B [K, N] row-major at srcOffset → 16-column panels (each K·16 floats, contiguous) at dstOffset; N a multiple of 16. */
  pack(heap: Uint8Array, srcOffset: number, dstOffset: number, K: number, N: number): void;
  /** toDeviceLayout (src/lora/adapter-file.ts) in C++: same loops, same result; whether A and B are all finite. */
  layout(A: Float32Array, B: Float32Array, r: number, inF: number, outF: number, s: number, At: Float32Array, Bt: Float32Array): boolean;
}

/** Where node-gyp puts the addon (src/backend/wasm/addon/build is ignored by git). */
export const ADDON_PATH = new URL('./build/Release/matmul.node', import.meta.url);

let addon: Addon | null | undefined;
let loadError = '';

/** The addon, or null (with `nativeMatmulUnavailable()` saying why). */
export function nativeAddon(): Addon | null {
  if (addon === undefined) {
    try {
      addon = createRequire(import.meta.url)(ADDON_PATH.pathname) as Addon;
      if (!addon.supported) {
        loadError = 'this CPU lacks AVX2/FMA';
        addon = null;
      }
    } catch (err) {
      loadError = `the addon is not built (${(err as Error).message.split('\n')[0]}); run npm ci (needs python3, make and g++)`;
      addon = null;
    }
  }
  return addon;
}

export function nativeMatmulUnavailable(): string {
  nativeAddon();
  return loadError;
}

