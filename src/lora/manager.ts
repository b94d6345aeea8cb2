/**
 * The adapter manager: where adapters live and how they get to the device.
 *
 * Tiers: device (uploaded A/B tensors, bounded by count and/or bytes), host (parsed, validated weights in an
 * lru-cache bounded by bytes), then disk / remote (AdapterStore). Evicting from the device disposes the
 * adapter's tensors and whatever the executor derived from it.
 * - An adapter used by a sequence is pinned (refcount) and never evicted; `load?pin=true` pins it too.
 *   When every device slot is pinned, a new load waits until a pin is released: no crash, no overcommit.
 * - Concurrent requests for an adapter that is not resident trigger exactly one load (single-flight).
 * - Replacing or deleting an adapter retires the resident version: sequences that hold it finish on it,
 *   it is disposed when the last one releases it, and new requests get the new version (or 404).
 * - An adapter from the Hugging Face Hub (src/lora/hub-adapters.ts) is cached under its hubKey
 *   (`hub:org/name@<commit>`): a new commit is a new adapter, and the old one ages out as any unused adapter.
 * - A merged adapter (`acquireMerged`, src/lora/merged-adapter.ts) is computed from its sources' files once and
 *   then lives in the device and host tiers under its merge id like any adapter (a slot, pins, eviction); it is
 *   dropped with every cached copy of a source that is replaced, deleted or changed at its remote source. Its
 *   sources may come from the Hub: the merge id is computed over their hubKeys, so a new commit is a new merge.
 */
import { LRUCache } from 'lru-cache';
import type { AdapterExecutor, ResidentAdapter } from '../engine/executor.ts';
import { fail, isServeError, ServeError } from '../errors.ts';
import type { LinearModule } from '../model/types.ts';
import { loadAdapterWeights, readPeftPairs, syntheticAdapter, type AdapterWeights } from './adapter-file.ts';
import { validateAdapterId } from './ids.ts';
import { scratchBuffers } from './host-buffers.ts';
import { isMergeId, mergeId, mergeSources, mergeVersion, type MergeSource } from './merged-adapter.ts';
import { singleFlight } from './single-flight.ts';
import { parseHubKey, type HubAdapters } from './hub-adapters.ts';
import { makeAdapterFiles, validateAdapterFiles, type AdapterFileSource, type AdapterFiles, type AdapterStore } from './store.ts';
import type { AdapterSource, AdapterSourceKind } from '../engine/types.ts';
import type { AdapterAdmin, AdapterCacheStats, AdapterInfo, AdapterLease, AdapterMetrics, AdapterProvider, MergeSpec } from './types.ts';

export interface AdapterManagerOptions {
  readonly maxRank: number;
  /** Device tier: at most this many adapters (0 = no count limit)... */
  readonly maxDeviceAdapters: number;
  /** ...and at most this many bytes (0 = no byte limit). */
  readonly maxDeviceBytes: number;
  /** Host tier bytes (parsed weights kept after leaving the device). */
  readonly maxHostBytes: number;
  /** Adapters from the Hugging Face Hub; without it a request for one fails with ADAPTER_NOT_FOUND. */
  readonly hub?: HubAdapters;
  /**
   * Where an id is looked for when a request does not say (`--adapter-source`): `local` (default): the store only;
   * `hub`: the store when it has the id, else the Hub.
   */
  readonly defaultSource?: AdapterSourceKind;
}

/** Reads an adapter's files for a load: the store's `readWith`, or a Hub download. */
type Reader = <T>(use: (files: AdapterFiles, release: () => void) => T | Promise<T>) => Promise<T>;

/** Where an adapter is found: the key it is cached under (its id, or its hubKey) and how its files are read. */
interface Located {
  readonly key: string;
  readonly read: Reader;
}

interface HostEntry {
  readonly weights: AdapterWeights;
  readonly version: string;
  readonly source: AdapterFileSource | 'merge';
  /** A merged adapter's sources' keys (adapter ids, hubKeys): a change to any of them drops it. */
  readonly mergedFrom?: readonly string[];
}

