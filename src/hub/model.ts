/**
 * A base model from the Hub (`--model org/name[@revision]`): the files the server reads, downloaded into the
 * cache (src/hub/client.ts), and the snapshot folder to load them from.
 */
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { fail } from '../errors.ts';
import { snapshotFiles, type HubClient, type RepoSpec, type Snapshot } from './client.ts';

/** Read by the checkpoint and tokenizer loaders when present (config.json is required). */
const MODEL_FILES = ['config.json', 'generation_config.json', 'tokenizer.json', 'tokenizer_config.json', 'chat_template.jinja', 'chat_template.json'];
const INDEX = 'model.safetensors.index.json';
const WEIGHTS = 'model.safetensors';

/** The model's snapshot folder with every file it needs in the cache (downloaded unless offline). */
export async function downloadModel(hub: HubClient, spec: RepoSpec): Promise<Snapshot> {
  const snap = await hub.resolve(spec);
  const files = new Set(snap.files ?? await snapshotFiles(snap.dir));
  const missing = (what: string) => snap.cachedOnly
    ? fail('HUB_NOT_CACHED', `Hub repo "${spec.repo}": ${what} of commit ${snap.commit} is not in the cache ${hub.settings.cacheDir}`)
    : fail('HUB_NOT_FOUND', `Hub repo "${spec.repo}" at revision "${spec.revision}" has no ${what}`);
  if (!files.has('config.json')) throw missing('config.json');
  for (const f of MODEL_FILES) if (files.has(f)) await hub.file(snap, f);
  if (files.has(INDEX)) {
    for (const shard of await shardsOf(await hub.file(snap, INDEX), spec.repo)) await hub.file(snap, shard);
  } else if (files.has(WEIGHTS)) {
    await hub.file(snap, WEIGHTS);
  } else {
    throw missing(`${WEIGHTS} or ${INDEX}${files.has('pytorch_model.bin') ? ' (only pytorch_model.bin, a pickle, which is never loaded)' : ''}`);
  }
  return snap;
}

/** The shard files an index's weight_map names (plain names in the snapshot folder). */
async function shardsOf(indexPath: string, repo: string): Promise<string[]> {
  let map: unknown;
  try {
    map = (JSON.parse(await readFile(indexPath, 'utf8')) as { weight_map?: unknown }).weight_map;
  } catch {
    map = undefined;
  }
  if (typeof map !== 'object' || map === null) throw fail('CHECKPOINT_INVALID', `Hub repo "${repo}": ${INDEX} has no "weight_map" object`);
  const shards = [...new Set(Object.values(map))];
  for (const s of shards) {
    if (typeof s !== 'string' || s !== path.basename(s) || s.startsWith('.')) throw fail('CHECKPOINT_INVALID', `Hub repo "${repo}": ${INDEX} names a bad shard file ${JSON.stringify(s)}`);
  }
  return shards as string[];
}
