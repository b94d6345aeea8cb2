/**
 * Pre-touched SharedArrayBuffers for adapters' host copies. The first write to fresh memory costs a page fault per
 * 4 KiB page, many times the cost of writing memory already touched (docs/architecture.md, "Adapter cache"), and a
 * cold load writes every byte of its host copy once. So each size recently asked for gets a few spare buffers,
 * allocated and touched by a helper thread (the faults cost that thread, not the main thread that serves
 * requests), and loads of that size take them. Adapters of one configuration (rank, target modules) share one size.
 * Touching a buffer takes about as long as a load, so a burst of loads needs several spares per size, not one.
 *
 * A SharedArrayBuffer's memory is freed only once every thread that held it has collected its handle. The helper
 * allocates little else, so it collects garbage rarely, and the handles of the buffers it handed out (long since
 * dropped by the server) kept their memory resident: the server's RSS grew with every load (issue 12). So each helper
 * is retired, its thread ended (which frees all its handles at once), after it has allocated `helperBytes`, and a
 * fresh one takes over: at most that many bytes are held by a helper's garbage.
 */
import { Worker } from 'node:worker_threads';

const MiB = 2 ** 20;

// The helper: allocates a SharedArrayBuffer of the asked size, writes every page, hands it back (shared, not copied).
// It runs at the lowest CPU priority (Linux: setpriority on a thread id changes just that thread), so the faults are
// taken when a core is idle, not in the place of the threads serving requests.
const TOUCHER = `
const { parentPort } = require('node:worker_threads');
try {
  const tid = Number(require('node:fs').readlinkSync('/proc/thread-self').split('/').pop());
  require('node:os').setPriority(tid, 19);
} catch {}
parentPort.on('message', (bytes) => {
  const buf = new SharedArrayBuffer(bytes);
  new Uint8Array(buf).fill(0);
  parentPort.postMessage(buf);
});
`;

export class SpareBuffers {
  /** Spares by size, most recently asked-for size last. */
  private readonly spares = new Map<number, SharedArrayBuffer[]>();
  /** Refills in flight, by size. */
  private readonly pending = new Map<number, number>();
  private helper: Helper | null = null;
  private broken = false;
  /** Helper threads started so far (for tests). */
  helpersStarted = 0;
  /** Retired helpers whose thread has not ended yet. */
  private retiring = 0;

  /**
   * @param depth spares kept per size; @param maxSizes sizes kept at once;
   * @param maxBytes no spares for a size above this; @param helperBytes bytes a helper allocates before it is retired.
   */
  constructor(private readonly depth = 3, private readonly maxSizes = 4, private readonly maxBytes = 64 * MiB, private readonly helperBytes = 16 * MiB) {}

  /** A zeroed buffer of exactly `bytes`: a spare of that size when there is one. */
  take(bytes: number): SharedArrayBuffer {
    if (bytes === 0 || bytes > this.maxBytes) return new SharedArrayBuffer(bytes);
    const list = this.spares.get(bytes) ?? [];
    const spare = list.pop();
    // This size is now the most recently used one.
    this.spares.delete(bytes);
    this.spares.set(bytes, list);
    this.evictSizes();
    this.refill(bytes);
    return spare ?? new SharedArrayBuffer(bytes);
  }

  /** Bytes held in spares (for tests). */
  get heldBytes(): number {
    let n = 0;
    for (const list of this.spares.values()) for (const b of list) n += b.byteLength;
    return n;
  }

  /** Resolves once no refill is in flight and every retired helper has ended (for tests). */
  async settled(): Promise<void> {
    while (this.pending.size > 0 || this.retiring > 0) await new Promise((r) => setTimeout(r, 1));
  }

  private refill(bytes: number): void {
    if (this.broken) return;
    const have = (this.spares.get(bytes)?.length ?? 0) + (this.pending.get(bytes) ?? 0);
    if (have >= this.depth) return;
    const helper = this.start();
    if (!helper) return;
    for (let i = have; i < this.depth; i++) helper.worker.postMessage(bytes);
    helper.asked += (this.depth - have) * bytes;
    helper.outstanding += this.depth - have;
    this.pending.set(bytes, (this.pending.get(bytes) ?? 0) + this.depth - have);
  }

