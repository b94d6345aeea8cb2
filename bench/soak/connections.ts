/**
 * Clients that misbehave at the connection level: slow senders, readers that stop reading, bodies over the limits,
 * and bursts far over the queue. The server must keep serving everyone else, answer with its coded errors and let
 * go of what such clients hold.
 */
import { setMaxListeners } from 'node:events';
import { readFileSync } from 'node:fs';
import { connect, type Socket } from 'node:net';
import { Pool } from 'undici';
import {
  adapterBytes, freshDir, multipartBody, placeAdapter, PROMPTS, requestHead, rssBytes, SoakClient, SoloAnswers, startSoakServer, type Answer,
} from './harness.ts';
import { percentile, round, sleep, slope, Violations, type Scenario } from './scenario.ts';

/** The slow-client server's connection timeouts, seconds. */
const TIMEOUTS = { headers: 3, body: 5, keepAlive: 2, stall: 2 } as const;
/** How late after its timeout a connection may still be closed: Node checks every second at most, and the machine is shared. */
const CLOSE_SLACK_S = 3;

type SlowKind = 'headers byte by byte' | 'body byte by byte' | 'silent';

interface SlowConnection {
  readonly kind: SlowKind;
  /** Seconds from connecting to the server closing the connection; NaN while open. */
  closedAfter: number;
  /** The first bytes the server sent (a 408 ...). */
  received: string;
}

/**
 * Opens a connection of `kind` and returns at once; the connection dribbles its request (a byte every 250 ms) or
 * sends nothing until the server closes it or `cancel` is called.
 */
function slowConnection(url: string, kind: SlowKind, cancel: AbortSignal): { conn: SlowConnection; closed: Promise<void> } {
  const { hostname, port } = new URL(url);
  const host = `${hostname}:${port}`;
  const conn: SlowConnection = { kind, closedAfter: NaN, received: '' };
  const t0 = performance.now();
  const socket: Socket = connect(Number(port), hostname);
  socket.on('error', () => {});
  const body = JSON.stringify({ inputs: PROMPTS[0], parameters: { max_new_tokens: 4 } });
  let pending = '';
  let timer: NodeJS.Timeout | undefined;
  const dribble = () => {
    if (pending.length === 0 || socket.destroyed) return;
    socket.write(pending[0]!);
    pending = pending.slice(1);
    timer = setTimeout(dribble, 250);
  };
  socket.once('connect', () => {
    if (kind === 'headers byte by byte') {
      pending = requestHead('POST', '/generate', host, { 'content-type': 'application/json', 'content-length': body.length }) + body;
      dribble();
    } else if (kind === 'body byte by byte') {
      socket.write(requestHead('POST', '/generate', host, { 'content-type': 'application/json', 'content-length': body.length }));
      pending = body;
      dribble();
    }
  });
  socket.on('data', (chunk: Buffer) => void (conn.received ||= chunk.subarray(0, 40).toString()));
  const closed = new Promise<void>((resolve) => {
    socket.once('close', () => {
      clearTimeout(timer);
      if (!cancel.aborted) conn.closedAfter = (performance.now() - t0) / 1000;
      resolve();
    });
  });
  const onAbort = () => socket.destroy();
  cancel.addEventListener('abort', onAbort, { once: true });
  void closed.then(() => cancel.removeEventListener('abort', onAbort));
  return { conn, closed };
}

/**
 * A stream reader that reads the response head and then nothing: a stream of `tokens` tokens with 5 alternatives
 * per token (~500 bytes an event). `resume()` reads the rest until the connection ends and says whether the stream was
 * complete (its last event carries `generated_text`) or cut by the server.
 */
