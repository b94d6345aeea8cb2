/**
 * safetensors reader and writer (huggingface/safetensors format).
 *
 * Layout: u64 little-endian header length N, N bytes of UTF-8 JSON
 * `{ name: { dtype, shape, data_offsets: [begin, end] }, "__metadata__": { str: str } }`, then the data;
 * offsets are relative to the end of the header. Validation follows the reference implementation
 * (`Metadata::validate` in safetensors/src/tensor.rs): sorted by offset, tensors must tile the data
 * section contiguously from 0 to its very end, and each byte range must equal numel × dtype size.
 *
 * The reader never reads past the file: every problem is a coded `SAFETENSORS_INVALID` (structure)
 * or `SAFETENSORS_DTYPE` (unsupported dtype) error naming the file. The host is assumed little-endian
 * (as the format is), which holds for every platform Node supports in practice.
 */
import * as fs from 'node:fs';
import { fail } from '../errors.ts';

export type Dtype = 'F64' | 'F32' | 'F16' | 'BF16' | 'I64' | 'I32' | 'I16' | 'I8' | 'U8' | 'BOOL' | string;

/** One tensor of the header; `begin`/`end` are absolute byte offsets in the file (or buffer). */
export interface TensorEntry {
  readonly name: string;
  readonly dtype: string;
  readonly shape: readonly number[];
  readonly begin: number;
  readonly end: number;
}

export interface SafetensorsReader {
  /** The file path, or a label for in-memory buffers. */
  readonly source: string;
  readonly metadata: Readonly<Record<string, string>>;
  readonly tensors: ReadonlyMap<string, TensorEntry>;
  /** The tensor as float32 (F32, F16, BF16 converted exactly). Missing name: CHECKPOINT_MISSING_TENSOR. */
  readFloat32(name: string): Float32Array;
  /**
   * As readFloat32, but an F32 tensor at a 4-byte aligned address of an in-memory buffer comes back as a
   * view of that buffer (no copy): valid only while the buffer is, and never to be written.
   */
  viewFloat32(name: string): Float32Array;
  /** The tensor's raw little-endian bytes, whatever its dtype. */
  readRaw(name: string): Uint8Array;
  close(): void;
}

/** Same limit as the reference implementation (MAX_HEADER_SIZE). */
const MAX_HEADER_BYTES = 100_000_000;

/** Bytes per element of every dtype the reference implementation knows. */
const DTYPE_BYTES: Readonly<Record<string, number>> = {
  BOOL: 1, U8: 1, I8: 1, F8_E5M2: 1, F8_E4M3: 1,
  I16: 2, U16: 2, F16: 2, BF16: 2,
  I32: 4, U32: 4, F32: 4,
  I64: 8, U64: 8, F64: 8,
};

/** Bytes per element, or undefined for a dtype the format does not define. */
export function bytesPerElement(dtype: string): number | undefined {
  return Object.hasOwn(DTYPE_BYTES, dtype) ? DTYPE_BYTES[dtype] : undefined;
}

// ---------------------------------------------------------------------------------------------
// Header parsing and validation (shared by the file and the in-memory reader)
// ---------------------------------------------------------------------------------------------

interface ParsedHeader {
  readonly metadata: Readonly<Record<string, string>>;
  readonly tensors: ReadonlyMap<string, TensorEntry>;
}

function invalid(source: string, problem: string): Error {
  return fail('SAFETENSORS_INVALID', `invalid safetensors file ${source}: ${problem}`);
}

/** Reads the u64 header length from the first 8 bytes and checks it against the file size. */
function headerLength(prefix: Uint8Array, fileSize: number, source: string): number {
  if (fileSize < 8) throw invalid(source, `file is ${fileSize} bytes, shorter than the 8-byte header length`);
  const n = new DataView(prefix.buffer, prefix.byteOffset, 8).getBigUint64(0, true);
  if (n > BigInt(MAX_HEADER_BYTES)) throw invalid(source, `header length ${n} exceeds ${MAX_HEADER_BYTES} bytes`);
  const len = Number(n);
  if (len > fileSize - 8) throw invalid(source, `header length ${len} runs past the end of the ${fileSize}-byte file`);
  return len;
}

function isSafeNonNegativeInt(v: unknown): v is number {
  return typeof v === 'number' && Number.isSafeInteger(v) && v >= 0;
}

