/**
 * `adapter_config.json` (huggingface/peft `LoraConfig`) validated once into a frozen, typed object,
 * plus the three questions the loader asks of it: does this module belong to the adapter
 * (`matchesTarget`), with which scaling (`scalingFor`), and in which layer (`layerIndexOf`).
 *
 * Matching mirrors peft `check_target_module_exists` / `get_pattern_key`. Module paths given to
 * these helpers are the names PEFT matched while training, i.e. the tensor name without its
 * `base_model.model.` prefix (`transformer.h.0.attn.c_attn`, `model.layers.3.self_attn.q_proj`).
 */

import { RE2JS } from 're2js';
import { fail } from '../errors.ts';

export type TargetModules = readonly string[] | { readonly regex: string } | 'all-linear';

export interface PeftConfig {
  readonly r: number;
  readonly loraAlpha: number;
  readonly useRslora: boolean;
  /** A list (exact name or `.`-suffix match), a regex (full match), or PEFT's `all-linear`. */
  readonly targetModules: TargetModules;
  /** peft `exclude_modules`, same forms as a list/regex target; null when absent. */
  readonly excludeModules: readonly string[] | { readonly regex: string } | null;
  /** rank_pattern / alpha_pattern in dict order (first matching key wins). */
  readonly rankPattern: readonly (readonly [key: string, r: number])[];
  readonly alphaPattern: readonly (readonly [key: string, alpha: number])[];
  /** True for GPT-2 Conv1D targets. A and B are stored as for Linear; only a merged delta is transposed. */
  readonly fanInFanOut: boolean;
  /** Layer indices the adapter was restricted to; null = all layers. */
  readonly layersToTransform: readonly number[] | null;
  /** Names of the layer list (`h`, `layers`); null = any `<name>.<index>.` segment. */
  readonly layersPattern: readonly string[] | null;
  readonly baseModel?: string;
}

/** Embedding / output-head module names: LoRA on them is not supported by this server. */
const EMBEDDING_NAMES = ['embed_tokens', 'wte', 'wpe', 'lm_head'] as const;
/** Paths the regex form of target_modules is probed with to detect embedding targets. */
const EMBEDDING_PROBES = [
  'transformer.wte', 'transformer.wpe', 'wte', 'wpe',
  'model.embed_tokens', 'embed_tokens', 'lm_head',
] as const;

/**
 * Optional LoraConfig fields that change what the adapter computes; when set (non-null, non-empty,
 * not false) the adapter cannot be served as plain LoRA.
 */
const UNSUPPORTED_WHEN_SET: readonly (readonly [field: string, why: string])[] = [
  ['use_dora', 'DoRA (use_dora: true) is not supported'],
  ['lora_bias', 'LoRA bias (lora_bias: true) is not supported'],
  ['modules_to_save', 'modules_to_save (fully trained extra modules) is not supported'],
  ['trainable_token_indices', 'trainable_token_indices (embedding updates) is not supported'],
  ['layer_replication', 'layer_replication is not supported'],
  ['target_parameters', 'target_parameters (LoRA on raw parameters) is not supported'],
  ['alora_invocation_tokens', 'activated LoRA (alora_invocation_tokens) is not supported'],
];

const invalid = (msg: string) => fail('ADAPTER_INVALID_CONFIG', `adapter_config.json: ${msg}`);
const unsupported = (msg: string) => fail('ADAPTER_UNSUPPORTED', `adapter_config.json: ${msg}`);

function isSet(v: unknown): boolean {
  if (v === undefined || v === null || v === false) return false;
  if (Array.isArray(v)) return v.length > 0;
  if (typeof v === 'object') return Object.keys(v).length > 0;
  return true;
}

function isPositiveInt(v: unknown): v is number {
  return typeof v === 'number' && Number.isInteger(v) && v > 0;
}

/** Longest pattern accepted in an adapter config. */
const MAX_PATTERN_LENGTH = 1024;

