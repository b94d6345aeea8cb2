/**
 * A local stand-in for the Hugging Face Hub (node:http), serving what lora-serve asks of it, with the headers the
 * real Hub sends:
 * - GET /api/models/<repo>/revision/<rev>: the model info API (`sha`, `siblings`), as `@huggingface/hub`'s
 *   modelInfo reads it;
 * - GET /<repo>/resolve/<rev>/<file>: a small (git) file with `ETag` (its git blob id) and `X-Repo-Commit`; a
 *   `.safetensors` file (LFS) as a 302 to /cdn/<sha256> carrying `X-Linked-Etag` (the sha256), `X-Linked-Size` and
 *   `X-Repo-Commit`, as the Hub redirects to its CDN;
 * - 401 for a private repo without the right `Authorization: Bearer` token, 404 with `X-Error-Code` (RepoNotFound,
 *   RevisionNotFound, EntryNotFound).
 * Every request is recorded (`requests`), so a test can assert what was (not) asked.
 */
import { createHash } from 'node:crypto';
import { readdirSync, readFileSync } from 'node:fs';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import path from 'node:path';

type Files = Readonly<Record<string, Uint8Array>>;

interface Repo {
  readonly token?: string;
  readonly commits: Map<string, Files>;
  readonly refs: Map<string, string>;
}

/** A file's git blob id: what the Hub sends as the ETag of a non-LFS file. */
export const gitBlobId = (bytes: Uint8Array) => createHash('sha1').update(`blob ${bytes.byteLength}\0`).update(bytes).digest('hex');
export const sha256 = (bytes: Uint8Array) => createHash('sha256').update(bytes).digest('hex');
const isLfs = (file: string) => file.endsWith('.safetensors') || file.endsWith('.bin');

/** The files of a folder (top level), as a Files record. */
export function folderFiles(dir: string): Files {
  return Object.fromEntries(readdirSync(dir).map((f) => [f, new Uint8Array(readFileSync(path.join(dir, f)))]));
}

export class FakeHub {
  readonly requests: { method: string; url: string; auth?: string }[] = [];
  private readonly repos = new Map<string, Repo>();
  private readonly cdn = new Map<string, Uint8Array>();
  private server?: Server;
  url = '';

  /** Adds a commit of `files` to `repo` (created, private when `token` is given), and points `branch` at it. Returns the commit. */
  commit(repo: string, files: Files, opts: { branch?: string; token?: string } = {}): string {
    let r = this.repos.get(repo);
    if (!r) this.repos.set(repo, (r = { token: opts.token, commits: new Map(), refs: new Map() }));
    const h = createHash('sha1').update(repo).update(String(r.commits.size));
    for (const [name, bytes] of Object.entries(files).sort()) h.update(name).update(bytes);
    const commit = h.digest('hex');
    r.commits.set(commit, files);
    r.refs.set(opts.branch ?? 'main', commit);
    for (const bytes of Object.values(files)) this.cdn.set(sha256(bytes), bytes);
    return commit;
  }

  /** Points `ref` (a branch or tag) of `repo` at `commit`. */
  tag(repo: string, ref: string, commit: string): void {
    this.repos.get(repo)!.refs.set(ref, commit);
  }

  /** From now on the CDN serves other bytes (of the same length) for the LFS file `bytes`. */
  corrupt(bytes: Uint8Array): void {
    const bad = Uint8Array.from(bytes);
    bad[bad.length - 1]! ^= 1;
    this.cdn.set(sha256(bytes), bad);
  }

  async start(): Promise<void> {
    this.server = createServer((req, res) => this.handle(req, res));
    await new Promise<void>((resolve) => this.server!.listen(0, '127.0.0.1', resolve));
    this.url = `http://127.0.0.1:${(this.server.address() as AddressInfo).port}`;
  }

  async close(): Promise<void> {
    this.server?.closeAllConnections();
    await new Promise<void>((resolve) => (this.server ? this.server.close(() => resolve()) : resolve()));
  }

  private handle(req: IncomingMessage, res: ServerResponse): void {
    const auth = req.headers.authorization;
    this.requests.push({ method: req.method!, url: req.url!, ...(auth ? { auth } : {}) });
    const url = new URL(req.url!, this.url);
    const fail = (status: number, code: string, message: string) => {
      res.writeHead(status, { 'content-type': 'application/json', 'x-error-code': code, 'x-error-message': message });
      res.end(JSON.stringify({ error: message }));
    };
    let m: RegExpExecArray | null;
    if ((m = /^\/cdn\/([0-9a-f]{64})$/.exec(url.pathname))) {
      const bytes = this.cdn.get(m[1]!);
      if (!bytes) return fail(404, 'EntryNotFound', 'no such object');
      res.writeHead(200, { 'content-length': bytes.byteLength, 'content-type': 'application/octet-stream', etag: `"${m[1]}"` });
      return void res.end(req.method === 'HEAD' ? undefined : bytes);
    }
    const api = /^\/api\/models\/(.+)\/revision\/([^/]+)$/.exec(url.pathname);
    const resolve = api ? null : /^\/(.+?)\/resolve\/([^/]+)\/(.+)$/.exec(url.pathname);
    const match = api ?? resolve;
    if (!match) return fail(404, 'NotFound', 'no such route');
    const name = match[1]!;
    const repo = this.repos.get(name);
    // The Hub answers a private repo without the right token as it answers a missing one, but with 401.
    if (repo?.token !== undefined && auth !== `Bearer ${repo.token}`) return fail(401, 'RepoNotFound', 'Invalid username or password.');
    if (!repo) return fail(auth ? 404 : 401, 'RepoNotFound', 'Repository not found');
    const revision = decodeURIComponent(match[2]!);
    const commit = repo.commits.has(revision) ? revision : repo.refs.get(revision);
    if (commit === undefined) return fail(404, 'RevisionNotFound', `Invalid rev id: ${revision}`);
    const files = repo.commits.get(commit)!;
    if (api) {
      res.writeHead(200, { 'content-type': 'application/json' });
      return void res.end(JSON.stringify({
        _id: sha256(new TextEncoder().encode(name)).slice(0, 24), id: name, private: repo.token !== undefined, sha: commit,
        lastModified: '2026-01-01T00:00:00.000Z', downloads: 0, likes: 0, gated: false,
        siblings: Object.keys(files).map((rfilename) => ({ rfilename })),
      }));
    }
    const file = decodeURIComponent(resolve![3]!);
    const bytes = files[file];
    if (!bytes) return fail(404, 'EntryNotFound', `${file} does not exist on "${revision}"`);
    if (isLfs(file)) {
      res.writeHead(302, {
        location: `${this.url}/cdn/${sha256(bytes)}`, 'x-repo-commit': commit, 'x-linked-etag': `"${sha256(bytes)}"`,
        'x-linked-size': bytes.byteLength, etag: `"${gitBlobId(bytes)}"`, 'content-length': 0,
      });
      return void res.end();
    }
    res.writeHead(200, { 'content-length': bytes.byteLength, 'x-repo-commit': commit, etag: `"${gitBlobId(bytes)}"`, 'content-type': 'text/plain' });
    res.end(req.method === 'HEAD' ? undefined : bytes);
  }
}
