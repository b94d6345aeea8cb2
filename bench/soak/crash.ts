/**
 * `kill -9` of the server in the middle of uploads and of adapter loads, then a restart on the same adapter
 * folder: what the folder holds afterwards must be whole versions only, and the server must start and serve them.
 */
import { promises as fs } from 'node:fs';
import { connect, type Socket } from 'node:net';
import { join } from 'node:path';
import type { BenchServer } from '../server.ts';
import {
  adapterBytes, freshDir, multipartBody, placeAdapter, PROMPTS, requestHead, SoakClient, SoloAnswers, startSoakServer, type AdapterBytes,
} from './harness.ts';
import { round, sleep, Violations, type Scenario, type ScenarioContext } from './scenario.ts';

/** SIGKILL, then wait for the process to be gone. */
async function kill9(server: BenchServer): Promise<void> {
  process.kill(server.pid, 'SIGKILL');
  await server.stop();
}

/** Opens a connection and sends an upload's head and the first `fraction` of its body, then holds it open. */
async function partialUpload(url: string, id: string, files: AdapterBytes, fraction: number): Promise<Socket> {
  const { hostname, port } = new URL(url);
  const { body, contentType } = multipartBody(files);
  const socket = connect(Number(port), hostname);
  socket.on('error', () => {});
  await new Promise<void>((resolve) => socket.once('connect', resolve));
  socket.write(requestHead('PUT', `/adapters/${id}`, `${hostname}:${port}`, { 'content-type': contentType, 'content-length': body.length }));
  await new Promise<void>((resolve) => socket.write(body.subarray(0, Math.floor(body.length * fraction)), () => resolve()));
  return socket;
}

/** Entries of the adapter folder: adapter ids (folders without a leading dot) and everything else. */
async function folderEntries(dir: string): Promise<{ ids: string[]; other: string[]; bytes: number }> {
  const ids: string[] = [];
  const other: string[] = [];
  let bytes = 0;
  for (const e of await fs.readdir(dir, { withFileTypes: true })) {
    if (e.isDirectory() && !e.name.startsWith('.')) ids.push(e.name);
    else other.push(e.name);
    if (e.isDirectory()) {
      for (const f of await fs.readdir(join(dir, e.name))) bytes += (await fs.stat(join(dir, e.name, f))).size;
    }
  }
  return { ids, other, bytes };
}

/** The label among `labels` whose solo answers `adapter` gives to every prompt, or the answers when none. */
async function whichVersion(client: SoakClient, solo: SoloAnswers, adapter: string, labels: readonly string[]): Promise<string> {
  const got: string[] = [];
  for (const p of PROMPTS) {
    const a = await client.generate(p, adapter);
    if (a.status !== 200) return `${a.status} ${a.code ?? a.failure ?? ''}`;
    got.push(a.text!);
  }
  return labels.find((l) => PROMPTS.every((p, i) => solo.get(l, p) === got[i])) ?? `no whole version: ${JSON.stringify(got)}`;
}