interface DeviceEntry {
  readonly id: string;
  readonly adapter: ResidentAdapter;
  readonly host: HostEntry;
  pins: number;
  userPinned: boolean;
  /** Replaced or deleted while pinned: disposed when the last pin goes. */
  retired: boolean;
  disposed: boolean;
}

/** A host entry for weights read from `files`: its version is `files.version`, and `files` is dropped once that is read. */
function hostEntry(weights: AdapterWeights, files: AdapterFiles): HostEntry {
  let from: AdapterFiles | null = files;
  let version = '';
  return {
    weights, source: files.source,
    get version() {
      if (from) [version, from] = [from.version, null];
      return version;
    },
  };
}

const MAX_FAILURES_KEPT = 1024;
/** Ids remembered as loaded before (admitToHost). */
const MAX_SEEN = 16384;

export class AdapterManager implements AdapterAdmin, AdapterProvider {
  /** Insertion order = LRU order (refreshed on use). */
  private readonly device = new Map<string, DeviceEntry>();
  private deviceBytes = 0;
  /** Slots and bytes promised to loads whose upload is in progress (so concurrent loads cannot overcommit). */
  private reserved = 0;
  private reservedBytes = 0;
  private readonly host: LRUCache<string, HostEntry>;
  private readonly loading = new Map<string, Promise<DeviceEntry>>();
  /** Requests waiting for an id's load: a freshly loaded adapter is not evicted before they pin it. */
  private readonly acquiring = new Map<string, number>();
  private readonly failed = new Map<string, { code: string; message: string }>();
  private readonly lastUsed = new Map<string, number>();
  private roomWaiters: (() => void)[] = [];
  /** Ids loaded from disk or the remote source since start, the most recent MAX_SEEN (admitToHost). */
  private readonly seen = new LRUCache<string, true>({ max: MAX_SEEN });
  /** Uploads so far: each gets its own device key (ExecAdapter.key). */
  private uploads = 0;
  /** Merges being computed or uploaded, by merge id: `stale` once a source changed meanwhile (invalidate). */
  private readonly merging = new Map<string, { readonly sources: readonly string[]; stale: boolean }>();
  private merges = 0;

  constructor(
    private readonly store: AdapterStore,
    private readonly base: { readonly modules: readonly LinearModule[] },
    private readonly opts: AdapterManagerOptions,
    /** Where adapters are loaded and offloaded: the executor (its device, or its workers'). */
    private readonly executor: AdapterExecutor,
    private readonly metrics?: AdapterMetrics,
  ) {
    this.host = new LRUCache<string, HostEntry>({
      maxSize: Math.max(1, opts.maxHostBytes),
      sizeCalculation: (v) => Math.max(1, v.weights.bytes),
      dispose: (_v, _k, reason) => {
        if (reason === 'evict') this.metrics?.evicted('host');
      },
    });
  }

  // ---------------------------------------------------------------- engine side

  async acquire(id: string, signal?: AbortSignal, source?: AdapterSource): Promise<AdapterLease> {
    const { key, read } = await this.locate(id, source);
    return (await this.acquireKey(key, () => this.loadToDevice(key, read), signal)).lease;
  }

  /**
   * The key `id` is cached under and how its files are read: the id and the store for a local adapter; for one
   * from the Hub, `hub:org/name@<commit>` (hubKey: a new commit is a new adapter) and a download with the token.
   */
  private async locate(id: string, source?: AdapterSource): Promise<Located> {
    validateAdapterId(id);
    const hub = await this.fromHub(id, source);
    if (!hub) return { key: id, read: (use) => this.store.readWith(id, use) };
    const key = await hub.key(id, source?.token);
    return { key, read: async (use) => use(await hub.read(key, source?.token, (n) => new Uint8Array(n)), () => {}) };
  }

