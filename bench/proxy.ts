/**
 * The shipped proxy configurations run locally (deploy/): a proxy started in the foreground and awaited through
 * GET /health, and deploy/haproxy/haproxy.cfg with only its listen address and replica addresses substituted (and,
 * for a baseline, its balance algorithm). Used by the scale-out bench case and test/deploy.test.ts.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { request } from 'undici';

export const HAPROXY_CFG = new URL('../deploy/haproxy/haproxy.cfg', import.meta.url);

/** Whether `cmd` is on the PATH. */
export function installed(cmd: string): boolean {
  return spawnSync('sh', ['-c', `command -v ${cmd}`]).status === 0;
}

/**
 * The shipped configuration listening on 127.0.0.1:`port` with its `server` lines pointing, in order, at
 * `replicas` (host:port). `balance` replaces the hash on the adapter (e.g. 'roundrobin' for a baseline).
 */
/** `balance`: another balance line (e.g. roundrobin); `balanceFactor`: another hash-balance-factor (0: no bounded load). */
export function renderHaproxyConfig(port: number, replicas: readonly string[], balance?: string, balanceFactor?: number): string {
  let n = 0;
  let cfg = readFileSync(HAPROXY_CFG, 'utf8')
    .replace(/^(\s*bind\s+)\S+/m, `$1127.0.0.1:${port}`)
    .replace(/^(\s*server\s+\S+\s+)\S+/gm, (_m, head: string) => `${head}${replicas[n++] ?? 'unused:1 disabled'}`);
  if (n !== replicas.length) throw new Error(`haproxy.cfg has ${n} server lines for ${replicas.length} replicas`);
  if (balance !== undefined) cfg = cfg.replace(/^(\s*balance\s+).*$/m, `$1${balance}`);
  if (balanceFactor !== undefined) cfg = cfg.replace(/^(\s*hash-balance-factor\s+)\d+/m, `$1${balanceFactor}`);
  return cfg;
}

export interface Proxy {
  readonly process: ChildProcess;
  /** stdout and stderr so far. */
  output(): string;
  stop(): void;
}

/** Starts `cmd args` in the foreground and resolves once GET /health through 127.0.0.1:`port` answers 200. */
export async function startProxy(cmd: string, args: readonly string[], port: number): Promise<Proxy> {
  let out = '';
  const p = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  p.stdout!.on('data', (d) => (out += d));
  p.stderr!.on('data', (d) => (out += d));
  const proxy = { process: p, output: () => out, stop: () => void p.kill('SIGTERM') };
  for (let i = 0; i < 100 && p.exitCode === null; i++) {
    try {
      const res = await request(`http://127.0.0.1:${port}/health`);
      await res.body.dump();
      if (res.statusCode === 200) return proxy;
    } catch {
      // not listening yet
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  proxy.stop();
  throw new Error(`${cmd} did not come up:\n${out}`);
}
