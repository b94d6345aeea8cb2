/**
 * A Hugging Face checkpoint directory: config.json (+ generation_config.json), model.safetensors or the
 * shards listed in model.safetensors.index.json. Tensors are read one at a time (positioned reads), so a
 * multi-GB checkpoint is never held in host memory at once.
 */
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { fail } from '../errors.ts';
import { normalizeConfig } from './config.ts';
import { openSafetensors, type SafetensorsReader } from '../formats/safetensors.ts';
import type { HostTensor, ModelConfig } from './types.ts';

export interface Checkpoint {
  readonly dir: string;
  readonly config: ModelConfig;
  readonly rawConfig: Record<string, unknown>;
  /** Every tensor name in the checkpoint. */
  readonly names: ReadonlySet<string>;
  /** dtype of the first floating tensor (as stored). */
  readonly dtype: string;
  /** Bytes of every tensor as float32, as the model holds its weights: known from the headers, before any read. */
  readonly float32Bytes: number;
  /** Reads one tensor as float32 (F32/F16/BF16 converted), checking its shape when given. */
  read(name: string, shape?: readonly number[]): HostTensor;
  close(): void;
}

function readJson(path: string, what: string, required: boolean): Record<string, unknown> | undefined {
  if (!existsSync(path)) {
    if (required) throw fail('CHECKPOINT_INVALID', `${what} not found at ${path}`);
    return undefined;
  }
  let parsed: unknown;
  try {
    parsed = JSON.parse(readFileSync(path, 'utf8'));
  } catch (err) {
    throw fail(what === 'config.json' ? 'CONFIG_INVALID' : 'CHECKPOINT_INVALID', `${what} is not valid JSON: ${(err as Error).message}`);
  }
  if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed)) {
    throw fail(what === 'config.json' ? 'CONFIG_INVALID' : 'CHECKPOINT_INVALID', `${what} must be a JSON object`);
  }
  return parsed as Record<string, unknown>;
}

export function openCheckpoint(dir: string): Checkpoint {
  const rawConfig = readJson(join(dir, 'config.json'), 'config.json', true)!;
  const generation = readJson(join(dir, 'generation_config.json'), 'generation_config.json', false) ?? {};
  const config = normalizeConfig(rawConfig, generation);

  // name → reader; one reader per file.
  const readers: SafetensorsReader[] = [];
  const where = new Map<string, SafetensorsReader>();
  const index = readJson(join(dir, 'model.safetensors.index.json'), 'model.safetensors.index.json', false);
  try {
    if (index) {
      const weightMap = index.weight_map;
      if (typeof weightMap !== 'object' || weightMap === null) {
        throw fail('CHECKPOINT_INVALID', 'model.safetensors.index.json has no "weight_map" object');
      }
      const byFile = new Map<string, SafetensorsReader>();
      for (const [name, file] of Object.entries(weightMap as Record<string, unknown>)) {
        if (typeof file !== 'string' || file.includes('/') || file.includes('\\') || file.startsWith('.')) {
          throw fail('CHECKPOINT_INVALID', `model.safetensors.index.json: bad file name for "${name}"`);
        }
        let reader = byFile.get(file);
        if (!reader) {
          reader = openSafetensors(join(dir, file));
          byFile.set(file, reader);
          readers.push(reader);
        }
        if (!reader.tensors.has(name)) {
          throw fail('CHECKPOINT_MISSING_TENSOR', `${file} does not contain "${name}" listed in model.safetensors.index.json`);
        }
        where.set(name, reader);
      }
    } else {
      const file = join(dir, 'model.safetensors');
      if (!existsSync(file)) {
        const bin = existsSync(join(dir, 'pytorch_model.bin'));
        throw fail('CHECKPOINT_INVALID', `no model.safetensors or model.safetensors.index.json in ${dir}` +
          (bin ? ' (pytorch_model.bin is a pickle and is never loaded: convert it to safetensors)' : ''));
      }
      const reader = openSafetensors(file);
      readers.push(reader);
      for (const name of reader.tensors.keys()) where.set(name, reader);
    }
  } catch (err) {
    for (const r of readers) r.close();
    throw err;
  }

  const first = where.keys().next().value;
  const dtype = first === undefined ? 'F32' : where.get(first)!.tensors.get(first)!.dtype;

  let float32Bytes = 0;
  for (const [name, reader] of where) float32Bytes += 4 * reader.tensors.get(name)!.shape.reduce((n, d) => n * d, 1);

  return {
    dir, config, rawConfig, dtype, float32Bytes,
    names: new Set(where.keys()),
    read(name, shape) {
      const reader = where.get(name);
      if (!reader) throw fail('CHECKPOINT_MISSING_TENSOR', `checkpoint ${dir} has no tensor "${name}"`);
      const entry = reader.tensors.get(name)!;
      if (shape && (entry.shape.length !== shape.length || entry.shape.some((d, i) => d !== shape[i]))) {
        throw fail('CHECKPOINT_SHAPE', `tensor "${name}" has shape [${entry.shape}] but the config implies [${shape}]`);
      }
      return { shape: entry.shape, data: reader.readFloat32(name) };
    },
    close() {
      for (const r of readers) r.close();
    },
  };
}
