import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import {
  bf16ToF32, f16ToF32, f32ToBf16, f32ToF16, f32ToF16Bits, openSafetensors, parseSafetensors,
  writeSafetensors, writeSafetensorsFile,
} from '../src/formats/safetensors.ts';

/** Asserts that `fn` throws a ServeError with `code` (never a RangeError or another crash). */
function expectCode(fn: () => unknown, code: string, label = ''): void {
  try {
    fn();
  } catch (err) {
    const e = err as { code?: unknown; name?: unknown; message?: unknown };
    assert.equal(e.name, 'ServeError', `${label}: expected ServeError, got ${String(err)}`);
    assert.equal(e.code, code, `${label}: ${String(e.message)}`);
    return;
  }
  assert.fail(`${label}: expected ${code}, nothing thrown`);
}

/** A file from a header (object or raw string) and data bytes; `declaredLength` overrides N. */
function rawFile(header: unknown, data: Uint8Array | number = 0, declaredLength?: bigint): Uint8Array {
  const json = new TextEncoder().encode(typeof header === 'string' ? header : JSON.stringify(header));
  const bytes = typeof data === 'number' ? new Uint8Array(data) : data;
  const out = new Uint8Array(8 + json.byteLength + bytes.byteLength);
  new DataView(out.buffer).setBigUint64(0, declaredLength ?? BigInt(json.byteLength), true);
  out.set(json, 8);
  out.set(bytes, 8 + json.byteLength);
  return out;
}

const f32 = (...v: number[]) => new Float32Array(v);
const tmpDir = () => fs.mkdtempSync(path.join(os.tmpdir(), 'safetensors-test-'));

test('writer output is byte-identical to the reference implementation (tensor.rs tests)', () => {
  // test_serialization
  const out = writeSafetensors({ 'attn.0': { shape: [1, 2, 3], data: f32(0, 1, 2, 3, 4, 5) } });
  assert.deepEqual([...out], [
    64, 0, 0, 0, 0, 0, 0, 0, 123, 34, 97, 116, 116, 110, 46, 48, 34, 58, 123, 34, 100,
    116, 121, 112, 101, 34, 58, 34, 70, 51, 50, 34, 44, 34, 115, 104, 97, 112, 101, 34,
    58, 91, 49, 44, 50, 44, 51, 93, 44, 34, 100, 97, 116, 97, 95, 111, 102, 102, 115,
    101, 116, 115, 34, 58, 91, 48, 44, 50, 52, 93, 125, 125, 0, 0, 0, 0, 0, 0, 128, 63,
    0, 0, 0, 64, 0, 0, 64, 64, 0, 0, 128, 64, 0, 0, 160, 64,
  ]);
  // test_serialization_forced_alignement: the header is padded with spaces to a multiple of 8
  const aligned = writeSafetensors({ attn0: { shape: [1, 1, 2, 3], data: f32(0, 1, 2, 3, 4, 5) } });
  assert.equal(aligned[0], 72);
  assert.deepEqual([...aligned.subarray(8 + 65, 8 + 72)], [32, 32, 32, 32, 32, 32, 32]);
  // test_empty, with and without metadata
  assert.deepEqual([...writeSafetensors({})], [8, 0, 0, 0, 0, 0, 0, 0, 123, 125, 32, 32, 32, 32, 32, 32]);
  const withMeta = writeSafetensors({}, { framework: 'pt' });
  assert.equal(new TextDecoder().decode(withMeta.subarray(8)), '{"__metadata__":{"framework":"pt"}}     ');
});