function stalledReader(url: string, tokens: number): { resume(): Promise<{ complete: boolean; endedAfter: number }> } {
  const { hostname, port } = new URL(url);
  const socket: Socket = connect(Number(port), hostname);
  socket.on('error', () => {});
  let text = '';
  let ended = false;
  const end = new Promise<void>((resolve) => socket.once('close', () => resolve()));
  void end.then(() => (ended = true));
  const stream = JSON.stringify({ inputs: PROMPTS[1], parameters: { max_new_tokens: tokens, ignore_eos: true, top_n_tokens: 5, details: true } });
  socket.once('connect', () => socket.write(requestHead('POST', '/generate_stream', `${hostname}:${port}`, { 'content-type': 'application/json', 'content-length': stream.length }) + stream));
  socket.once('data', (chunk: Buffer) => {
    text += chunk.toString();
    socket.pause();
    socket.on('data', (c: Buffer) => void (text += c.toString()));
  });
  return {
    async resume() {
      const t0 = performance.now();
      socket.resume();
      await Promise.race([end, sleep(10_000)]);
      const endedAfter = ended ? (performance.now() - t0) / 1000 : NaN;
      socket.destroy();
      return { complete: text.includes('"generated_text":"'), endedAfter };
    },
  };
}

/** Latencies (seconds) of `count` base-model generations, `concurrency` at a time; non-200s are returned too. */
async function latencies(client: SoakClient, count: number, concurrency: number): Promise<{ seconds: number[]; bad: Answer[] }> {
  const seconds: number[] = [];
  const bad: Answer[] = [];
  let next = 0;
  await Promise.all(Array.from({ length: concurrency }, async () => {
    while (next < count) {
      const a = await client.generate(PROMPTS[next++ % PROMPTS.length]!, null);
      if (a.status === 200) seconds.push(a.seconds);
      else bad.push(a);
    }
  }));
  return { seconds, bad };
}

