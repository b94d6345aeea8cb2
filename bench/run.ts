/**
 * `npm run bench [-- [case ...] [--quick] [--rounds N] [--model DIR] [--backend NAME] [--out DIR]]`
 *
 * Starts the real server (src/server/main.ts) in a child process per case, drives it over HTTP,
 * prints a table and writes every figure, with the machine, backend, model and git commit, to
 * bench/results/*.json. Benchmarks report; they never fail: a case that breaks is reported as such.
 */
import { execFileSync } from 'node:child_process';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import { join, resolve } from 'node:path';
import { met, type BenchCase, type CaseContext, type Figure, type ServerRun, type Sizes } from './case.ts';
import { adapterSwitch } from './cases/adapter-switch.ts';
import { batching } from './cases/batching.ts';
import { coldLoad } from './cases/cold-load.ts';
import { decodeLinear } from './cases/decode-linear.ts';
import { dispatches } from './cases/dispatches.ts';
import { recordedStep } from './cases/recorded-step.ts';
import { manyAdapters } from './cases/many-adapters.ts';
import { memory } from './cases/memory.ts';
import { mergedOverhead } from './cases/merged-overhead.ts';
import { grammar } from './cases/grammar.ts';
import { hostSampling } from './cases/host-sampling.ts';
import { kernels } from './cases/kernels.ts';
import { profile } from './cases/profile.ts';
import { scaleOut } from './cases/scale-out.ts';
import { ttft } from './cases/ttft.ts';
import type { ApiClient } from './client.ts';
import { fmt } from './readme.ts';
import { REFERENCES, referenceOf } from './references.ts';
import { startServer, type ServerFlags } from './server.ts';
import { prepareAdapters, prepareModel, preparePrompts } from './setup.ts';

const CASES: readonly BenchCase[] = [mergedOverhead, batching, manyAdapters, coldLoad, adapterSwitch, ttft, memory, profile, kernels, dispatches, decodeLinear, recordedStep, scaleOut, grammar, hostSampling];

/** Sized to finish within 20 minutes on a 2-core machine. */
const FULL: Sizes = { rounds: 3, newTokens: 32, sequential: 4, loads: 40, switchPairs: 60, ttftIdle: 20, memoryRequests: 5000 };
/** A smoke run: one round, fewer samples. Figures are indicative only. */
const QUICK: Sizes = { rounds: 1, newTokens: 32, sequential: 4, loads: 15, switchPairs: 8, ttftIdle: 5, memoryRequests: 1000 };

const PROMPT_TOKENS = 32;
const PROMPTS = 64;

const HELP = `Usage: npm run bench -- [case ...] [options]

Cases (default: all that measure the backend): ${CASES.map((c) => c.name + (c.backend ? ` (${c.backend} only)` : '')).join(', ')}

Options:
  --quick           one round and fewer samples (a smoke run; figures are indicative)
  --rounds N        rounds of every side-by-side comparison (default ${FULL.rounds}; median reported)
  --model DIR       benchmark this checkpoint instead of the generated BENCH_LLAMA one
  --backend NAME    the server's --backend (default wasm)
  --tuned           start servers with the settings a user would choose for each case's workload (its tuning flags)
                    and --workers 2 unless --workers is given; without it, servers run on their default flags
  --workers N       the server's --workers (default: the server's default, or 2 with --tuned; 1 on webgpu)
  --out DIR         where the JSON results go (default bench/results)
  --save NAME       also write the results to DIR/NAME.json (latest-defaults, latest: what the README renders)
  --help            this text
`;

interface Args {
  cases: BenchCase[];
  quick: boolean;
  rounds?: number;
  model?: string;
  backend: string;
  tuned: boolean;
  workers?: number;
  out: string;
  save?: string;
}