export const killDuringUploads: Scenario = {
  name: 'kill -9 during uploads',
  criterion: 'SIGKILL while uploads run (a replacement of an existing id and new ids; bodies half sent, and uploads racing the kill), then a restart on the same folder: the existing id serves a whole version (the old one when the bodies were cut), a new id is absent or whole (absent when its body was cut), no temp folder is listed or left in the folder, the folder holds no more than its adapters',
  async run(ctx) {
    const v = new Violations();
    const rounds = ctx.size === 'short' ? 2 : 8;
    const dir = await freshDir(ctx.workDir, 'kill-uploads');
    // Large adapters (all-linear, r 64: ~4.7 MB) so that a kill lands inside a write more often.
    const [old, next, fresh] = await Promise.all([401, 402, 403].map((seed) => adapterBytes(ctx.workDir, { seed, r: 64, targetModules: 'all-linear' })));
    await placeAdapter(dir, 'keep', old!);
    const solo = new SoloAnswers();
    let server = await startSoakServer(ctx, 'kill-uploads-0', dir);
    let client = new SoakClient(server.api.url);
    await solo.record(client, 'old', 'keep');
    for (const [label, files] of [['new', next!], ['fresh', fresh!]] as const) {
      await client.upload(`probe-${label}`, files);
      await solo.record(client, label, `probe-${label}`);
      await client.remove(`probe-${label}`);
    }
    for (const c of solo.collisions(['old', 'new', 'fresh'])) v.add('indistinguishable solo answers', c);
    const kept: Record<string, number> = {};
    let freshWhole = 0;
    let freshAbsent = 0;
    let restartSeconds = 0;
    try {
      for (let r = 1; r <= rounds; r++) {
        // Odd rounds cut bodies in the middle; even rounds race whole uploads against the kill.
        const cut = r % 2 === 1;
        const reset = await client.upload('keep', old!);
        v.check(reset.status === 200, 'setup', () => `reset of keep: ${reset.status}`);
        const freshId = `fresh-${r}`;
        let keepCompleted = false;
        let freshCompleted = false;
        if (cut) {
          const sockets = await Promise.all([partialUpload(server.api.url, 'keep', next!, 0.5), partialUpload(server.api.url, freshId, fresh!, 0.5)]);
          await sleep(200);
          await kill9(server);
          for (const s of sockets) s.destroy();
        } else {
          let stop = false;
          const racer = async (id: string, files: AdapterBytes, done: () => void) => {
            while (!stop) {
              if ((await client.upload(id, files)).status === 200 && !stop) done();
            }
          };
          const racing = [racer('keep', next!, () => (keepCompleted = true)), racer(freshId, fresh!, () => (freshCompleted = true))];
          await sleep(50 + Math.random() * 400);
          stop = true;
          await kill9(server);
          await Promise.all(racing);
        }
        await client.close();
        const t0 = performance.now();
        server = await startSoakServer(ctx, `kill-uploads-${r}`, dir);
        restartSeconds = Math.max(restartSeconds, (performance.now() - t0) / 1000);
        client = new SoakClient(server.api.url);

        const listed = (await client.json<{ adapters: { id: string }[] }>('/adapters')).adapters.map((a) => a.id);
        v.check(listed.every((id) => id === 'keep' || /^fresh-\d+$/.test(id)), 'unexpected adapter listed', () => listed.join(', '));
        const keep = await whichVersion(client, solo, 'keep', ['old', 'new']);
        kept[keep] = (kept[keep] ?? 0) + 1;
        v.check(keep === 'old' || (keep === 'new' && !cut), 'existing id not intact', () => `round ${r} (${cut ? 'cut bodies' : 'racing'}): keep answers ${keep}`);
        if (listed.includes(freshId)) {
          const f = await whichVersion(client, solo, freshId, ['fresh']);
          v.check(f === 'fresh' && !cut, 'new id present', () => `round ${r} (${cut ? 'cut bodies' : 'racing'}): ${freshId} answers ${f}`);
          freshWhole++;
        } else {
          v.check(!freshCompleted, 'completed upload lost', () => `round ${r}: ${freshId} got 200 before the kill but is absent`);
          const a = await client.generate(PROMPTS[0], freshId);
          v.check(a.status === 404 && a.code === 'ADAPTER_NOT_FOUND', 'absent id not a coded 404', () => `${a.status} ${a.code ?? a.failure ?? ''}`);
          freshAbsent++;
        }
        if (keepCompleted) kept['(an upload of the new version completed before the kill)'] = (kept['(an upload of the new version completed before the kill)'] ?? 0) + 1;
        const entries = await folderEntries(dir);
        v.check(entries.other.length === 0, 'temp entries left', () => `round ${r}: ${entries.other.join(', ')}`);
        const expected = entries.ids.length * old!.weights.length * 1.01;
        v.check(entries.bytes <= expected, 'folder grew', () => `round ${r}: ${entries.bytes} bytes for ${entries.ids.length} adapters`);
      }
      const entries = await folderEntries(dir);
      return v.result(this, {
        rounds, 'rounds with cut bodies': Math.ceil(rounds / 2), 'rounds racing the kill': Math.floor(rounds / 2),
        ...Object.fromEntries(Object.entries(kept).map(([k, n]) => [`existing id after restart: ${k}`, n])),
        'new id whole after restart': freshWhole, 'new id absent after restart': freshAbsent,
        'adapters in the folder at the end': entries.ids.length, 'other entries in the folder at the end': entries.other.length,
        'slowest restart seconds': round(restartSeconds, 1),
      });
    } finally {
      await client.close();
      await server.stop();
    }
  },
};