export const slowClients: Scenario = {
  name: 'slow clients',
  criterion: `hundreds of connections sending headers or bodies a byte every 250 ms, or nothing: other clients' p95 latency stays within 2× of idle, and the server closes each such connection within its timeout (--headers-timeout ${TIMEOUTS.headers}, --body-timeout ${TIMEOUTS.body} s) plus ${CLOSE_SLACK_S} s; then streams whose readers never read (--stream-stall-timeout ${TIMEOUTS.stall}, --keep-alive-timeout ${TIMEOUTS.keepAlive} s): their requests end, no request is left running, and the server has closed their connections`,
  async run(ctx) {
    const v = new Violations();
    const slowCount = ctx.size === 'short' ? 120 : 400;
    const stalledCount = ctx.size === 'short' ? 4 : 8;
    const measured = ctx.size === 'short' ? 30 : 200;
    const dir = await freshDir(ctx.workDir, 'slow-clients');
    const server = await startSoakServer(ctx, 'slow-clients', dir, {
      'headers-timeout': TIMEOUTS.headers, 'body-timeout': TIMEOUTS.body, 'keep-alive-timeout': TIMEOUTS.keepAlive, 'stream-stall-timeout': TIMEOUTS.stall,
    });
    const client = new SoakClient(server.api.url, 8);
    try {
      await latencies(client, 8, 4); // warm-up
      const idle = await latencies(client, measured, 4);
      const rssBefore = rssBytes(server.pid);

      // Slow connections are kept open (each replaced when the server closes it) while the latency is measured again.
      const kinds: SlowKind[] = ['headers byte by byte', 'body byte by byte', 'silent'];
      const cancel = new AbortController();
      setMaxListeners(0, cancel.signal); // one listener per open slow connection
      const conns: SlowConnection[] = [];
      const closing: Promise<void>[] = [];
      let measuring = true;
      const keepOpen = async (kind: SlowKind) => {
        while (measuring) {
          const c = slowConnection(server.api.url, kind, cancel.signal);
          conns.push(c.conn);
          closing.push(c.closed);
          await c.closed;
        }
      };
      const slots = Array.from({ length: slowCount }, (_, i) => keepOpen(kinds[i % kinds.length]!));
      await sleep(500);
      const loaded = await latencies(client, measured, 4);
      measuring = false;
      // Stalled readers come after the latency is measured: their generations are real work, which would count
      // against the other clients' latency for a reason other than slow connections.
      const stalled = Array.from({ length: stalledCount }, () => stalledReader(server.api.url, ctx.size === 'short' ? 200 : 500));
      const stalledSince = performance.now();
      // The last connection of every slot must be closed by the server; give each its timeout and the slack.
      const deadline = setTimeout(() => cancel.abort(), (Math.max(TIMEOUTS.headers, TIMEOUTS.body) + CLOSE_SLACK_S + 30) * 1000);
      await Promise.all(slots);
      clearTimeout(deadline);
      await Promise.all(closing);
      // The stalled readers still read nothing: their requests must end (cancelled, or finished into socket buffers).
      let running = await client.metric('lora_serve_requests_running');
      while (running > 0 && performance.now() - stalledSince < 180_000) {
        await sleep(500);
        running = await client.metric('lora_serve_requests_running');
      }
      const releasedAfter = (performance.now() - stalledSince) / 1000;
      const readers = await Promise.all(stalled.map((r) => r.resume()));
      const rssAfter = rssBytes(server.pid);

      for (const a of [...idle.bad, ...loaded.bad]) v.add('other client failed', `${a.status} ${a.code ?? a.failure ?? ''}`);
      const p95Idle = percentile(idle.seconds, 95);
      const p95Loaded = percentile(loaded.seconds, 95);
      v.check(p95Loaded <= 2 * p95Idle, 'p95 over 2× idle', () => `${round(p95Loaded)} s vs ${round(p95Idle)} s idle`);
      const limit: Record<SlowKind, number> = { 'headers byte by byte': TIMEOUTS.headers, 'body byte by byte': TIMEOUTS.body, silent: TIMEOUTS.headers };
      const figures: Record<string, number | string> = {
        'slow connections open at once': slowCount, 'other clients\' requests': 2 * measured,
        'p95 idle s': round(p95Idle), 'p95 with slow clients s': round(p95Loaded), 'p95 ratio': round(p95Loaded / p95Idle, 2),
      };
      for (const kind of kinds) {
        const of = conns.filter((c) => c.kind === kind);
        const open = of.filter((c) => Number.isNaN(c.closedAfter));
        v.check(open.length === 0, 'not closed by the server', () => `${open.length} ${kind} connections were still open ${CLOSE_SLACK_S + 30} s after the last`);
        const after = of.map((c) => c.closedAfter).filter((x) => !Number.isNaN(x));
        const late = after.filter((s) => s > limit[kind] + CLOSE_SLACK_S);
        v.check(late.length === 0, 'closed late', () => `${late.length} ${kind} connections after ${round(Math.max(...late), 1)} s`);
        figures[`${kind}: connections`] = of.length;
        figures[`${kind}: closed after s (max)`] = round(Math.max(...after), 1);
        figures[`${kind}: answered 408 first`] = of.filter((c) => c.received.startsWith('HTTP/1.1 408')).length;
      }
      const notEnded = readers.filter((r) => Number.isNaN(r.endedAfter)).length;
      v.check(notEnded === 0, 'stalled reader\'s connection still open', () => `${notEnded} of ${stalledCount} did not end within 10 s of reading again`);
      figures['stalled readers'] = stalledCount;
      figures['stalled readers: requests released after s'] = round(releasedAfter, 1);
      figures['stalled readers: streams cut by the server'] = readers.filter((r) => !r.complete).length;
      figures['stalled readers: streams complete in socket buffers'] = readers.filter((r) => r.complete).length;
      const log = readFileSync(server.logFile, 'utf8');
      figures['streams cancelled for stalling (server log)'] = log.split('the client read nothing').length - 1;
      v.check(running === 0, 'requests left running', () => `lora_serve_requests_running ${running} after 180 s`);
      figures['requests running after'] = running;
      figures['RSS before MiB'] = round(rssBefore / 2 ** 20, 1);
      figures['RSS after MiB'] = round(rssAfter / 2 ** 20, 1);
      return v.result(this, figures, ['p95 latency is timed on the machine of the run; a shared machine makes the ratio noisy.']);
    } finally {
      await client.close();
      await server.stop();
    }
  },
};

