/**
 * Where adapter files come from: a local folder (`<dir>/<id>/adapter_config.json` +
 * `adapter_model.safetensors`, ids `name` or `org/name`), optionally backed by a remote HTTP
 * source whose downloads are cached into that folder. Host bytes only; validation against the
 * base model is the caller's job (`validateAdapterFiles` / `loadAdapterWeights`) and happens
 * before `write`.
 *
 * Atomicity: `write` fills `<dir>/.tmp-<id>-<rand>/`, fsyncs the files and the folder, then
 * renames it into place. Linux cannot rename a folder over a non-empty one, so an existing
 * version is first renamed to `<dir>/.old-<id>-<rand>` and removed after the swap (put back if
 * the swap fails). Disk operations on one id are serialised inside the store, so its readers see
 * the old or the new version, never a half-written or mixed one (one process owns the folder). A crash can leave `.tmp-*` (deleted) or,
 * between the two renames, `.old-*` (renamed back when its id has no folder); both are handled
 * when the store is first used. Names starting with `.` are never listed as adapters. One store
 * instance owns a folder: two stores (or processes) on the same folder are not coordinated.
 *
 * Failures of the disk: a write or delete that fails for a full disk (ENOSPC, EDQUOT) is INSUFFICIENT_STORAGE, for
 * a read-only folder (EROFS, EACCES, EPERM) STORAGE_UNAVAILABLE; the previous version stays in place and the work
 * folder is removed. Writes and deletes never go through a symlink (an org or adapter folder that is a link is
 * refused with ADAPTER_PATH_NOT_ALLOWED), so nothing outside the folder is written, moved or removed.
 *
 * Revalidation: a remote download is cached with `<dir>/<id>/.source.json` (each file's ETag and Last-Modified and
 * the time it was last checked). With `revalidateAfterMs` > 0, a read of a cached copy last checked longer ago
 * first asks the source with conditional GETs (If-None-Match, If-Modified-Since): 304 keeps the copy, 200 replaces
 * it. A source that fails or no longer has the adapter leaves the cached copy in use (with a warning) until the
 * next check. `revalidate(id)` runs the same check on its own (the manager calls it for resident adapters).
 */

import { createHash, randomBytes } from 'node:crypto';
import { closeSync, constants, fstatSync, openSync, read, readSync } from 'node:fs';
import { lstat, mkdir, open, readdir, rename, rm, rmdir, stat } from 'node:fs/promises';
import { promisify } from 'node:util';
import path from 'node:path';
import { LRUCache } from 'lru-cache';
import { Agent, interceptors, request, type Dispatcher } from 'undici';
import { fail, isServeError, ServeError } from '../errors.ts';
import type { LinearModule } from '../model/types.ts';
import { assertNotPickle, loadAdapterWeights, type AdapterWeights } from './adapter-file.ts';
import { adapterDirFor, validateAdapterId } from './ids.ts';
import { singleFlight } from './single-flight.ts';

/** Where adapter files came from: the adapter folder, an upload, --adapter-source-url, or the Hugging Face Hub. */
export type AdapterFileSource = 'disk' | 'upload' | 'remote' | 'hub';

export interface AdapterFiles {
  readonly id: string;
  /** Parsed adapter_config.json (unvalidated). */
  readonly config: unknown;
  /** adapter_model.safetensors bytes (unvalidated). */
  readonly weights: Uint8Array;
  readonly source: AdapterFileSource;
  /**
   * Content hash (`adapterVersion`) of these config and weights. Computed on first read, so that a load can hash
   * while the device upload runs; files read with `readWith` are hashed before their buffer is lent again, so the
   * value is always that of the bytes read.
   */
  readonly version: string;
}

export interface AdapterStoreOptions {
  /** Local adapter folder (created on first write). */
  readonly dir: string;
  /**
   * Remote source, a URL template with `{id}` (e.g. `http://host/adapters/{id}/`); the file
   * names are resolved against it. Without `{id}`, `<id>/` is appended.
   */
  readonly remoteUrl?: string;
  /** Limit for adapter_model.safetensors, on disk and while streaming a download. */
  readonly maxAdapterBytes: number;
  /** Connect, response-headers and body-idle timeout of each remote request (default 30 s). */
  readonly fetchTimeoutMs?: number;
  /** Extra attempts after a network error, timeout, 5xx or 429 (default 2). */
  readonly retries?: number;
  /** Delay before the first retry, doubled for each further one (default 250 ms). */
  readonly retryDelayMs?: number;
  /** HTTP dispatcher for remote requests (tests: a MockAgent); default: an Agent owned by the store. */
  readonly dispatcher?: Dispatcher;
  /**
   * Test seam: runs after the temp folder is written and fsynced, right before it is renamed into
   * place. It holds the id's lock: it must not call this store's methods for the same id.
   */
  readonly beforeCommit?: (tmpDir: string) => void | Promise<void>;
  /** Milliseconds after which a cached remote download is checked against the source again; 0 (default): never. */
  readonly revalidateAfterMs?: number;
  /** Called when caching a remote download to disk fails (the read itself still succeeds). */
  readonly onWarning?: (message: string, err: unknown) => void;
  /**
   * Test seam: replaces the filesystem calls that write (`StoreWriteFs`), so a test can fail them as a full or
   * read-only disk would (tests run as root, where permissions do not stop a write).
   */
  readonly writeFs?: Partial<StoreWriteFs>;
}

