/**
 * Host sampling: what the engine's main thread costs per decode step when the device is free, for 128 concurrent
 * requests, by how their tokens reach it: picked on the device (greedy; with repetition_penalty 1.1, whose edits the
 * engine makes each step), sampled from a device shortlist (top_k 40; top_p 0.9 alone and plain sampling, whose
 * shortlist decides the token when the nucleus or the draw lies within it, else the row is read), or sampled
 * from the whole logits row (what runs when the device does not shortlist: every backend but webgpu). The engine runs
 * in the harness with the bench model's tokenizer over an executor that answers at once (no model, no device): the
 * tokens/s are the host's ceiling, which a GPU cannot raise. Vocabularies of 32,000 (Llama 2, Mistral) and 128,256
 * (Llama 3) ids; the rows and their shortlists are made once and reused.
 */
import type { BenchCase, Figure } from '../case.ts';
import { sideBySide, rateFigure, ratioFigure } from '../case.ts';
import type { Throughput } from '../client.ts';
import { Engine, type Detokenizer } from '../../src/engine/engine.ts';
import { SHORTLIST_SIZE, type DecodeItem, type PickedToken, type PrefillItem, type Shortlist, type StepExecutor, type StepResult } from '../../src/engine/executor.ts';
import { DEFAULT_SAMPLING, type SamplingParams } from '../../src/engine/sampling.ts';
import { TextTokenizer } from '../../src/text/tokenizer.ts';

const N = 128;
/** New tokens per request (one prefill step and STEPS − 1 decode steps of N rows). */
const STEPS = 8;
const VOCABS = [32_000, 128_256];
/** Distinct rows the executor cycles through. */
const ROWS = 16;

type Mode = 'picked' | 'repetition_penalty 1.1, picked' | 'repetition_penalty 1.1, whole row' | 'top_k 40, shortlist' | 'top_k 40, whole row'
  | 'top_p 0.9, shortlist' | 'top_p 0.9, whole row' | 'plain, shortlist' | 'plain, whole row';
const MODES: readonly Mode[] = [
  'picked', 'repetition_penalty 1.1, picked', 'repetition_penalty 1.1, whole row', 'top_k 40, shortlist', 'top_k 40, whole row', 'top_p 0.9, shortlist',
  'top_p 0.9, whole row', 'plain, shortlist', 'plain, whole row',
];

/**
 * A language model's next-token logits, roughly: 8 to 128 likely ids (by row) well above a long Gumbel tail, so that
 * a top_p 0.9 nucleus lies within 64 ids in most rows and reaches past them in some.
 */
function makeRow(V: number, seed: number): Float32Array {
  let s = seed >>> 0 || 1;
  const u = () => ((s = (Math.imul(s, 1664525) + 1013904223) >>> 0) + 0.5) / 2 ** 32;
  const row = Float32Array.from({ length: V }, () => -Math.log(-Math.log(u())) - 4);
  const likely = [8, 16, 32, 64, 128][seed % 5]!;
  for (let i = 0; i < likely; i++) row[Math.floor(u() * V)] = 9 + 2 * u() - (3 * i) / likely;
  return row;
}

/** The shortlist the device would make of `row` at temperature 1 (src/backend/webgpu/kernels/shortlist.ts). */
function shortlistOf(row: Float32Array): Shortlist {
  const ids = Array.from({ length: row.length }, (_, i) => i).sort((a, b) => row[b]! - row[a]! || a - b).slice(0, SHORTLIST_SIZE);
  const max = row[ids[0]!]!;
  let sum = 0;
  for (const x of row) sum += Math.exp(x - max);
  return { ids: Int32Array.from(ids), logits: Float32Array.from(ids, (i) => row[i]!), logNorm: Math.fround(Math.log(sum)) };
}

/**
 * An executor that answers every step at once from precomputed rows: picks and shortlists where allowed (`device`), else
 * logits. Edits (logit_bias, penalties) are taken as made: the rows do not change.
 */
class InstantExecutor implements StepExecutor {
  readonly vocabSize: number;
  private readonly batch = new Set<number>();
  private readonly shortlists: Shortlist[];
  private step = 0;
  /** Rows read through readLogits (undecided shortlists). */
  rowsRead = 0;
  shortlisted = 0;

  constructor(private readonly rows: readonly Float32Array[], private readonly device: boolean, private readonly tokenIds: number) {
    this.vocabSize = rows[0]!.length;
    this.shortlists = device ? rows.map(shortlistOf) : [];
  }

  get running(): number {
    return this.batch.size;
  }

  private answer(items: readonly { seq: number; pick?: boolean; shortlist?: unknown }[]): StepResult {
    const picked = new Map<number, PickedToken>();
    const shortlists = new Map<number, Shortlist>();
    const logits = new Map<number, Float32Array>();
    const k = this.step++;
    for (const it of items) {
      const r = (it.seq * 7 + k) % this.rows.length;
      if (it.pick && this.device) picked.set(it.seq, { id: (it.seq * 31 + k * 17) % this.tokenIds, logprob: -0.5 });
      else if (it.shortlist && this.device) shortlists.set(it.seq, this.shortlists[r]!);
      else logits.set(it.seq, this.rows[r]!);
    }
    this.shortlisted += shortlists.size;
    const readLogits = async (seqs: readonly number[]) => {
      this.rowsRead += seqs.length;
      return new Map(seqs.map((q) => [q, this.rows[(q * 7 + k) % this.rows.length]!]));
    };
    return { picked, shortlists, logits, passes: [{ rows: items.length, adapters: 0, mode: 'none' }], readLogits };
  }

  async prefill(items: readonly PrefillItem[]): Promise<StepResult> {
    for (const it of items) if (it.last) this.batch.add(it.seq);
    return this.answer(items);
  }