test('F32/F16/BF16 round trip: exact for representable values, tensors in sorted-name order', () => {
  const exact = f32(0, -0, 1, -2.5, 0.5, 1024, -49152, 2 ** -14, 2 ** -24, 3 * 2 ** -24, Infinity, -Infinity);
  const bytes = writeSafetensors({
    z: { dtype: 'F32', shape: [3, 4], data: exact },
    a: { dtype: 'F16', shape: [12], data: exact },
    m: { dtype: 'BF16', shape: [2, 6], data: exact },
    scalar: { shape: [], data: f32(Math.PI) },
    empty: { dtype: 'F16', shape: [0, 5], data: new Float32Array(0) },
  }, { format: 'pt' });
  const r = parseSafetensors(bytes, 'mem');
  assert.deepEqual(r.metadata, { format: 'pt' });
  assert.deepEqual([...r.tensors.keys()], ['a', 'empty', 'm', 'scalar', 'z']);
  assert.equal((8 + Number(new DataView(bytes.buffer).getBigUint64(0, true))) % 8, 0);
  assert.deepEqual(r.tensors.get('z')!.shape, [3, 4]);
  assert.equal(r.tensors.get('z')!.dtype, 'F32');
  for (const name of ['a', 'm', 'z']) assert.deepEqual(r.readFloat32(name), exact, name);
  assert.deepEqual(r.readFloat32('scalar'), f32(Math.PI));
  assert.deepEqual(r.readFloat32('empty'), new Float32Array(0));
  assert.equal(r.readRaw('a').byteLength, 24);
  // NaN survives every dtype
  const nan = parseSafetensors(writeSafetensors({
    a: { dtype: 'F16', shape: [1], data: f32(NaN) },
    b: { dtype: 'BF16', shape: [1], data: f32(NaN) },
    c: { shape: [1], data: f32(NaN) },
  }));
  for (const n of ['a', 'b', 'c']) assert.ok(Number.isNaN(nan.readFloat32(n)[0]), n);
});

test('bf16 rounds to nearest even, overflows to inf', () => {
  const cases: Array<[number, number]> = [
    [1 + 2 ** -8, 1], // halfway, ties to even (down)
    [1 + 3 * 2 ** -8, 1 + 2 ** -6], // halfway, ties to even (up)
    [1 + 2 ** -8 + 2 ** -20, 1 + 2 ** -7], // just above halfway
    [1 + 2 ** -9, 1],
    [-(1 + 3 * 2 ** -8), -(1 + 2 ** -6)],
    [3.4028234663852886e38, Infinity], // float32 max rounds up past bf16 max
    [2 ** -133, 2 ** -133], // float32 subnormal, exact in bf16
  ];
  const out = bf16ToF32(f32ToBf16(f32(...cases.map(([x]) => x))));
  cases.forEach(([, want], i) => assert.equal(out[i], want, `case ${i}`));
});

test('f16 rounds to nearest even, with subnormals and overflow', () => {
  const cases: Array<[number, number]> = [
    [1 + 2 ** -11, 1],
    [1 + 3 * 2 ** -11, 1 + 2 ** -9],
    [65519, 65504],
    [65520, Infinity], // halfway between max and "2^16": ties to even = inf
    [1e6, Infinity],
    [-1e6, -Infinity],
    [2 ** -25, 0], // halfway between 0 and the smallest subnormal: ties to 0
    [1.5 * 2 ** -25, 2 ** -24],
    [3 * 2 ** -25, 2 ** -23],
    [2 ** -26, 0],
    [2 ** -14 - 2 ** -25, 2 ** -14], // largest subnormal + half ulp rounds up to the smallest normal
    [0.1, 0.0999755859375],
  ];
  const out = f16ToF32(f32ToF16(f32(...cases.map(([x]) => x))));
  cases.forEach(([, want], i) => assert.equal(out[i], want, `case ${i}: ${cases[i]![0]}`));
  assert.ok(Object.is(f16ToF32(f32ToF16(f32(-0)))[0], -0));
});

test('every f16 and bf16 bit pattern decodes and re-encodes to itself', () => {
  const all = new Uint16Array(65536).map((_, i) => i);
  for (const [decode, encode, isNaNBits] of [
    [f16ToF32, f32ToF16, (h: number) => (h & 0x7c00) === 0x7c00 && (h & 0x3ff) !== 0],
    [bf16ToF32, f32ToBf16, (h: number) => (h & 0x7f80) === 0x7f80 && (h & 0x7f) !== 0],
  ] as const) {
    const back = encode(decode(all));
    for (let h = 0; h < 65536; h++) {
      if (isNaNBits(h)) assert.ok(isNaNBits(back[h]!), `NaN ${h}`);
      else if (back[h] !== h) assert.fail(`bits ${h.toString(16)} became ${back[h]!.toString(16)}`);
    }
  }
});