/**
 * Compiles a pattern from an adapter config with RE2 semantics (re2js): matching takes time linear in the input, so
 * no config can stall the event loop with catastrophic backtracking, as `(a|aa)*c` or `.*.*.*=` do in a backtracking
 * engine. RE2 has no lookarounds or backreferences; a pattern that uses them is refused with its field named.
 */
function userRegex(source: string, wrapped: string, what: string): RE2JS {
  if (source.length > MAX_PATTERN_LENGTH) throw invalid(`${what} is longer than ${MAX_PATTERN_LENGTH} characters`);
  try {
    return RE2JS.compile(wrapped);
  } catch (err) {
    throw invalid(`${what} ${JSON.stringify(source)} is not a supported regular expression (${(err as Error).message}; `
      + 'patterns are matched with RE2 syntax: no lookarounds or backreferences)');
  }
}

/** A target_modules / exclude_modules regex: a full match of the module path (peft's re.fullmatch). */
function fullMatchRegex(source: string, field: string): RE2JS {
  return userRegex(source, `^(?:${source})$`, field);
}

/** rank_pattern / alpha_pattern key → `re.match(r"(.*\.)?(" + key + r")$", name)`. */
function patternRegex(key: string, field: string): RE2JS {
  return userRegex(key, `^(?:.*\\.)?(?:${key})$`, `${field} key`);
}

/** layers_pattern p → peft's `.*\.{p}\.(\d+)\.`, also at the start of the path; group 1 is the layer index. */
function layerRegex(p: string): RE2JS {
  return userRegex(p, `^(?:.*\\.)?(?:${p})\\.(\\d+)\\.`, 'layers_pattern');
}

const test = (re: RE2JS, s: string): boolean => re.matcher(s).find();

function optionalBool(json: Record<string, unknown>, field: string): boolean {
  const v = json[field];
  if (v === undefined || v === null) return false;
  if (typeof v !== 'boolean') throw invalid(`${field} must be a boolean, got ${JSON.stringify(v)}`);
  return v;
}

function parseModuleList(v: unknown, field: string): string[] | { regex: string } {
  if (typeof v === 'string') {
    fullMatchRegex(v, field);
    return Object.freeze({ regex: v });
  }
  if (!Array.isArray(v) || v.some((t) => typeof t !== 'string' || t.length === 0)) {
    throw invalid(`${field} must be a list of module names or a regex string, got ${JSON.stringify(v)}`);
  }
  return Object.freeze([...new Set(v as string[])]) as string[];
}

function parseTargets(v: unknown): TargetModules {
  if (v === undefined || v === null) {
    throw invalid('target_modules is required (a list of module names, a regex string or "all-linear")');
  }
  if (typeof v === 'string' && v.toLowerCase() === 'all-linear') return 'all-linear';
  const t = parseModuleList(v, 'target_modules');
  if (Array.isArray(t)) {
    if (t.length === 0) throw invalid('target_modules is empty');
    const emb = t.find((name) => EMBEDDING_NAMES.some((e) => name === e || name.endsWith(`.${e}`)));
    if (emb !== undefined) {
      throw unsupported(`target_modules names the embedding/output module "${emb}"; LoRA on embeddings or lm_head is not supported`);
    }
  } else {
    const re = fullMatchRegex((t as { regex: string }).regex, 'target_modules');
    const emb = EMBEDDING_PROBES.find((p) => test(re, p));
    if (emb !== undefined) {
      throw unsupported(`target_modules regex ${JSON.stringify((t as { regex: string }).regex)} selects the embedding/output module "${emb}"; LoRA on embeddings or lm_head is not supported`);
    }
  }
  return t;
}

function parsePattern(v: unknown, field: string, check: (key: string, value: unknown) => number): [string, number][] {
  if (v === undefined || v === null) return [];
  if (typeof v !== 'object' || Array.isArray(v)) throw invalid(`${field} must be an object mapping module patterns to values`);
  return Object.entries(v as Record<string, unknown>).map(([key, value]) => {
    patternRegex(key, field);
    return Object.freeze([key, check(key, value)]) as [string, number];
  });
}

