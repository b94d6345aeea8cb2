/** The adapter manager's public contract (HTTP layer, engine, metrics). */
import type { ExecAdapter } from '../engine/executor.ts';
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

/** What the engine needs: resolve an id to a pinned device adapter, loading it if needed. */
export interface AdapterProvider {
  /** Resolves when the adapter is resident and pinned for the caller; rejects with a coded error. */
  acquire(id: string, signal?: AbortSignal, source?: AdapterSource): Promise<AdapterLease>;
}

/** What the adapter manager reports to metrics (implemented in src/obs/metrics.ts). */
export interface AdapterMetrics {
  hit(tier: 'device' | 'host'): void;
  miss(): void;
  loaded(tier: 'device' | 'host', seconds: number): void;
  loadFailed(code: string): void;
  evicted(tier: 'device' | 'host'): void;
  resident(tier: 'device' | 'host', adapters: number, bytes: number): void;
}