  async acquireMerged(spec: MergeSpec, signal?: AbortSignal, source?: AdapterSource): Promise<AdapterLease> {
    const located = new Map<string, Located>();
    for (const id of spec.ids) if (!located.has(id)) located.set(id, await this.locate(id, source));
    // Keyed by its sources' keys: a Hub source counts by its commit, so a new commit is a new merged adapter.
    const id = mergeId({ ...spec, ids: spec.ids.map((s) => located.get(s)!.key) });
    return (await this.acquireKey(id, () => this.loadMerged(id, spec, located), signal)).lease;
  }

  /** A lease on the resident `key` (an adapter id, hubKey or merge id), after `load` (single-flight per key) when it is not resident. */
  private async acquireKey(key: string, load: () => Promise<DeviceEntry>, signal?: AbortSignal): Promise<{ lease: AdapterLease; entry: DeviceEntry }> {
    for (;;) {
      if (signal?.aborted) throw fail('CANCELLED', 'the request was cancelled');
      const resident = this.device.get(key);
      if (resident && !resident.retired) {
        this.metrics?.hit('device');
        // Hub adapters are keyed by commit: nothing to revalidate.
        for (const source of resident.host.mergedFrom ?? [key]) if (parseHubKey(source) === null) this.revalidate(source);
        return { lease: this.lease(resident), entry: resident };
      }
      this.acquiring.set(key, (this.acquiring.get(key) ?? 0) + 1);
      let entry: DeviceEntry;
      try {
        entry = await singleFlight(this.loading, key, load);
      } finally {
        const n = this.acquiring.get(key)! - 1;
        if (n === 0) this.acquiring.delete(key);
        else this.acquiring.set(key, n);
      }
      // Replaced or deleted between its load and now: try again (new version, or 404).
      if (!entry.disposed && !entry.retired && this.device.get(key) === entry) return { lease: this.lease(entry), entry };
    }
  }

  /** The Hub adapters when `id` is to come from the Hub (the request's source, else --adapter-source); else null. */
  private async fromHub(id: string, source: AdapterSource | undefined): Promise<HubAdapters | null> {
    const kind = source?.kind ?? this.opts.defaultSource ?? 'local';
    if (kind === 'local') return null;
    // By default (no source in the request), an id the store has stays local.
    if (source?.kind === undefined && (this.device.has(id) || this.host.has(id) || (await this.store.has(id)))) return null;
    if (!this.opts.hub) throw fail('ADAPTER_NOT_FOUND', `adapter "${id}": this server does not fetch adapters from the Hugging Face Hub`);
    return this.opts.hub;
  }

  /**
   * Asks the store, in the background, whether a resident adapter's remote source has a newer version
   * (AdapterStore.revalidate: at most once per --adapter-revalidate-after); when it has, the cached copies are
   * dropped, so the requests after this one load the new version (this one runs on the old).
   */
  private revalidate(id: string): void {
    void this.store.revalidate(id).then(async (changed) => {
      if (!changed) return;
      await this.loading.get(id)?.catch(() => undefined);
      this.invalidate(id);
    }, () => undefined);
  }

  private lease(entry: DeviceEntry): AdapterLease {
    entry.pins++;
    this.touch(entry);
    let released = false;
    return {
      adapter: entry.adapter,
      version: entry.host.version,
      release: () => {
        if (released) return;
        released = true;
        entry.pins--;
        this.lastUsed.set(entry.id, Date.now());
        if (entry.pins === 0 && entry.retired) this.disposeEntry(entry);
        this.wakeRoomWaiters();
      },
    };
  }

  private touch(entry: DeviceEntry): void {
    this.lastUsed.set(entry.id, Date.now());
    if (this.device.get(entry.id) === entry) {
      this.device.delete(entry.id);
      this.device.set(entry.id, entry);
    }
  }

