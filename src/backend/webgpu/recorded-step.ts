/**
 * Recorded decode steps: the WebGPU analogue of the CUDA graphs vLLM captures per decode batch. A decode step run
 * through TensorFlow.js costs about 0.1 ms of CPU per dispatch in tfjs and Dawn (shader keys, uniform packing, bind
 * groups), whatever the GPU. `recordStep` runs one step through tfjs as usual and keeps what each of its dispatches
 * was: the pipeline, the buffers bound, the uniform bytes and the workgroup counts. `Recording.replay` then runs the
 * same step again from that list: it writes the step's few host inputs (token ids, positions, the KV state, adapter
 * slots), encodes the recorded dispatches into one command buffer with bind groups made once, and reads the output
 * back: no tfjs op, no shader key, no uniform packing per dispatch.
 *
 * What the step's buffers are, found while recording:
 * - persistent: a tensor still alive after the step holds it (weights, LoRA banks, merged weights, the KV caches the
 *   step appends to in place): the replay binds the same buffer, after checking that the tensor still holds it;
 * - intermediate: a new tensor's, written by one of the step's dispatches before any dispatch reads it: the recording
 *   gets a buffer of its own (from tfjs's pool), since tfjs hands the step's buffers to other tensors afterwards;
 * - input: host values uploaded during the step that were named with `stepInput` (the only host data of its own a
 *   recorded step may read; host values uploaded at first use by a tensor that outlives the step are persistent): a
 *   buffer of its own, written at each replay with that step's values of the name.
 * A step that reads or writes in place anything else (a buffer made before it that no live tensor holds, as a KV cache
 * that the step grows or trims; host values not named), whose
 * dispatches read a buffer tfjs reused within the step, or that submits or reads back midway, is not recorded (the
 * reason is returned), and runs through tfjs as it did. Every value that changes from step to step must therefore
 * reach the shaders through a named input, never a uniform: the KV column count is read from the KV state buffer
 * (attention.ts, kv-append.ts).
 *
 * tfjs-backend-webgpu 4.22's internals used (wrapped once, like counters.ts): `recordAndSubmit` (each dispatch),
 * `makeUniforms` (the uniform bytes, caught from its queue.writeBuffer), `uploadToGPU` (host uploads), `submitQueue`,
 * `tensorMap`, `bufferManager`, `device`, `queue`, and its queued command encoder, which a replay submits first so that
 * the replay runs after what tfjs has queued.
 */
import * as tf from '@tensorflow/tfjs-core';
import { countReplay } from './counters.ts';
import { throwDeviceError } from './guard.ts';

/** Host values a step uploads (token ids, positions, KV state, slots). */
export type StepData = Int32Array | Float32Array;

interface GpuBuffer {
  readonly size: number;
  readonly usage: number;
  mapAsync(mode: number): Promise<void>;
  getMappedRange(): ArrayBuffer;
  unmap(): void;
}
interface GpuPipeline {
  getBindGroupLayout(index: number): unknown;
}
interface GpuPass {
  setPipeline(p: GpuPipeline): void;
  setBindGroup(index: number, group: unknown): void;
  dispatchWorkgroups(x: number, y: number, z: number): void;
  end(): void;
}
interface GpuEncoder {
  beginComputePass(): GpuPass;
  copyBufferToBuffer(src: GpuBuffer, srcOffset: number, dst: GpuBuffer, dstOffset: number, size: number): void;
  finish(): unknown;
}
interface GpuQueue {
  writeBuffer(buffer: GpuBuffer, offset: number, data: ArrayBufferView | ArrayBuffer, dataOffset?: number, size?: number): void;
  submit(buffers: unknown[]): void;
}
interface Program {
  pipeline: GpuPipeline | Promise<GpuPipeline>;
  dispatch: [number, number, number];
}