/**
 * Validates a parsed adapter_config.json. Unknown extra fields are ignored; fields that would
 * change the computation beyond plain LoRA are rejected as ADAPTER_UNSUPPORTED.
 */
export function parsePeftConfig(json: unknown, opts: { maxRank: number }): PeftConfig {
  if (typeof json !== 'object' || json === null || Array.isArray(json)) throw invalid('must be a JSON object');
  const c = json as Record<string, unknown>;

  if (c.peft_type !== undefined && c.peft_type !== 'LORA') {
    throw invalid(`peft_type must be "LORA", got ${JSON.stringify(c.peft_type)}`);
  }
  for (const [field, why] of UNSUPPORTED_WHEN_SET) {
    if (isSet(c[field])) throw unsupported(why);
  }
  if (c.bias !== undefined && c.bias !== null && c.bias !== 'none') {
    if (typeof c.bias !== 'string') throw invalid(`bias must be a string, got ${JSON.stringify(c.bias)}`);
    throw unsupported(`bias "${c.bias}" is not supported (only "none")`);
  }

  if (!isPositiveInt(c.r)) throw invalid(`r must be a positive integer, got ${JSON.stringify(c.r)}`);
  if (c.r > opts.maxRank) {
    throw fail('ADAPTER_RANK_TOO_LARGE', `adapter_config.json: r=${c.r} exceeds the server's max LoRA rank ${opts.maxRank}`);
  }
  if (typeof c.lora_alpha !== 'number' || !Number.isFinite(c.lora_alpha)) {
    throw invalid(`lora_alpha must be a finite number, got ${JSON.stringify(c.lora_alpha)}`);
  }

  const rankPattern = parsePattern(c.rank_pattern, 'rank_pattern', (key, value) => {
    if (!isPositiveInt(value)) throw invalid(`rank_pattern["${key}"] must be a positive integer, got ${JSON.stringify(value)}`);
    if (value > opts.maxRank) {
      throw fail('ADAPTER_RANK_TOO_LARGE', `adapter_config.json: rank_pattern["${key}"]=${value} exceeds the server's max LoRA rank ${opts.maxRank}`);
    }
    return value;
  });
  const alphaPattern = parsePattern(c.alpha_pattern, 'alpha_pattern', (key, value) => {
    if (typeof value !== 'number' || !Number.isFinite(value)) {
      throw invalid(`alpha_pattern["${key}"] must be a finite number, got ${JSON.stringify(value)}`);
    }
    return value;
  });

  let layersToTransform: number[] | null = null;
  const ltt = c.layers_to_transform;
  if (ltt !== undefined && ltt !== null) {
    const list = typeof ltt === 'number' ? [ltt] : ltt;
    if (!Array.isArray(list) || list.some((i) => typeof i !== 'number' || !Number.isInteger(i) || i < 0)) {
      throw invalid(`layers_to_transform must be a non-negative integer or a list of them, got ${JSON.stringify(ltt)}`);
    }
    if (list.length > 0) layersToTransform = Object.freeze([...list]) as number[];
  }
  let layersPattern: string[] | null = null;
  const lp = c.layers_pattern;
  if (lp !== undefined && lp !== null) {
    const list = typeof lp === 'string' ? (lp === '' ? [] : [lp]) : lp;
    if (!Array.isArray(list) || list.some((p) => typeof p !== 'string' || p.length === 0)) {
      throw invalid(`layers_pattern must be a string or a list of strings, got ${JSON.stringify(lp)}`);
    }
    for (const p of list as string[]) layerRegex(p);
    if (list.length > 0) layersPattern = Object.freeze([...list]) as string[];
  }

  const excludeModules = isSet(c.exclude_modules) ? parseModuleList(c.exclude_modules, 'exclude_modules') : null;
  const baseModel = typeof c.base_model_name_or_path === 'string' ? c.base_model_name_or_path : undefined;

  return Object.freeze({
    r: c.r,
    loraAlpha: c.lora_alpha,
    useRslora: optionalBool(c, 'use_rslora'),
    targetModules: parseTargets(c.target_modules),
    excludeModules,
    rankPattern: Object.freeze(rankPattern),
    alphaPattern: Object.freeze(alphaPattern),
    fanInFanOut: optionalBool(c, 'fan_in_fan_out'),
    layersToTransform,
    layersPattern,
    ...(baseModel !== undefined ? { baseModel } : {}),
  });
}