  private evictSizes(): void {
    while (this.spares.size > this.maxSizes) this.spares.delete(this.spares.keys().next().value!);
  }

  /** The current helper; a new one once the current one has allocated `helperBytes` (the old one ends when it has answered). */
  private start(): Helper | null {
    if (this.helper && this.helper.asked < this.helperBytes) return this.helper;
    if (this.helper) {
      this.helper.retired = true;
      this.retiring++;
      if (this.helper.outstanding === 0) void this.helper.worker.terminate();
    }
    try {
      const h: Helper = { worker: new Worker(TOUCHER, { eval: true }), asked: 0, outstanding: 0, retired: false };
      this.helpersStarted++;
      h.worker.on('message', (buf: SharedArrayBuffer) => {
        h.outstanding--;
        if (h.retired && h.outstanding === 0) void h.worker.terminate();
        const n = buf.byteLength;
        const left = (this.pending.get(n) ?? 1) - 1;
        if (left > 0) this.pending.set(n, left);
        else this.pending.delete(n);
        const list = this.spares.get(n);
        if (list && list.length < this.depth) list.push(buf); // a size dropped meanwhile is not brought back
      });
      // Without the helper, loads just allocate fresh buffers (as they would anyway). A retired helper ending once it
      // has answered everything is not that; one ending before is.
      const stop = () => {
        this.broken = true;
        this.helper = null;
        this.pending.clear();
      };
      const ended = () => h.retired && h.outstanding === 0;
      h.worker.on('error', () => ended() || stop());
      h.worker.on('exit', () => {
        if (h.retired) this.retiring--;
        if (!ended()) stop();
      });
      h.worker.unref(); // the helper never keeps the process alive
      this.helper = h;
    } catch {
      this.broken = true;
      this.helper = null;
    }
    return this.helper;
  }
}

/** A helper thread: bytes asked of it so far, answers still to come, and whether it is to end once they have. */
interface Helper {
  readonly worker: Worker;
  asked: number;
  outstanding: number;
  retired: boolean;
}

/**
 * Recycled buffers for host copies that are only needed until the device has copied them: an adapter loaded for
 * the first time is not kept in the host tier (see AdapterManager), so its host copy goes into one of these and
 * comes back once uploaded. Written once, a buffer is then reused by later loads of its size without page faults.
 * At most `perSize` are kept per size, for the `maxSizes` sizes given back last; a new one is a spare when one is
 * ready (SpareBuffers).
 */
export class ScratchBuffers {
  /** Free buffers by size, the size given back last at the end. */
  private readonly free = new Map<number, SharedArrayBuffer[]>();

  constructor(private readonly spares: SpareBuffers, private readonly perSize = 4, private readonly maxSizes = 4) {}

  /** A buffer of exactly `bytes` for the caller alone until giveBack (its contents are stale: overwrite them). */
  borrow(bytes: number): SharedArrayBuffer {
    return this.free.get(bytes)?.pop() ?? this.spares.take(bytes);
  }

  /** Returns a borrowed buffer; the caller must not use it (or views of it) again. */
  giveBack(buf: SharedArrayBuffer): void {
    const n = buf.byteLength;
    const list = this.free.get(n) ?? [];
    this.free.delete(n);
    this.free.set(n, list);
    if (list.length < this.perSize) list.push(buf);
    while (this.free.size > this.maxSizes) this.free.delete(this.free.keys().next().value!);
  }

  /** Free buffers held (for tests). */
  get held(): number {
    let n = 0;
    for (const list of this.free.values()) n += list.length;
    return n;
  }
}

/** The process' spares for adapter host copies (src/lora/adapter-file.ts). */
export const hostBuffers = new SpareBuffers();
/** The process' recycled buffers for host copies that live only until uploaded (src/lora/manager.ts). */
export const scratchBuffers = new ScratchBuffers(hostBuffers);
