/**
 * Turns WebGPU validation errors into failed reads. When Dawn rejects an operation (e.g. a step's tensor larger
 * than maxStorageBufferBindingSize cannot be bound), it reports an uncaptured error event and skips the work: the
 * results read back afterwards are zeros, not an exception. The guard records the first such error and makes the
 * next read of a tensor from the device (tfjs's `data()`, which every step uses for its logits) fail with
 * DEVICE_ERROR instead of returning those values.
 */
import { fail } from '../../errors.ts';

interface GuardedBackend {
  device: { addEventListener(type: 'uncapturederror', listener: (e: { error?: { message?: string } }) => void): void };
  read(dataId: object): Promise<unknown>;
}

let pending: string | null = null;
let installed = false;

/** Installs the guard on tfjs-backend-webgpu's backend; false when it lacks the device or read. */
export function installErrorGuard(backend: object): boolean {
  const b = backend as Partial<GuardedBackend>;
  if (installed) return true;
  if (typeof b.device?.addEventListener !== 'function' || typeof b.read !== 'function') return false;
  b.device.addEventListener('uncapturederror', (e) => {
    pending ??= (e.error?.message ?? 'unknown WebGPU error').split('\n')[0]!;
  });
  const read = b.read;
  b.read = async function (this: unknown, dataId: object) {
    const values = await read.call(this, dataId);
    throwDeviceError();
    return values;
  };
  installed = true;
  return true;
}

/** Throws DEVICE_ERROR when the device rejected an operation since the last read (reads outside tfjs call it). */
export function throwDeviceError(): void {
  if (pending === null) return;
  const message = pending;
  pending = null;
  const hint = /binding size/i.test(message)
    ? ': a tensor of this step is larger than the device can bind; lower --max-batch-size, --max-batch-tokens or --max-total-tokens'
    : '';
  throw fail('DEVICE_ERROR', `the WebGPU device rejected an operation, so this step's results were discarded (${message})${hint}`);
}
