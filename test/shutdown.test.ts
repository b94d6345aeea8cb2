/** The real entry point in a child process: --help, bad flags, and SIGTERM draining an in-flight stream. */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { request } from 'undici';
import { TINY_LLAMA, writeCheckpoint } from '../src/demo/index.ts';
import { tempDir } from './helpers/tf.ts';

const tmp = tempDir();
before(() => writeCheckpoint(join(tmp.dir, 'model'), TINY_LLAMA));
after(tmp.cleanup);

const MAIN = ['--import', 'tsx', 'src/server/main.ts'];

test('--help lists the flags; a bad flag exits 2 with a clear message', () => {
  const help = spawnSync(process.execPath, [...MAIN, '--help'], { encoding: 'utf8' });
  assert.equal(help.status, 0);
  for (const flag of ['--model', '--port', '--host', '--adapter-dir', '--backend', '--lora-mode', '--max-loaded-adapters']) assert.ok(help.stdout.includes(flag), flag);
  const bad = spawnSync(process.execPath, [...MAIN, '--backend', 'tpu'], { encoding: 'utf8' });
  assert.equal(bad.status, 2);
  assert.match(bad.stderr, /backend/);
});

test('SIGTERM: stops accepting, finishes the in-flight stream, exits 0; one JSON log line per event, a summary per request', async () => {
  const child = spawn(process.execPath, [...MAIN, '--model', join(tmp.dir, 'model'), '--adapter-dir', join(tmp.dir, 'adapters'),
    '--port', '0', '--backend', 'wasm', '--shutdown-grace', '20', '--log-level', 'info'], { stdio: ['ignore', 'pipe', 'pipe'] });
  const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
  let out = '';
  // It listens before the model loads (answering 503 meanwhile): the URL, once it logs that it is ready.
  const url = await new Promise<string>((resolve, reject) => {
    child.stdout.on('data', (d) => {
      out += d;
      const m = /"msg":"listening on (http:\/\/[^\s"]+)/.exec(out);
      if (m && /"msg":"ready"/.test(out)) resolve(m[1]!);
    });
    child.on('exit', () => reject(new Error(`server exited early: ${out}`)));
  });
  const res = await request(`${url}/generate_stream`, {
    method: 'POST', headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ inputs: 'drain me', parameters: { max_new_tokens: 60, ignore_eos: true } }),
  });
  let text = '';
  let signalled = false;
  let refused: Promise<string> | null = null;
  for await (const chunk of res.body) {
    text += chunk.toString();
    if (!signalled && text.includes('"token"')) {
      signalled = true;
      child.kill('SIGTERM');
      refused = refusedAfterSignal(url);
    }
  }
  const events = text.split('\n\n').filter((f) => f.startsWith('data:')).map((f) => JSON.parse(f.slice(5)));
  const last = events.at(-1);
  assert.ok(last.generated_text !== null && last.details, `stream did not finish: ${text.slice(-300)}`);
  assert.equal(last.details.finish_reason, 'length', 'the in-flight stream ran to its end, not cancelled');
  assert.equal(last.details.generated_tokens, 60);
  assert.match(await refused!, /^(ECONNREFUSED|ECONNRESET|EPIPE|503)$/, 'a new request after SIGTERM is refused');
  assert.equal(await exited, 0);

  const lines = out.trim().split('\n').map((l) => JSON.parse(l) as Record<string, any>);
  assert.ok(lines.every((l) => typeof l.time === 'string' && typeof l.level === 'number' && typeof l.msg === 'string'), 'every line is a pino JSON line');
  assert.ok(lines.some((l) => /^loaded llama from /.test(l.msg)), 'start-up messages go through the same logger');
  const summary = lines.find((l) => l.msg === 'request' && l.url === '/generate_stream');
  assert.ok(summary, out.slice(-2000));
  assert.deepEqual(
    { status: summary.status, adapter: summary.adapter, generated_tokens: summary.generated_tokens, finish_reason: summary.finish_reason },
    { status: 200, adapter: 'base', generated_tokens: 60, finish_reason: 'length' });
  assert.ok(summary.prompt_tokens > 0 && summary.queue_s >= 0 && summary.generation_s > 0 && summary.ms > 0, JSON.stringify(summary));
  assert.ok(!lines.some((l) => l.msg === 'incoming request' || l.msg === 'request completed'), 'one line per request, not fastify\'s two');
});

/**
 * Sends new generate requests after the signal until one is refused: the connection refused or reset, or a 503 while
 * closing. Never rejects (it runs beside the stream being read); what refused it, or why it is not refused.
 */
async function refusedAfterSignal(url: string): Promise<string> {
  for (let i = 0; i < 100; i++) {
    try {
      const r = await request(`${url}/generate`, {
        method: 'POST', headers: { 'content-type': 'application/json' }, reset: true,
        body: JSON.stringify({ inputs: 'late', parameters: { max_new_tokens: 1 } }),
      });
      await r.body.dump();
      if (r.statusCode === 503) return '503';
    } catch (err) {
      const code = (err as { code?: string }).code ?? '';
      if (code === 'ECONNREFUSED' || code === 'ECONNRESET' || code === 'EPIPE') return code;
      return `unexpected error: ${(err as Error).message}`;
    }
    await new Promise((r) => setTimeout(r, 20));
  }
  return 'still accepting after 2 s';
}

test('npm start: SIGTERM to npm reaches the server, which drains and exits (no orphaned node process)', async () => {
  const child = spawn('npm', ['start', '--silent', '--', '--model', join(tmp.dir, 'model'), '--adapter-dir', join(tmp.dir, 'adapters'),
    '--port', '0', '--backend', 'wasm', '--log-level', 'info'], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  const serverPid = await new Promise<number>((resolve, reject) => {
    child.stdout.on('data', (d) => {
      out += d;
      const m = /"pid":(\d+),[^\n]*"msg":"listening on /.exec(out);
      if (m) resolve(Number(m[1]));
    });
    child.on('exit', () => reject(new Error(`npm start exited early: ${out}`)));
  });
  assert.notEqual(serverPid, child.pid, 'the server is npm\'s child process');
  child.kill('SIGTERM');
  const alive = () => {
    try {
      process.kill(serverPid, 0);
      return true;
    } catch {
      return false;
    }
  };
  for (let i = 0; i < 100 && alive(); i++) await new Promise((r) => setTimeout(r, 100));
  const orphaned = alive();
  if (orphaned) process.kill(serverPid, 'SIGKILL'); // so a failure does not leave it running
  assert.equal(orphaned, false, `the server (pid ${serverPid}) outlived npm start`);
  assert.match(out, /"msg":"SIGTERM: draining/);
});