/** The calls through which the store creates and moves things in its folder (clean-up with `rm` is not among them). */
export interface StoreWriteFs {
  /** mkdir, `recursive` as fs.mkdir's. */
  mkdir(dir: string, recursive: boolean): Promise<void>;
  /** Creates `file` (failing if it exists), writes `data` and fsyncs it. */
  writeFile(file: string, data: Uint8Array): Promise<void>;
  rename(from: string, to: string): Promise<void>;
}

export const CONFIG_FILE = 'adapter_config.json';
export const WEIGHTS_FILE = 'adapter_model.safetensors';
export const PICKLE_FILE = 'adapter_model.bin';
/** Beside a cached remote download: SourceMeta as JSON. */
export const SOURCE_FILE = '.source.json';
/** Limit for adapter_config.json, on disk and while downloading. */
export const MAX_CONFIG_BYTES = 1 << 20;
/** readWith keeps at most this many read buffers, each at most POOLED_MAX bytes. */
const POOL_SIZE = 4;
const POOLED_MAX = 32 << 20;

/** First 16 hex of sha256(JSON.stringify(config), NUL, weights): independent of config file formatting. */
export function adapterVersion(config: unknown, weights: Uint8Array): string {
  return createHash('sha256').update(JSON.stringify(config) ?? 'undefined').update('\0').update(weights).digest('hex').slice(0, 16);
}

/** AdapterFiles for bytes that arrived some other way (e.g. an upload body). */
export function makeAdapterFiles(id: string, config: unknown, weights: Uint8Array, source: AdapterFiles['source']): AdapterFiles {
  let version: string | undefined;
  return {
    id: validateAdapterId(id), config, weights, source,
    get version() {
      return (version ??= adapterVersion(config, weights));
    },
  };
}

/** `loadAdapterWeights` over AdapterFiles: throws the coded error of the first problem found. */
export function validateAdapterFiles(
  files: Pick<AdapterFiles, 'id' | 'config' | 'weights'>,
  base: { modules: readonly LinearModule[] },
  opts: { maxRank: number; alloc?: (bytes: number) => SharedArrayBuffer },
): AdapterWeights {
  return loadAdapterWeights({ id: files.id, config: files.config, weights: files.weights }, base, opts);
}

const errno = (err: unknown) => (err as NodeJS.ErrnoException | undefined)?.code;
const isMissing = (err: unknown) => errno(err) === 'ENOENT' || errno(err) === 'ENOTDIR';
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));
/** Ids in work-folder names: `/` (never part of a segment) becomes `~`. */
const encodeId = (id: string) => id.replace('/', '~');
const decodeId = (s: string) => s.replace('~', '/');
const WORK_NAME = /^\.(tmp|old|del)-(.+)-[0-9a-f]{12}$/;

const readAt = promisify(read);
/** Read-only, and non-blocking so that opening a FIFO put where a file should be cannot hang the event loop. */
const OPEN_FLAGS = constants.O_RDONLY | (constants.O_NONBLOCK ?? 0);

/** fstat of an open file, which must be a regular file (not a FIFO, device or folder). */
function regularSize(fd: number, id: string, file: string): number {
  const st = fstatSync(fd);
  if (!st.isFile()) throw fail('ADAPTER_INVALID_CONFIG', `adapter "${id}": ${file} is not a regular file`);
  return st.size;
}

/** adapter_config.json is at most MAX_CONFIG_BYTES, written or read. */
function checkConfigSize(id: string, bytes: number): void {
  if (bytes > MAX_CONFIG_BYTES) throw fail('ADAPTER_TOO_LARGE', `adapter "${id}": ${CONFIG_FILE} is ${bytes} bytes (limit ${MAX_CONFIG_BYTES})`);
}

/** adapter_config.json's bytes, or null when it does not exist (synchronous: see readAdapterFolder). */
function readConfigSync(id: string, dir: string): Uint8Array | null {
  let fd: number;
  try {
    fd = openSync(path.join(dir, CONFIG_FILE), OPEN_FLAGS);
  } catch (err) {
    if (isMissing(err)) return null;
    throw err;
  }
  try {
    const size = regularSize(fd, id, CONFIG_FILE);
    checkConfigSize(id, size);
    const bytes = new Uint8Array(size);
    let got = 0;
    for (let n = -1; got < size && n !== 0; got += n) n = readSync(fd, bytes, got, size - got, got);
    return bytes.subarray(0, got);
  } finally {
    closeSync(fd);
  }
}