  private async loadToDevice(id: string, read: Reader): Promise<DeviceEntry> {
    const t0 = performance.now();
    try {
      const cached = this.host.get(id);
      let entry: DeviceEntry;
      if (cached) {
        this.metrics?.hit('host');
        entry = await this.upload(id, cached);
      } else {
        this.metrics?.miss();
        const admit = this.admitToHost(id);
        // The file bytes are needed until validated (the weights come out in their own buffer) and hashed: upload
        // reads host.version while the device copies the weights, and the store hashes before it takes them back.
        entry = await read(async (files, release) => {
          let scratch: SharedArrayBuffer | null = null;
          try {
            const weights = validateAdapterFiles(files, this.base, {
              maxRank: this.opts.maxRank, alloc: admit ? undefined : (n) => (scratch = scratchBuffers.borrow(n)),
            });
            const host = hostEntry(weights, files);
            if (admit) {
              this.host.set(id, host);
              this.metrics?.loaded('host', (performance.now() - t0) / 1000);
            }
            // A load that must wait for a device slot gives the file bytes back meanwhile.
            return await this.upload(id, host, scratch !== null, release);
          } finally {
            if (scratch) scratchBuffers.giveBack(scratch);
          }
        });
      }
      this.failed.delete(id);
      this.reportResident();
      return entry;
    } catch (err) {
      throw this.loadFailed(id, err);
    }
  }

  /** Counts a failed load and remembers its error for `info` (not for a missing or cancelled adapter). */
  private loadFailed(id: string, err: unknown): ServeError {
    const e = isServeError(err) ? err : new ServeError('INTERNAL', 'adapter load failed', undefined, { cause: err });
    this.metrics?.loadFailed(e.code);
    if (e.code !== 'ADAPTER_NOT_FOUND' && e.code !== 'ADAPTER_INVALID_ID' && e.code !== 'CANCELLED' && !isMergeId(id)) {
      if (this.failed.size >= MAX_FAILURES_KEPT) this.failed.delete(this.failed.keys().next().value!);
      this.failed.set(id, { code: e.code, message: e.message });
    }
    return e;
  }

  /**
   * Loads the merged adapter `id` of `spec`: from the host tier when it is there, else merged from the sources'
   * files (read from the store or the Hub as `located` says, checked as any adapter), then validated and uploaded
   * as a PEFT adapter. It stays in the host tier (a merge costs more than a disk read). A source changed while this
   * runs makes the result stale: it is not cached, and is retired once uploaded, so `acquireKey` loads it again.
   */
  private async loadMerged(id: string, spec: MergeSpec, located: ReadonlyMap<string, Located>): Promise<DeviceEntry> {
    const job = { sources: [...located.values()].map((l) => l.key), stale: false };
    this.merging.set(id, job);
    try {
      let host = this.host.get(id);
      if (host) {
        this.metrics?.hit('host');
      } else {
        this.metrics?.miss();
        host = await this.computeMerge(id, spec, located);
        if (!job.stale) this.host.set(id, host);
      }
      const entry = await this.upload(id, host);
      if (job.stale) this.evict(entry);
      this.reportResident();
      return entry;
    } catch (err) {
      throw this.loadFailed(id, err);
    } finally {
      this.merging.delete(id);
    }
  }

  /** Reads the sources (PEFT layout, checked against the base model) and merges them into a host entry. */
  private async computeMerge(id: string, spec: MergeSpec, located: ReadonlyMap<string, Located>): Promise<HostEntry> {
    const t0 = performance.now();
    const read = new Map<string, { source: MergeSource; version: string }>();
    for (const [sourceId, { read: readFiles }] of located) {
      read.set(sourceId, await readFiles((files) => {
        const { config, pairs } = readPeftPairs(files, this.base, { maxRank: this.opts.maxRank });
        return { source: { id: sourceId, rawConfig: files.config, config, pairs }, version: files.version };
      }));
    }
    const merged = await mergeSources(spec.ids.map((s) => read.get(s)!.source), spec);
    const weights = loadAdapterWeights({ id, ...merged }, this.base, { maxRank: this.opts.maxRank });
    this.merges++;
    this.metrics?.merged(spec.strategy, (performance.now() - t0) / 1000);
    const version = mergeVersion(spec, spec.ids.map((s) => read.get(s)!.version));
    return { weights, version, source: 'merge', mergedFrom: [...located.values()].map((l) => l.key) };
  }