/**
 * Parses and validates the JSON header. `dataStart` is the absolute offset of the data section and
 * `dataLength` its size in bytes.
 */
function parseHeader(headerBytes: Uint8Array, dataStart: number, dataLength: number, source: string): ParsedHeader {
  let text: string;
  try {
    text = new TextDecoder('utf-8', { fatal: true }).decode(headerBytes);
  } catch {
    throw invalid(source, 'header is not valid UTF-8');
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch {
    throw invalid(source, 'header is not valid JSON');
  }
  if (typeof json !== 'object' || json === null || Array.isArray(json)) {
    throw invalid(source, 'header is not a JSON object');
  }

  const metadata: Record<string, string> = {};
  const entries: TensorEntry[] = [];
  for (const [name, raw] of Object.entries(json as Record<string, unknown>)) {
    if (name === '__metadata__') {
      if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) {
        throw invalid(source, '__metadata__ is not an object');
      }
      for (const [k, v] of Object.entries(raw as Record<string, unknown>)) {
        if (typeof v !== 'string') throw invalid(source, `__metadata__["${k}"] is not a string`);
        metadata[k] = v;
      }
      continue;
    }
    entries.push(parseEntry(name, raw, dataStart, source));
  }

  // The reference implementation sorts by offsets and requires the tensors to tile the data
  // section exactly: no gaps, no overlaps, nothing after the last tensor.
  entries.sort((a, b) => a.begin - b.begin || a.end - b.end);
  let cursor = dataStart;
  for (const e of entries) {
    if (e.begin !== cursor) {
      const why = e.begin < cursor ? 'overlaps the previous tensor' : 'leaves a gap before it';
      throw invalid(source, `tensor "${e.name}" ${why} (data_offsets [${e.begin - dataStart}, ${e.end - dataStart}])`);
    }
    cursor = e.end;
  }
  const dataEnd = dataStart + dataLength;
  if (cursor > dataEnd) {
    throw invalid(source, `tensor data ends at byte ${cursor - dataStart} but the data section has ${dataLength} bytes (truncated file?)`);
  }
  if (cursor < dataEnd) {
    throw invalid(source, `tensors cover ${cursor - dataStart} bytes but the data section has ${dataLength} bytes`);
  }

  const tensors = new Map<string, TensorEntry>();
  for (const e of entries) tensors.set(e.name, e);
  return { metadata: Object.freeze(metadata), tensors };
}

function parseEntry(name: string, raw: unknown, dataStart: number, source: string): TensorEntry {
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) {
    throw invalid(source, `entry "${name}" is not an object`);
  }
  const { dtype, shape, data_offsets: offsets } = raw as Record<string, unknown>;
  if (typeof dtype !== 'string') throw invalid(source, `tensor "${name}" has no string dtype`);
  const size = bytesPerElement(dtype);
  if (size === undefined) {
    throw fail('SAFETENSORS_DTYPE', `invalid safetensors file ${source}: tensor "${name}" has unknown dtype "${dtype}"`);
  }
  if (!Array.isArray(shape) || !shape.every(isSafeNonNegativeInt)) {
    throw invalid(source, `tensor "${name}" shape is not an array of non-negative integers`);
  }
  if (!Array.isArray(offsets) || offsets.length !== 2 || !offsets.every(isSafeNonNegativeInt)) {
    throw invalid(source, `tensor "${name}" data_offsets is not a pair of non-negative integers`);
  }
  const [begin, end] = offsets as [number, number];
  if (begin > end) throw invalid(source, `tensor "${name}" data_offsets [${begin}, ${end}] are inverted`);
  let numel = 1;
  for (const d of shape as number[]) {
    numel *= d;
    if (!Number.isSafeInteger(numel * size)) throw invalid(source, `tensor "${name}" shape ${JSON.stringify(shape)} overflows`);
  }
  if (end - begin !== numel * size) {
    throw invalid(source, `tensor "${name}" has ${end - begin} bytes but ${dtype}${JSON.stringify(shape)} needs ${numel * size}`);
  }
  return Object.freeze({ name, dtype, shape: Object.freeze([...(shape as number[])]), begin: dataStart + begin, end: dataStart + end });
}

// ---------------------------------------------------------------------------------------------
// Readers
// ---------------------------------------------------------------------------------------------

