/**
 * Counts what the webgpu backend asks of the device: compute dispatches (one per GPU kernel run), command-buffer
 * submits, host→device uploads and device→host readbacks, and the bytes read back. tfjs-backend-webgpu keeps no totals of these, so the
 * backend's own methods are wrapped (once, when the backend starts). Each dispatch costs CPU time in tfjs and Dawn
 * whatever the GPU, so dispatches per decode step bound the step's time from below.
 */

export const WEBGPU_OPS = ['dispatch', 'submit', 'upload', 'readback'] as const;
export type WebGPUOp = (typeof WEBGPU_OPS)[number];
/** How a decode step ran on webgpu: replayed from a recording, recorded (through tfjs), or through tfjs unrecorded. */
export const DECODE_PATHS = ['replayed', 'recorded', 'tfjs'] as const;
export type DecodePath = (typeof DECODE_PATHS)[number];

export type WebGPUCounts = Record<WebGPUOp, number> & {
  /** Bytes of the device buffers read back (the readbacks' sizes). */
  readbackBytes: number;
  /** Decode steps by how they ran (src/backend/webgpu/recorded-step.ts). */
  decodeSteps: Record<DecodePath, number>;
};

/** The methods of tfjs-backend-webgpu's WebGPUBackend (4.22) that are counted. */
interface CountedBackend {
  recordAndSubmit(...args: unknown[]): unknown;
  submitQueue(...args: unknown[]): unknown;
  uploadToGPU(dataId: object): unknown;
  getBufferData(buffer: { size: number }, ...rest: unknown[]): unknown;
  tensorMap: { get(dataId: object): { resource?: unknown; values?: unknown } | undefined };
}

let counts: WebGPUCounts | null = null;

/** Wraps the backend's methods so that webgpuCounts() counts; false when the backend lacks one of them. */
export function installCounters(backend: object): boolean {
  const b = backend as Partial<CountedBackend>;
  if (counts) return true;
  if (typeof b.recordAndSubmit !== 'function' || typeof b.submitQueue !== 'function' || typeof b.uploadToGPU !== 'function' ||
    typeof b.getBufferData !== 'function' || typeof b.tensorMap?.get !== 'function') return false;
  const c: WebGPUCounts = { dispatch: 0, submit: 0, upload: 0, readback: 0, readbackBytes: 0, decodeSteps: { replayed: 0, recorded: 0, tfjs: 0 } };
  const wrap = <K extends 'recordAndSubmit' | 'submitQueue'>(name: K, op: WebGPUOp) => {
    const original = b[name]!;
    b[name] = function (this: unknown, ...args: unknown[]) {
      c[op]++;
      return original.apply(this, args);
    } as CountedBackend[K];
  };
  wrap('recordAndSubmit', 'dispatch');
  wrap('submitQueue', 'submit');
  const read = b.getBufferData;
  b.getBufferData = function (this: unknown, buffer: { size: number }, ...rest: unknown[]) {
    c.readback++;
    c.readbackBytes += buffer.size;
    return read.call(this, buffer, ...rest);
  };
  const upload = b.uploadToGPU;
  const map = b.tensorMap;
  b.uploadToGPU = function (this: unknown, dataId: object) {
    const d = map.get(dataId);
    if (d && d.resource == null && d.values != null) c.upload++; // host values not on the device yet
    return upload.call(this, dataId);
  };
  counts = c;
  return true;
}

/**
 * Counts a recorded step's replay (src/backend/webgpu/recorded-step.ts), which submits outside tfjs: its dispatches,
 * one submit, `uploads` host inputs written and one readback of `bytes`.
 */
export function countReplay(dispatches: number, uploads: number, bytes: number): void {
  if (!counts) return;
  counts.dispatch += dispatches;
  counts.submit++;
  counts.upload += uploads;
  counts.readback++;
  counts.readbackBytes += bytes;
}

/** Counts a decode step on webgpu by how it ran. */
export function countDecodeStep(path: DecodePath): void {
  if (counts) counts.decodeSteps[path]++;
}

/** Totals since the backend started, or null when the webgpu backend is not running (or was not counted). */
export function webgpuCounts(): Readonly<WebGPUCounts> | null {
  return counts ? { ...counts, decodeSteps: { ...counts.decodeSteps } } : null;
}