  /**
   * Whether a load from disk (or the remote source) keeps the adapter in the host tier: from its second load since
   * start on (a doorkeeper, as in TinyLFU: adapters loaded once do not push out ones that come back), and always
   * when the device may keep referencing host arrays (AdapterExecutor.copiesOnUpload false). The host copy of an
   * adapter not kept goes into a recycled scratch buffer, so its load writes no fresh memory (the page faults of a
   * fresh buffer would cost more than the rest of the load: docs/architecture.md, "Adapter cache").
   */
  private admitToHost(id: string): boolean {
    const again = this.seen.has(id);
    this.seen.set(id, true);
    return again || !this.executor.copiesOnUpload;
  }

  /**
   * Reserves room for the host entry's weights and uploads them under a new device key; while the upload runs (on
   * the executor workers' threads, when there are some) it reads `host.version`, which a fresh load computes then.
   */
  private async upload(id: string, host: HostEntry, scratch = false, beforeWait?: () => void): Promise<DeviceEntry> {
    const bytes = host.weights.bytes;
    await this.makeRoom(bytes, beforeWait); // reserves a slot and the bytes
    const t1 = performance.now();
    let adapter: ResidentAdapter;
    try {
      const uploading = this.executor.loadAdapter(host.weights, String(++this.uploads));
      void host.version; // a fresh load's content hash, computed while the device copies the weights
      adapter = await uploading;
    } finally {
      this.reserved--;
      this.reservedBytes -= bytes;
      this.wakeRoomWaiters();
    }
    // Host arrays in a scratch buffer are reused once this load returns: the entry keeps the metadata only.
    const kept = scratch ? { ...host, weights: { ...host.weights, modules: [] } } : host;
    const entry: DeviceEntry = { id, adapter, host: kept, pins: 0, userPinned: false, retired: false, disposed: false };
    this.device.set(id, entry);
    this.deviceBytes += adapter.bytes;
    this.metrics?.loaded('device', (performance.now() - t1) / 1000);
    return entry;
  }

  private full(extraBytes: number): boolean {
    const { maxDeviceAdapters: n, maxDeviceBytes: b } = this.opts;
    return (n > 0 && this.device.size + this.reserved + 1 > n) || (b > 0 && this.deviceBytes + this.reservedBytes + extraBytes > b);
  }

  /**
   * Evicts least-recently-used unpinned adapters until one of `bytes` fits, then reserves the room (the caller
   * releases the reservation once its upload is done); waits while everything resident is pinned, calling
   * `beforeWait` once before it first does.
   */
  private async makeRoom(bytes: number, beforeWait?: () => void): Promise<void> {
    if (this.opts.maxDeviceBytes > 0 && bytes > this.opts.maxDeviceBytes) {
      throw fail('ADAPTER_TOO_LARGE', `adapter needs ${bytes} device bytes but --adapter-device-bytes is ${this.opts.maxDeviceBytes}`);
    }
    while (this.full(bytes)) {
      const victim = [...this.device.values()].find((e) => e.pins === 0 && !e.userPinned && !this.acquiring.has(e.id));
      if (victim) {
        this.evict(victim);
        this.metrics?.evicted('device');
        continue;
      }
      beforeWait?.();
      beforeWait = undefined;
      await new Promise<void>((resolve) => this.roomWaiters.push(resolve));
    }
    this.reserved++;
    this.reservedBytes += bytes;
  }

  private wakeRoomWaiters(): void {
    const waiters = this.roomWaiters;
    this.roomWaiters = [];
    waiters.forEach((w) => w());
  }

