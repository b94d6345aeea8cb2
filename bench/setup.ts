/**
 * What the benchmarks run on, generated once under .cache (git-ignored): the BENCH_LLAMA checkpoint
 * (unless --model is given), a pool of PEFT adapters for the model, and ~32-token prompts.
 */
import { createHash } from 'node:crypto';
import { existsSync, promises as fs, readFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { BENCH_LLAMA, ensureCheckpoint, writePeftAdapter } from '../src/demo/index.ts';
import { openSafetensors } from '../src/formats/safetensors.ts';
import { TextTokenizer } from '../src/text/tokenizer.ts';

export const BENCH_MODEL_DIR = resolve('.cache/bench-model');
const ADAPTERS_ROOT = resolve('.cache/bench-adapters');

/** The adapters every case draws from: r=8, alpha 16, q/k/v/o_proj, random non-zero B. */
const ADAPTER = { r: 8, loraAlpha: 16, targetModules: ['q_proj', 'k_proj', 'v_proj', 'o_proj'] } as const;

/** The benchmark checkpoint: `dir` as given, or BENCH_LLAMA generated into .cache/bench-model. */
export async function prepareModel(dir: string | undefined, log: (msg: string) => void): Promise<string> {
  if (dir) return resolve(dir);
  const { written } = await ensureCheckpoint(BENCH_MODEL_DIR, BENCH_LLAMA);
  if (written) log(`generated the BENCH_LLAMA checkpoint in ${BENCH_MODEL_DIR}`);
  return BENCH_MODEL_DIR;
}

export interface AdapterPool {
  /** The server's --adapter-dir. */
  readonly dir: string;
  /** `bench-000`, `bench-001`, ... */
  id(i: number): string;
  /** Float32 bytes of adapter i's A and B matrices, from its safetensors header. */
  expectedBytes(i: number): number;
}

/**
 * Makes sure `count` adapters exist for the model in `modelDir` (one folder per config.json, so a
 * --model run never sees adapters of another shape). Each is written to a temp folder and renamed.
 */
export async function prepareAdapters(modelDir: string, count: number, log: (msg: string) => void): Promise<AdapterPool> {
  const configText = readFileSync(join(modelDir, 'config.json'), 'utf8');
  const baseConfig = JSON.parse(configText) as Record<string, unknown>;
  const dir = join(ADAPTERS_ROOT, createHash('sha256').update(configText).digest('hex').slice(0, 12));
  const id = (i: number) => `bench-${String(i).padStart(3, '0')}`;
  await fs.mkdir(dir, { recursive: true });
  let written = 0;
  for (let i = 0; i < count; i++) {
    const target = join(dir, id(i));
    if (existsSync(join(target, 'adapter_model.safetensors'))) continue;
    const tmp = `${target}.tmp-${process.pid}`;
    await writePeftAdapter(tmp, { baseConfig, ...ADAPTER, seed: 1000 + i, baseModelNameOrPath: modelDir });
    await fs.rm(target, { recursive: true, force: true });
    await fs.rename(tmp, target);
    written++;
  }
  if (written) log(`wrote ${written} adapters to ${dir}`);
  return {
    dir, id,
    expectedBytes(i) {
      const reader = openSafetensors(join(dir, id(i), 'adapter_model.safetensors'));
      try {
        return [...reader.tensors.values()].reduce((s, t) => s + 4 * t.shape.reduce((a, b) => a * b, 1), 0);
      } finally {
        reader.close();
      }
    },
  };
}

const TEXT = `The river is high after the storms of last week and the old bridge near the mill was closed
for two days. Farmers in the valley say the harvest will be good this year because the apples are sweet
and the wheat is tall. A small robot read books about dragons and kings and brave explorers who sailed
across the ocean to find new lands, then it tried to write a story of its own about a lighthouse keeper
who counted boats and birds every morning while the clouds moved east toward the sea.`.split(/\s+/);

/** `count` distinct prompts of at least `tokens` tokens each (whole words, cut as soon as long enough). */
export async function preparePrompts(modelDir: string, count: number, tokens: number): Promise<string[]> {
  const tokenizer = await TextTokenizer.load(modelDir);
  return Array.from({ length: count }, (_, i) => {
    const words: string[] = [];
    for (let w = i; tokenizer.encode(words.join(' ')).length < tokens; w++) words.push(TEXT[w % TEXT.length]!);
    return words.join(' ');
  });
}