async function exists(p: string): Promise<boolean> {
  try {
    await stat(p);
    return true;
  } catch (err) {
    if (isMissing(err)) return false;
    throw err;
  }
}

async function isDir(p: string): Promise<boolean> {
  try {
    return (await stat(p)).isDirectory();
  } catch (err) {
    if (isMissing(err)) return false;
    throw err;
  }
}

const NODE_WRITE_FS: StoreWriteFs = {
  mkdir: async (dir, recursive) => {
    await mkdir(dir, { recursive });
  },
  writeFile: writeFileSynced,
  rename,
};

async function writeFileSynced(file: string, data: Uint8Array): Promise<void> {
  const fh = await open(file, 'wx');
  try {
    await fh.writeFile(data);
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/** Replaces `dir/name` atomically (a temp file beside it, fsynced, renamed over it). */
async function writeFileAtomic(dir: string, name: string, data: Uint8Array): Promise<void> {
  const tmp = path.join(dir, `.tmp-${name}-${randomBytes(6).toString('hex')}`);
  try {
    await writeFileSynced(tmp, data);
    await rename(tmp, path.join(dir, name));
  } catch (err) {
    await rm(tmp, { force: true });
    throw err;
  }
}

/** fsync a folder so renames and new entries in it are durable (best effort where unsupported). */
async function syncDir(dir: string): Promise<void> {
  let fh;
  try {
    fh = await open(dir, 'r');
    await fh.sync();
  } catch {
    // Some platforms/filesystems cannot fsync a directory; the data files themselves were synced.
  } finally {
    await fh?.close();
  }
}

function checkWeightsSize(id: string, bytes: number, limit: number): void {
  if (bytes > limit) throw fail('ADAPTER_TOO_LARGE', `adapter "${id}": ${WEIGHTS_FILE} is ${bytes} bytes (limit ${limit})`);
}

/**
 * A failed write to the adapter folder as a coded error: ENOSPC/EDQUOT → INSUFFICIENT_STORAGE (507),
 * EROFS/EACCES/EPERM → STORAGE_UNAVAILABLE (503); anything else unchanged. The message names the adapter, never
 * a path (the cause, for the log, has it).
 */
function storageError(err: unknown, what: string): unknown {
  switch (errno(err)) {
    case 'ENOSPC':
    case 'EDQUOT':
      return new ServeError('INSUFFICIENT_STORAGE', `${what} failed: the adapter folder's disk is full or over quota; nothing stored was changed`, undefined, { cause: err });
    case 'EROFS':
    case 'EACCES':
    case 'EPERM':
      return new ServeError('STORAGE_UNAVAILABLE', `${what} failed: the adapter folder cannot be written (read-only or permission denied); nothing stored was changed`, undefined, { cause: err });
    default:
      return err;
  }
}

/**
 * Refuses (ADAPTER_PATH_NOT_ALLOWED) to write or delete through a symlink: the org folder and the adapter folder
 * under `root`, where they exist, must be real folders. Reading through links stays allowed (an operator's own).
 */
async function assertRealFolders(root: string, id: string): Promise<void> {
  let p = root;
  for (const segment of id.split('/')) {
    p = path.join(p, segment);
    let st;
    try {
      st = await lstat(p);
    } catch (err) {
      if (isMissing(err)) return;
      throw err;
    }
    const what = st.isSymbolicLink() ? 'a symbolic link' : st.isDirectory() ? null : 'not a folder';
    if (what !== null) {
      throw fail('ADAPTER_PATH_NOT_ALLOWED', `adapter "${id}": its place in the adapter folder is ${what}; uploads and deletes never write through links or over files`);
    }
  }
}

function pickleError(id: string): ServeError {
  return fail('ADAPTER_PICKLE', `adapter "${id}" only has ${PICKLE_FILE} (a pickle, never loaded); convert it to ${WEIGHTS_FILE}`);
}

/**
 * Both files of the adapter folder `dir`, or null when it has no adapter_config.json; `id` names it in errors.
 * The small calls (open, fstat, the config's read, close) are synchronous: from the page cache each costs less
 * than the round trip to libuv's thread pool that an asynchronous call adds (docs/architecture.md, "Adapter
 * cache"). The weights (megabytes) are read asynchronously, so a slow disk does not stall the event loop.
 */
export async function readAdapterFolder(
  id: string, dir: string, maxAdapterBytes: number, alloc: (size: number) => Uint8Array, source: AdapterFileSource = 'disk',
): Promise<AdapterFiles | null> {
  const configBytes = readConfigSync(id, dir);
  if (configBytes === null) return null;
  let fd: number;
  try {
    fd = openSync(path.join(dir, WEIGHTS_FILE), OPEN_FLAGS);
  } catch (err) {
    if (!isMissing(err)) throw err;
    if (await exists(path.join(dir, PICKLE_FILE))) throw pickleError(id);
    throw fail('ADAPTER_NOT_FOUND', `adapter "${id}" has ${CONFIG_FILE} but no ${WEIGHTS_FILE}`);
  }
  try {
    const size = regularSize(fd, id, WEIGHTS_FILE);
    checkWeightsSize(id, size, maxAdapterBytes);
    const weights = alloc(size);
    let got = 0;
    for (let n = -1; got < size && n !== 0; got += n) n = (await readAt(fd, weights, got, size - got, got)).bytesRead;
    // A file that shrank mid-read is returned short: validation then reports it as truncated.
    return makeAdapterFiles(id, parseConfig(id, configBytes), weights.subarray(0, got), source);
  } finally {
    closeSync(fd);
  }
}

/** An HTTP response's validators, sent back as If-None-Match / If-Modified-Since. */
interface Validators {
  readonly etag?: string;
  readonly lastModified?: string;
}

/** What SOURCE_FILE records of a remote download. */
interface SourceMeta {
  /** Date.now() of the download or of the last check against the source. */
  readonly checkedAt: number;
  readonly config: Validators;
  readonly weights: Validators;
}

function sourceMetaBytes(meta: SourceMeta): Uint8Array {
  return new TextEncoder().encode(`${JSON.stringify(meta)}\n`);
}

/** SOURCE_FILE of an adapter folder; null when there is none (not a remote download) or it is unreadable. */
async function readSourceMeta(dir: string): Promise<SourceMeta | null> {
  try {
    const fh = await open(path.join(dir, SOURCE_FILE), OPEN_FLAGS);
    try {
      const meta = JSON.parse(await fh.readFile('utf8')) as SourceMeta;
      return typeof meta.checkedAt === 'number' ? meta : null;
    } finally {
      await fh.close();
    }
  } catch {
    return null;
  }
}

/** A fetched file and the validators its response carried. */
interface Fetched {
  readonly bytes: Uint8Array;
  readonly validators: Validators;
}

/** A failure worth another attempt (network, timeout, 5xx, 429), carrying the error to report if none is left. */
class Transient extends Error {
  constructor(readonly final: ServeError) {
    super(final.message);
  }
}

export class AdapterStore {
  private readonly dir: string;
  private readonly remoteUrl?: string;
  private readonly maxAdapterBytes: number;
  private readonly timeoutMs: number;
  private readonly retries: number;
  private readonly retryDelayMs: number;
  private readonly dispatcher?: Dispatcher;
  private ownAgent?: Dispatcher;
  private readonly beforeCommit?: AdapterStoreOptions['beforeCommit'];
  private readonly onWarning?: AdapterStoreOptions['onWarning'];
  private readonly revalidateAfterMs: number;
  private readonly fs: StoreWriteFs;
  /** Revalidations in flight, by id. */
  private readonly checking = new Map<string, Promise<boolean>>();
  /** When each recently checked id is due again (spares reading SOURCE_FILE on every use of a hot adapter). */
  private readonly due = new LRUCache<string, number>({ max: 16384 });
  /** The last disk operation per id (see `exclusive`). */
  private readonly pending = new Map<string, Promise<unknown>>();
  private recovered?: Promise<void>;
  /**
   * Read buffers lent by readWith: a load needs the file bytes only until they are validated and hashed, and a
   * recycled buffer spares faulting in and zeroing a fresh multi-megabyte one (docs/architecture.md, "Adapter cache").
   */
  private readonly pool: Uint8Array[] = [];

  constructor(opts: AdapterStoreOptions) {
    this.dir = path.resolve(opts.dir);
    this.remoteUrl = opts.remoteUrl;
    this.maxAdapterBytes = opts.maxAdapterBytes;
    this.timeoutMs = opts.fetchTimeoutMs ?? 30_000;
    this.retries = opts.retries ?? 2;
    this.retryDelayMs = opts.retryDelayMs ?? 250;
    this.dispatcher = opts.dispatcher;
    this.beforeCommit = opts.beforeCommit;
    this.onWarning = opts.onWarning;
    this.revalidateAfterMs = opts.revalidateAfterMs ?? 0;
    this.fs = { ...NODE_WRITE_FS, ...opts.writeFs };
  }

  /** Ids of `<dir>/<name>/` and `<dir>/<org>/<name>/` folders holding an adapter_config.json, sorted. */
  async list(): Promise<string[]> {
    await this.recover();
    const ids: string[] = [];
    const children = async (d: string) => {
      try {
        return (await readdir(d)).filter((n) => !n.startsWith('.'));
      } catch (err) {
        if (isMissing(err)) return [];
        throw err;
      }
    };
    for (const name of await children(this.dir)) {
      const folder = path.join(this.dir, name);
      if (!(await isDir(folder))) continue;
      if (await exists(path.join(folder, CONFIG_FILE))) ids.push(name);
      for (const sub of await children(folder)) {
        if ((await isDir(path.join(folder, sub))) && (await exists(path.join(folder, sub, CONFIG_FILE)))) ids.push(`${name}/${sub}`);
      }
    }
    return ids.filter((id) => { try { validateAdapterId(id); return true; } catch { return false; } }).sort();
  }

  /** Whether the adapter is on local disk (the remote source is not asked). */
  async has(id: string): Promise<boolean> {
    const dir = adapterDirFor(this.dir, id);
    return this.exclusive(id, () => exists(path.join(dir, CONFIG_FILE)));
  }

  /** The adapter's files: local disk first, then the remote source (cached to disk afterwards). */
  read(id: string): Promise<AdapterFiles> {
    return this.readFrom(id, (size) => new Uint8Array(size));
  }

  /**
   * `use(read(id))` without a fresh buffer for the weights: a disk read borrows one of the store's buffers,
   * so `files.weights` is only valid until `use` returns, its promise settles, or it calls `release` (which
   * gives the buffer back early); copy out anything kept. `files.version` stays valid: it is computed, if it
   * was not yet, before the buffer goes back.
   */
  async readWith<T>(id: string, use: (files: AdapterFiles, release: () => void) => T | Promise<T>): Promise<T> {
    let lent: Uint8Array | undefined;
    let files: AdapterFiles | undefined;
    const borrow = (size: number) => {
      const i = this.pool.findIndex((b) => b.byteLength >= size);
      lent = i >= 0 ? this.pool.splice(i, 1)[0]! : new Uint8Array(size);
      return lent.subarray(0, size);
    };
    const release = () => {
      if (!lent) return;
      void files?.version; // hashed while the bytes are still these files'
      if (lent.byteLength <= POOLED_MAX) {
        this.pool.push(lent);
        if (this.pool.length > POOL_SIZE) this.pool.sort((a, b) => b.byteLength - a.byteLength).pop();
      }
      lent = undefined;
    };
    try {
      files = await this.readFrom(id, borrow);
      return await use(files, release);
    } finally {
      release();
    }
  }

  private async readFrom(id: string, alloc: (size: number) => Uint8Array): Promise<AdapterFiles> {
    const dir = adapterDirFor(this.dir, id);
    await this.revalidate(id);
    const local = await this.exclusive(id, () => readAdapterFolder(id, dir, this.maxAdapterBytes, alloc));
    if (local !== null) return local;

    if (this.remoteUrl === undefined) {
      if (await exists(path.join(dir, PICKLE_FILE))) throw pickleError(id);
      throw fail('ADAPTER_NOT_FOUND', `adapter "${id}" not found`);
    }
    const remote = await this.fetchRemote(id);
    const files = makeAdapterFiles(id, parseConfig(id, remote.configBytes), remote.weights, 'remote');
    try {
      assertNotPickle(files.weights);
    } catch (err) {
      throw isServeError(err) ? fail(err.code, `adapter "${id}": ${err.message}`) : err;
    }
    try {
      await this.commit(id, remote.configBytes, remote.weights, { checkedAt: Date.now(), config: remote.config, weights: remote.weightsValidators });
    } catch (err) {
      this.onWarning?.(`adapter "${id}": caching the remote download to disk failed`, err);
    }
    return files;
  }

  /**
   * Atomically installs (or replaces) an adapter: nothing of the new version is visible until one
   * rename, and a failure leaves the previous version intact and no work folder behind.
   */
  async write(id: string, files: { config: unknown; weights: Uint8Array }): Promise<void> {
    validateAdapterId(id);
    const text = JSON.stringify(files.config, null, 2);
    if (text === undefined) throw fail('ADAPTER_INVALID_CONFIG', `adapter "${id}": config is not JSON-serialisable`);
    const configBytes = new TextEncoder().encode(`${text}\n`);
    checkConfigSize(id, configBytes.byteLength);
    checkWeightsSize(id, files.weights.byteLength, this.maxAdapterBytes);
    await this.commit(id, configBytes, files.weights);
  }

  /** Removes the adapter from disk; false when it was not there (an org folder is not an adapter). */
  async delete(id: string): Promise<boolean> {
    const dir = adapterDirFor(this.dir, id);
    return this.exclusive(id, async () => {
      await assertRealFolders(this.dir, id);
      const files = await Promise.all([CONFIG_FILE, WEIGHTS_FILE, PICKLE_FILE].map((f) => exists(path.join(dir, f))));
      if (!files.some(Boolean)) return false;
      // Rename first so the adapter disappears at once, then remove at leisure.
      const doomed = path.join(this.dir, `.del-${encodeId(id)}-${randomBytes(6).toString('hex')}`);
      try {
        await this.fs.rename(dir, doomed);
      } catch (err) {
        throw storageError(err, `deleting adapter "${id}"`);
      }
      await rm(doomed, { recursive: true, force: true });
      if (id.includes('/')) await rmdir(path.dirname(dir)).catch(() => undefined); // empty org folder
      await syncDir(this.dir);
      return true;
    });
  }

  /** Closes the HTTP agent the store created for itself (not a dispatcher passed in). */
  async close(): Promise<void> {
    const agent = this.ownAgent;
    this.ownAgent = undefined;
    await agent?.close();
  }

  // --- disk ------------------------------------------------------------------------------

  /**
   * Runs `fn` after every earlier disk operation on `id` has finished (and after crash recovery),
   * so a read never sees the config of one version and the weights of another. Remote downloads
   * run outside this lock; only their disk commit takes it.
   */
  private exclusive<T>(id: string, fn: () => Promise<T>): Promise<T> {
    const prev = this.pending.get(id) ?? Promise.resolve();
    const run = prev.catch(() => undefined).then(() => this.recover()).then(fn);
    const tail = run.catch(() => undefined);
    this.pending.set(id, tail);
    void tail.then(() => { if (this.pending.get(id) === tail) this.pending.delete(id); });
    return run;
  }

  /**
   * `source`: the validators of a remote download, written beside the files (SOURCE_FILE). A full or read-only
   * disk fails with INSUFFICIENT_STORAGE or STORAGE_UNAVAILABLE, the previous version in place and no work folder left.
   */
  private commit(id: string, configBytes: Uint8Array, weights: Uint8Array, source?: SourceMeta): Promise<void> {
    const target = adapterDirFor(this.dir, id);
    return this.exclusive(id, async () => {
      await assertRealFolders(this.dir, id);
      const tmp = path.join(this.dir, `.tmp-${encodeId(id)}-${randomBytes(6).toString('hex')}`);
      try {
        await this.fs.mkdir(this.dir, true);
        await this.fs.mkdir(tmp, false);
      } catch (err) {
        throw storageError(err, `storing adapter "${id}"`);
      }
      try {
        await this.fs.writeFile(path.join(tmp, CONFIG_FILE), configBytes);
        await this.fs.writeFile(path.join(tmp, WEIGHTS_FILE), weights);
        if (source) await this.fs.writeFile(path.join(tmp, SOURCE_FILE), sourceMetaBytes(source));
        await syncDir(tmp);
        await this.beforeCommit?.(tmp);
        await this.fs.mkdir(path.dirname(target), true);
        await this.swapIn(id, tmp, target);
      } catch (err) {
        // Best effort: a .tmp-* folder left behind is removed when the store is next opened (recover).
        await rm(tmp, { recursive: true, force: true }).catch(() => undefined);
        throw storageError(err, `storing adapter "${id}"`);
      }
    });
  }

  /** rename(tmp → target); an existing target is moved aside first and put back if that fails. */
  private async swapIn(id: string, tmp: string, target: string): Promise<void> {
    try {
      await this.fs.rename(tmp, target);
    } catch (err) {
      if (errno(err) !== 'ENOTEMPTY' && errno(err) !== 'EEXIST') throw err;
      const old = path.join(this.dir, `.old-${encodeId(id)}-${randomBytes(6).toString('hex')}`);
      await this.fs.rename(target, old);
      try {
        await this.fs.rename(tmp, target);
      } catch (err2) {
        await rename(old, target);
        throw err2;
      }
      await rm(old, { recursive: true, force: true });
    }
    await syncDir(path.dirname(target));
    if (path.dirname(target) !== this.dir) await syncDir(this.dir);
  }

  /**
   * Once per store, before its first disk operation: removes `.tmp-*` (unfinished writes) and
   * `.del-*` (unfinished deletes), and renames an `.old-*` folder back when its id has no folder
   * (a crash between the two renames of a swap), else removes it.
   */
  private recover(): Promise<void> {
    this.recovered ??= (async () => {
      let names: string[];
      try {
        names = await readdir(this.dir);
      } catch (err) {
        if (isMissing(err)) return;
        throw err;
      }
      for (const name of names) {
        const m = WORK_NAME.exec(name);
        if (!m) continue;
        const work = path.join(this.dir, name);
        let target: string | null = null;
        try {
          target = m[1] === 'old' ? adapterDirFor(this.dir, decodeId(m[2]!)) : null;
        } catch {
          target = null;
        }
        if (target !== null && !(await exists(target))) {
          await mkdir(path.dirname(target), { recursive: true });
          await rename(work, target);
        } else {
          await rm(work, { recursive: true, force: true });
        }
      }
    })();
    return this.recovered;
  }

  // --- remote ----------------------------------------------------------------------------

  private agent(): Dispatcher {
    if (this.dispatcher) return this.dispatcher;
    this.ownAgent ??= new Agent({ connect: { timeout: this.timeoutMs } }).compose(interceptors.redirect({ maxRedirections: 5 }));
    return this.ownAgent;
  }

  private remoteBase(id: string): URL {
    const encoded = id.split('/').map(encodeURIComponent).join('/');
    let base = this.remoteUrl!.includes('{id}') ? this.remoteUrl!.replaceAll('{id}', encoded) : `${this.remoteUrl!.replace(/\/?$/, '/')}${encoded}`;
    if (!base.endsWith('/')) base += '/';
    try {
      return new URL(base);
    } catch {
      // The URL is the server's configuration (it may carry credentials): the message does not show it.
      throw fail('ADAPTER_FETCH_FAILED', `adapter "${id}": --adapter-source-url does not give a valid URL for this id`);
    }
  }

  private async fetchRemote(id: string): Promise<{ configBytes: Uint8Array; weights: Uint8Array; config: Validators; weightsValidators: Validators }> {
    const base = this.remoteBase(id);
    const config = (await this.fetchWithRetries(id, new URL(CONFIG_FILE, base), MAX_CONFIG_BYTES))!;
    try {
      const weights = (await this.fetchWithRetries(id, new URL(WEIGHTS_FILE, base), this.maxAdapterBytes))!;
      return { configBytes: config.bytes, weights: weights.bytes, config: config.validators, weightsValidators: weights.validators };
    } catch (err) {
      if (isServeError(err) && err.code === 'ADAPTER_NOT_FOUND' && (await this.remoteExists(new URL(PICKLE_FILE, base)))) {
        throw pickleError(id);
      }
      throw err;
    }
  }

  /** null: 304, the copy described by `validators` is current (only when validators are given). */
  private async fetchWithRetries(id: string, url: URL, limit: number, validators?: Validators): Promise<Fetched | null> {
    for (let attempt = 0; ; attempt++) {
      try {
        return await this.fetchOnce(id, url, limit, validators);
      } catch (err) {
        if (!(err instanceof Transient)) throw err;
        if (attempt >= this.retries) throw err.final;
        await sleep(this.retryDelayMs * 2 ** attempt);
      }
    }
  }

  /** Rewrites SOURCE_FILE of a cached download (not through a symlinked folder, as every write). */
  private writeSourceMeta(id: string, meta: SourceMeta): Promise<void> {
    return this.exclusive(id, async () => {
      await assertRealFolders(this.dir, id);
      await writeFileAtomic(adapterDirFor(this.dir, id), SOURCE_FILE, sourceMetaBytes(meta));
    });
  }

  /** Single-flight: concurrent checks of one id share one (see the header). True when a new version was cached. */
  revalidate(id: string): Promise<boolean> {
    if (this.revalidateAfterMs <= 0 || this.remoteUrl === undefined || Date.now() < (this.due.get(id) ?? 0)) return Promise.resolve(false);
    return singleFlight(this.checking, id, () => this.check(id));
  }

  private async check(id: string): Promise<boolean> {
    const dir = adapterDirFor(this.dir, id);
    const meta = await this.exclusive(id, () => readSourceMeta(dir));
    this.due.set(id, (meta?.checkedAt ?? Date.now()) + this.revalidateAfterMs);
    if (meta === null || Date.now() - meta.checkedAt < this.revalidateAfterMs) return false;
    this.due.set(id, Date.now() + this.revalidateAfterMs);
    const base = this.remoteBase(id);
    try {
      const config = await this.fetchWithRetries(id, new URL(CONFIG_FILE, base), MAX_CONFIG_BYTES, meta.config);
      const weights = await this.fetchWithRetries(id, new URL(WEIGHTS_FILE, base), this.maxAdapterBytes, meta.weights);
      const now = Date.now();
      if (config === null && weights === null) {
        await this.writeSourceMeta(id, { ...meta, checkedAt: now });
        return false;
      }
      // What a 304 confirmed, and what a 200 is compared with (a source that sends no validators answers 200).
      const cached = await this.exclusive(id, async () => ({
        config: readConfigSync(id, dir),
        weights: (await readAdapterFolder(id, dir, this.maxAdapterBytes, (n) => new Uint8Array(n)))?.weights ?? null,
      }));
      if (cached.config === null || cached.weights === null) return false; // deleted meanwhile
      const configBytes = config?.bytes ?? cached.config;
      const weightBytes = weights?.bytes ?? cached.weights;
      const validators = { config: config?.validators ?? meta.config, weights: weights?.validators ?? meta.weights };
      if (Buffer.compare(configBytes, cached.config) === 0 && Buffer.compare(weightBytes, cached.weights) === 0) {
        await this.writeSourceMeta(id, { checkedAt: now, ...validators });
        return false;
      }
      parseConfig(id, configBytes);
      assertNotPickle(weightBytes);
      await this.commit(id, configBytes, weightBytes, { checkedAt: now, ...validators });
      return true;
    } catch (err) {
      this.onWarning?.(`adapter "${id}": revalidating against the remote source failed; the cached copy stays in use`, err);
      await this.writeSourceMeta(id, { ...meta, checkedAt: Date.now() }).catch(() => undefined);
      return false;
    }
  }

  /** One GET; the size limit is enforced from content-length and again while streaming. */
  private async fetchOnce(id: string, url: URL, limit: number, validators?: Validators): Promise<Fetched | null> {
    const file = path.posix.basename(url.pathname);
    const what = `adapter "${id}": fetching ${file}`;
    const networkError = (err: unknown) => {
      const code = (err as { code?: unknown } | undefined)?.code;
      if (code === 'UND_ERR_CONNECT_TIMEOUT' || code === 'UND_ERR_HEADERS_TIMEOUT' || code === 'UND_ERR_BODY_TIMEOUT') {
        return new Transient(new ServeError('ADAPTER_FETCH_TIMEOUT', `${what} timed out after ${this.timeoutMs} ms`, undefined, { cause: err }));
      }
      return new Transient(new ServeError('ADAPTER_FETCH_FAILED', `${what} failed (${typeof code === 'string' ? code : 'network error'})`, undefined, { cause: err }));
    };

    let res: Dispatcher.ResponseData;
    try {
      res = await request(url, {
        method: 'GET',
        dispatcher: this.agent(),
        headersTimeout: this.timeoutMs,
        bodyTimeout: this.timeoutMs,
        headers: {
          ...(validators?.etag ? { 'if-none-match': validators.etag } : {}),
          ...(validators?.lastModified ? { 'if-modified-since': validators.lastModified } : {}),
        },
      });
    } catch (err) {
      throw networkError(err);
    }

    const status = res.statusCode;
    if (status === 304 && validators) {
      await res.body.dump().catch(() => undefined);
      return null;
    }
    if (status !== 200) {
      await res.body.dump().catch(() => undefined);
      if (status === 404) throw fail('ADAPTER_NOT_FOUND', `adapter "${id}" not found at the remote source (${file}: HTTP 404)`);
      const error = fail('ADAPTER_FETCH_FAILED', `${what} failed with HTTP ${status}`, { status });
      throw status >= 500 || status === 429 ? new Transient(error) : error;
    }
    const tooLarge = (bytes: number | string) => fail('ADAPTER_TOO_LARGE', `adapter "${id}": ${file} is ${bytes} bytes (limit ${limit})`);
    const declared = Number(res.headers['content-length']);
    if (Number.isFinite(declared) && declared > limit) {
      res.body.on('error', () => undefined); // destroying without a reader emits "aborted"
      res.body.destroy();
      throw tooLarge(declared);
    }
    const chunks: Buffer[] = [];
    let received = 0;
    try {
      for await (const chunk of res.body as AsyncIterable<Buffer>) {
        received += chunk.byteLength;
        if (received > limit) throw tooLarge(`more than ${limit}`); // leaving the loop destroys the body
        chunks.push(chunk);
      }
    } catch (err) {
      if (isServeError(err)) throw err;
      throw networkError(err);
    }
    const header = (name: string) => {
      const v = res.headers[name];
      return typeof v === 'string' ? v : undefined;
    };
    return { bytes: Buffer.concat(chunks, received), validators: { etag: header('etag'), lastModified: header('last-modified') } };
  }

  /** HEAD probe (one attempt); any failure counts as "not there". */
  private async remoteExists(url: URL): Promise<boolean> {
    try {
      const res = await request(url, { method: 'HEAD', dispatcher: this.agent(), headersTimeout: this.timeoutMs, bodyTimeout: this.timeoutMs });
      await res.body.dump();
      return res.statusCode === 200;
    } catch {
      return false;
    }
  }
}

function parseConfig(id: string, bytes: Uint8Array): unknown {
  try {
    return JSON.parse(new TextDecoder().decode(bytes));
  } catch {
    throw fail('ADAPTER_INVALID_CONFIG', `adapter "${id}": ${CONFIG_FILE} is not valid JSON`);
  }
}
