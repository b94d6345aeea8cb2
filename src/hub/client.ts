/**
 * The Hugging Face Hub: a repo revision resolved to its commit, and files downloaded into the cache layout of
 * Python's huggingface_hub, so that both share one cache:
 *
 *   <cache>/models--<org>--<name>/blobs/<etag>                 the bytes, named by their ETag (sha256 for LFS files)
 *   <cache>/models--<org>--<name>/snapshots/<commit>/<file>    relative symlink to ../../blobs/<etag>
 *   <cache>/models--<org>--<name>/refs/<revision>              the commit the branch or tag named when last resolved
 *
 * The revision is resolved with `@huggingface/hub`'s `modelInfo` (GET /api/models/<repo>/revision/<rev>: the
 * commit `sha` and the file list); files are fetched from `<endpoint>/<repo>/resolve/<commit>/<file>` (redirects
 * followed, as to the Hub's CDN: see `download`), streamed into a temporary blob with a size limit and progress in the log, then
 * renamed and linked. The library's own `downloadFileToCacheDir` is not used: it has no size limit, no progress and
 * prints to the console.
 *
 * Offline (`HF_HUB_OFFLINE`), a revision is read from `refs/` (a commit hash as is) and files must already be in
 * the snapshot; anything else is HUB_NOT_CACHED. Online, a network failure while resolving falls back to the cached
 * ref the same way (with a warning), as huggingface_hub does. 401/403 is HUB_ACCESS_DENIED, 404 HUB_NOT_FOUND,
 * other failures HUB_UNAVAILABLE.
 */
