/**
 * Adapters read from a local folder named by a client (vLLM's `POST /v1/load_lora_adapter` `lora_path`). A folder
 * is read only when it lies inside one of the allowed roots (`--allowed-local-adapter-paths`): the folder and both
 * adapter files are resolved through every symlink first, and the real paths must stay inside a root's real path,
 * so a symlink that leads out of a root is refused like a path outside it. Anything else is ADAPTER_PATH_NOT_ALLOWED.
 */
import { realpath } from 'node:fs/promises';
import path from 'node:path';
import { fail } from '../errors.ts';
import { CONFIG_FILE, readAdapterFolder, WEIGHTS_FILE, type AdapterFiles } from './store.ts';

const isMissing = (err: unknown) => ['ENOENT', 'ENOTDIR'].includes((err as NodeJS.ErrnoException).code ?? '');

/** The comma-separated --allowed-local-adapter-paths value as absolute folders (empty: none allowed). */
export function parseAllowedRoots(value: string): string[] {
  return value.split(',').map((s) => s.trim()).filter((s) => s !== '').map((s) => path.resolve(s));
}

function inside(root: string, p: string): boolean {
  return p === root || p.startsWith(root.endsWith(path.sep) ? root : root + path.sep);
}

/** realpath, or null when the path does not exist. */
async function real(p: string): Promise<string | null> {
  try {
    return await realpath(p);
  } catch (err) {
    if (isMissing(err)) return null;
    throw err;
  }
}

/**
 * The files of the adapter folder `folder` (an absolute path), read as adapter `id`; the caller validates them.
 * Throws ADAPTER_PATH_NOT_ALLOWED (relative path, no allowed roots, outside every root, a symlink out of it),
 * ADAPTER_NOT_FOUND (no such folder or no adapter_config.json), or the store's read errors.
 */
export async function readAllowedAdapterFolder(
  id: string, folder: string, roots: readonly string[], maxAdapterBytes: number,
): Promise<AdapterFiles> {
  // Messages name the field, not its value: an error body never carries an absolute path (README "Security").
  const field = "`lora_path`";
  if (roots.length === 0) {
    throw fail('ADAPTER_PATH_NOT_ALLOWED', `loading adapters from local paths is disabled; start the server with --allowed-local-adapter-paths DIR[,DIR] to allow it`);
  }
  if (!path.isAbsolute(folder)) throw fail('ADAPTER_PATH_NOT_ALLOWED', `${field} must be an absolute path`);
  const realRoots = (await Promise.all(roots.map(real))).filter((r): r is string => r !== null);
  // The allowed folders are the server's own paths: the message does not list them.
  const notAllowed = () => fail('ADAPTER_PATH_NOT_ALLOWED', `${field} is not inside an allowed folder (--allowed-local-adapter-paths)`);
  // The path as written must lie in a root too: "/allowed/../etc" is refused even where it resolves inside one.
  if (!roots.some((r) => inside(r, path.normalize(folder))) || folder.split(/[\\/]/).includes('..')) throw notAllowed();
  const dir = await real(folder);
  if (dir === null) throw fail('ADAPTER_NOT_FOUND', `${field} does not exist`);
  const root = realRoots.find((r) => inside(r, dir));
  if (root === undefined) throw notAllowed();
  for (const file of [CONFIG_FILE, WEIGHTS_FILE]) {
    const target = await real(path.join(dir, file));
    if (target !== null && !inside(root, target)) {
      throw fail('ADAPTER_PATH_NOT_ALLOWED', `${field}: ${file} is a symlink that leads out of the allowed folder`);
    }
  }
  const files = await readAdapterFolder(id, dir, maxAdapterBytes, (n) => new Uint8Array(n));
  if (files === null) throw fail('ADAPTER_NOT_FOUND', `${field} has no ${CONFIG_FILE}`);
  return files;
}