function parseArgs(argv: readonly string[]): Args {
  const args: Args = { cases: [], quick: false, tuned: false, backend: 'wasm', out: 'bench/results' };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    const value = () => {
      if (i + 1 >= argv.length) throw new Error(`${a} needs a value`);
      return argv[++i]!;
    };
    if (a === '--help' || a === '-h') {
      process.stdout.write(HELP);
      process.exit(0);
    } else if (a === '--quick') args.quick = true;
    else if (a === '--tuned') args.tuned = true;
    else if (a === '--rounds') {
      args.rounds = Number(value());
      if (!Number.isInteger(args.rounds) || args.rounds < 1) throw new Error('--rounds must be a positive integer');
    } else if (a === '--model') args.model = value();
    else if (a === '--backend') args.backend = value();
    else if (a === '--workers') {
      args.workers = Number(value());
      if (!Number.isInteger(args.workers) || args.workers < 1) throw new Error('--workers must be a positive integer');
    }
    else if (a === '--out') args.out = value();
    else if (a === '--save') {
      args.save = value();
      if (!/^[\w.-]+$/.test(args.save)) throw new Error('--save takes a file name without a folder');
    }
    else if (a.startsWith('--')) throw new Error(`unknown option ${a}`);
    else {
      const c = CASES.find((x) => x.name === a);
      if (!c) throw new Error(`unknown case "${a}" (cases: ${CASES.map((x) => x.name).join(', ')})`);
      args.cases.push(c);
    }
  }
  if (args.cases.length === 0) args.cases = CASES.filter((c) => c.backend === undefined || c.backend === args.backend);
  // webgpu runs in the server's main thread only.
  if (args.tuned) args.workers ??= args.backend === 'webgpu' ? 1 : 2;
  return args;
}

function git(...args: string[]): string {
  try {
    return execFileSync('git', args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).trim();
  } catch {
    return '';
  }
}


/** A server a case ran against: the flags the harness gave it and what its GET /info said. */
interface CaseServer {
  readonly flags: Readonly<Record<string, string | number>>;
  readonly info: Record<string, unknown>;
}

export interface CaseResult {
  readonly name: string;
  readonly title: string;
  readonly seconds: number;
  readonly figures: readonly Figure[];
  readonly servers: readonly CaseServer[];
  readonly error?: string;
}

function table(results: readonly CaseResult[]): string {
  const systems = REFERENCES.map((x) => x.system);
  const rows = [['case', 'figure', 'measured', ...systems.map((s) => `${s} (ref.)`), 'target', 'result']];
  for (const r of results) {
    if (r.error) rows.push([r.name, `FAILED: ${r.error.split('\n')[0]}`, '', ...systems.map(() => ''), '', '']);
    for (const f of r.figures) {
      const ok = met(f);
      const refs = referenceOf(r.name, f.key);
      rows.push([
        r.name, f.label, f.note ?? fmt(f.value, f.unit), ...systems.map((s) => {
          const x = refs.find((y) => y.system === s);
          return x ? fmt(x.value, f.unit) : '';
        }),
        f.target ? `${f.target.op} ${fmt(f.target.value, f.unit)}` : '', ok === undefined ? '' : ok ? 'met' : 'MISSED',
      ]);
    }
  }
  const widths = rows[0]!.map((_, c) => Math.max(...rows.map((row) => row[c]!.length)));
  const line = (row: string[]) => row.map((cell, c) => (c >= 2 && c <= 3 ? cell.padStart(widths[c]!) : cell.padEnd(widths[c]!))).join('  ').trimEnd();
  return [line(rows[0]!), widths.map((w) => '-'.repeat(w)).join('  '), ...rows.slice(1).map(line)].join('\n');
}

