/** The adapter manager's public contract (HTTP layer, engine, metrics). */
import type { ExecAdapter } from '../engine/executor.ts';
import type { MajoritySignMethod, MergeStrategy } from './merge.ts';
import type { AdapterSource } from '../engine/types.ts';

export type AdapterState = 'available' | 'loading' | 'ready' | 'failed';
export type AdapterTier = 'device' | 'host' | 'disk' | 'remote';

export interface AdapterInfo {
  readonly id: string;
  /** available: known (disk/remote) but not loaded; loading; ready: on the device; failed: see error. */
  readonly state: AdapterState;
  /** The fastest tier it is in now. */
  readonly tier: AdapterTier;
  /** disk: --adapter-dir; remote: --adapter-source-url; hub: the Hugging Face Hub (id `hub:org/name@<commit>`). */
  readonly source: 'disk' | 'upload' | 'remote' | 'hub' | null;
  /** Content hash of config + weights, when known. */
  readonly version: string | null;
  /** Float32 bytes of every A and B, when parsed. */
  readonly bytes: number | null;
  readonly rank: number | null;
  readonly alpha: number | null;
  readonly targetModules: readonly string[] | null;
  readonly pinned: boolean;
  /** Sequences using it right now. */
  readonly activeRequests: number;
  /** ISO time, or null if never used since start. */
  readonly lastUsed: string | null;
  readonly error: { readonly code: string; readonly message: string } | null;
}

/** What the HTTP layer may do with adapters. All errors are ServeErrors with ADAPTER_* codes. */
export interface AdapterAdmin {
  list(): Promise<AdapterInfo[]>;
  info(id: string): Promise<AdapterInfo>;
  /** Validates fully, then stores atomically; replaces an older version only when the new one is valid. */
  put(id: string, files: { config: unknown; weights: Uint8Array }): Promise<AdapterInfo>;
  /** `put` of the files of a Hugging Face Hub adapter repo (downloaded into the Hub cache first). */
  putFromHub(id: string, repo: string): Promise<AdapterInfo>;
  /** Removes from every tier and disk; in-flight requests finish on the version they started with. */
  delete(id: string): Promise<boolean>;
  /** Warms into the device tier; pin keeps it there until unload. */
  load(id: string, opts?: { pin?: boolean }): Promise<AdapterInfo>;
  /** Unpins and drops it from the device tier (when no request uses it). */
  unload(id: string): Promise<AdapterInfo>;
  /** Known ids (disk + loaded), cheap; for /v1/models. */
  ids(): Promise<string[]>;
  stats(): AdapterCacheStats;
}

export interface AdapterCacheStats {
  readonly deviceAdapters: number;
  readonly deviceBytes: number;
  readonly hostAdapters: number;
  readonly hostBytes: number;
  readonly maxDeviceAdapters: number;
  readonly maxDeviceBytes: number;
  readonly maxHostBytes: number;
}

/** A pinned device adapter held by one sequence. */
export interface AdapterLease {
  readonly adapter: ExecAdapter;
  /** The content version the lease holds (AdapterInfo.version). */
  readonly version: string;
  release(): void;
}

/**
 * A per-request merge of adapters (LoRAX `merged_adapters`, src/lora/merged-adapter.ts), its values checked and
 * its defaults filled in (src/server/params.ts).
 */
export interface MergeSpec {
  /** The source adapters, in the request's order (at least two; duplicates allowed). */
  readonly ids: readonly string[];
  /** One finite weight per id. */
  readonly weights: readonly number[];
  readonly strategy: MergeStrategy;
  /** In [0, 1]: the fraction of each task tensor ties and DARE keep (unused by linear). */
  readonly density: number;
  /** Used by ties and dare_ties. */
  readonly majoritySignMethod: MajoritySignMethod;
  /** Seeds DARE's random drop masks (unused by linear and ties). */
  readonly seed: number;
}

/** What the engine needs: resolve an id to a pinned device adapter, loading it if needed. */
export interface AdapterProvider {
  /** Resolves when the adapter is resident and pinned for the caller; rejects with a coded error. */
  acquire(id: string, signal?: AbortSignal, source?: AdapterSource): Promise<AdapterLease>;
  /**
   * As acquire, for the adapter merged from `spec`, each source looked up as acquire looks up an id with `source`.
   * Computed once, then cached like any adapter under `mergeId` of the spec with each Hub source as its hubKey (so a
   * new commit of a Hub source is a new merge), until one of its local sources is replaced or deleted.
   */
  acquireMerged(spec: MergeSpec, signal?: AbortSignal, source?: AdapterSource): Promise<AdapterLease>;
}

/** What the adapter manager reports to metrics (implemented in src/obs/metrics.ts). */
export interface AdapterMetrics {
  hit(tier: 'device' | 'host'): void;
  miss(): void;
  loaded(tier: 'device' | 'host', seconds: number): void;
  loadFailed(code: string): void;
  evicted(tier: 'device' | 'host'): void;
  resident(tier: 'device' | 'host', adapters: number, bytes: number): void;
  /** A merged adapter computed from its sources (not counted when it came from the cache). */
  merged(strategy: MergeStrategy, seconds: number): void;
}
