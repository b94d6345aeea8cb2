/** Shared test set-up: the wasm backend, fixture checkpoints in a temp dir, reference getters. */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { initBackend } from '../../src/backend/select.ts';
import { writeCheckpoint, type CheckpointOptions } from '../../src/demo/index.ts';
import { openCheckpoint } from '../../src/model/checkpoint.ts';
import type { GetTensor } from '../reference/forward.ts';

/**
 * The wasm backend (TEST_BACKEND=cpu or webgpu for those; test/webgpu.test.ts runs the reference tests on webgpu),
 * with the native matmul unless TEST_NATIVE_MATMUL=0.
 */
export async function setupBackend(): Promise<void> {
  await initBackend(testBackend(), { nativeMatmul: process.env.TEST_NATIVE_MATMUL !== '0' });
}

export function testBackend(): 'wasm' | 'cpu' | 'webgpu' {
  return (process.env.TEST_BACKEND as 'wasm' | 'cpu' | 'webgpu' | undefined) ?? 'wasm';
}

/** Whether weights are packed for the native matmul (wasm only). */
export function nativeMatmulOn(): boolean {
  return testBackend() === 'wasm' && process.env.TEST_NATIVE_MATMUL !== '0';
}

export function tempDir(prefix = 'lora-serve-test-'): { dir: string; cleanup: () => void } {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  return { dir, cleanup: () => rmSync(dir, { recursive: true, force: true }) };
}

/** Writes a fixture checkpoint and returns its raw config plus a reference tensor getter. */
export async function fixtureCheckpoint(dir: string, opts: CheckpointOptions): Promise<{ dir: string; config: Record<string, unknown>; get: GetTensor }> {
  await writeCheckpoint(dir, opts);
  const ckpt = openCheckpoint(dir);
  const cache = new Map<string, { shape: readonly number[]; data: Float32Array }>();
  const get = Object.assign((name: string) => {
    let t = cache.get(name);
    if (!t) cache.set(name, (t = ckpt.read(name)));
    return t;
  }, { has: (name: string) => ckpt.names.has(name) });
  return { dir, config: ckpt.rawConfig, get };
}

/** max |a-b| / max(1, |b|) over all entries. */
export function maxRelErr(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let m = 0;
  for (let i = 0; i < b.length; i++) m = Math.max(m, Math.abs(a[i]! - b[i]!) / Math.max(1, Math.abs(b[i]!)));
  return m;
}

export function argmax(x: ArrayLike<number>): number {
  let best = 0;
  for (let i = 1; i < x.length; i++) if (x[i]! > x[best]!) best = i;
  return best;
}
