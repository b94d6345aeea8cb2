/**
 * A worker thread that owns one copy of the model and one TfExecutor (see parallel-executor.ts), answering the
 * requests of protocol.ts in arrival order. Adapters are uploaded to its executor by key (ExecAdapter.key).
 */
import { parentPort } from 'node:worker_threads';
import * as tf from '@tensorflow/tfjs-core';
import { initBackend } from '../backend/select.ts';
import { openCheckpoint } from '../model/checkpoint.ts';
import { assertModelFits } from '../sizing.ts';
import type { DecodeItem, PrefillItem, StepResult } from '../engine/executor.ts';
import { isServeError } from '../errors.ts';
import { profiler } from '../obs/profile.ts';
import { CausalLM } from '../model/model.ts';
import type { RequestOf, WorkerInfo, WorkerMessage, WorkerOp, WorkerProgress, WorkerReply, WorkerResults, WorkerStep } from './protocol.ts';
import { TfExecutor } from './tf-executor.ts';

let executor: TfExecutor | null = null;

function ready(): TfExecutor {
  if (!executor) throw new Error('worker: not initialised');
  return executor;
}

async function step(r: StepResult, items: readonly (PrefillItem | DecodeItem)[]): Promise<{ value: WorkerStep; transfer: ArrayBuffer[] }> {
  // readLogits cannot cross threads: the rows of fallback shortlists go with the answer.
  const unread = items.filter((i) => i.shortlist?.fallback && r.shortlists?.has(i.seq) && !r.logits.has(i.seq)).map((i) => i.seq);
  const rows = r.readLogits && unread.length > 0 ? await r.readLogits(unread) : new Map<number, Float32Array>();
  // Copy each sequence's rows out of the shared logits buffer so each can be transferred on its own.
  const logits: [number, Float32Array][] = [...r.logits, ...rows].map(([seq, l]) => [seq, l.slice()]);
  const value: WorkerStep = { logits, picked: [...r.picked ?? []], shortlists: [...r.shortlists ?? []], passes: r.passes };
  return { value, transfer: logits.map(([, l]) => l.buffer as ArrayBuffer) };
}

interface Answer<O extends WorkerOp> {
  readonly value: WorkerResults[O];
  readonly transfer?: ArrayBuffer[];
}

type Handlers = { readonly [O in WorkerOp]: (req: RequestOf<O>) => Answer<O> | Promise<Answer<O>> };

const done = { value: null };
let backendReady = false;

const handlers: Handlers = {
  async init({ init }) {
    profiler.enabled = init.profile;
    const backend = await initBackend(init.backend, { nativeMatmul: init.nativeMatmul });
    backendReady = true;
    const ckpt = openCheckpoint(init.modelDir);
    const { float32Bytes } = ckpt;
    ckpt.close();
    assertModelFits(backend.name, float32Bytes);
    const model = CausalLM.load(init.modelDir, { onTensor: (elements) => parentPort!.postMessage({ tensorRead: elements } satisfies WorkerProgress) });
    executor = new TfExecutor(model);
    executor.warmUp(backend.name === 'wasm' ? init.warmHeapBytes : 0);
    const value: WorkerInfo = {
      backend: backend.name, vocabSize: model.config.vocabSize, bytes: model.bytes, dtype: model.dtype,
      nativeMatmul: backend.nativeMatmul, ...(backend.nativeMatmulNote ? { nativeMatmulNote: backend.nativeMatmulNote } : {}),
    };
    return { value };
  },
  prefill({ items, lora }) {
    return profiler.step('prefill', 'executor', async () => await step(await ready().prefill(items, lora), items));
  },
  decode({ items, lora }) {
    return profiler.step('decode', 'executor', async () => await step(await ready().decode(items, lora), items));
  },
  release({ seq }) {
    ready().release(seq);
    return done;
  },
  fork({ seq, into }) {
    ready().fork(seq, into);
    return done;
  },
  async loadAdapter({ weights, key }) {
    await ready().loadAdapter(weights, key);
    return done;
  },
  offloadAdapter({ adapter }) {
    ready().offloadAdapter(adapter);
    return done;
  },
  memory() {
    return done;
  },
  async dispose() {
    await executor?.close();
    executor = null;
    return done;
  },
};

function handle<O extends WorkerOp>(req: RequestOf<O>): Answer<O> | Promise<Answer<O>> {
  return handlers[req.op](req);
}

/** The device memory after an operation; none before a backend is initialised (a failed init still gets its answer). */
function memory(): WorkerReply['memory'] {
  if (!backendReady) return { numTensors: 0, numBytes: 0 };
  const m = tf.memory();
  return { numTensors: m.numTensors, numBytes: m.numBytes };
}

// Requests are handled strictly one after another, in arrival order.
let queue = Promise.resolve();
parentPort!.on('message', (msg: WorkerMessage) => {
  queue = queue.then(async () => {
    let reply: WorkerReply;
    let transfer: ArrayBuffer[] = [];
    try {
      const answer = await handle(msg);
      transfer = answer.transfer ?? [];
      reply = { id: msg.id, ok: true, result: answer.value, memory: memory(), profile: profiler.enabled ? profiler.snapshot() : undefined };
    } catch (err) {
      const message = err instanceof Error ? err.message : String(err);
      reply = { id: msg.id, ok: false, error: { message, code: isServeError(err) ? err.code : undefined }, memory: memory() };
    }
    parentPort!.postMessage(reply, transfer);
  });
});