/** Shared reader logic over a `readBytes(begin, end)` primitive. */
function makeReader(
  source: string,
  header: ParsedHeader,
  readBytes: (begin: number, end: number) => Uint8Array,
  close: () => void,
  view?: (begin: number, end: number) => Uint8Array,
): SafetensorsReader {
  const entry = (name: string): TensorEntry => {
    const e = header.tensors.get(name);
    if (!e) throw fail('CHECKPOINT_MISSING_TENSOR', `tensor "${name}" not found in ${source}`);
    return e;
  };
  return {
    source,
    metadata: header.metadata,
    tensors: header.tensors,
    readRaw: (name) => {
      const e = entry(name);
      return readBytes(e.begin, e.end);
    },
    readFloat32: (name) => {
      const e = entry(name);
      if (e.dtype !== 'F32' && e.dtype !== 'F16' && e.dtype !== 'BF16') {
        throw fail('SAFETENSORS_DTYPE', `tensor "${name}" in ${source} has dtype ${e.dtype}; only F32, F16 and BF16 are supported`);
      }
      return decodeFloat32(readBytes(e.begin, e.end), e.dtype);
    },
    viewFloat32(name) {
      const e = entry(name);
      const bytes = e.dtype === 'F32' ? view?.(e.begin, e.end) : undefined;
      if (!bytes || bytes.byteOffset % 4 !== 0) return this.readFloat32(name);
      return new Float32Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 4);
    },
    close,
  };
}

/** Converts raw little-endian bytes of F32/F16/BF16 to a fresh Float32Array. `bytes` must be a fresh copy. */
function decodeFloat32(bytes: Uint8Array, dtype: 'F32' | 'F16' | 'BF16'): Float32Array {
  if (dtype === 'F32') {
    // `bytes` is a fresh, zero-offset allocation: reinterpret without copying.
    return new Float32Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 4);
  }
  const halves = new Uint16Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 2);
  return dtype === 'F16' ? f16ToF32(halves) : bf16ToF32(halves);
}

/** A reader over a safetensors file already in memory. The buffer is not copied; reads return copies. */
export function parseSafetensors(bytes: Uint8Array, source = '<buffer>'): SafetensorsReader {
  const n = headerLength(bytes, bytes.byteLength, source);
  const header = parseHeader(bytes.subarray(8, 8 + n), 8 + n, bytes.byteLength - 8 - n, source);
  let closed = false;
  return makeReader(source, header, (begin, end) => {
    if (closed) throw invalid(source, 'reader is closed');
    return new Uint8Array(bytes.subarray(begin, end)); // a fresh, aligned copy (Buffer#slice would be a view)
  }, () => { closed = true; }, (begin, end) => {
    if (closed) throw invalid(source, 'reader is closed');
    return bytes.subarray(begin, end);
  });
}

/**
 * A reader over a file on disk. Only the header is read on open; each tensor is read on demand with
 * positioned reads, so multi-GB checkpoints never sit in memory whole. Call `close()` when done.
 */
export function openSafetensors(path: string): SafetensorsReader {
  let fd: number;
  try {
    fd = fs.openSync(path, 'r');
  } catch (err) {
    throw invalid(path, `cannot open (${(err as NodeJS.ErrnoException).code ?? 'error'})`);
  }
  try {
    const size = fs.fstatSync(fd).size;
    const prefix = new Uint8Array(8);
    if (size >= 8) readFully(fd, prefix, 0, path);
    const n = headerLength(prefix, size, path);
    const headerBytes = new Uint8Array(n);
    readFully(fd, headerBytes, 8, path);
    const header = parseHeader(headerBytes, 8 + n, size - 8 - n, path);
    let open = true;
    return makeReader(path, header, (begin, end) => {
      if (!open) throw invalid(path, 'reader is closed');
      const out = new Uint8Array(end - begin);
      readFully(fd, out, begin, path);
      return out;
    }, () => {
      if (open) {
        open = false;
        fs.closeSync(fd);
      }
    });
  } catch (err) {
    fs.closeSync(fd);
    throw err;
  }
}

/** Fills `out` from `position`, looping over short reads; a file that shrank is SAFETENSORS_INVALID. */
function readFully(fd: number, out: Uint8Array, position: number, source: string): void {
  const CHUNK = 1 << 30; // readSync's length must stay below 2 GiB
  let done = 0;
  while (done < out.byteLength) {
    const len = Math.min(CHUNK, out.byteLength - done);
    const got = fs.readSync(fd, out, done, len, position + done);
    if (got === 0) throw invalid(source, `unexpected end of file at byte ${position + done}`);
    done += got;
  }
}