test('f32 → f16 picks the nearest value (ties to even) for random inputs', () => {
  const table = f16ToF32(new Uint16Array(65536).map((_, i) => i));
  let s = 12345;
  const rand = () => ((s = (Math.imul(s, 1664525) + 1013904223) >>> 0) / 2 ** 32);
  for (let i = 0; i < 20000; i++) {
    const x = Math.fround((rand() * 2 - 1) * 2 ** (rand() * 40 - 26));
    const h = f32ToF16Bits(x);
    const err = Math.abs(table[h]! - x);
    for (const n of [h - 1, h + 1]) {
      if ((n & 0x7fff) >= 0x7c00 || (n & 0x8000) !== (h & 0x8000)) continue;
      const other = Math.abs(table[n]! - x);
      assert.ok(err < other || (err === other && (h & 1) === 0), `x=${x}: chose ${table[h]}, ${table[n]} is closer`);
    }
  }
});

test('other dtypes are parsed; readFloat32 rejects them with SAFETENSORS_DTYPE; unknown dtypes are rejected', () => {
  const ints = new Uint8Array(16);
  new DataView(ints.buffer).setBigInt64(0, 7n, true);
  const file = rawFile({
    ids: { dtype: 'I64', shape: [2], data_offsets: [0, 16] },
    mask: { dtype: 'BOOL', shape: [2], data_offsets: [16, 18] },
    w: { dtype: 'F64', shape: [1], data_offsets: [18, 26] },
    f8: { dtype: 'F8_E4M3', shape: [2], data_offsets: [26, 28] },
  }, new Uint8Array([...ints, 1, 0, ...new Uint8Array(8), 0, 0]));
  const r = parseSafetensors(file);
  assert.equal(r.tensors.get('ids')!.dtype, 'I64');
  assert.equal(new DataView(r.readRaw('ids').buffer).getBigInt64(0, true), 7n);
  for (const name of ['ids', 'mask', 'w', 'f8']) expectCode(() => r.readFloat32(name), 'SAFETENSORS_DTYPE', name);
  expectCode(() => parseSafetensors(rawFile({ q: { dtype: 'Q4_K', shape: [2], data_offsets: [0, 1] } }, 1)), 'SAFETENSORS_DTYPE');
});

test('a missing tensor is CHECKPOINT_MISSING_TENSOR', () => {
  const r = parseSafetensors(writeSafetensors({ a: { shape: [1], data: f32(1) } }));
  expectCode(() => r.readFloat32('b'), 'CHECKPOINT_MISSING_TENSOR');
  expectCode(() => r.readRaw('b'), 'CHECKPOINT_MISSING_TENSOR');
});

test('every truncation of a valid file is SAFETENSORS_INVALID', () => {
  const good = writeSafetensors({
    a: { shape: [2, 3], data: f32(1, 2, 3, 4, 5, 6) },
    b: { dtype: 'BF16', shape: [4], data: f32(1, 2, 3, 4) },
  });
  parseSafetensors(good);
  for (let len = 0; len < good.byteLength; len++) {
    expectCode(() => parseSafetensors(good.subarray(0, len)), 'SAFETENSORS_INVALID', `length ${len}`);
  }
  // trailing bytes after the last tensor are rejected too, as in the reference implementation
  const longer = new Uint8Array(good.byteLength + 4);
  longer.set(good);
  expectCode(() => parseSafetensors(longer), 'SAFETENSORS_INVALID', 'trailing bytes');
});

