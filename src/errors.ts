/**
 * The one error catalogue. Every error the server can answer with has a stable `code`,
 * an HTTP status and an `error_type` (the TGI/LoRAX convention for the JSON body
 * `{ "error": message, "error_type": type }`). Code matches on `err.code`, never `instanceof`.
 */

export const ERRORS = {
  // --- request validation (HTTP layer, engine) ---
  VALIDATION: { status: 422, type: 'validation' },
  BAD_REQUEST: { status: 400, type: 'validation' },
  /** A request field the API does not know (a typo, or another server's extension): the message lists the known ones. */
  UNKNOWN_FIELD: { status: 422, type: 'validation' },
  /** A known request field asking for something the server does not implement (README "HTTP API"). */
  UNSUPPORTED_PARAMETER: { status: 422, type: 'validation' },
  INPUT_TOO_LONG: { status: 422, type: 'validation' },
  PAYLOAD_TOO_LARGE: { status: 413, type: 'payload_too_large' },
  UNSUPPORTED_MEDIA_TYPE: { status: 415, type: 'validation' },
  UNAUTHORIZED: { status: 401, type: 'unauthorized' },
  /** An admin route (adapter upload, delete, load/unload) called with the plain API key while --admin-api-key is set. */
  ADMIN_KEY_REQUIRED: { status: 403, type: 'forbidden' },
  NOT_FOUND: { status: 404, type: 'not_found' },
  // --- adapters ---
  ADAPTER_NOT_FOUND: { status: 404, type: 'adapter_not_found' },
  ADAPTER_INVALID_ID: { status: 400, type: 'validation' },
  ADAPTER_INVALID_CONFIG: { status: 422, type: 'adapter_invalid' },
  ADAPTER_UNSUPPORTED: { status: 422, type: 'adapter_unsupported' },
  ADAPTER_SHAPE_MISMATCH: { status: 422, type: 'adapter_invalid' },
  ADAPTER_UNKNOWN_MODULE: { status: 422, type: 'adapter_invalid' },
  ADAPTER_RANK_TOO_LARGE: { status: 422, type: 'adapter_invalid' },
  ADAPTER_NON_FINITE: { status: 422, type: 'adapter_invalid' },
  ADAPTER_PICKLE: { status: 422, type: 'adapter_unsupported' },
  ADAPTER_FETCH_FAILED: { status: 502, type: 'adapter_fetch_failed' },
  ADAPTER_FETCH_TIMEOUT: { status: 504, type: 'adapter_fetch_failed' },
  ADAPTER_TOO_LARGE: { status: 413, type: 'payload_too_large' },
  ADAPTER_BUSY: { status: 409, type: 'conflict' },
  /**
   * A local adapter path outside --allowed-local-adapter-paths (or a symlink leading out of it); an upload or delete
   * whose adapter folder (or org folder) in --adapter-dir is a symlink (writes never go through links).
   */
  ADAPTER_PATH_NOT_ALLOWED: { status: 403, type: 'forbidden' },
  /** OpenAI `logit_bias` with a key that is not a token id below the vocabulary size, or a bias outside [-100, 100]. */
  LOGIT_BIAS_INVALID: { status: 400, type: 'validation' },
  /** A grammar (regex, JSON schema) that cannot be parsed or matches nothing. */
  GRAMMAR_INVALID: { status: 400, type: 'validation' },
  /** A grammar using a feature the constraint compiler does not implement (named in the message: lookaround, a schema keyword...). */
  GRAMMAR_UNSUPPORTED: { status: 400, type: 'validation' },
  /** `parameters.merged_adapters` with bad values: ids, weights, strategy, density, sign method. */
  MERGE_INVALID: { status: 400, type: 'validation' },
  /** Source adapters that cannot be merged: different ranks, rank/alpha patterns (src/lora/merged-adapter.ts). */
  MERGE_INCOMPATIBLE: { status: 422, type: 'adapter_invalid' },
  /** The adapter folder's disk is full (ENOSPC) or over quota (EDQUOT): nothing was stored, nothing stored was lost. */
  INSUFFICIENT_STORAGE: { status: 507, type: 'insufficient_storage' },
  /** The adapter folder cannot be written (read-only filesystem, permissions): nothing was stored, nothing stored was lost. */
  STORAGE_UNAVAILABLE: { status: 503, type: 'storage_unavailable' },
  // --- the Hugging Face Hub (--model org/name, adapters with adapter_source "hub"; src/hub/client.ts) ---
  /** The Hub answered 401 or 403: a private or gated repo, and no token or a refused one. */
  HUB_ACCESS_DENIED: { status: 403, type: 'forbidden' },
  /** The Hub answered 404: no such repo, revision or file. */
  HUB_NOT_FOUND: { status: 404, type: 'not_found' },
  /** HF_HUB_OFFLINE is set (or the Hub could not be reached) and the repo, revision or file is not in the cache. */
  HUB_NOT_CACHED: { status: 404, type: 'not_found' },
  /** The Hub could not be reached, timed out, or answered with another error. */
  HUB_UNAVAILABLE: { status: 502, type: 'hub_unavailable' },
  // --- checkpoint / safetensors (startup or adapter files) ---
  SAFETENSORS_INVALID: { status: 422, type: 'invalid_file' },
  SAFETENSORS_DTYPE: { status: 422, type: 'invalid_file' },
  CHECKPOINT_INVALID: { status: 500, type: 'invalid_checkpoint' },
  CHECKPOINT_MISSING_TENSOR: { status: 500, type: 'invalid_checkpoint' },
  CHECKPOINT_SHAPE: { status: 500, type: 'invalid_checkpoint' },
  CONFIG_INVALID: { status: 500, type: 'invalid_config' },
  MODEL_TYPE_UNSUPPORTED: { status: 500, type: 'invalid_config' },
  /** A config.json field whose math the server does not implement (named in the message): refused rather than served approximately. */
  CONFIG_UNSUPPORTED: { status: 500, type: 'invalid_config' },
  TOKENIZER_INVALID: { status: 500, type: 'invalid_tokenizer' },
  // --- serving ---
  OVERLOADED: { status: 429, type: 'overloaded' },
  NOT_READY: { status: 503, type: 'not_ready' },
  SHUTTING_DOWN: { status: 503, type: 'shutting_down' },
  CANCELLED: { status: 499, type: 'cancelled' },
  TIMEOUT: { status: 504, type: 'timeout' },
  GENERATION: { status: 424, type: 'generation' },
  BACKEND_UNAVAILABLE: { status: 500, type: 'backend' },
  /** A weight tensor larger than the backend can hold in one buffer (webgpu: maxStorageBufferBindingSize). */
  MODEL_TOO_LARGE: { status: 500, type: 'backend' },
  /** The WebGPU device rejected an operation (src/backend/webgpu/guard.ts): the step's results are discarded. */
  DEVICE_ERROR: { status: 500, type: 'backend' },
  /**
   * An executor worker thread died: the requests it was running fail with it, and /health answers it until the
   * process is restarted (the other workers keep serving meanwhile).
   */
  WORKER_DIED: { status: 503, type: 'backend' },
  INTERNAL: { status: 500, type: 'internal' },
} as const satisfies Record<string, { status: number; type: string }>;