// ---------------------------------------------------------------------------------------------
// Writer
// ---------------------------------------------------------------------------------------------

export type WriteDtype = 'F32' | 'F16' | 'BF16';

export interface WriteTensor {
  /** Stored dtype (default F32); data is always given as float32 and converted. */
  readonly dtype?: WriteDtype;
  readonly shape: readonly number[];
  readonly data: Float32Array;
}

/** A tensor for `writeSafetensorsFile`, whose data may be produced lazily (one tensor in memory at a time). */
export interface LazyWriteTensor {
  readonly dtype?: WriteDtype;
  readonly shape: readonly number[];
  readonly data: Float32Array | (() => Float32Array);
}

interface PlannedTensor {
  readonly name: string;
  readonly dtype: WriteDtype;
  readonly shape: readonly number[];
  readonly byteLength: number;
}

/**
 * Header bytes (8-byte length + JSON padded with spaces to a multiple of 8, as the reference writer
 * does so the data section is 8-byte aligned) and the data layout, tensors in sorted-name order.
 */
function planFile(tensors: Record<string, { dtype?: WriteDtype; shape: readonly number[] }>, metadata?: Record<string, string>) {
  const planned: PlannedTensor[] = [];
  for (const name of Object.keys(tensors).sort()) {
    if (name === '__metadata__') throw new Error('"__metadata__" is reserved and cannot name a tensor');
    const { dtype = 'F32', shape } = tensors[name]!;
    const numel = shape.reduce((a, b) => a * b, 1);
    planned.push({ name, dtype, shape, byteLength: numel * bytesPerElement(dtype)! });
  }
  const json: Record<string, unknown> = {};
  if (metadata && Object.keys(metadata).length > 0) json.__metadata__ = metadata;
  let offset = 0;
  for (const t of planned) {
    json[t.name] = { dtype: t.dtype, shape: t.shape, data_offsets: [offset, offset + t.byteLength] };
    offset += t.byteLength;
  }
  let text = JSON.stringify(json);
  const utf8Length = Buffer.byteLength(text, 'utf8');
  text += ' '.repeat((8 - (utf8Length % 8)) % 8);
  const headerJson = new TextEncoder().encode(text);
  const head = new Uint8Array(8 + headerJson.byteLength);
  new DataView(head.buffer).setBigUint64(0, BigInt(headerJson.byteLength), true);
  head.set(headerJson, 8);
  return { head, planned, dataLength: offset };
}

/** float32 data as the stored dtype's little-endian bytes. */
function encodeTensor(name: string, t: PlannedTensor, data: Float32Array): Uint8Array {
  if (data.length * bytesPerElement(t.dtype)! !== t.byteLength) {
    throw new Error(`tensor "${name}": data has ${data.length} elements but shape ${JSON.stringify(t.shape)} needs ${t.byteLength / bytesPerElement(t.dtype)!}`);
  }
  const converted = t.dtype === 'F32' ? data : t.dtype === 'F16' ? f32ToF16(data) : f32ToBf16(data);
  return new Uint8Array(converted.buffer, converted.byteOffset, converted.byteLength);
}

/** Serialises tensors (sorted by name) and optional `__metadata__` into one in-memory safetensors file. */
export function writeSafetensors(tensors: Record<string, WriteTensor>, metadata?: Record<string, string>): Uint8Array {
  const { head, planned, dataLength } = planFile(tensors, metadata);
  const out = new Uint8Array(head.byteLength + dataLength);
  out.set(head, 0);
  let pos = head.byteLength;
  for (const t of planned) {
    out.set(encodeTensor(t.name, t, tensors[t.name]!.data), pos);
    pos += t.byteLength;
  }
  return out;
}

/**
 * Writes a safetensors file tensor by tensor (one write per tensor), so files larger than memory
 * can be produced when `data` is a function that builds each tensor on demand.
 */
export async function writeSafetensorsFile(
  path: string,
  tensors: Record<string, LazyWriteTensor>,
  metadata?: Record<string, string>,
): Promise<void> {
  const { head, planned } = planFile(tensors, metadata);
  const file = await fs.promises.open(path, 'w');
  try {
    await file.write(head, 0, head.byteLength, 0);
    let pos = head.byteLength;
    for (const t of planned) {
      const source = tensors[t.name]!.data;
      const bytes = encodeTensor(t.name, t, typeof source === 'function' ? source() : source);
      await file.write(bytes, 0, bytes.byteLength, pos);
      pos += bytes.byteLength;
    }
  } finally {
    await file.close();
  }
}