/** The parts of tfjs-backend-webgpu's WebGPUBackend (4.22) a recording uses. */
interface Backend {
  device: { createBindGroup(desc: { layout: unknown; entries: { binding: number; resource: { buffer: GpuBuffer } }[] }): unknown; createCommandEncoder(): GpuEncoder };
  queue: GpuQueue;
  /** tfjs's DataStorage: `get` of a dataId it does not hold asks the engine to move the data, so `has` comes first. */
  tensorMap: { has(dataId: object): boolean; get(dataId: object): { resource?: unknown; values?: unknown } };
  bufferManager: { acquireBuffer(size: number, usage: number): GpuBuffer; releaseBuffer(buffer: GpuBuffer): void };
  commandEncoder: unknown;
  recordAndSubmit(program: Program, output: tf.TensorInfo, inputs: tf.TensorInfo[], uniforms?: unknown): void;
  makeUniforms(uniforms: unknown): { buffer: GpuBuffer };
  uploadToGPU(dataId: object): void;
  submitQueue(): void;
  endComputePassEncoder(): void;
  getBufferData(buffer: GpuBuffer): Promise<ArrayBuffer>;
}

/** What one dispatch of the recorded step bound: its output, inputs and uniforms. */
interface Dispatch {
  readonly pipeline: GpuPipeline;
  readonly workgroups: [number, number, number];
  readonly output: GpuBuffer;
  readonly outputId: object;
  readonly inputs: readonly { buffer: GpuBuffer; dataId: object }[];
  readonly uniforms: Uint8Array | null;
}

/** The recording in progress: what the wrapped backend methods report. */
class Recorder {
  readonly dispatches: Dispatch[] = [];
  /** Buffers uploaded during the step, with their input name (or the count of unnamed values). */
  readonly uploads = new Map<GpuBuffer, string | { unnamed: number }>();
  /** Buffers given to new tensors during the step (their first write allocates them). */
  readonly fresh = new Set<GpuBuffer>();
  /** The dataId each buffer was seen with (a buffer seen with two is a reuse within the step). */
  readonly owners = new Map<GpuBuffer, object>();
  failure: string | null = null;

  fail(why: string): void {
    this.failure ??= why;
  }

  see(buffer: GpuBuffer, dataId: object): void {
    const owner = this.owners.get(buffer);
    if (owner === undefined) this.owners.set(buffer, dataId);
    else if (owner !== dataId) this.fail('a buffer was reused by another tensor within the step');
  }
}

let backend: Backend | null = null;
let active: Recorder | null = null;
/** Host values named by stepInput (before or during a recording: a step's LoRA slots are made before its forward). */
const names = new WeakMap<StepData, string>();
/** The uniform bytes the last makeUniforms call wrote. */
let lastUniforms: Uint8Array | null = null;

/** Wraps the backend's methods so that steps can be recorded (once, when the backend starts); false if it lacks one. */
export function installRecorder(b: object): boolean {
  const be = b as Partial<Backend>;
  if (backend === b) return true;
  for (const name of ['recordAndSubmit', 'makeUniforms', 'uploadToGPU', 'submitQueue', 'endComputePassEncoder'] as const) {
    if (typeof be[name] !== 'function') return false;
  }
  if (!be.tensorMap || !be.bufferManager || !be.device || !be.queue) return false;
  const full = be as Backend;
  const record = full.recordAndSubmit;
  full.recordAndSubmit = function (this: Backend, program, output, inputs, uniforms) {
    lastUniforms = null;
    record.call(this, program, output, inputs, uniforms);
    if (active) noteDispatch(active, this, program, output, inputs);
  };
  const makeUniforms = full.makeUniforms;
  full.makeUniforms = function (this: Backend, uniforms) {
    if (!active) return makeUniforms.call(this, uniforms);
    const queue = this.queue;
    this.queue = {
      writeBuffer(buffer, offset, data, dataOffset = 0, size) {
        const bytes = data instanceof ArrayBuffer ? new Uint8Array(data) : new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
        lastUniforms = bytes.slice(dataOffset, size === undefined ? undefined : dataOffset + size);
        queue.writeBuffer(buffer, offset, data, dataOffset, size);
      },
      submit: (buffers) => queue.submit(buffers),
    };
    try {
      return makeUniforms.call(this, uniforms);
    } finally {
      this.queue = queue;
    }
  };
  const upload = full.uploadToGPU;
  full.uploadToGPU = function (this: Backend, dataId) {
    const before = active ? this.tensorMap.get(dataId) : undefined;
    const values = before && before.resource == null ? before.values : null;
    const fresh = before !== undefined && before.resource == null && before.values == null;
    upload.call(this, dataId);
    if (active && fresh) active.fresh.add(this.tensorMap.get(dataId).resource as GpuBuffer);
    if (!active || values == null) return;
    const buffer = this.tensorMap.get(dataId).resource as GpuBuffer;
    // Unnamed host values are the step's only if no tensor holds them after it (a weight uploaded at first use is not).
    active.uploads.set(buffer, names.get(values as StepData) ?? { unnamed: (values as ArrayLike<number>).length });
    active.see(buffer, dataId);
  };
  const submit = full.submitQueue;
  full.submitQueue = function (this: Backend) {
    active?.fail('the step submitted its commands before its end (a readback or a buffer copy)');
    submit.call(this);
  };
  backend = full;
  return true;
}

