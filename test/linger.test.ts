/**
 * Oversized bodies: the client receives the coded 413 every time, even while it is still sending (src/server/linger.ts).
 * The client runs in another process, as real clients do: in one process the client's writes and the server's close
 * never race.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { build } from './helpers/app.ts';

const CLIENT = `
const [url, mb, times] = process.argv.slice(1);
const body = JSON.stringify({ inputs: 'x'.repeat(Number(mb) * 2 ** 20) });
const out = [];
for (let i = 0; i < Number(times); i++) {
  try {
    const r = await fetch(url, { method: 'POST', headers: { 'content-type': 'application/json' }, body });
    out.push({ status: r.status, code: (await r.json()).code });
  } catch (e) {
    out.push({ error: e.message + ' ' + (e.cause?.code ?? '') });
  }
}
console.log(JSON.stringify(out));
`;

test('a JSON body over the limit gets its 413 PAYLOAD_TOO_LARGE every time, not a reset connection', async () => {
  const s = await build({ options: { bodyLimitBytes: 4 * 2 ** 20 }, validate: false });
  const url = await s.app.listen({ port: 0, host: '127.0.0.1' });
  try {
    // Asynchronously: this process' event loop serves the requests.
    const child = spawn(process.execPath, ['--input-type=module', '-e', CLIENT, `${url}/generate`, '60', '6'], { stdio: ['ignore', 'pipe', 'inherit'] });
    let stdout = '';
    child.stdout.on('data', (d) => (stdout += d));
    await new Promise((resolve) => child.on('exit', resolve));
    const results = JSON.parse(stdout) as { status?: number; code?: string; error?: string }[];
    assert.deepEqual(results, Array.from({ length: 6 }, () => ({ status: 413, code: 'PAYLOAD_TOO_LARGE' })));
    // The server still serves.
    const ok = await fetch(`${url}/health`);
    assert.equal(ok.status, 200);
  } finally {
    await s.app.close();
  }
});

