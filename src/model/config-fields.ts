/**
 * Typed reads of config.json values: a wrong type or range is CONFIG_INVALID, naming the field. `prefix` names a
 * nested object's fields (e.g. "rope_scaling." for rope_scaling.factor).
 */
import { fail } from '../errors.ts';

export type Json = Record<string, unknown>;

const name = (key: string, prefix: string): string => `config.json: "${prefix}${key}"`;

export function int(obj: Json, key: string, fallback?: number, prefix = ''): number {
  const v = obj[key] ?? fallback;
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v <= 0) {
    throw fail('CONFIG_INVALID', `${name(key, prefix)} must be a positive integer (got ${JSON.stringify(obj[key])})`);
  }
  return v;
}

export function num(obj: Json, key: string, fallback?: number, prefix = ''): number {
  const v = obj[key] ?? fallback;
  if (typeof v !== 'number' || !Number.isFinite(v) || v <= 0) {
    throw fail('CONFIG_INVALID', `${name(key, prefix)} must be a positive number (got ${JSON.stringify(obj[key])})`);
  }
  return v;
}

export function flag(obj: Json, key: string, fallback = false, prefix = ''): boolean {
  const v = obj[key] ?? fallback;
  if (typeof v !== 'boolean') throw fail('CONFIG_INVALID', `${name(key, prefix)} must be a boolean (got ${JSON.stringify(v)})`);
  return v;
}