export type ErrorCode = keyof typeof ERRORS;

export class ServeError extends Error {
  readonly code: ErrorCode;
  readonly status: number;
  readonly errorType: string;
  /**
   * Extra machine-readable fields (never internals): retryAfter seconds for OVERLOADED; `param`, the
   * request field at fault (dotted path), which OpenAI-shaped error bodies report.
   */
  readonly details?: Record<string, unknown>;

  constructor(code: ErrorCode, message: string, details?: Record<string, unknown>, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'ServeError';
    this.code = code;
    this.status = ERRORS[code].status;
    this.errorType = ERRORS[code].type;
    this.details = details;
  }
}

/** Shorthand: `throw fail('ADAPTER_NOT_FOUND', 'adapter "x" not found')`. */
export function fail(code: ErrorCode, message: string, details?: Record<string, unknown>): ServeError {
  return new ServeError(code, message, details);
}

export function isServeError(err: unknown): err is ServeError {
  return typeof err === 'object' && err !== null && typeof (err as { code?: unknown }).code === 'string' &&
    (err as { code: string }).code in ERRORS && (err as { name?: unknown }).name === 'ServeError';
}

/** The JSON body for an error. 5xx bodies that are not ServeErrors never leak internals. */
export function errorBody(err: unknown): { status: number; body: { error: string; error_type: string; code: string } } {
  if (isServeError(err)) {
    return { status: err.status, body: { error: err.message, error_type: err.errorType, code: err.code } };
  }
  return { status: 500, body: { error: 'internal server error', error_type: 'internal', code: 'INTERNAL' } };
}