/** Sends `body` with undici (a real client, writing the whole body while the server answers) and returns the answer. */
async function post(url: string, path: string, body: Buffer, contentType: string): Promise<Answer> {
  const pool = new Pool(url, { connections: 1 });
  const t0 = performance.now();
  try {
    const res = await pool.request({ method: path.startsWith('/adapters/') ? 'PUT' : 'POST', path, headers: { 'content-type': contentType }, body });
    const text = await res.body.text();
    let code: string | undefined;
    try {
      code = (JSON.parse(text) as { code?: string }).code;
    } catch {
      code = undefined;
    }
    return { status: res.statusCode, code, text, seconds: (performance.now() - t0) / 1000, headers: res.headers };
  } catch (err) {
    return { status: 0, seconds: (performance.now() - t0) / 1000, headers: {}, failure: (err as Error).message };
  } finally {
    await pool.destroy();
  }
}

export const oversizedBodies: Scenario = {
  name: 'oversized bodies',
  criterion: 'a 60 MB JSON body against the 4 MiB limit and a 16 MiB upload against --max-adapter-bytes 1MiB, sent whole by undici: the client receives the 413 with its code (PAYLOAD_TOO_LARGE, ADAPTER_TOO_LARGE) every time, and the server answers correctly afterwards',
  async run(ctx) {
    const v = new Violations();
    const tries = ctx.size === 'short' ? 3 : 20;
    const dir = await freshDir(ctx.workDir, 'oversized');
    const files = await adapterBytes(ctx.workDir, { seed: 701 });
    await placeAdapter(dir, 'small', files);
    const server = await startSoakServer(ctx, 'oversized', dir, { 'max-adapter-bytes': '1MiB' });
    const client = new SoakClient(server.api.url);
    try {
      const solo = new SoloAnswers();
      await solo.record(client, 'small', 'small');
      const json = Buffer.alloc(60 * 10 ** 6, ' ');
      json.write(`{"inputs":"${'x'.repeat(1000)}`, 0);
      const upload = multipartBody(files, Buffer.alloc(16 * 2 ** 20, 7));
      const seconds: number[] = [];
      for (let i = 0; i < tries; i++) {
        const a = await post(server.api.url, '/generate', json, 'application/json');
        v.check(a.status === 413 && a.code === 'PAYLOAD_TOO_LARGE', '60 MB JSON not a coded 413', () => `${a.status} ${a.code ?? a.failure ?? ''}`);
        const b = await post(server.api.url, '/adapters/too-big', upload.body, upload.contentType);
        v.check(b.status === 413 && b.code === 'ADAPTER_TOO_LARGE', 'upload not a coded 413', () => `${b.status} ${b.code ?? b.failure ?? ''}`);
        seconds.push(a.seconds, b.seconds);
        const ok = await client.generate(PROMPTS[i % PROMPTS.length]!, 'small');
        v.check(ok.status === 200 && ok.text === solo.get('small', PROMPTS[i % PROMPTS.length]!), 'wrong answer afterwards', () => `${ok.status} ${JSON.stringify(ok.text)}`);
      }
      const listed = await client.json<{ adapters: { id: string }[] }>('/adapters');
      v.check(!listed.adapters.some((a) => a.id === 'too-big'), 'refused upload stored', () => 'too-big is listed');
      return v.result(this, { 'oversized requests': 2 * tries, 'slowest 413 s': round(Math.max(...seconds), 2) });
    } finally {
      await client.close();
      await server.stop();
    }
  },
};

