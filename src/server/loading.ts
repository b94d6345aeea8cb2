/**
 * The answers the server gives while it starts (it listens before the model is loaded, src/server/server.ts):
 * `GET /metrics` is served, every other request gets 503 NOT_READY with `Retry-After` and the start-up
 * progress (src/startup.ts) in `loading`: `{error, error_type, code, loading}`, or OpenAI's
 * `{error: {message, type, param, code}, loading}` on /v1/ routes; HEAD requests get the status alone.
 * The keys are checked as the app checks them: with `--api-key`, every path but /health (and /metrics with
 * `--metrics-public`) needs either key, or is answered 401 UNAUTHORIZED; admin routes take either key here, as
 * none of them does anything yet.
 */
import type { IncomingMessage, ServerResponse } from 'node:http';
import { ERRORS, type ErrorCode } from '../errors.ts';
import type { Metrics } from '../obs/metrics.ts';
import type { StartupProgress } from '../startup.ts';
import { keyMatcher, type AppOptions } from './app.ts';

/** Seconds a client is asked to wait before trying again while the server loads. */
export const LOADING_RETRY_AFTER_S = 2;

/** What the loading answers say, in words: the phase and the counts that move in it. */
export function loadingMessage(progress: StartupProgress): string {
  const p = progress.json();
  const counts = p.phase === 'weights'
    ? `: ${p.tensors_loaded} of ${p.tensors_total} tensors (${mib(p.bytes_loaded)} of ${mib(p.bytes_total)} MiB)${p.workers_total ? `, ${p.workers_started} of ${p.workers_total} workers started` : ''}`
    : '';
  return `the server is starting (${p.phase}${counts}); retry later`;
}

const mib = (bytes: number) => (bytes / 2 ** 20).toFixed(1);

/** The request handler until the app takes over. */
export function loadingHandler(
  progress: StartupProgress,
  metrics: Metrics,
  access: Pick<AppOptions, 'apiKey' | 'adminApiKey' | 'metricsPublic'> = {},
): (req: IncomingMessage, res: ServerResponse) => void {
  const match = keyMatcher(access);
  /** Whether the request may see what `path` answers: public, no `--api-key`, or either key presented. */
  const allowed = (req: IncomingMessage, path: string) => {
    if (path === '/health' || (path === '/metrics' && access.metricsPublic) || !access.apiKey || !match) return true;
    const k = match(req.headers.authorization);
    return k.plain || k.admin;
  };
  return (req, res) => {
    req.resume(); // a body is not read: drained so the connection stays usable
    const path = (req.url ?? '/').split('?')[0]!;
    if (!allowed(req, path)) {
      send(req, res, path, 'UNAUTHORIZED', 'missing or invalid API key: send "Authorization: Bearer <key>"', null, { 'www-authenticate': 'Bearer' });
      return;
    }
    if (req.method === 'GET' && path === '/metrics') {
      metrics.text().then(
        (text) => res.writeHead(200, { 'content-type': metrics.contentType }).end(text),
        () => res.writeHead(500).end(),
      );
      return;
    }
    send(req, res, path, 'NOT_READY', loadingMessage(progress), progress.json(), { 'retry-after': String(LOADING_RETRY_AFTER_S) });
  };
}

/** A coded error in the route's shape (OpenAI's on /v1/), with the start-up progress when there is one. */
function send(
  req: IncomingMessage, res: ServerResponse, path: string, code: ErrorCode, message: string,
  loading: ReturnType<StartupProgress['json']> | null, headers: Record<string, string>,
): void {
  const { status, type } = ERRORS[code];
  const extra = loading ? { loading } : {};
  const body = path.startsWith('/v1/')
    ? { error: { message, type, param: null, code }, ...extra }
    : { error: message, error_type: type, code, ...extra };
  res.writeHead(status, { 'content-type': 'application/json; charset=utf-8', ...headers });
  res.end(req.method === 'HEAD' ? undefined : JSON.stringify(body));
}