function noteDispatch(r: Recorder, b: Backend, program: Program, output: tf.TensorInfo, inputs: tf.TensorInfo[]): void {
  if (program.pipeline instanceof Promise) return r.fail('a pipeline was still compiling');
  const buffer = (info: tf.TensorInfo): GpuBuffer => b.tensorMap.get(info.dataId).resource as GpuBuffer;
  const ins = inputs.map((t) => ({ buffer: buffer(t), dataId: t.dataId }));
  for (const i of ins) r.see(i.buffer, i.dataId);
  const out = buffer(output);
  r.see(out, output.dataId);
  r.dispatches.push({ pipeline: program.pipeline, workgroups: [...program.dispatch], output: out, outputId: output.dataId, inputs: ins, uniforms: lastUniforms });
}

/**
 * Names host values a step uploads: a recorded step's replay writes that step's values of the same name (same
 * length) into the buffer they were uploaded to. Returns `data`.
 */
export function stepInput<T extends StepData>(name: string, data: T): T {
  names.set(data, name);
  return data;
}

/** Whether steps can be recorded on the active backend (webgpu, with the recorder installed). */
export function canRecord(): boolean {
  return backend !== null && tf.getBackend() === 'webgpu';
}

/** A step being recorded: its output, and `finish` once the output was read back and the step's tensors disposed. */
export interface PendingRecording<T extends tf.Tensor> {
  readonly output: T;
  /** The recording, or why the step could not be recorded. */
  finish(): Recording | string;
}

/**
 * Runs `build`, which makes a step's output tensor through tfjs (no readback, no submit), recording its dispatches.
 * The caller reads the output back, disposes every tensor of the step (the output included), then calls `finish`.
 */
export function recordStep<T extends tf.Tensor>(build: () => T): PendingRecording<T> {
  const b = backend;
  if (!b || active) throw new Error('recordStep: the recorder is not installed, or a step is already being recorded');
  const r = new Recorder();
  active = r;
  let output: T;
  try {
    output = build();
  } finally {
    active = null;
  }
  const outId = output.dataId;
  const outBuffer = b.tensorMap.has(outId) ? b.tensorMap.get(outId).resource as GpuBuffer | undefined : undefined;
  if (!outBuffer) r.fail('the output is not on the device');
  else if (output.dtype !== 'float32') r.fail('the output is not float32');
  return { output, finish: () => (r.failure ?? makeRecording(b, r, outBuffer!)) };
}