  /** Removes from the device tier; disposes now, or when the last pin goes. */
  private evict(entry: DeviceEntry): void {
    if (this.device.get(entry.id) === entry) {
      this.device.delete(entry.id);
      this.deviceBytes -= entry.adapter.bytes;
    }
    entry.retired = true;
    if (entry.pins === 0) this.disposeEntry(entry);
    this.reportResident();
    this.wakeRoomWaiters();
  }

  private disposeEntry(entry: DeviceEntry): void {
    if (entry.disposed) return;
    entry.disposed = true;
    this.executor.offloadAdapter(entry.adapter);
  }

  private reportResident(): void {
    this.metrics?.resident('device', this.device.size, this.deviceBytes);
    this.metrics?.resident('host', this.host.size, this.host.calculatedSize ?? 0);
  }

  /** Drops every cached copy of an id (after put/delete), and of the merged adapters computed from it. */
  private invalidate(id: string): void {
    const entry = this.device.get(id);
    if (entry) this.evict(entry);
    this.host.delete(id);
    this.failed.delete(id);
    const dependents = new Set<string>();
    for (const e of this.device.values()) if (e.host.mergedFrom?.includes(id)) dependents.add(e.id);
    for (const [mid, h] of this.host.entries()) if (h.mergedFrom?.includes(id)) dependents.add(mid);
    dependents.forEach((mid) => this.invalidate(mid));
    for (const job of this.merging.values()) if (job.sources.includes(id)) job.stale = true;
  }

  // ---------------------------------------------------------------- admin side

  async put(id: string, files: { config: unknown; weights: Uint8Array }): Promise<AdapterInfo> {
    validateAdapterId(id);
    const f = makeAdapterFiles(id, files.config, files.weights, 'upload');
    // Validate fully before anything is stored: a bad upload leaves the old version untouched.
    const weights = validateAdapterFiles(f, this.base, { maxRank: this.opts.maxRank });
    await this.store.write(id, files);
    // A load of the old version may be in flight: let it finish, then drop what it cached.
    await this.loading.get(id)?.catch(() => undefined);
    this.invalidate(id);
    this.host.set(id, { weights, version: f.version, source: 'upload' });
    this.reportResident();
    return this.info(id);
  }

  async putFromHub(id: string, repo: string): Promise<AdapterInfo> {
    validateAdapterId(id);
    const hub = this.opts.hub;
    if (!hub) throw fail('ADAPTER_NOT_FOUND', `adapter "${repo}": this server does not fetch adapters from the Hugging Face Hub`);
    const files = await hub.read(await hub.key(repo), undefined, (n) => new Uint8Array(n));
    return this.put(id, { config: files.config, weights: files.weights });
  }

  async delete(id: string): Promise<boolean> {
    validateAdapterId(id);
    const existed = await this.store.delete(id);
    await this.loading.get(id)?.catch(() => undefined);
    const known = existed || this.device.has(id) || this.host.has(id);
    this.invalidate(id);
    this.lastUsed.delete(id);
    this.seen.delete(id);
    return known;
  }

  /** With --adapter-source hub, an id the store lacks is loaded from the Hub, and its info is that of its hubKey. */
  async load(id: string, opts: { pin?: boolean } = {}): Promise<AdapterInfo> {
    const { key, read } = await this.locate(id);
    const { lease, entry } = await this.acquireKey(key, () => this.loadToDevice(key, read));
    if (opts.pin) entry.userPinned = true;
    lease.release();
    return this.info(key);
  }

  async unload(id: string): Promise<AdapterInfo> {
    validateAdapterId(id);
    const entry = this.device.get(id);
    if (!entry && !(await this.store.has(id)) && !this.host.has(id)) throw fail('ADAPTER_NOT_FOUND', `adapter "${id}" not found`);
    if (entry) {
      entry.userPinned = false;
      if (entry.pins === 0) this.evict(entry);
    }
    return this.info(id);
  }

