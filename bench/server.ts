/**
 * The server under test: the real `src/server/main.ts` in a child process, started with the given
 * flags on a free port, awaited through GET /health, and stopped with SIGTERM (SIGKILL after 10 s).
 * Its output goes to a log file so a failed start can say why.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { createWriteStream, mkdirSync, readFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { join } from 'node:path';
import { ApiClient } from './client.ts';

export const SERVER_ENTRY = 'src/server/main.ts';

export interface ServerFlags {
  readonly [flag: string]: string | number;
}

export interface BenchServer {
  readonly api: ApiClient;
  readonly pid: number;
  readonly logFile: string;
  /** Seconds from spawn to the first healthy /health. */
  readonly startSeconds: number;
  stop(): Promise<void>;
  /** SIGKILL, without waiting. */
  kill(): void;
}

/** A TCP port free on 127.0.0.1 right now. */
export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer().listen(0, '127.0.0.1', () => {
      const { port } = s.address() as { port: number };
      s.close(() => resolve(port));
    }).on('error', reject);
  });
}

/** Children still running; killed if the harness exits early (Ctrl-C, crash). */
const live = new Set<ChildProcess>();
process.once('exit', () => {
  for (const child of live) child.kill('SIGKILL');
});

const exited = (child: ChildProcess) => new Promise<void>((resolve) => {
  if (child.exitCode !== null || child.signalCode !== null) resolve();
  else child.once('exit', () => resolve());
});

function tail(file: string, lines = 20): string {
  try {
    return readFileSync(file, 'utf8').trimEnd().split('\n').slice(-lines).join('\n');
  } catch {
    return '';
  }
}

/** Starts the server with `flags` (`--name value` each) and waits until it is healthy (timeout 5 min). */
export async function startServer(flags: ServerFlags, logDir: string, name: string): Promise<BenchServer> {
  const port = await freePort();
  const args = Object.entries({ host: '127.0.0.1', port, ...flags }).flatMap(([k, v]) => [`--${k}`, String(v)]);
  mkdirSync(logDir, { recursive: true });
  const logFile = join(logDir, `${name}.log`);
  const log = createWriteStream(logFile);
  log.write(`$ node --import tsx ${SERVER_ENTRY} ${args.join(' ')}\n`);
  const t0 = performance.now();
  const child = spawn(process.execPath, ['--import', 'tsx', SERVER_ENTRY, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  child.stdout!.pipe(log, { end: false });
  child.stderr!.pipe(log, { end: false });
  live.add(child);
  const done = exited(child).then(() => void live.delete(child));
  const api = new ApiClient(`http://127.0.0.1:${port}`);

  const stop = async () => {
    if (child.exitCode === null && child.signalCode === null) {
      child.kill('SIGTERM');
      const timer = setTimeout(() => child.kill('SIGKILL'), 10_000);
      await done;
      clearTimeout(timer);
    }
    await api.close();
    log.end();
  };

  const deadline = t0 + 300_000;
  for (;;) {
    if (child.exitCode !== null || child.signalCode !== null) {
      await stop();
      throw new Error(`the server exited (${child.exitCode ?? child.signalCode}) before it was healthy; ${logFile}:\n${tail(logFile)}`);
    }
    try {
      await api.json('GET', '/health');
      break;
    } catch {
      if (performance.now() > deadline) {
        await stop();
        throw new Error(`the server was not healthy within 5 minutes; ${logFile}:\n${tail(logFile)}`);
      }
      await new Promise((r) => setTimeout(r, 250));
    }
  }
  return { api, pid: child.pid!, logFile, startSeconds: (performance.now() - t0) / 1000, stop, kill: () => void child.kill('SIGKILL') };
}