/** Classifies the step's buffers (see the file's comment) and makes the recording, or says why it cannot. */
function makeRecording(b: Backend, r: Recorder, outBuffer: GpuBuffer): Recording | string {
  const own = new Map<GpuBuffer, GpuBuffer>(); // the step's buffer → the recording's
  const persistent = new Map<object, GpuBuffer>(); // dataId → the buffer it must still hold
  const inputs = new Map<string, GpuBuffer[]>();
  const written = new Set<GpuBuffer>();
  const owned: GpuBuffer[] = [];
  const alive = (dataId: object, buffer: GpuBuffer): boolean => holds(b, dataId, buffer);
  const mine = (buffer: GpuBuffer): GpuBuffer => {
    let m = own.get(buffer);
    if (!m) {
      m = b.bufferManager.acquireBuffer(buffer.size, buffer.usage);
      owned.push(m);
      own.set(buffer, m);
    }
    return m;
  };
  /** The buffer a replay binds for one the step bound, or why there is none. */
  const bind = (buffer: GpuBuffer, dataId: object, writing: boolean): GpuBuffer | string => {
    const upload = r.uploads.get(buffer);
    if (alive(dataId, buffer)) {
      if (typeof upload === 'string') return `the step input "${upload}" is kept by a tensor after the step (a replay would not write it)`;
      persistent.set(dataId, buffer);
      return buffer;
    }
    if (upload !== undefined) {
      if (typeof upload !== 'string') return `the step uploaded host values that are not a named step input (${upload.unnamed} values)`;
      if (writing) return 'the step writes over one of its inputs';
      const m = mine(buffer);
      const list = inputs.get(upload) ?? [];
      if (!list.includes(m)) inputs.set(upload, [...list, m]);
      return m;
    }
    // Made before the step by a tensor now gone: read, or written in place (a trim or growth of the KV cache).
    if (writing ? !r.fresh.has(buffer) : !written.has(buffer)) {
      return 'the step reads or writes in place a buffer made before it that no live tensor holds (a KV cache grown or trimmed)';
    }
    return mine(buffer);
  };
  const steps: { pipeline: GpuPipeline; workgroups: [number, number, number]; group: unknown }[] = [];
  const uniformBuffers: GpuBuffer[] = [];
  /** Returns the recording's buffers to the pool and says why there is no recording. */
  const refuse = (why: string): string => {
    owned.forEach((x) => b.bufferManager.releaseBuffer(x));
    uniformBuffers.forEach((u) => b.bufferManager.releaseBuffer(u));
    return why;
  };
  try {
    for (const d of r.dispatches) {
      const ins = d.inputs.map((i) => bind(i.buffer, i.dataId, false));
      const out = bind(d.output, d.outputId, true);
      written.add(d.output);
      const refusal = [out, ...ins].find((x): x is string => typeof x === 'string');
      if (refusal !== undefined) return refuse(refusal);
      const entries = [out as GpuBuffer, ...(ins as GpuBuffer[])].map((buffer, i) => ({ binding: i, resource: { buffer } }));
      if (d.uniforms) {
        const u = b.bufferManager.acquireBuffer(d.uniforms.byteLength, gpuFlags().GPUBufferUsage.UNIFORM | gpuFlags().GPUBufferUsage.COPY_DST);
        b.queue.writeBuffer(u, 0, d.uniforms);
        uniformBuffers.push(u);
        entries.push({ binding: entries.length, resource: { buffer: u } });
      }
      steps.push({ pipeline: d.pipeline, workgroups: d.workgroups, group: b.device.createBindGroup({ layout: d.pipeline.getBindGroupLayout(0), entries }) });
    }
  } catch (err) {
    return refuse(`the recording could not be made: ${(err as Error).message}`);
  }
  const output = own.get(outBuffer);
  if (!output) return refuse('the output was not written by the step');
  return new Recording(b, steps, inputs, persistent, output, [...owned, ...uniformBuffers]);
}

/** Submits the commands tfjs has queued, if any. */
function flush(b: Backend): void {
  if (!b.commandEncoder) return;
  b.endComputePassEncoder();
  b.submitQueue();
}

/** Whether the tensor data `dataId` exists and holds `buffer`. */
function holds(b: Backend, dataId: object, buffer: GpuBuffer): boolean {
  return b.tensorMap.has(dataId) && b.tensorMap.get(dataId).resource === buffer;
}

/** WebGPU's flag constants, which init.ts installs as globals (tfjs-backend-webgpu reads them there). */
function gpuFlags(): { GPUBufferUsage: { UNIFORM: number; MAP_READ: number; COPY_DST: number }; GPUMapMode: { READ: number } } {
  return globalThis as unknown as ReturnType<typeof gpuFlags>;
}

/** A recorded decode step (recordStep): replayed with new inputs while every tensor it binds still holds its buffer. */
export class Recording {
  private disposed = false;
  /** Replays so far: readOutput reads the last one's output only. */
  private replays = 0;

  constructor(private readonly b: Backend,
    private readonly steps: readonly { pipeline: GpuPipeline; workgroups: [number, number, number]; group: unknown }[],
    private readonly inputs: ReadonlyMap<string, readonly GpuBuffer[]>,
    private readonly persistent: ReadonlyMap<object, GpuBuffer>,
    private readonly output: GpuBuffer,
    private readonly owned: readonly GpuBuffer[]) {}

  /** Dispatches per replay. */
  get dispatches(): number {
    return this.steps.length;
  }

  /** The host inputs a replay writes, by name. */
  get inputNames(): string[] {
    return [...this.inputs.keys()];
  }

