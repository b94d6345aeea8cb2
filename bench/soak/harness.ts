/**
 * What the reliability scenarios run on: the demo checkpoint, PEFT adapters generated for it (two versions of an
 * id differ by their seed), the real server started as the benchmarks start it (bench/server.ts), an HTTP client
 * that reports every answer as data (status, code, text) instead of throwing, and the solo answers every answer
 * under load is compared with.
 */
import { promises as fs, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { FormData, Pool } from 'undici';
import { DEMO_LLAMA, ensureCheckpoint, writePeftAdapter } from '../../src/demo/index.ts';
import { DEMO_MODEL_DIR } from '../../src/runtime.ts';
import { startServer, type BenchServer, type ServerFlags } from '../server.ts';
import type { ScenarioContext } from './scenario.ts';

/** Prompts every scenario asks; greedy answers of 6 tokens. */
export const PROMPTS = ['The river is high after', 'A small robot read books', 'Farmers in the valley say', 'The old bridge near the mill'] as const;
export const MAX_NEW_TOKENS = 6;

/** The demo checkpoint (generated under .cache on first use) and its config.json. */
export async function soakModel(): Promise<{ dir: string; config: Record<string, unknown> }> {
  const { config } = await ensureCheckpoint(DEMO_MODEL_DIR, DEMO_LLAMA);
  return { dir: DEMO_MODEL_DIR, config };
}

/** An adapter's two files as uploaded: adapter_config.json's text and adapter_model.safetensors' bytes. */
export interface AdapterBytes {
  readonly config: string;
  readonly weights: Uint8Array;
}

export interface AdapterSpec {
  readonly seed: number;
  readonly r?: number;
  readonly targetModules?: readonly string[] | string;
}

const generated = new Map<string, AdapterBytes>();

/** The files of a generated adapter for the demo model (r 8 on q/k/v/o unless `spec` says otherwise). */
export async function adapterBytes(workDir: string, spec: AdapterSpec): Promise<AdapterBytes> {
  const key = JSON.stringify(spec);
  const cached = generated.get(key);
  if (cached) return cached;
  const { config } = await soakModel();
  const dir = join(workDir, 'generated', `seed-${spec.seed}-r${spec.r ?? 8}-${String(spec.targetModules ?? 'qkvo')}`.replace(/[^\w.-]/g, '_'));
  await writePeftAdapter(dir, {
    baseConfig: config, seed: spec.seed, r: spec.r ?? 8, loraAlpha: 2 * (spec.r ?? 8),
    targetModules: (spec.targetModules ?? ['q_proj', 'k_proj', 'v_proj', 'o_proj']) as string[] | string,
    baseModelNameOrPath: 'lora-serve/demo-llama',
  });
  const files = { config: readFileSync(join(dir, 'adapter_config.json'), 'utf8'), weights: new Uint8Array(readFileSync(join(dir, 'adapter_model.safetensors'))) };
  generated.set(key, files);
  return files;
}

/** Writes an adapter straight into a server's folder (as an operator copying it there would). */
export async function placeAdapter(adapterDir: string, id: string, files: AdapterBytes): Promise<void> {
  const dir = join(adapterDir, id);
  await fs.mkdir(dir, { recursive: true });
  await fs.writeFile(join(dir, 'adapter_config.json'), files.config);
  await fs.writeFile(join(dir, 'adapter_model.safetensors'), files.weights);
}

/** The real server on the demo model and `adapterDir`, quiet logs, with `flags` on top. */
export async function startSoakServer(ctx: ScenarioContext, name: string, adapterDir: string, flags: ServerFlags = {}): Promise<BenchServer> {
  const { dir } = await soakModel();
  return startServer({ model: dir, 'adapter-dir': adapterDir, 'log-level': 'warn', 'shutdown-grace': 1, ...flags }, join(ctx.workDir, 'logs'), name);
}

/** An answer as data: the status, the catalogue code of an error, the generated text of a success. */
export interface Answer {
  readonly status: number;
  /** `code` of an error body; undefined for a success or a body without one. */
  readonly code?: string;
  readonly text?: string;
  /** Seconds from sending to the whole answer. */
  readonly seconds: number;
  readonly headers: Record<string, string | string[] | undefined>;
  /** A transport failure (reset, refused): no HTTP answer at all. */
  readonly failure?: string;
}

export interface GenerateOpts {
  readonly stream?: boolean;
  /** Streams only: abort after the first event (a client that goes away). */
  readonly cancelAfterFirst?: boolean;
  readonly maxNewTokens?: number;
}

function codeOf(text: string): string | undefined {
  try {
    const b = JSON.parse(text) as { code?: unknown; error?: { code?: unknown } };
    const code = b.code ?? b.error?.code;
    return typeof code === 'string' ? code : undefined;
  } catch {
    return undefined;
  }
}

/** The generated text of a TGI stream: the last event's `generated_text`; an `error` event is returned as a code. */
function parseStream(sse: string): { text?: string; code?: string } {
  let text: string | undefined;
  for (const event of sse.split('\n\n')) {
    const data = event.split('\n').filter((l) => l.startsWith('data:')).map((l) => l.slice(5)).join('\n').trim();
    if (!data) continue;
    const e = JSON.parse(data) as { generated_text?: string | null; error?: string; error_type?: string; code?: string };
    if (e.error !== undefined) return { code: e.code ?? e.error_type ?? 'STREAM_ERROR' };
    if (typeof e.generated_text === 'string') text = e.generated_text;
  }
  return { text };
}

/** The scenarios' client: answers are returned as data, never thrown. */
export class SoakClient {
  readonly pool: Pool;

  constructor(readonly url: string, connections = 64) {
    this.pool = new Pool(url, { connections, headersTimeout: 0, bodyTimeout: 0 });
  }

  private async send(method: 'GET' | 'POST' | 'PUT' | 'DELETE', path: string, body?: string | FormData, signal?: AbortSignal, onFirstChunk?: () => void): Promise<Answer> {
    const t0 = performance.now();
    try {
      const res = await this.pool.request({
        method, path, signal,
        headers: typeof body === 'string' ? { 'content-type': 'application/json' } : {},
        body,
      });
      let text = '';
      for await (const chunk of res.body) {
        text += chunk.toString();
        onFirstChunk?.();
      }
      const seconds = (performance.now() - t0) / 1000;
      return { status: res.statusCode, seconds, headers: res.headers, text, ...(res.statusCode >= 300 ? { code: codeOf(text) } : {}) };
    } catch (err) {
      return { status: 0, seconds: (performance.now() - t0) / 1000, headers: {}, failure: (err as Error).name === 'AbortError' ? 'aborted' : String((err as Error).message) };
    }
  }

  /** A greedy TGI generation on `adapter` (null: the base model); a stream's text is its last event's. */
  async generate(prompt: string, adapter: string | null, opts: GenerateOpts = {}): Promise<Answer> {
    const parameters = { max_new_tokens: opts.maxNewTokens ?? MAX_NEW_TOKENS, ...(adapter === null ? {} : { adapter_id: adapter }) };
    const body = JSON.stringify({ inputs: prompt, parameters });
    if (!opts.stream) {
      const a = await this.send('POST', '/generate', body);
      return a.status === 200 ? { ...a, text: (JSON.parse(a.text!) as { generated_text: string }).generated_text } : a;
    }
    const controller = new AbortController();
    const a = await this.send('POST', '/generate_stream', body, controller.signal, opts.cancelAfterFirst ? () => controller.abort() : undefined);
    if (a.status !== 200) return a;
    const parsed = parseStream(a.text!);
    return { ...a, text: parsed.text, ...(parsed.code ? { code: parsed.code } : {}) };
  }

  /** PUT /adapters/{id} as multipart (config and weights parts). */
  upload(id: string, files: AdapterBytes): Promise<Answer> {
    const form = new FormData();
    form.append('config', files.config);
    form.append('weights', new Blob([Buffer.from(files.weights)]), 'adapter_model.safetensors');
    return this.send('PUT', `/adapters/${id}`, form);
  }

  remove(id: string): Promise<Answer> {
    return this.send('DELETE', `/adapters/${id}`);
  }

  async json<T = any>(path: string): Promise<T> {
    const a = await this.send('GET', path);
    if (a.status !== 200) throw new Error(`GET ${path}: ${a.status} ${a.failure ?? a.text?.slice(0, 200)}`);
    return JSON.parse(a.text!) as T;
  }

  /** A gauge or counter of GET /metrics, summed over its series. */
  async metric(name: string): Promise<number> {
    const a = await this.send('GET', '/metrics');
    let sum = 0;
    for (const line of (a.text ?? '').split('\n')) {
      if (line.startsWith(`${name} `) || line.startsWith(`${name}{`)) sum += Number(line.slice(line.lastIndexOf(' ') + 1));
    }
    return sum;
  }

  close(): Promise<void> {
    return this.pool.close();
  }
}

/** Expected answers: `key(adapter, prompt)` → text, each asked alone on an idle server. */
export class SoloAnswers {
  private readonly texts = new Map<string, string>();

  static key(label: string, prompt: string): string {
    return `${label}\u0000${prompt}`;
  }

  /** Asks every prompt of `adapter` (null: base) alone and records the answers under `label`. */
  async record(client: SoakClient, label: string, adapter: string | null, opts: GenerateOpts = {}): Promise<void> {
    for (const p of PROMPTS) {
      const a = await client.generate(p, adapter, opts);
      if (a.status !== 200 || a.text === undefined) throw new Error(`solo answer of ${label} on "${p}": ${a.status} ${a.failure ?? a.text}`);
      this.texts.set(SoloAnswers.key(label, p), a.text);
    }
  }

  get(label: string, prompt: string): string {
    const t = this.texts.get(SoloAnswers.key(label, prompt));
    if (t === undefined) throw new Error(`no solo answer for ${label}`);
    return t;
  }

  /** The labels whose solo answer to `prompt` is `text`. */
  labelsOf(prompt: string, text: string): string[] {
    const out: string[] = [];
    for (const [k, v] of this.texts) {
      const [label, p] = k.split('\u0000') as [string, string];
      if (p === prompt && v === text) out.push(label);
    }
    return out;
  }

  /** Pairs of labels that answer some prompt alike (the scenario could not tell them apart there). */
  collisions(labels: readonly string[]): string[] {
    const out: string[] = [];
    for (const p of PROMPTS) {
      for (let i = 0; i < labels.length; i++) {
        for (let j = i + 1; j < labels.length; j++) {
          if (this.get(labels[i]!, p) === this.get(labels[j]!, p)) out.push(`${labels[i]} = ${labels[j]} on "${p}"`);
        }
      }
    }
    return out;
  }
}

/** Resident memory of a process from /proc (Linux), bytes; NaN where unavailable. */
export function rssBytes(pid: number): number {
  try {
    const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
    return m ? Number(m[1]) * 1024 : NaN;
  } catch {
    return NaN;
  }
}

/** A fresh, empty folder under the work dir. */
export async function freshDir(workDir: string, name: string): Promise<string> {
  const dir = join(workDir, name);
  await fs.rm(dir, { recursive: true, force: true });
  await fs.mkdir(dir, { recursive: true });
  return dir;
}

/** Runs `fn` on `n` concurrent workers until `until()` is true. */
export async function loop(n: number, until: () => boolean, fn: (worker: number, i: number) => Promise<void>): Promise<void> {
  let i = 0;
  await Promise.all(Array.from({ length: n }, async (_, w) => {
    while (!until()) await fn(w, i++);
  }));
}

/** PUT /adapters/{id}'s multipart body, as bytes, and its content type (for clients that write it by hand). */
export function multipartBody(files: AdapterBytes, weightsOverride?: Uint8Array): { body: Buffer; contentType: string } {
  const boundary = `soak${Math.random().toString(16).slice(2)}`;
  const body = Buffer.concat([
    Buffer.from(`--${boundary}\r\nContent-Disposition: form-data; name="config"\r\n\r\n${files.config}\r\n`),
    Buffer.from(`--${boundary}\r\nContent-Disposition: form-data; name="weights"; filename="adapter_model.safetensors"\r\nContent-Type: application/octet-stream\r\n\r\n`),
    weightsOverride ?? files.weights,
    Buffer.from(`\r\n--${boundary}--\r\n`),
  ]);
  return { body, contentType: `multipart/form-data; boundary=${boundary}` };
}

/** An HTTP/1.1 request head for a raw socket. */
export function requestHead(method: string, path: string, host: string, headers: Record<string, string | number>): string {
  return `${method} ${path} HTTP/1.1\r\nHost: ${host}\r\n${Object.entries(headers).map(([k, v]) => `${k}: ${v}\r\n`).join('')}\r\n`;
}