  /** `id`: an adapter id, or the key of a Hub adapter that was loaded (`hub:org/name@<commit>`, as list() shows it). */
  async info(id: string): Promise<AdapterInfo> {
    const fromHub = parseHubKey(id) !== null;
    if (!fromHub) validateAdapterId(id);
    const dev = this.device.get(id);
    const host = dev?.host ?? this.host.get(id, { updateAgeOnGet: false });
    const failure = this.failed.get(id) ?? null;
    const onDisk = dev || host ? true : !fromHub && await this.store.has(id);
    if (!dev && !host && !failure && !onDisk && !this.loading.has(id)) throw fail('ADAPTER_NOT_FOUND', `adapter "${id}" not found`);
    const w = host?.weights;
    const used = this.lastUsed.get(id);
    return {
      id,
      state: dev ? 'ready' : this.loading.has(id) ? 'loading' : failure ? 'failed' : 'available',
      tier: dev ? 'device' : host ? 'host' : 'disk',
      source: host && host.source !== 'merge' ? host.source : onDisk ? 'disk' : null,
      version: host?.version ?? null,
      bytes: w?.bytes ?? null,
      rank: w?.rank ?? null,
      alpha: w?.config.loraAlpha ?? null,
      targetModules: w?.targetModules ?? null,
      pinned: dev?.userPinned ?? false,
      activeRequests: dev?.pins ?? 0,
      lastUsed: used ? new Date(used).toISOString() : null,
      error: dev ? null : failure,
    };
  }

  /** Known adapter ids (merged adapters are not adapters one can name). */
  async ids(): Promise<string[]> {
    const all = new Set([...(await this.store.list()), ...this.device.keys(), ...this.host.keys()]);
    return [...all].filter((id) => !isMergeId(id)).sort();
  }

  async list(): Promise<AdapterInfo[]> {
    const out: AdapterInfo[] = [];
    for (const id of new Set([...(await this.ids()), ...this.failed.keys()])) {
      try {
        out.push(await this.info(id));
      } catch {
        // deleted meanwhile
      }
    }
    return out;
  }

  /** Merged adapters computed since start (a merge served from a cache tier is not counted). */
  get mergesComputed(): number {
    return this.merges;
  }

  stats(): AdapterCacheStats {
    return {
      deviceAdapters: this.device.size, deviceBytes: this.deviceBytes,
      hostAdapters: this.host.size, hostBytes: this.host.calculatedSize ?? 0,
      maxDeviceAdapters: this.opts.maxDeviceAdapters, maxDeviceBytes: this.opts.maxDeviceBytes, maxHostBytes: this.opts.maxHostBytes,
    };
  }

  /**
   * Runs the load path `rounds` times at start on a synthetic adapter (rank 1, zero weights, every base module):
   * validation, the content hash, the upload to the device (every worker) and its disposal. The first loads of a
   * fresh process otherwise run their JavaScript before it is compiled, and are slower than later ones
   * (docs/architecture.md, "Adapter cache"). Nothing is kept and no metric is counted; the adapter store (disk)
   * is not touched.
   */
  async warmUp(rounds: number): Promise<void> {
    if (rounds <= 0) return;
    const { config, weights: bytes } = syntheticAdapter(this.base);
    // One host buffer for every round (each upload is disposed before the next round writes it), kept out of the
    // spare and scratch buffers, which are sized for real adapters.
    let host: SharedArrayBuffer | undefined;
    for (let i = 0; i < rounds; i++) {
      const files = makeAdapterFiles('warm-up', config, bytes, 'upload');
      const weights = validateAdapterFiles(files, this.base, { maxRank: this.opts.maxRank, alloc: (n) => (host ??= new SharedArrayBuffer(n)) });
      const uploading = this.executor.loadAdapter(weights, String(++this.uploads));
      void files.version; // hashed while the device copies, as a load does
      this.executor.offloadAdapter(await uploading);
    }
  }

  /** Disposes every device adapter (shutdown, tests). */
  dispose(): void {
    for (const e of [...this.device.values()]) {
      this.device.delete(e.id);
      this.disposeEntry(e);
    }
    this.deviceBytes = 0;
  }
}
