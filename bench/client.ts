/**
 * The benchmark's HTTP client (undici) and the small statistics it needs: concurrent drivers,
 * percentiles, medians and a Zipf sampler.
 */
import { Pool } from 'undici';

/** One finished generation as the client saw it. */
export interface Generation {
  /** details.generated_tokens: real tokens, so an early eos does not inflate a rate. */
  readonly tokens: number;
  /** Wall time of the whole request, seconds. */
  readonly seconds: number;
  /** Seconds to the first streamed token (streaming only). */
  readonly ttft?: number;
  /** generated_text (non-streaming only). */
  readonly text?: string;
  /** The `x-served-by` response header a proxy in front of the replicas adds (non-streaming only). */
  readonly servedBy?: string;
}

export interface GenerateOptions {
  /** null: the base model. */
  readonly adapter: string | null;
  readonly maxNewTokens: number;
  /** Use /generate_stream and time the first event. */
  readonly stream?: boolean;
}

export class ApiClient {
  private readonly pool: Pool;

  constructor(readonly url: string, connections = 128) {
    // Long generations under load: no header/body timeouts. Idle sockets are dropped after 10 s, well before
    // the server's own keep-alive and header timeouts, so a request never goes out on a socket being closed.
    this.pool = new Pool(url, { connections, headersTimeout: 0, bodyTimeout: 0, keepAliveTimeout: 10_000, keepAliveMaxTimeout: 10_000 });
  }

  async json<T = any>(method: 'GET' | 'POST' | 'PUT' | 'DELETE', path: string, body?: unknown): Promise<T> {
    return (await this.jsonWithHeaders<T>(method, path, body)).body;
  }

  private async jsonWithHeaders<T>(method: 'GET' | 'POST' | 'PUT' | 'DELETE', path: string, body?: unknown): Promise<{ body: T; headers: Record<string, string | string[] | undefined> }> {
    const res = await this.pool.request({
      method, path,
      headers: body === undefined ? {} : { 'content-type': 'application/json' },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = await res.body.text();
    if (res.statusCode >= 300) throw new Error(`${method} ${path}: HTTP ${res.statusCode} ${text.slice(0, 300)}`);
    return { body: JSON.parse(text) as T, headers: res.headers };
  }

  /** One TGI generation, greedy. Streaming parses the SSE events and times the first token. */
  async generate(inputs: string, opts: GenerateOptions): Promise<Generation> {
    // ignore_eos: every request generates exactly max_new_tokens, so the batch mix is the same in every configuration.
    const parameters = { max_new_tokens: opts.maxNewTokens, details: true, ignore_eos: true, ...(opts.adapter === null ? {} : { adapter_id: opts.adapter }) };
    const t0 = performance.now();
    if (!opts.stream) {
      const { body: r, headers } = await this.jsonWithHeaders<any>('POST', '/generate', { inputs, parameters });
      const servedBy = headers['x-served-by'];
      return {
        tokens: r.details.generated_tokens, seconds: (performance.now() - t0) / 1000, text: r.generated_text,
        ...(typeof servedBy === 'string' ? { servedBy } : {}),
      };
    }
    const res = await this.pool.request({
      method: 'POST', path: '/generate_stream', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ inputs, parameters }),
    });
    if (res.statusCode >= 300) throw new Error(`POST /generate_stream: HTTP ${res.statusCode} ${(await res.body.text()).slice(0, 300)}`);
    let ttft: number | undefined;
    let tokens = 0;
    let buffer = '';
    for await (const chunk of res.body) {
      buffer += chunk.toString();
      let end: number;
      while ((end = buffer.indexOf('\n\n')) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = event.split('\n').filter((l) => l.startsWith('data:')).map((l) => l.slice(5)).join('\n').trim();
        if (!data) continue;
        const e = JSON.parse(data);
        if (e.error) throw new Error(`POST /generate_stream: ${e.error}`);
        ttft ??= (performance.now() - t0) / 1000;
        if (e.details) tokens = e.details.generated_tokens;
      }
    }
    return { tokens, seconds: (performance.now() - t0) / 1000, ttft };
  }

  /** GET /metrics, parsed: series (`name{labels}`) → value. */
  async metrics(): Promise<Metrics> {
    const res = await this.pool.request({ method: 'GET', path: '/metrics' });
    return parseMetrics(await res.body.text());
  }

  close(): Promise<void> {
    return this.pool.close();
  }
}

export type Metrics = ReadonlyMap<string, number>;

/** Prometheus text format → series → value (comments skipped). */
export function parseMetrics(text: string): Metrics {
  const out = new Map<string, number>();
  for (const line of text.split('\n')) {
    if (!line || line.startsWith('#')) continue;
    const cut = line.lastIndexOf(' ');
    out.set(line.slice(0, cut), Number(line.slice(cut + 1)));
  }
  return out;
}

/** Sum of every series of `name` whose labels include all of `labels` (0 when none). */
export function metric(m: Metrics, name: string, labels: Record<string, string> = {}): number {
  let sum = 0;
  for (const [series, value] of m) {
    const brace = series.indexOf('{');
    if ((brace < 0 ? series : series.slice(0, brace)) !== name) continue;
    if (Object.entries(labels).every(([k, v]) => series.includes(`${k}="${v}"`))) sum += value;
  }
  return sum;
}

/** Aggregate throughput of a set of generations run together. */
export interface Throughput {
  readonly tokens: number;
  readonly seconds: number;
  readonly tokensPerSecond: number;
  readonly generations: readonly Generation[];
}

/**
 * Runs `jobs` with at most `concurrency` in flight (closed loop: each worker takes the next job when
 * its previous one finishes) and returns generated tokens over the wall time of the whole set.
 */
export async function drive(jobs: readonly (() => Promise<Generation>)[], concurrency: number): Promise<Throughput> {
  const generations: Generation[] = [];
  let next = 0;
  const t0 = performance.now();
  const worker = async () => {
    while (next < jobs.length) generations.push(await jobs[next++]!());
  };
  await Promise.all(Array.from({ length: Math.min(concurrency, jobs.length) }, worker));
  const seconds = (performance.now() - t0) / 1000;
  const tokens = generations.reduce((s, g) => s + g.tokens, 0);
  return { tokens, seconds, tokensPerSecond: tokens / seconds, generations };
}

/** The p-th percentile (0-100), linear between closest ranks (numpy's default). NaN when empty. */
export function percentile(xs: readonly number[], p: number): number {
  if (xs.length === 0) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  const rank = (p / 100) * (s.length - 1);
  const lo = Math.floor(rank);
  const hi = Math.ceil(rank);
  return s[lo]! + (s[hi]! - s[lo]!) * (rank - lo);
}

export const median = (xs: readonly number[]) => percentile(xs, 50);

/**
 * Zipf(s) over ranks 0..n-1: P(k) ∝ 1/(k+1)^s. `uniform` gives numbers in [0, 1) (seed it for
 * repeatable runs). Inverse CDF by binary search.
 */
export function zipfSampler(n: number, s: number, uniform: () => number): () => number {
  const cdf = new Float64Array(n);
  let total = 0;
  for (let k = 0; k < n; k++) cdf[k] = total += 1 / (k + 1) ** s;
  return () => {
    const u = uniform() * total;
    let lo = 0;
    let hi = n - 1;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (cdf[mid]! > u) hi = mid;
      else lo = mid + 1;
    }
    return lo;
  };
}