async function main(): Promise<void> {
  let args: Args;
  try {
    args = parseArgs(process.argv.slice(2));
  } catch (err) {
    process.stderr.write(`${(err as Error).message}\n\n${HELP}`);
    process.exit(2);
  }
  process.once('SIGINT', () => process.exit(130)); // the server children are killed on exit
  const started = new Date();
  const t0 = performance.now();
  const sizes: Sizes = { ...(args.quick ? QUICK : FULL), ...(args.rounds ? { rounds: args.rounds } : {}) };
  const say = (msg: string) => process.stderr.write(`${msg}\n`);

  const modelDir = await prepareModel(args.model, say);
  const adapters = await prepareAdapters(modelDir, Math.max(...args.cases.map((c) => c.adapters)), say);
  const prompts = await preparePrompts(modelDir, PROMPTS, PROMPT_TOKENS);
  const logDir = resolve('.cache/bench-logs');
  let backendInfo: unknown;
  let workersSeen: number | undefined;

  const results: CaseResult[] = [];
  for (const c of args.cases) {
    say(`\n== ${c.name}: ${c.title}`);
    const tc = performance.now();
    const log = (msg: string) => say(`[${c.name}] ${msg}`);
    const servers: CaseServer[] = [];
    const ctx: CaseContext = {
      sizes, adapters, log, tuned: args.tuned, modelDir,
      prompt: (i) => prompts[i % prompts.length]!,
      withServer<T>(flags: ServerFlags, fn: (api: ApiClient, server: ServerRun) => Promise<T>, tuning: ServerFlags = {}): Promise<T> {
        return ctx.withServers(1, { ...(args.tuned ? tuning : {}), ...flags }, ([api], [run]) => fn(api!, run!));
      },
      async withServers<T>(count: number, flags: ServerFlags, fn: (apis: ApiClient[], servers: ServerRun[]) => Promise<T>): Promise<T> {
        const all: Record<string, string | number> = {
          model: modelDir, 'adapter-dir': adapters.dir, backend: args.backend, 'log-level': 'warn', 'shutdown-grace': 1,
          ...(args.workers === undefined ? {} : { workers: args.workers }), ...flags,
        };
        const started: Awaited<ReturnType<typeof startServer>>[] = [];
        const runs: ServerRun[] = [];
        try {
          for (let i = 0; i < count; i++) {
            const server = await startServer(all, logDir, count === 1 ? c.name : `${c.name}-${i + 1}`);
            started.push(server);
            log(`server ${server.pid} healthy after ${server.startSeconds.toFixed(1)} s (log: ${server.logFile})`);
            const info = await server.api.json('GET', '/info');
            servers.push({ flags: all, info });
            backendInfo ??= info.backend;
            const workers = typeof info.workers === 'number' ? info.workers : Number(all.workers ?? 1);
            workersSeen ??= workers;
            runs.push({ info, workers, address: new URL(server.api.url).host, kill: server.kill });
          }
          return await fn(started.map((s) => s.api), runs);
        } finally {
          await Promise.all(started.map((s) => s.stop()));
        }
      },
    };
    let figures: Figure[] = [];
    let error: string | undefined;
    try {
      figures = await c.run(ctx);
    } catch (err) {
      const e = err as Error;
      say(`[${c.name}] FAILED: ${e.stack ?? e.message}`);
      error = e.message;
    }
    const caseSeconds = (performance.now() - tc) / 1000;
    results.push({ name: c.name, title: c.title, seconds: caseSeconds, figures, servers, ...(error === undefined ? {} : { error }) });
    say(`[${c.name}] ${caseSeconds.toFixed(0)} s`);
  }

  const seconds = (performance.now() - t0) / 1000;
  const commit = git('rev-parse', 'HEAD');
  const report = {
    started: started.toISOString(),
    seconds,
    args: process.argv.slice(2),
    sizes,
    machine: {
      cpu: os.cpus()[0]?.model ?? 'unknown', cores: os.cpus().length, memoryBytes: os.totalmem(),
      platform: `${os.platform()} ${os.release()} ${os.arch()}`, node: process.version, loadAverage: os.loadavg(),
    },
    backend: { requested: args.backend, server: backendInfo ?? null, workers: workersSeen ?? null },
    tuned: args.tuned,
    model: { dir: modelDir, generated: args.model === undefined, config: JSON.parse(readFileSync(join(modelDir, 'config.json'), 'utf8')) },
    // Figures of other systems shown beside ours: not measured by this run.
    references: REFERENCES,
    git: { commit, dirty: git('status', '--porcelain').length > 0 },
    cases: results,
  };
  mkdirSync(args.out, { recursive: true });
  const stamp = started.toISOString().replace(/[:.]/g, '-');
  const file = join(args.out, `${stamp}-${commit.slice(0, 8) || 'nogit'}${args.quick ? '-quick' : ''}.json`);
  writeFileSync(file, JSON.stringify(report, null, 2) + '\n');
  if (args.save) writeFileSync(join(args.out, `${args.save}.json`), JSON.stringify(report, null, 2) + '\n');

  const m = report.machine;
  process.stdout.write(`\n${m.cpu}, ${m.cores} cores, ${(m.memoryBytes / 2 ** 30).toFixed(0)} GiB; backend ${report.backend.server ?? args.backend}; ` +
    `model ${modelDir}; commit ${commit.slice(0, 12)}${report.git.dirty ? ' (dirty)' : ''}; ` +
    `${args.quick ? 'quick, ' : ''}${sizes.rounds} round(s), medians; ${(seconds / 60).toFixed(1)} min\n\n`);
  const referenced = REFERENCES.filter((x) => results.some((r) => r.figures.some((f) => referenceOf(r.name, f.key).some((y) => y.system === x.system))));
  process.stdout.write(`${table(results)}\n\n${referenced.map((x) => `${x.system} (ref.): ${x.source}.\n`).join('')}Results: ${file}\n`);
}

await main();
