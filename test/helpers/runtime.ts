/** A Runtime over a fixture checkpoint and a temp adapter folder, plus a promise wrapper around generate(). */
import { join } from 'node:path';
import { DEFAULT_SAMPLING, type SamplingParams } from '../../src/engine/sampling.ts';
import type { EngineApi, GenerateRequest, GenerationResult, TokenInfo } from '../../src/engine/types.ts';
import type { ServeError } from '../../src/errors.ts';
import { writeCheckpoint, type CheckpointOptions } from '../../src/demo/index.ts';
import { startRuntime, type Runtime, type RuntimeOptions } from '../../src/runtime.ts';
import { testBackend } from './tf.ts';

export const TEST_RUNTIME: Omit<RuntimeOptions, 'model' | 'adapterDir'> = {
  backend: testBackend(), loraMode: 'auto', maxLoraRank: 64, maxLoadedAdapters: 16, adapterDeviceBytes: 0,
  adapterHostBytes: 64 << 20, maxAdapterBytes: 64 << 20, maxBatchSize: 32, maxBatchTokens: 2048,
  maxInputLength: 100, maxTotalTokens: 128, maxQueue: 256, prefillChunk: 32, workers: 1,
  warmHeapBytes: 0, // the warm-up forward still runs; touching heap only saves page faults (slower starts in tests)
  warmUpLoads: 2, // the adapter load path's warm-up runs, briefly
};

export async function fixtureRuntime(root: string, ckpt: CheckpointOptions, opts: Partial<RuntimeOptions> = {}): Promise<{ rt: Runtime; config: Record<string, unknown> }> {
  const { config } = await writeCheckpoint(join(root, 'model'), ckpt);
  const rt = await startRuntime({ ...TEST_RUNTIME, model: join(root, 'model'), adapterDir: join(root, 'adapters'), ...opts });
  return { rt, config };
}

export interface Outcome {
  result?: GenerationResult;
  error?: ServeError;
  tokens: TokenInfo[];
  text: string;
}

export function request(inputIds: number[], extra: Partial<Omit<GenerateRequest, 'sampling'>> & { sampling?: Partial<SamplingParams> } = {}): GenerateRequest {
  return {
    inputIds, adapterId: null, maxNewTokens: 8, stop: [], decoderInputDetails: false,
    ...extra, sampling: { ...DEFAULT_SAMPLING, ...extra.sampling },
  };
}

/** Runs one request to completion (rejects only on synchronous validation errors). */
export function generate(rt: { readonly engine: EngineApi }, req: GenerateRequest, onToken?: (n: number) => void): Promise<Outcome> {
  return new Promise((resolve) => {
    const out: Outcome = { tokens: [], text: '' };
    rt.engine.generate(req, {
      onToken(token, text) {
        out.tokens.push(token);
        out.text += text;
        onToken?.(out.tokens.length);
      },
      onDone(result) {
        out.result = result;
        resolve(out);
      },
      onError(error) {
        out.error = error;
        resolve(out);
      },
    });
  });
}