// ---------------------------------------------------------------------------------------------
// Half-precision conversions (exact decoding; round-to-nearest-even encoding)
// ---------------------------------------------------------------------------------------------

const f32Scratch = new Float32Array(1);
const u32Scratch = new Uint32Array(f32Scratch.buffer);

/** bfloat16 bits → float32: exact (bf16 is the top half of a float32). */
export function bf16ToF32(x: Uint16Array): Float32Array {
  const bits = new Uint32Array(x.length);
  for (let i = 0; i < x.length; i++) bits[i] = x[i]! << 16;
  return new Float32Array(bits.buffer);
}

/** float32 → bfloat16 bits, round-to-nearest-even; NaN stays a (quiet) NaN, overflow rounds to ±inf. */
export function f32ToBf16(x: Float32Array): Uint16Array {
  const bits = new Uint32Array(x.buffer, x.byteOffset, x.length);
  const out = new Uint16Array(x.length);
  for (let i = 0; i < x.length; i++) {
    const u = bits[i]!;
    if ((u & 0x7f800000) === 0x7f800000 && (u & 0x007fffff) !== 0) {
      out[i] = (u >>> 16) | 0x0040;
    } else {
      out[i] = (u + 0x7fff + ((u >>> 16) & 1)) >>> 16;
    }
  }
  return out;
}

let f16Table: Float32Array | undefined;

/** All 65536 float16 values as float32 (built once; 256 KiB). */
function f16Lookup(): Float32Array {
  if (f16Table) return f16Table;
  const table = new Float32Array(65536);
  for (let h = 0; h < 65536; h++) {
    const sign = h & 0x8000 ? -1 : 1;
    const exp = (h >>> 10) & 0x1f;
    const mant = h & 0x3ff;
    if (exp === 0) table[h] = sign * mant * 2 ** -24; // zero and subnormals
    else if (exp === 0x1f) table[h] = mant === 0 ? sign * Infinity : NaN;
    else table[h] = sign * (1 + mant / 1024) * 2 ** (exp - 15);
  }
  return (f16Table = table);
}

/** float16 bits → float32: exact, including subnormals, ±inf and NaN. */
export function f16ToF32(x: Uint16Array): Float32Array {
  const table = f16Lookup();
  const out = new Float32Array(x.length);
  for (let i = 0; i < x.length; i++) out[i] = table[x[i]!]!;
  return out;
}

/** One float32 → float16 bits, round-to-nearest-even (subnormals, overflow to ±inf, NaN kept). */
export function f32ToF16Bits(value: number): number {
  f32Scratch[0] = value;
  const u = u32Scratch[0]!;
  const sign = (u >>> 16) & 0x8000;
  const exp = (u >>> 23) & 0xff;
  const mant = u & 0x7fffff;
  if (exp === 0xff) return sign | 0x7c00 | (mant !== 0 ? 0x200 | (mant >>> 13) : 0);
  const e = exp - 127 + 15; // rebiased exponent
  if (e >= 0x1f) return sign | 0x7c00;
  if (e <= 0) {
    // Subnormal half (or zero): shift the 24-bit significand into 10 bits with rounding.
    if (e < -10) return sign;
    const m = mant | 0x800000;
    const shift = 14 - e;
    let half = m >>> shift;
    const rem = m & ((1 << shift) - 1);
    const halfway = 1 << (shift - 1);
    if (rem > halfway || (rem === halfway && (half & 1) !== 0)) half++;
    return sign | half; // a carry lands on the smallest normal, as it should
  }
  let half = (e << 10) | (mant >>> 13);
  const rem = mant & 0x1fff;
  if (rem > 0x1000 || (rem === 0x1000 && (half & 1) !== 0)) half++; // a carry may reach inf: correct
  return sign | half;
}

/** float32 → float16 bits, round-to-nearest-even. */
export function f32ToF16(x: Float32Array): Uint16Array {
  const out = new Uint16Array(x.length);
  for (let i = 0; i < x.length; i++) out[i] = f32ToF16Bits(x[i]!);
  return out;
}
