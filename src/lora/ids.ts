/**
 * Adapter ids: `name` or `org/name` (the Hugging Face hub shape), each segment of
 * `[A-Za-z0-9._-]`, 1–128 characters in all. A segment may not start with `.` — that rules out
 * `.` and `..`, hidden folders, and the store's own `.tmp-*` / `.old-*` work folders.
 */

import path from 'node:path';
import { fail } from '../errors.ts';

const ID_RE = /^[A-Za-z0-9._-]+(?:\/[A-Za-z0-9._-]+)?$/;
export const MAX_ADAPTER_ID_LENGTH = 128;

export function validateAdapterId(id: unknown): string {
  if (typeof id !== 'string') throw fail('ADAPTER_INVALID_ID', 'adapter id must be a string');
  const shown = JSON.stringify(id.length > 40 ? `${id.slice(0, 40)}…` : id);
  if (id.length === 0 || id.length > MAX_ADAPTER_ID_LENGTH) {
    throw fail('ADAPTER_INVALID_ID', `adapter id ${shown} must be 1-${MAX_ADAPTER_ID_LENGTH} characters long (got ${id.length})`);
  }
  if (!ID_RE.test(id)) {
    throw fail('ADAPTER_INVALID_ID', `adapter id ${shown} may only contain A-Z a-z 0-9 . _ - and at most one "/" (org/name)`);
  }
  if (id.split('/').some((segment) => segment.startsWith('.'))) {
    throw fail('ADAPTER_INVALID_ID', `adapter id ${shown} has a segment starting with "." (".", ".." and hidden names are not allowed)`);
  }
  return id;
}

/** The adapter's folder under `root`, guaranteed (and re-checked after path.resolve) to lie inside it. */
export function adapterDirFor(root: string, id: string): string {
  validateAdapterId(id);
  const base = path.resolve(root);
  const dir = path.resolve(base, ...id.split('/'));
  if (!dir.startsWith(base + path.sep)) {
    throw fail('ADAPTER_INVALID_ID', `adapter id ${JSON.stringify(id)} resolves outside the adapter folder`);
  }
  return dir;
}