test('corrupt headers give SAFETENSORS_INVALID', () => {
  const t = (offsets: unknown, extra: Record<string, unknown> = {}) => ({ t: { dtype: 'F32', shape: [2], data_offsets: offsets, ...extra } });
  const cases: Array<[string, Uint8Array]> = [
    ['header length 2^64-1', rawFile({}, 0, 2n ** 64n - 1n)],
    ['header length just over 100 MB', rawFile({}, 0, 100_000_001n)],
    ['header length past end of file', rawFile({}, 0, 1000n)],
    ['empty header', rawFile('', 0)],
    ['garbage header', rawFile('not json at all', 0)],
    ['truncated JSON', rawFile('{"t": {"dtype": "F32"', 0)],
    ['invalid UTF-8', rawFile('{}', 0, undefined).map((b, i) => (i === 8 ? 0xff : b))],
    ['header is an array', rawFile([1, 2], 0)],
    ['header is a number', rawFile('42', 0)],
    ['header is null', rawFile('null', 0)],
    ['header is a string', rawFile('"abc"', 0)],
    ['entry is not an object', rawFile({ t: [1, 2] }, 0)],
    ['missing dtype', rawFile({ t: { shape: [2], data_offsets: [0, 8] } }, 8)],
    ['missing shape', rawFile({ t: { dtype: 'F32', data_offsets: [0, 8] } }, 8)],
    ['missing data_offsets', rawFile({ t: { dtype: 'F32', shape: [2] } }, 8)],
    ['negative dimension', rawFile(t([0, 8], { shape: [-2] }), 8)],
    ['fractional dimension', rawFile(t([0, 8], { shape: [1.5] }), 8)],
    ['string dimension', rawFile(t([0, 8], { shape: ['2'] }), 8)],
    ['shape not an array', rawFile(t([0, 8], { shape: 2 }), 8)],
    ['shape overflows', rawFile(t([0, 8], { shape: [2 ** 30, 2 ** 30, 2 ** 30] }), 8)],
    ['negative offset', rawFile(t([-8, 0]), 8)],
    ['inverted offsets', rawFile(t([8, 0]), 8)],
    ['fractional offsets', rawFile(t([0, 7.5]), 8)],
    ['three offsets', rawFile(t([0, 8, 8]), 8)],
    ['offsets not an array', rawFile(t('0-8'), 8)],
    ['end beyond data', rawFile(t([0, 8]), 4)],
    ['huge end offset', rawFile(t([0, 2 ** 53 + 2]), 8)],
    ['wrong byte length', rawFile(t([0, 12]), 12)],
    ['gap before first tensor', rawFile(t([4, 12]), 12)],
    ['overlapping tensors', rawFile({ ...t([0, 8]), u: { dtype: 'F32', shape: [2], data_offsets: [4, 12] } }, 12)],
    ['duplicate ranges', rawFile({ ...t([0, 8]), u: { dtype: 'F32', shape: [2], data_offsets: [0, 8] } }, 8)],
    ['metadata not an object', rawFile({ __metadata__: 'x' }, 0)],
    ['metadata value not a string', rawFile({ __metadata__: { n: 1 } }, 0)],
  ];
  for (const [label, bytes] of cases) expectCode(() => parseSafetensors(bytes, label), 'SAFETENSORS_INVALID', label);
  // a valid hand-built file parses (the cases above differ from it in one way each)
  assert.deepEqual(parseSafetensors(rawFile(t([0, 8]), new Uint8Array(new Float32Array([1, 2]).buffer))).readFloat32('t'), f32(1, 2));
});

test('error messages name the file and the problem', () => {
  try {
    parseSafetensors(rawFile({ t: { dtype: 'F32', shape: [2], data_offsets: [0, 12] } }, 12), 'adapter_model.safetensors');
    assert.fail('no error');
  } catch (err) {
    assert.match((err as Error).message, /adapter_model\.safetensors/);
    assert.match((err as Error).message, /"t"/);
  }
});