  /**
   * Whether every tensor the step binds (weights, banks, KV caches) still holds the buffer it held. It first submits
   * what tfjs has queued: tfjs frees the tensors disposed since (a KV cache replaced by a trim) only then.
   */
  valid(): boolean {
    if (this.disposed) return false;
    flush(this.b);
    for (const [dataId, buffer] of this.persistent) if (!holds(this.b, dataId, buffer)) return false;
    return true;
  }

  /**
   * Runs the step again with `inputs` (every name the step uploaded, each as long as it was): one command buffer, then
   * the output's first `bytes` read back (all of it by default; readOutput reads more of it later). The caller checks
   * valid() first. Returns the data and the replay's number, for readOutput.
   */
  async replay(inputs: ReadonlyMap<string, StepData>, bytes = this.output.size): Promise<{ data: Float32Array; replay: number }> {
    if (this.disposed) throw new Error('replay: the recording was disposed');
    if (bytes <= 0 || bytes > this.output.size || bytes % 4 !== 0) throw new Error(`replay: cannot read ${bytes} bytes of a ${this.output.size}-byte output`);
    const b = this.b;
    for (const [name, buffers] of this.inputs) {
      const data = inputs.get(name);
      for (const buffer of buffers) {
        if (!data || data.byteLength !== buffer.size) throw new Error(`replay: input "${name}" is missing or not ${buffer.size} bytes`);
      }
    }
    flush(b); // what tfjs queued before (a KV cache's growth, a join) runs first
    for (const [name, buffers] of this.inputs) for (const buffer of buffers) b.queue.writeBuffer(buffer, 0, inputs.get(name)!);
    const encoder = b.device.createCommandEncoder();
    const pass = encoder.beginComputePass();
    for (const s of this.steps) {
      pass.setPipeline(s.pipeline);
      pass.setBindGroup(0, s.group);
      pass.dispatchWorkgroups(...s.workgroups);
    }
    pass.end();
    const replay = ++this.replays;
    countReplay(this.steps.length, this.inputs.size, bytes);
    return { data: await this.read(encoder, [[0, bytes]]), replay };
  }

  /**
   * Reads byte ranges [offset, offset + bytes) of the output, concatenated, as the replay numbered `replay` left it
   * (one readback); rejects when the recording has been replayed again or disposed since.
   */
  async readOutput(ranges: readonly (readonly [number, number])[], replay: number): Promise<Float32Array> {
    if (this.disposed || replay !== this.replays) throw new Error('readOutput: the step\'s output was overwritten or freed since');
    for (const [offset, bytes] of ranges) {
      if (offset < 0 || bytes <= 0 || offset + bytes > this.output.size || offset % 4 !== 0 || bytes % 4 !== 0) {
        throw new Error(`readOutput: bytes ${offset}..${offset + bytes} are not within the ${this.output.size}-byte output`);
      }
    }
    const total = ranges.reduce((n, [, bytes]) => n + bytes, 0);
    if (total === 0) return new Float32Array(0);
    countReplay(0, 0, total);
    return this.read(this.b.device.createCommandEncoder(), ranges);
  }

  /** Copies output byte ranges, concatenated, to a staging buffer after what `encoder` holds, submits, and maps it. */
  private async read(encoder: GpuEncoder, ranges: readonly (readonly [number, number])[]): Promise<Float32Array> {
    const b = this.b;
    const g = gpuFlags();
    const bytes = ranges.reduce((n, [, size]) => n + size, 0);
    const staging = b.bufferManager.acquireBuffer(bytes, g.GPUBufferUsage.MAP_READ | g.GPUBufferUsage.COPY_DST);
    try {
      let at = 0;
      for (const [offset, size] of ranges) {
        encoder.copyBufferToBuffer(this.output, offset, staging, at, size);
        at += size;
      }
      b.queue.submit([encoder.finish()]);
      await staging.mapAsync(g.GPUMapMode.READ);
      const out = new Float32Array(staging.getMappedRange().slice(0));
      staging.unmap();
      throwDeviceError();
      return out;
    } finally {
      b.bufferManager.releaseBuffer(staging);
    }
  }

  /** Returns the recording's own buffers to tfjs's pool. */
  dispose(): void {
    if (this.disposed) return;
    this.disposed = true;
    for (const buffer of this.owned) this.b.bufferManager.releaseBuffer(buffer);
  }
}