// Compiled regexes per source string: configs are frozen, so the cache never goes stale.
const regexCache = new Map<string, RE2JS>();
function cached(source: string, make: () => RE2JS): RE2JS {
  let re = regexCache.get(source);
  if (re === undefined) {
    re = make();
    if (regexCache.size > 1024) regexCache.clear();
    regexCache.set(source, re);
  }
  return re;
}

function listOrRegexHits(t: readonly string[] | { readonly regex: string }, path: string): 'exact' | 'suffix' | 'regex' | null {
  if ('regex' in t) return test(cached(`full:${t.regex}`, () => fullMatchRegex(t.regex, 'regex')), path) ? 'regex' : null;
  const list = t as readonly string[];
  if (list.includes(path)) return 'exact';
  return list.some((name) => path.endsWith(`.${name}`)) ? 'suffix' : null;
}

/**
 * The layer index of a module path: the number after `<pattern>.` (`h.3.attn.c_attn` → 3 for
 * pattern `h`), or after any path component when `layersPattern` is null. Unlike peft's
 * `.*\.{pattern}\.(\d+)\.`, the pattern may also start the path (adapters saved against a bare
 * base model: `h.3.attn.c_attn`). Returns null when there is no such segment.
 */
export function layerIndexOf(modulePath: string, layersPattern: readonly string[] | null): number | null {
  const patterns = layersPattern ?? ['[^.]*'];
  for (const p of patterns) {
    const m = cached(`layer:${p}`, () => layerRegex(p)).matcher(modulePath);
    if (m.find()) return Number(m.group(1));
  }
  return null;
}

/**
 * Whether peft would have put a LoRA layer on `modulePath`: not excluded, then a regex target
 * must match the whole path, a list target must equal it or be a `.`-suffix of it, and
 * `all-linear` takes every linear module except the output layer. layers_to_transform then
 * filters suffix (and all-linear) hits by layer index, as in peft (exact and regex hits are kept).
 */
export function matchesTarget(cfg: PeftConfig, modulePath: string, isOutputLayer = false): boolean {
  if (cfg.excludeModules !== null && listOrRegexHits(cfg.excludeModules, modulePath) !== null) return false;
  let hit: 'exact' | 'suffix' | 'regex' | null;
  if (cfg.targetModules === 'all-linear') hit = isOutputLayer ? null : 'suffix';
  else hit = listOrRegexHits(cfg.targetModules, modulePath);
  if (hit !== 'suffix' || cfg.layersToTransform === null) return hit !== null;
  const layer = layerIndexOf(modulePath, cfg.layersPattern);
  return layer !== null && cfg.layersToTransform.includes(layer);
}

function patternValue(pattern: readonly (readonly [string, number])[], modulePath: string): number | undefined {
  for (const [key, value] of pattern) {
    if (test(cached(`pat:${key}`, () => patternRegex(key, 'pattern')), modulePath)) return value;
  }
  return undefined;
}

/** The rank the config declares for a module (rank_pattern, else r). Informational: the tensor's own rank wins. */
export function rankFor(cfg: PeftConfig, modulePath: string): number {
  return patternValue(cfg.rankPattern, modulePath) ?? cfg.r;
}

/**
 * LoRA scaling for one module: alpha / r, or alpha / sqrt(r) with rsLoRA, where alpha comes from
 * alpha_pattern (first key in dict order with `^(.*\.)?(key)$` matching the path) else lora_alpha,
 * and r is the tensor's own rank (`lora_A.shape[0]`).
 */
export function scalingFor(cfg: PeftConfig, modulePath: string, tensorRank: number): number {
  const alpha = patternValue(cfg.alphaPattern, modulePath) ?? cfg.loraAlpha;
  return cfg.useRslora ? alpha / Math.sqrt(tensorRank) : alpha / tensorRank;
}
