/**
 * PEFT adapters from the Hugging Face Hub (a request's `adapter_source: "hub"`, or `--adapter-source hub` for ids
 * the adapter folder does not have). An adapter repo `org/name` is resolved to its current commit and cached by it:
 * the adapter manager keys it `hub:org/name@<commit>` (`hubKey`), so a new commit on the Hub is a new adapter and
 * the old one leaves the device tier as any unused adapter does. Its two files are downloaded into the Hub cache
 * (src/hub/client.ts) and validated like an upload by the manager.
 *
 * A resolution is reused for `refreshAfterMs` per repo and token (0: for as long as it is remembered), so a hot
 * adapter costs no Hub request per use; a request with another token (or none) asks the Hub itself, so a private
 * adapter is only served to requests whose token the Hub accepts. Concurrent resolutions of one repo and token share
 * one request. Offline, resolutions and files come from the cache only (the token is not checked there).
 */
import { createHash } from 'node:crypto';
import { LRUCache } from 'lru-cache';
import { fail } from '../errors.ts';
import { DEFAULT_REVISION, type HubClient, type Snapshot } from '../hub/client.ts';
import { validateAdapterId } from './ids.ts';
import { singleFlight } from './single-flight.ts';
import { CONFIG_FILE, MAX_CONFIG_BYTES, PICKLE_FILE, readAdapterFolder, WEIGHTS_FILE, type AdapterFiles } from './store.ts';

const KEY_PREFIX = 'hub:';
const KEY_RE = /^hub:(.+)@([0-9a-f]{40})$/;
/** Resolutions remembered (repo × token). */
const MAX_REFS = 4096;

/** The adapter manager's key of a Hub adapter at a commit. */
export function hubKey(repo: string, commit: string): string {
  return `${KEY_PREFIX}${repo}@${commit}`;
}

/** The repo and commit of a key made by hubKey, or null for any other key (a local adapter id). */
export function parseHubKey(key: string): { repo: string; commit: string } | null {
  const m = KEY_RE.exec(key);
  return m ? { repo: m[1]!, commit: m[2]! } : null;
}

export interface HubAdaptersOptions {
  /** Limit for adapter_model.safetensors (--max-adapter-bytes). */
  readonly maxAdapterBytes: number;
  /** Milliseconds a resolved commit is reused before the Hub is asked again (0: no expiry). */
  readonly refreshAfterMs: number;
}

interface Resolved {
  readonly snapshot: Snapshot;
  readonly at: number;
}

export class HubAdapters {
  private readonly refs = new LRUCache<string, Resolved>({ max: MAX_REFS });
  private readonly resolving = new Map<string, Promise<Resolved>>();

  constructor(private readonly hub: HubClient, private readonly opts: HubAdaptersOptions) {}

  /** The manager key of adapter repo `id` at its current commit; coded Hub errors name the repo. */
  async key(id: string, token?: string): Promise<string> {
    validateAdapterId(id);
    const ref = `${id}\0${token === undefined ? '' : createHash('sha256').update(token).digest('hex')}`;
    const known = this.refs.get(ref);
    const fresh = known && (this.opts.refreshAfterMs <= 0 || Date.now() - known.at < this.opts.refreshAfterMs);
    const resolved = fresh ? known : await singleFlight(this.resolving, ref, async () => {
      const r = { snapshot: await this.hub.resolve({ repo: id, revision: DEFAULT_REVISION }, token), at: Date.now() };
      this.refs.set(ref, r);
      return r;
    });
    return hubKey(id, resolved.snapshot.commit);
  }

  /**
   * The files of the adapter `key` names (see `key`), downloaded into the Hub cache first when they are not there
   * (with `token`). Not validated: the manager validates them as it does every adapter.
   */
  async read(key: string, token: string | undefined, alloc: (size: number) => Uint8Array): Promise<AdapterFiles> {
    const parsed = parseHubKey(key);
    if (parsed === null) throw fail('ADAPTER_INVALID_ID', `${JSON.stringify(key)} is not a Hub adapter key`);
    const { repo, commit } = parsed;
    const snap = this.snapshotOf(repo, commit) ?? this.hub.snapshotAt(repo, commit);
    if (snap.files !== null && !snap.files.includes(WEIGHTS_FILE) && snap.files.includes(PICKLE_FILE)) {
      throw fail('ADAPTER_PICKLE', `adapter "${repo}" on the Hub only has ${PICKLE_FILE} (a pickle, never loaded); convert it to ${WEIGHTS_FILE}`);
    }
    await this.hub.file(snap, CONFIG_FILE, { token, maxBytes: MAX_CONFIG_BYTES });
    await this.hub.file(snap, WEIGHTS_FILE, { token, maxBytes: this.opts.maxAdapterBytes });
    const files = await readAdapterFolder(repo, snap.dir, this.opts.maxAdapterBytes, alloc, 'hub');
    if (files === null) throw fail('HUB_NOT_CACHED', `adapter "${repo}": ${CONFIG_FILE} of commit ${commit} is not in the Hub cache`);
    return files;
  }

  /** The snapshot of a resolution still remembered for this commit (it carries the file list). */
  private snapshotOf(repo: string, commit: string): Snapshot | null {
    for (const r of this.refs.values()) if (r.snapshot.repo === repo && r.snapshot.commit === commit) return r.snapshot;
    return null;
  }
}