  async decode(items: readonly DecodeItem[]): Promise<StepResult> {
    return this.answer(items);
  }

  release(seq: number): void {
    this.batch.delete(seq);
  }

  fork(): void {
    throw new Error('InstantExecutor: no forks');
  }
}

/** The bench tokenizer's text for sampled ids beyond its own vocabulary (id modulo its size). */
function detokenizer(tok: TextTokenizer, size: number): Detokenizer {
  const map = (id: number) => 3 + (id % (size - 3));
  return {
    eosTokenIds: [],
    tokenText: (id) => tok.tokenText(map(id)),
    isSpecial: () => false,
    createDecoder: (opts) => {
      const d = tok.createDecoder(opts);
      return Object.assign(Object.create(d) as typeof d, { push: (id: number) => d.push(map(id)) });
    },
  };
}

function sampling(mode: Mode, seed: number): SamplingParams {
  if (mode === 'picked') return DEFAULT_SAMPLING;
  if (mode.startsWith('repetition_penalty')) return { ...DEFAULT_SAMPLING, repetitionPenalty: 1.1 };
  if (mode.startsWith('plain')) return { ...DEFAULT_SAMPLING, doSample: true, seed };
  return { ...DEFAULT_SAMPLING, doSample: true, seed, ...(mode.startsWith('top_k') ? { topK: 40 } : { topP: 0.9 }) };
}

export const hostSampling: BenchCase = {
  name: 'host-sampling',
  title: `Host sampling: the engine's ceiling at ${N} concurrent requests (no model, no device), tokens picked on the device, sampled from shortlists, or from whole rows (in the harness)`,
  adapters: 0,
  async run(ctx) {
    const tok = await TextTokenizer.load(ctx.modelDir);
    const size = tok.vocabSize;
    const newTokens = STEPS;
    const prompt = Array.from({ length: 32 }, (_, i) => 3 + ((i * 37) % (size - 3)));
    const out: Figure[] = [];
    for (const V of VOCABS) {
      const rows = Array.from({ length: ROWS }, (_, i) => makeRow(V, 1 + i));
      const executors = new Map<Mode, InstantExecutor>();
      const runs = Object.fromEntries(MODES.map((mode) => {
        const ex = new InstantExecutor(rows, !mode.endsWith('whole row'), size);
        executors.set(mode, ex);
        const engine = new Engine(ex, detokenizer(tok, size), null, {
          maxBatchSize: N, maxBatchTokens: N * prompt.length, prefillChunk: 512, loraMode: 'auto', maxQueue: 4 * N,
          maxInputLength: 1024, maxTotalTokens: 2048, maxPositions: 2048,
        });
        const one = (i: number) => new Promise<void>((resolve, reject) => engine.generate({
          inputIds: prompt, adapterId: null, maxNewTokens: newTokens, stop: [], decoderInputDetails: false, ignoreEos: true, sampling: sampling(mode, i),
        }, { onToken() {}, onDone: () => resolve(), onError: reject }));
        const run = async (): Promise<Throughput> => {
          const t0 = performance.now();
          await Promise.all(Array.from({ length: N }, (_, i) => one(i)));
          const seconds = (performance.now() - t0) / 1000;
          const tokens = N * newTokens;
          return { tokens, seconds, tokensPerSecond: tokens / seconds, generations: [] };
        };
        return [mode, run];
      })) as Record<Mode, () => Promise<Throughput>>;
      const rates = await sideBySide(ctx.sizes.rounds, runs, (m) => ctx.log(`vocab ${V}: ${m}`));
      const vocab = V.toLocaleString('en-US');
      for (const mode of MODES) {
        const msPerStep = rates[mode].map((r) => (1000 * N) / r);
        out.push(rateFigure(`vocab ${vocab}, ${mode}: host ceiling, ${N} concurrent`, rates[mode], { key: `${V}/${mode}`, headline: mode !== 'picked' || V === VOCABS[0] }));
        out.push({ label: `vocab ${vocab}, ${mode}: main-thread ms per step of ${N} rows (the prefill step included)`, value: msPerStep.sort((a, b) => a - b)[msPerStep.length >> 1]!, unit: 'ms', values: msPerStep });
      }
      out.push(ratioFigure(`vocab ${vocab}, repetition_penalty 1.1: picked ÷ whole row`, rates['repetition_penalty 1.1, picked'], rates['repetition_penalty 1.1, whole row'], { key: `${V}/penalty ratio`, headline: true }));
      out.push(ratioFigure(`vocab ${vocab}, top_k 40: shortlist ÷ whole row`, rates['top_k 40, shortlist'], rates['top_k 40, whole row'], { key: `${V}/top_k ratio`, headline: true }));
      out.push(ratioFigure(`vocab ${vocab}, top_p 0.9: shortlist ÷ whole row`, rates['top_p 0.9, shortlist'], rates['top_p 0.9, whole row'], { key: `${V}/top_p ratio`, headline: true }));
      out.push(ratioFigure(`vocab ${vocab}, plain sampling: shortlist ÷ whole row`, rates['plain, shortlist'], rates['plain, whole row'], { key: `${V}/plain ratio`, headline: true }));
      for (const [mode, what] of [['top_p 0.9, shortlist', 'the nucleus reached past the shortlist'], ['plain, shortlist', 'the draw fell past the shortlist']] as const) {
        const ex = executors.get(mode)!;
        out.push({ label: `vocab ${vocab}, ${mode.split(',')[0]}: tokens whose row was read (${what})`, value: (100 * ex.rowsRead) / Math.max(1, ex.shortlisted), unit: '%' });
      }
    }
    return out;
  },
};