import { createHash, randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { mkdir, open, readFile, readdir, rename, rm, stat, symlink, writeFile } from 'node:fs/promises';
import { homedir } from 'node:os';
import path from 'node:path';
import { getRepoFolderName, HubApiError, modelInfo } from '@huggingface/hub';
import { Agent, request, type Dispatcher } from 'undici';
import { fail, isServeError, ServeError } from '../errors.ts';

/** Where the Hub is, the cache, the default token and offline mode: the environment variables of huggingface_hub. */
export interface HubSettings {
  /** `HF_ENDPOINT`, default https://huggingface.co (no trailing slash). */
  readonly endpoint: string;
  /** `HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`. */
  readonly cacheDir: string;
  /** `HF_TOKEN`, else the token file (`HF_TOKEN_PATH`, default `HF_HOME/token`); sent when a call gives none. */
  readonly token?: string;
  /** `HF_HUB_OFFLINE` is 1/true/yes/on: the cache only. */
  readonly offline: boolean;
}

const TRUE = new Set(['1', 'true', 'yes', 'on']);

/** HubSettings from the environment, with huggingface_hub's names and precedence. */
export function hubSettingsFromEnv(env: NodeJS.ProcessEnv = process.env): HubSettings {
  const hfHome = env.HF_HOME || path.join(env.XDG_CACHE_HOME || path.join(homedir(), '.cache'), 'huggingface');
  const cacheDir = env.HF_HUB_CACHE || env.HUGGINGFACE_HUB_CACHE || path.join(hfHome, 'hub');
  let token = env.HF_TOKEN || env.HUGGING_FACE_HUB_TOKEN || undefined;
  if (token === undefined) {
    try {
      token = readFileSync(env.HF_TOKEN_PATH || path.join(hfHome, 'token'), 'utf8').trim() || undefined;
    } catch {
      token = undefined; // no token file: anonymous
    }
  }
  return {
    endpoint: (env.HF_ENDPOINT || 'https://huggingface.co').replace(/\/+$/, ''),
    cacheDir: path.resolve(cacheDir),
    token,
    offline: TRUE.has((env.HF_HUB_OFFLINE ?? '').trim().toLowerCase()),
  };
}

/** A Hub repo id (`name` or `org/name`) and a revision (branch, tag or commit). */
export interface RepoSpec {
  readonly repo: string;
  readonly revision: string;
}

const REPO_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(?:\/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$/;
const REVISION_RE = /^[A-Za-z0-9._-]+(?:\/[A-Za-z0-9._-]+)*$/;
const COMMIT_RE = /^[0-9a-f]{40}$/;
export const DEFAULT_REVISION = 'main';

/** `org/name[@revision]` → RepoSpec, or null when `spec` is not of that shape. */
export function parseRepoSpec(spec: string): RepoSpec | null {
  const at = spec.indexOf('@');
  const repo = at < 0 ? spec : spec.slice(0, at);
  const revision = at < 0 ? DEFAULT_REVISION : spec.slice(at + 1);
  if (!REPO_RE.test(repo) || repo.includes('..') || repo.endsWith('.git')) return null;
  if (!REVISION_RE.test(revision) || revision.split('/').some((s) => s === '.' || s === '..')) return null;
  return { repo, revision };
}

/** A revision resolved to a commit, and where its files are (or will be) in the cache. */
export interface Snapshot {
  readonly repo: string;
  readonly revision: string;
  readonly commit: string;
  /** snapshots/<commit> */
  readonly dir: string;
  /** The repo's files at that commit, from the Hub; null when resolved from the cache only. */
  readonly files: readonly string[] | null;
  /** Resolved from the cache (offline, or the Hub unreachable): files are not downloaded. */
  readonly cachedOnly: boolean;
}

export interface HubClientOptions {
  /** Connect, response-headers and body-idle timeout of each request (default 30 s). */
  readonly timeoutMs?: number;
  /** Files at least this large are logged as they download, every 10% (default 16 MiB). */
  readonly progressBytes?: number;
  /** Progress and fallback warnings. */
  readonly log?: (message: string) => void;
}

/** An error of a Hub request for `what` (a repo, revision or file), coded by the HTTP status; `detail`: the Hub's reason. */
function statusError(status: number, what: string, tokenSent: boolean, detail?: string): ServeError {
  if (status === 401 || status === 403) {
    const hint = tokenSent ? 'the token sent was refused' : 'no token was sent (set HF_TOKEN, or api_token for an adapter)';
    return fail('HUB_ACCESS_DENIED', `${what}: the Hub refused access (HTTP ${status}): the repo is private or gated, or does not exist; ${hint}`, { status });
  }
  if (status === 404) return fail('HUB_NOT_FOUND', `${what}: not found on the Hub (HTTP 404${detail ? `: ${detail}` : ''})`, { status });
  return fail('HUB_UNAVAILABLE', `${what}: the Hub answered HTTP ${status}`, { status });
}

/** A failed request (network, timeout) as HUB_UNAVAILABLE. */
function networkError(err: unknown, what: string): ServeError {
  if (isServeError(err)) return err;
  const e = err as { name?: string; code?: string; cause?: { code?: string } } | undefined;
  const why = e?.name === 'TimeoutError' || e?.code?.startsWith('UND_ERR_') && e.code.includes('TIMEOUT') ? 'timed out'
    : e?.cause?.code ?? e?.code ?? 'network error';
  return new ServeError('HUB_UNAVAILABLE', `${what}: the Hub could not be reached (${why})`, undefined, { cause: err });
}

/** ETag header → blob name, as huggingface_hub normalises it (no weak prefix, no quotes). */
function blobName(etag: string | undefined): string | null {
  const name = etag?.replace(/^W\//, '').replaceAll('"', '');
  return name && /^[A-Za-z0-9._-]+$/.test(name) && !name.startsWith('.') ? name : null;
}

async function exists(p: string): Promise<boolean> {
  try {
    await stat(p);
    return true;
  } catch {
    return false;
  }
}

export class HubClient {
  private readonly timeoutMs: number;
  private readonly progressBytes: number;
  private readonly log: (message: string) => void;
  private agent?: Dispatcher;

  constructor(readonly settings: HubSettings, opts: HubClientOptions = {}) {
    this.timeoutMs = opts.timeoutMs ?? 30_000;
    this.progressBytes = opts.progressBytes ?? 16 * 2 ** 20;
    this.log = opts.log ?? (() => {});
  }

  /** The repo's cache folder: <cache>/models--org--name. */
  repoDir(repo: string): string {
    return path.join(this.settings.cacheDir, getRepoFolderName({ type: 'model', name: repo }));
  }

  /**
   * The commit `revision` names: asked of the Hub (with `token`, else the configured one) and recorded in
   * `refs/`; offline, or when the Hub cannot be reached and the ref is cached, read from `refs/`.
   */
  async resolve(spec: RepoSpec, token = this.settings.token): Promise<Snapshot> {
    if (this.settings.offline) return this.cachedSnapshot(spec, 'HF_HUB_OFFLINE is set');
    if (!URL.canParse(this.settings.endpoint) || !/^https?:$/.test(new URL(this.settings.endpoint).protocol)) {
      throw fail('HUB_UNAVAILABLE', `HF_ENDPOINT ${JSON.stringify(this.settings.endpoint)} is not an http(s) URL`);
    }
    let info: { sha?: unknown; filePaths?: unknown };
    try {
      info = await modelInfo({
        name: spec.repo, revision: spec.revision, additionalFields: ['sha', 'filePaths'], hubUrl: this.settings.endpoint, fetch: this.fetchWith(token),
      });
    } catch (err) {
      const what = `Hub repo "${spec.repo}" at revision "${spec.revision}"`;
      const hubMessage = err instanceof HubApiError ? (err.data as { error?: unknown } | undefined)?.error : undefined;
      const e = err instanceof HubApiError
        ? statusError(err.statusCode, what, token !== undefined, typeof hubMessage === 'string' ? hubMessage.slice(0, 200) : undefined)
        : networkError(err, what);
      if (e.code !== 'HUB_UNAVAILABLE') throw e;
      const cached = await this.cachedSnapshot(spec, e.message).catch(() => null);
      if (cached === null) throw e;
      this.log(`${e.message}; using the cached commit ${cached.commit}`);
      return cached;
    }
    const commit = info.sha;
    if (typeof commit !== 'string' || !COMMIT_RE.test(commit) || !Array.isArray(info.filePaths)) {
      throw fail('HUB_UNAVAILABLE', `Hub repo "${spec.repo}": the model info API gave no commit or file list`);
    }
    if (spec.revision !== commit) {
      const ref = path.join(this.repoDir(spec.repo), 'refs', spec.revision);
      await mkdir(path.dirname(ref), { recursive: true });
      await writeFileAtomic(ref, commit);
    }
    return { ...spec, commit, dir: this.snapshotDir(spec.repo, commit), files: info.filePaths.filter((f): f is string => typeof f === 'string'), cachedOnly: false };
  }

  /** The snapshot `refs/<revision>` names (a commit hash names itself); HUB_NOT_CACHED when there is none. */
  async cachedSnapshot(spec: RepoSpec, why: string): Promise<Snapshot> {
    let commit = COMMIT_RE.test(spec.revision) ? spec.revision : null;
    if (commit === null) {
      commit = (await readFile(path.join(this.repoDir(spec.repo), 'refs', spec.revision), 'utf8').catch(() => '')).trim();
    }
    const dir = COMMIT_RE.test(commit) ? this.snapshotDir(spec.repo, commit) : null;
    if (dir === null || !(await exists(dir))) {
      throw fail('HUB_NOT_CACHED', `Hub repo "${spec.repo}" at revision "${spec.revision}" is not in the cache ${this.settings.cacheDir} (${why})`);
    }
    return { ...spec, commit, dir, files: null, cachedOnly: true };
  }

  /** The snapshot of a known commit (files are downloaded unless offline). */
  snapshotAt(repo: string, commit: string): Snapshot {
    return { repo, revision: commit, commit, dir: this.snapshotDir(repo, commit), files: null, cachedOnly: this.settings.offline };
  }

  /**
   * The cached path of `file` of the snapshot, downloaded first when it is not there (`maxBytes`: the largest size
   * accepted, ADAPTER_TOO_LARGE beyond). A snapshot resolved from the cache only downloads nothing: HUB_NOT_CACHED.
   */
  async file(snap: Snapshot, file: string, opts: { token?: string; maxBytes?: number } = {}): Promise<string> {
    const pointer = path.join(snap.dir, ...file.split('/'));
    if (await exists(pointer)) return pointer;
    if (snap.cachedOnly) {
      throw fail('HUB_NOT_CACHED', `Hub repo "${snap.repo}": ${file} of commit ${snap.commit} is not in the cache ${this.settings.cacheDir}` +
        (this.settings.offline ? ' (HF_HUB_OFFLINE is set)' : ' (the Hub could not be reached)'));
    }
    await this.download(snap, file, pointer, opts.token ?? this.settings.token, opts.maxBytes ?? Number.MAX_SAFE_INTEGER);
    return pointer;
  }

  /** Closes the HTTP agent of the downloads. */
  async close(): Promise<void> {
    const agent = this.agent;
    this.agent = undefined;
    await agent?.close();
  }

  private snapshotDir(repo: string, commit: string): string {
    return path.join(this.repoDir(repo), 'snapshots', commit);
  }

  /** `fetch` for the library: the token as a Bearer header (any token: the library itself only takes `hf_…`), and a timeout. */
  private fetchWith(token: string | undefined): typeof fetch {
    return (input, init) => {
      const headers = new Headers(init?.headers);
      if (token !== undefined) headers.set('authorization', `Bearer ${token}`);
      return fetch(input, { ...init, headers, signal: AbortSignal.timeout(this.timeoutMs) });
    };
  }

  private dispatcher(): Dispatcher {
    this.agent ??= new Agent({ connect: { timeout: this.timeoutMs } });
    return this.agent;
  }

  /**
   * GET resolve/<commit>/<file> into blobs/<etag>, then the snapshot's symlink to it. Redirects are followed here,
   * not by the HTTP client: the blob's name is the ETag the Hub itself sends (`X-Linked-Etag` on an LFS file's
   * redirect to the CDN, else `ETag`), as huggingface_hub names it, never the CDN's; and the token goes to the Hub's
   * origin only.
   */
  private async download(snap: Snapshot, file: string, pointer: string, token: string | undefined, maxBytes: number): Promise<void> {
    const what = `Hub repo "${snap.repo}": ${file}`;
    const hubOrigin = new URL(this.settings.endpoint).origin;
    let url = new URL(`${this.settings.endpoint}/${snap.repo}/resolve/${snap.commit}/${file.split('/').map(encodeURIComponent).join('/')}`);
    let name: string | null = null;
    let size = NaN;
    for (let hops = 0; ; hops++) {
      const fromHub = url.origin === hubOrigin;
      let res: Dispatcher.ResponseData;
      try {
        res = await request(url, {
          dispatcher: this.dispatcher(), headersTimeout: this.timeoutMs, bodyTimeout: this.timeoutMs,
          headers: { 'accept-encoding': 'identity', 'user-agent': 'lora-serve', ...(token !== undefined && fromHub ? { authorization: `Bearer ${token}` } : {}) },
        });
      } catch (err) {
        throw networkError(err, what);
      }
      const header = (h: string) => (typeof res.headers[h] === 'string' ? res.headers[h] as string : undefined);
      if (fromHub && name === null && header('x-repo-commit') !== undefined) {
        name = blobName(header('x-linked-etag') ?? header('etag'));
        size = Number(header('x-linked-size') ?? header('content-length'));
      }
      const location = header('location');
      if (res.statusCode >= 300 && res.statusCode < 400 && location !== undefined && hops < 5) {
        await res.body.dump().catch(() => undefined);
        url = new URL(location, url);
        if (name !== null && (await exists(path.join(this.repoDir(snap.repo), 'blobs', name)))) break; // cached under another commit
        continue;
      }
      if (res.statusCode !== 200) {
        await res.body.dump().catch(() => undefined);
        throw statusError(res.statusCode, what, token !== undefined, header('x-error-code'));
      }
      if (name === null) {
        await res.body.dump().catch(() => undefined);
        throw fail('HUB_UNAVAILABLE', `${what}: the Hub's answer has no X-Repo-Commit and ETag`);
      }
      const blob = path.join(this.repoDir(snap.repo), 'blobs', name);
      await mkdir(path.dirname(blob), { recursive: true });
      if (await exists(blob)) await res.body.dump({ limit: 0 }).catch(() => undefined);
      else await this.receive(res, blob, what, maxBytes, Number.isFinite(size) ? size : Number(header('content-length')));
      break;
    }
    const blob = path.join(this.repoDir(snap.repo), 'blobs', name!);
    await mkdir(path.dirname(pointer), { recursive: true });
    const tmp = `${pointer}.${randomBytes(6).toString('hex')}.tmp`;
    await symlink(path.relative(path.dirname(pointer), blob), tmp);
    await rename(tmp, pointer);
  }

  /**
   * Streams a response body into `blob` (a temporary name, then renamed), within `maxBytes`, logging progress. A blob
   * named by a sha256 (an LFS file) must hash to it.
   */
  private async receive(res: Dispatcher.ResponseData, blob: string, what: string, maxBytes: number, size: number): Promise<void> {
    const expected = /^[0-9a-f]{64}$/.test(path.basename(blob)) ? path.basename(blob) : null;
    const hash = expected ? createHash('sha256') : null;
    const tooLarge = (bytes: string) => fail('ADAPTER_TOO_LARGE', `${what} is ${bytes} bytes (limit ${maxBytes})`);
    if (Number.isFinite(size) && size > maxBytes) {
      res.body.on('error', () => undefined);
      res.body.destroy();
      throw tooLarge(String(size));
    }
    const progress = Number.isFinite(size) && size >= this.progressBytes ? this.progress(what, size) : null;
    const tmp = `${blob}.${randomBytes(6).toString('hex')}.incomplete`;
    const fh = await open(tmp, 'wx');
    let received = 0;
    try {
      try {
        for await (const chunk of res.body as AsyncIterable<Buffer>) {
          received += chunk.byteLength;
          if (received > maxBytes) throw tooLarge(`more than ${maxBytes}`);
          hash?.update(chunk);
          await fh.write(chunk);
          progress?.(received);
        }
      } catch (err) {
        throw networkError(err, what);
      }
      if (Number.isFinite(size) && received !== size) throw fail('HUB_UNAVAILABLE', `${what}: the download ended after ${received} of ${size} bytes`);
      if (hash && hash.digest('hex') !== expected) throw fail('HUB_UNAVAILABLE', `${what}: the downloaded bytes do not match their sha256 ${expected}`);
      await fh.sync();
      await fh.close();
      await rename(tmp, blob);
    } catch (err) {
      await fh.close().catch(() => undefined);
      await rm(tmp, { force: true });
      throw err;
    }
  }

  /** A progress callback that logs each 10% of `size` bytes with the rate so far. */
  private progress(what: string, size: number): (received: number) => void {
    const mib = (n: number) => (n / 2 ** 20).toFixed(1);
    const t0 = performance.now();
    let next = 1;
    this.log(`downloading ${what} (${mib(size)} MiB)`);
    return (received) => {
      const tenths = Math.floor((received / size) * 10);
      if (tenths < next) return;
      next = tenths + 1;
      const seconds = (performance.now() - t0) / 1000;
      this.log(`downloading ${what}: ${tenths * 10}% (${mib(received)} of ${mib(size)} MiB, ${mib(received / Math.max(seconds, 1e-3))} MiB/s)`);
    };
  }
}

/** Writes `file` through a temporary name and a rename, so a reader sees the old or the new content. */
async function writeFileAtomic(file: string, data: string): Promise<void> {
  const tmp = `${file}.${randomBytes(6).toString('hex')}.tmp`;
  await writeFile(tmp, data);
  await rename(tmp, file);
}

/** The top-level file names of a cached snapshot whose blob is there. */
export async function snapshotFiles(dir: string): Promise<string[]> {
  const names = await readdir(dir).catch(() => [] as string[]);
  const out: string[] = [];
  for (const n of names) if (await exists(path.join(dir, n))) out.push(n);
  return out;
}