export const killDuringLoads: Scenario = {
  name: 'kill -9 during loads',
  criterion: 'SIGKILL while adapters load (a device tier of 2 over more adapters) and requests run, then a restart: the server starts, lists every stored adapter, and each answers its solo answers as before',
  async run(ctx: ScenarioContext) {
    const v = new Violations();
    const rounds = ctx.size === 'short' ? 1 : 6;
    const count = ctx.size === 'short' ? 4 : 12;
    const dir = await freshDir(ctx.workDir, 'kill-loads');
    const ids = Array.from({ length: count }, (_, i) => `load-${i}`);
    for (const [i, id] of ids.entries()) await placeAdapter(dir, id, await adapterBytes(ctx.workDir, { seed: 500 + i, r: i % 2 ? 16 : 8 }));
    const flags = { 'max-loaded-adapters': 2 };
    let server = await startSoakServer(ctx, 'kill-loads-0', dir, flags);
    let client = new SoakClient(server.api.url);
    const solo = new SoloAnswers();
    for (const id of ids) await solo.record(client, id, id);
    let inFlight = 0;
    let restartSeconds = 0;
    let checked = 0;
    try {
      for (let r = 1; r <= rounds; r++) {
        let stop = false;
        const started = new Set<number>();
        let n = 0;
        const traffic = Array.from({ length: 8 }, async (_, w) => {
          while (!stop) {
            const k = n++;
            started.add(k);
            if (w === 0) await client.pool.request({ method: 'POST', path: `/adapters/${ids[k % count]}/load` }).then((res) => res.body.dump(), () => {});
            else await client.generate(PROMPTS[k % PROMPTS.length]!, ids[k % count]!, { stream: k % 2 === 0 });
            started.delete(k);
          }
        });
        await sleep(300 + Math.random() * 1200);
        inFlight += started.size;
        stop = true;
        await kill9(server);
        await Promise.all(traffic);
        await client.close();
        const t0 = performance.now();
        server = await startSoakServer(ctx, `kill-loads-${r}`, dir, flags);
        restartSeconds = Math.max(restartSeconds, (performance.now() - t0) / 1000);
        client = new SoakClient(server.api.url);
        const listed = (await client.json<{ adapters: { id: string; state: string }[] }>('/adapters')).adapters;
        v.check(ids.every((id) => listed.some((a) => a.id === id)), 'stored adapter not listed', () => `round ${r}: listed ${listed.map((a) => a.id).join(', ')}`);
        v.check(listed.every((a) => a.state !== 'failed'), 'adapter failed', () => `round ${r}: ${JSON.stringify(listed.filter((a) => a.state === 'failed'))}`);
        // Every adapter answers, each on one prompt (a different one each round).
        for (const [i, id] of ids.entries()) {
          const p = PROMPTS[(i + r) % PROMPTS.length]!;
          const a = await client.generate(p, id);
          checked++;
          v.check(a.status === 200 && a.text === solo.get(id, p), 'answer differs after restart', () => `round ${r}, ${id}: ${a.status} ${a.code ?? ''} ${JSON.stringify(a.text)}`);
        }
      }
      return v.result(this, {
        rounds, adapters: count, 'device tier (adapters)': 2, 'requests in flight at the kills': inFlight,
        'answers checked after restarts': checked, 'slowest restart seconds': round(restartSeconds, 1),
      });
    } finally {
      await client.close();
      await server.stop();
    }
  },
};