export const bursts: Scenario = {
  name: 'bursts',
  criterion: '10× --max-queue requests of 16 tokens at once, repeatedly (--max-queue 8, --max-batch-size 8, --lora-mode unmerged): every refusal is a coded 429 with Retry-After, answered faster than the accepted requests\' median; every accepted request completes with its solo answer; RSS after the last burst within 5 % of after the first, TensorFlow.js tensors back to their count',
  async run(ctx) {
    const v = new Violations();
    const rounds = ctx.size === 'short' ? 4 : 30;
    const maxQueue = 8;
    const dir = await freshDir(ctx.workDir, 'bursts');
    await placeAdapter(dir, 'burst', await adapterBytes(ctx.workDir, { seed: 801 }));
    // Unmerged LoRA: a run of adapter-only steps would otherwise merge the adapter into cached weights, which the
    // tensor count would see as growth.
    const server = await startSoakServer(ctx, 'bursts', dir, { 'max-queue': maxQueue, 'max-batch-size': 8, 'lora-mode': 'unmerged' });
    const client = new SoakClient(server.api.url, 10 * maxQueue + 8);
    try {
      // Answers long enough (16 tokens) that an accepted request takes many engine steps, and a refusal waits at most
      // for the step in progress: the two latencies stay apart on a loaded machine.
      const tokens = { maxNewTokens: 16 };
      const solo = new SoloAnswers();
      await solo.record(client, 'base', null, tokens);
      await solo.record(client, 'burst', 'burst', tokens);
      const rejected: number[] = [];
      const accepted: number[] = [];
      const rss: [number, number][] = [];
      let tensors0 = NaN;
      let tensorsMax = 0;
      for (let r = 0; r < rounds; r++) {
        const answers = await Promise.all(Array.from({ length: 10 * maxQueue }, async (_, i) => {
          const adapter = i % 2 ? 'burst' : null;
          const prompt = PROMPTS[i % PROMPTS.length]!;
          return { adapter, prompt, a: await client.generate(prompt, adapter, { ...tokens, stream: i % 4 === 1 }) };
        }));
        for (const { adapter, prompt, a } of answers) {
          if (a.status === 429) {
            rejected.push(a.seconds);
            v.check(a.code === 'OVERLOADED', '429 without its code', () => String(a.code));
            v.check(Number(a.headers['retry-after']) > 0, '429 without Retry-After', () => String(a.headers['retry-after']));
          } else if (v.check(a.status === 200 && a.code === undefined, 'neither 200 nor 429', () => `${a.status} ${a.code ?? a.failure ?? ''}`)) {
            accepted.push(a.seconds);
            v.check(a.text === solo.get(adapter ?? 'base', prompt), 'wrong answer', () => `${adapter ?? 'base'} "${prompt}": ${JSON.stringify(a.text)}`);
          }
        }
        rss.push([r, rssBytes(server.pid)]);
        const tensors = await client.metric('lora_serve_tfjs_tensors');
        if (r === 0) tensors0 = tensors;
        tensorsMax = Math.max(tensorsMax, tensors);
      }
      v.check(rejected.length > 0, 'no burst was refused', () => `${accepted.length} accepted`);
      const p95Rejected = percentile(rejected, 95);
      const p50Accepted = percentile(accepted, 50);
      v.check(p95Rejected < p50Accepted, '429s not immediate', () => `p95 ${round(p95Rejected)} s vs accepted p50 ${round(p50Accepted)} s`);
      const growth = rss[rss.length - 1]![1] / rss[0]![1] - 1;
      v.check(growth <= 0.05, 'memory growth', () => `RSS +${round(100 * growth, 1)} % from the first burst to the last`);
      v.check(tensorsMax === tensors0, 'tensor growth', () => `${tensors0} after the first burst, up to ${tensorsMax}`);
      return v.result(this, {
        bursts: rounds, 'requests per burst': 10 * maxQueue, accepted: accepted.length, 'refused 429': rejected.length,
        '429 p95 s': round(p95Rejected), 'accepted p50 s': round(p50Accepted),
        'RSS after first burst MiB': round(rss[0]![1] / 2 ** 20, 1), 'RSS after last burst MiB': round(rss[rss.length - 1]![1] / 2 ** 20, 1),
        'RSS slope MiB per burst': round(slope(rss) / 2 ** 20, 3), 'tfjs tensors after first burst': tensors0, 'tfjs tensors max after a burst': tensorsMax,
      }, ['429 latency and RSS are measured on the machine of the run; a shared machine makes them noisy.']);
    } finally {
      await client.close();
      await server.stop();
    }
  },
};
