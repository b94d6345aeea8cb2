/**
 * The answers the server gives while it starts (it listens before the model is loaded, src/server/server.ts):
 * `GET /metrics` is served, every other request gets 503 NOT_READY with `Retry-After` and the start-up
 * progress (src/startup.ts) in `loading`: `{error, error_type, code, loading}`, or OpenAI's
 * `{error: {message, type, param, code}, loading}` on /v1/ routes; HEAD requests get the status alone.
 */
import type { IncomingMessage, ServerResponse } from 'node:http';
import { ERRORS } from '../errors.ts';
import type { Metrics } from '../obs/metrics.ts';
import type { StartupProgress } from '../startup.ts';

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
export function loadingHandler(progress: StartupProgress, metrics: Metrics): (req: IncomingMessage, res: ServerResponse) => void {
  return (req, res) => {
    req.resume(); // a body is not read: drained so the connection stays usable
    const path = (req.url ?? '/').split('?')[0];
    if (req.method === 'GET' && path === '/metrics') {
      metrics.text().then(
        (text) => res.writeHead(200, { 'content-type': metrics.contentType }).end(text),
        () => res.writeHead(500).end(),
      );
      return;
    }
    const { status, type } = ERRORS.NOT_READY;
    const message = loadingMessage(progress);
    const loading = progress.json();
    const body = path.startsWith('/v1/')
      ? { error: { message, type, param: null, code: 'NOT_READY' }, loading }
      : { error: message, error_type: type, code: 'NOT_READY', loading };
    res.writeHead(status, { 'content-type': 'application/json; charset=utf-8', 'retry-after': String(LOADING_RETRY_AFTER_S) });
    res.end(req.method === 'HEAD' ? undefined : JSON.stringify(body));
  };
}