test('file-backed reader reads tensors with positioned reads and matches the in-memory reader', async () => {
  const dir = tmpDir();
  try {
    const file = path.join(dir, 'model.safetensors');
    const big = new Float32Array(10_000).map((_, i) => Math.sin(i));
    let produced = 0;
    await writeSafetensorsFile(file, {
      big: { shape: [100, 100], data: () => { produced++; return big; } },
      half: { dtype: 'F16', shape: [3], data: f32(1, 0.5, -2) },
      brain: { dtype: 'BF16', shape: [2], data: f32(1.5, -3) },
    }, { format: 'pt' });
    assert.equal(produced, 1);
    const bytes = fs.readFileSync(file);
    const mem = parseSafetensors(bytes, 'mem');
    const r = openSafetensors(file);
    assert.equal(r.source, file);
    assert.deepEqual(r.metadata, { format: 'pt' });
    assert.deepEqual([...r.tensors.values()], [...mem.tensors.values()]);
    for (const name of r.tensors.keys()) {
      assert.deepEqual(r.readFloat32(name), mem.readFloat32(name), name);
      assert.deepEqual(r.readRaw(name), mem.readRaw(name), name);
    }
    assert.deepEqual(r.readFloat32('big'), big);
    assert.deepEqual(r.readFloat32('half'), f32(1, 0.5, -2));
    assert.equal(r.tensors.get('half')!.end, bytes.byteLength); // last in sorted-name order
    expectCode(() => r.readFloat32('nope'), 'CHECKPOINT_MISSING_TENSOR');
    r.close();
    r.close(); // idempotent
    expectCode(() => r.readFloat32('big'), 'SAFETENSORS_INVALID', 'read after close');

    // truncated files on disk, including in the middle of the data
    for (const len of [0, 5, 8, 20, bytes.byteLength - 1, bytes.byteLength - 20_000]) {
      const cut = path.join(dir, `cut-${len}.safetensors`);
      fs.writeFileSync(cut, bytes.subarray(0, len));
      expectCode(() => openSafetensors(cut), 'SAFETENSORS_INVALID', `truncated to ${len}`);
    }
    expectCode(() => openSafetensors(path.join(dir, 'missing.safetensors')), 'SAFETENSORS_INVALID', 'missing file');
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('file-backed reader reports a file that shrinks after opening', () => {
  const dir = tmpDir();
  try {
    const file = path.join(dir, 'x.safetensors');
    fs.writeFileSync(file, writeSafetensors({ a: { shape: [1000], data: new Float32Array(1000) } }));
    const r = openSafetensors(file);
    fs.truncateSync(file, 200);
    expectCode(() => r.readFloat32('a'), 'SAFETENSORS_INVALID');
    r.close();
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('viewFloat32: an aligned F32 tensor of an in-memory file is a view; otherwise the same values as readFloat32', async () => {
  const data = Float32Array.from({ length: 12 }, (_, i) => i / 7 - 0.5);
  const bytes = writeSafetensors({ a: { dtype: 'F32', shape: [3, 4], data }, h: { dtype: 'F16', shape: [12], data } });
  const r = parseSafetensors(bytes, 'mem');
  const v = r.viewFloat32('a');
  assert.deepEqual(v, data);
  assert.equal(v.buffer, bytes.buffer, 'no copy');
  assert.deepEqual(r.viewFloat32('h'), r.readFloat32('h'), 'F16 is converted');
  // The same file one byte into a buffer: the tensor is misaligned, so it is copied.
  const shifted = new Uint8Array(bytes.byteLength + 1);
  shifted.set(bytes, 1);
  const r2 = parseSafetensors(shifted.subarray(1), 'shifted');
  const c = r2.viewFloat32('a');
  assert.deepEqual(c, data);
  assert.notEqual(c.buffer, shifted.buffer);
  r.close();
  expectCode(() => r.viewFloat32('a'), 'SAFETENSORS_INVALID', 'closed');
  expectCode(() => r2.viewFloat32('missing'), 'CHECKPOINT_MISSING_TENSOR', 'missing');
  // A file reader has no buffer to view: it reads.
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'st-view-'));
  try {
    await writeSafetensorsFile(path.join(dir, 'x.safetensors'), { a: { dtype: 'F32', shape: [3, 4], data } });
    const f = openSafetensors(path.join(dir, 'x.safetensors'));
    assert.deepEqual(f.viewFloat32('a'), data);
    f.close();
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
