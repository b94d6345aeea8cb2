/**
 * An executor worker thread that dies (terminated through ParallelExecutor's test seam, as a crash would end it):
 * the log names it, the requests in flight on it fail with WORKER_DIED (503) instead of hanging, /health answers
 * 503 with that code so an orchestrator restarts the process, and the other worker keeps serving meanwhile.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { request as http } from 'undici';
import { DEMO_LLAMA, writeCheckpoint } from '../src/demo/index.ts';
import type { ParallelExecutor } from '../src/exec/parallel-executor.ts';
import { listeningServer, type ListeningServer } from './helpers/listening.ts';
import { setupBackend, tempDir } from './helpers/tf.ts';

const tmp = tempDir();
let server: ListeningServer;

before(async () => {
  await setupBackend();
  await writeCheckpoint(join(tmp.dir, 'model'), DEMO_LLAMA);
  server = await listeningServer(tmp.dir, { logLevel: 'info', maxTotalTokens: 1024, workers: 2 });
});
after(async () => {
  await server.close();
  tmp.cleanup();
});

const long = { inputs: 'Hello', parameters: { max_new_tokens: 1000, ignore_eos: true } };

async function post(path: string, body: unknown) {
  const res = await http(server.url + path, { method: 'POST', body: JSON.stringify(body), headers: { 'content-type': 'application/json' } });
  return { status: res.statusCode, json: (await res.body.json()) as any };
}

async function until(what: string, ok: () => boolean): Promise<void> {
  for (let i = 0; i < 2000 && !ok(); i++) await new Promise((r) => setTimeout(r, 5));
  assert.ok(ok(), what);
}

test('a dead worker: its requests fail with WORKER_DIED, /health answers 503, the log names it, the other worker serves', async () => {
  const executor = server.runtime.executor as ParallelExecutor;
  assert.equal((await http(`${server.url}/health`)).statusCode, 200);

  // A stream on worker 0 (the first sequence goes to the first of two idle workers): killed after its first token.
  const res = await http(`${server.url}/generate_stream`, { method: 'POST', body: JSON.stringify(long), headers: { 'content-type': 'application/json' } });
  assert.equal(res.statusCode, 200);
  let body = '';
  let killed: Promise<void> | null = null;
  for await (const chunk of res.body) {
    body += chunk;
    killed ??= executor.terminateWorker(0);
  }
  await killed;
  const events = body.split('\n\n').filter((f) => f.startsWith('data:')).map((f) => JSON.parse(f.slice(5)));
  assert.ok(events.length < 1000, 'the stream ended early');
  assert.equal(events.at(-1).code, 'WORKER_DIED');
  assert.equal(events.at(-1).error_type, 'backend');

  for (const method of ['GET', 'HEAD'] as const) {
    const health = await http(`${server.url}/health`, { method });
    assert.equal(health.statusCode, 503, method);
    if (method === 'GET') assert.equal(((await health.body.json()) as any).code, 'WORKER_DIED');
    else await health.body.dump();
  }
  const died = server.lines.find((l) => /executor worker 0 of 2 died/.test(l.msg));
  assert.ok(died, 'the log names the worker');
  assert.equal(died.level, 50, 'logged as an error');

  // Worker 1 still serves new requests.
  const ok = await post('/generate', { inputs: 'Hi', parameters: { max_new_tokens: 3 } });
  assert.equal(ok.status, 200, JSON.stringify(ok.json));

  // A request in flight on the last worker answers 503 WORKER_DIED (not a hang) when it dies; so does the next one.
  const inFlight = post('/generate', long);
  await until('the request is running', () => server.runtime.engine.stats().running === 1);
  await executor.terminateWorker(1);
  const failed = await inFlight;
  assert.equal(failed.status, 503);
  assert.equal(failed.json.code, 'WORKER_DIED');
  const none = await post('/generate', { inputs: 'Hi', parameters: { max_new_tokens: 3 } });
  assert.equal(none.status, 503);
  assert.equal(none.json.code, 'WORKER_DIED');
  assert.ok(server.lines.some((l) => /executor worker 1 of 2 died/.test(l.msg)));
});
