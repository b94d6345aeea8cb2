/**
 * RoPE variants: the server's frequencies (src/model/rope.ts) and the reference's (test/reference/forward.ts)
 * against values worked out by hand from transformers' formulas, the rotary tables and row choice built from them,
 * and the coded refusals of what is not served.
 */
import { before, test } from 'node:test';
import assert from 'node:assert/strict';
import * as tf from '@tensorflow/tfjs-core';
import { normalizeConfig } from '../src/model/config.ts';
import { ropeRows, ropeTables } from '../src/model/layers.ts';
import { ropeSpec } from '../src/model/rope.ts';
import { refRope } from './reference/forward.ts';
import { setupBackend } from './helpers/tf.ts';

before(setupBackend);

const BASE = {
  model_type: 'llama', hidden_size: 32, num_attention_heads: 4, num_hidden_layers: 1, intermediate_size: 8,
  vocab_size: 16, max_position_embeddings: 128,
};

/** Server and reference frequencies and attention factor for a config; headDim 8 unless the config says. */
function both(extra: Record<string, unknown>, hd = 8, seqLen = 1) {
  const cfg = { ...BASE, ...extra };
  const server = normalizeConfig(cfg).rope!;
  const ref = refRope(cfg, hd, seqLen);
  return { server, ref };
}

function close(actual: number, expected: number, what: string, tol = 1e-12): void {
  assert.ok(Math.abs(actual - expected) <= tol * Math.max(1, Math.abs(expected)), `${what}: ${actual} ≠ ${expected}`);
}

/** Entries [i, expected] of inv_freq, checked on the server's and the reference's frequencies. */
function expectInv(server: readonly number[], ref: ArrayLike<number>, entries: [number, number][], what: string): void {
  for (const [i, v] of entries) {
    close(server[i]!, v, `${what} server inv_freq[${i}]`);
    close(ref[i]!, v, `${what} reference inv_freq[${i}]`);
  }
}

test('default and linear: θ^(−2i/d), divided by factor', () => {
  // d = 8, θ = 10000: θ^(−2i/8) = 1, 0.1, 0.01, 0.001
  const d = both({});
  expectInv(d.server.invFreq, d.ref.invFreq, [[0, 1], [1, 0.1], [3, 0.001]], 'default');
  assert.equal(d.server.attentionFactor, 1);
  const l = both({ rope_scaling: { type: 'linear', factor: 4 } });
  expectInv(l.server.invFreq, l.ref.invFreq, [[0, 0.25], [1, 0.025], [2, 0.0025]], 'linear');
  assert.equal(l.server.type, 'linear');
});

test('llama3: kept, blended and divided frequencies', () => {
  // θ = 100, d = 16, factor 32, low 1, high 4, original 32: wavelength bands < 32/4 = 8 kept, > 32/1 = 32 divided.
  const { server, ref } = both({
    hidden_size: 64, rope_theta: 100,
    rope_scaling: { rope_type: 'llama3', factor: 32, low_freq_factor: 1, high_freq_factor: 4, original_max_position_embeddings: 32 },
  }, 16);
  expectInv(server.invFreq, ref.invFreq, [
    [0, 1], // wavelength 2π = 6.28 < 8: kept
    // 100^(−1/8) = 0.5623413; wavelength 11.1733; smooth = (32/11.1733 − 1)/3 = 0.621317;
    // (1 − 0.621317)·0.5623413/32 + 0.621317·0.5623413 = 0.3560523
    [1, 0.35605230523251413],
    // 100^(−3/8) = 0.1778279; wavelength 35.33 > 32: 0.1778279/32
    [3, 0.1778279410038923 / 32],
  ], 'llama3');
});

test('yarn: ramp between the correction dims, attention factor', () => {
  // θ = 100, d = 8, factor 4, original 64. Correction dims: 8·ln(64/(32·2π))/(2·ln 100) = −0.994 → floor → 0;
  // 8·ln(64/(1·2π))/(2·ln 100) = 2.016 → ceil → 3. Ramp (i − 0)/3 = 0, ⅓, ⅔, 1 takes inv_freq from θ^(−2i/d)
  // to θ^(−2i/d)/4: i = 1: 0.3162278·(⅔ + ⅓/4) = 0.2371708; i = 3: 0.0316228/4.
  const { server, ref } = both({ rope_theta: 100, rope_scaling: { type: 'yarn', factor: 4, original_max_position_embeddings: 64 } });
  expectInv(server.invFreq, ref.invFreq, [[0, 1], [1, 0.23717082451262847], [2, 0.05], [3, 0.03162277660168379 / 4]], 'yarn');
  close(server.attentionFactor, 0.1 * Math.log(4) + 1, 'yarn attention factor'); // 1.1386294
  close(ref.scale, 1.138629436111989, 'reference yarn attention factor');
  // mscale 1, mscale_all_dim 0.5, factor 8: (0.1·ln 8 + 1)/(0.05·ln 8 + 1) = 1.2079442/1.1039721 = 1.0941800
  const m = both({ rope_scaling: { rope_type: 'yarn', factor: 8, mscale: 1, mscale_all_dim: 0.5 } });
  close(m.server.attentionFactor, 1.094179988101349, 'mscale attention factor');
  close(m.ref.scale, 1.094179988101349, 'reference mscale attention factor');
  const given = both({ rope_scaling: { rope_type: 'yarn', factor: 8, attention_factor: 0.75 } });
  assert.equal(given.server.attentionFactor, 0.75);
});

test('longrope: short factors, long ones past original_max_position_embeddings, attention factor', () => {
  const cfg = {
    original_max_position_embeddings: 8,
    rope_scaling: { rope_type: 'longrope', short_factor: [1, 2, 4, 8], long_factor: [2, 4, 8, 16] },
  };
  const { server } = both(cfg);
  // 1 / (ext_i · 10000^(−2i/8)... ) = θ^(−2i/d)/ext_i: i = 1: 0.1/2 (short), 0.1/4 (long)
  expectInv(server.invFreq, refRope({ ...BASE, ...cfg }, 8, 8).invFreq, [[0, 1], [1, 0.05], [3, 0.001 / 8]], 'longrope short');
  expectInv(server.long!.invFreq, refRope({ ...BASE, ...cfg }, 8, 9).invFreq, [[0, 0.5], [1, 0.025], [3, 0.001 / 16]], 'longrope long');
  assert.equal(server.long!.after, 8);
  // factor = 128/8 = 16: √(1 + ln 16/ln 8) = √(7/3) = 1.5275252
  close(server.attentionFactor, Math.sqrt(7 / 3), 'longrope attention factor');
  close(refRope({ ...BASE, ...cfg }, 8, 1).scale, 1.5275252316519468, 'reference longrope attention factor');
});

test('dynamic: the default rotation up to max_position_embeddings; the reference grows θ past it', () => {
  const { server, ref } = both({ rope_scaling: { rope_type: 'dynamic', factor: 2 } }, 8, 128);
  expectInv(server.invFreq, ref.invFreq, [[0, 1], [1, 0.1], [3, 0.001]], 'dynamic');
  // seq_len 256 > 128: θ' = 10000·(2·256/128 − 1)^(8/6) = 10000·3^(4/3) = 43267.487; inv_freq_1 = θ'^(−1/4)
  const beyond = refRope({ ...BASE, rope_scaling: { rope_type: 'dynamic', factor: 2 } }, 8, 256);
  close(beyond.invFreq[1]!, Math.pow(10000 * Math.pow(3, 4 / 3), -0.25), 'dynamic beyond');
  close(beyond.invFreq[1]!, 0.0693361274, 'dynamic beyond (value)', 1e-9); // e^(−ln(43267.49)/4)
});

test('ropeTables holds scale·cos(p·inv_freq) per set; ropeRows picks the second set per row', () => {
  const before = tf.memory().numTensors;
  const { cos, sin } = ropeTables(4, [[1, 0.5], [2, 0.25]], 1.5);
  assert.deepEqual(cos.shape, [8, 4]);
  const c = cos.dataSync();
  const s = sin.dataSync();
  close(c[3 * 4 + 1]!, 1.5 * Math.cos(3 * 0.5), 'cos(3·0.5)', 1e-6);
  close(c[3 * 4 + 3]!, 1.5 * Math.cos(3 * 0.5), 'second half repeats', 1e-6);
  close(s[(4 + 2) * 4 + 0]!, 1.5 * Math.sin(2 * 2), 'second set: sin(2·2)', 1e-6);
  cos.dispose();
  sin.dispose();
  // Row 0 (left-padded) ends at position 6: 6 + 1 ≤ 8, first set. Row 1 ends at 9: 9 + 1 > 8, second set (offset 100).
  const rows = ropeRows(Int32Array.of(0, 0, 5, 6, 6, 7, 8, 9), 2, 4, { after: 8, offset: 100 });
  assert.deepEqual(Array.from(rows), [0, 0, 5, 6, 106, 107, 108, 109]);
  assert.equal(tf.memory().numTensors, before);
});

test('every fixture variant: the server and the reference agree on all frequencies', () => {
  const variants: Record<string, unknown>[] = [
    { rope_scaling: null },
    { rope_scaling: { rope_type: 'default' } },
    { rope_scaling: { rope_type: 'linear', factor: 2.5 } },
    { rope_scaling: { rope_type: 'llama3', factor: 8, low_freq_factor: 1, high_freq_factor: 4, original_max_position_embeddings: 16 }, rope_theta: 50 },
    { rope_scaling: { rope_type: 'yarn', factor: 8, beta_fast: 8, beta_slow: 2, truncate: false, original_max_position_embeddings: 64 }, rope_theta: 100 },
    { rope_scaling: { rope_type: 'yarn', factor: 3 }, rope_theta: 20 },
    { rope_scaling: { type: 'longrope', short_factor: [1, 1.1, 1.2, 1.3], long_factor: [2, 3, 4, 5], attention_factor: 1.2 }, original_max_position_embeddings: 32 },
  ];
  for (const v of variants) {
    const cfg = { ...BASE, ...v };
    const server = normalizeConfig(cfg).rope!;
    const ref = refRope(cfg, 8, 1);
    server.invFreq.forEach((f, i) => close(f, ref.invFreq[i]!, `${JSON.stringify(v)} [${i}]`));
    close(server.attentionFactor, ref.scale, `${JSON.stringify(v)} attention factor`);
    if (server.long) server.long.invFreq.forEach((f, i) => close(f, refRope(cfg, 8, server.long!.after + 1).invFreq[i]!, `long [${i}]`));
  }
});

function code(fn: () => unknown): { code?: string; message: string } {
  try {
    fn();
  } catch (err) {
    return err as { code?: string; message: string };
  }
  return assert.fail('no error thrown');
}

test('rope configs that cannot be served exactly are refused by name', () => {
  const cases: [Record<string, unknown>, string, RegExp][] = [
    [{ rope_scaling: { rope_type: 'mrope', factor: 2 } }, 'CONFIG_UNSUPPORTED', /rope_scaling\.rope_type.*"mrope"/],
    [{ rope_scaling: { factor: 2 } }, 'CONFIG_INVALID', /rope_scaling\.rope_type/],
    [{ rope_scaling: { rope_type: 'linear' } }, 'CONFIG_INVALID', /rope_scaling\.factor/],
    [{ rope_scaling: { rope_type: 'llama3', factor: 8, low_freq_factor: 1, original_max_position_embeddings: 16 } }, 'CONFIG_INVALID', /rope_scaling\.high_freq_factor/],
    [{ rope_scaling: { rope_type: 'longrope', short_factor: [1, 1], long_factor: [1, 1, 1, 1] } }, 'CONFIG_INVALID', /rope_scaling\.short_factor/],
    [{ original_max_position_embeddings: 32, rope_scaling: { rope_type: 'longrope', factor: 2, short_factor: [1, 1, 1, 1], long_factor: [1, 1, 1, 1] } }, 'CONFIG_UNSUPPORTED', /rope_scaling\.factor/],
    [{ rope_scaling: { rope_type: 'longrope', original_max_position_embeddings: 32, short_factor: [1, 1, 1, 1], long_factor: [1, 1, 1, 1] } }, 'CONFIG_UNSUPPORTED', /rope_scaling\.original_max_position_embeddings/],
    [{ partial_rotary_factor: 0.5 }, 'CONFIG_UNSUPPORTED', /partial_rotary_factor/],
  ];
  for (const [extra, expected, pattern] of cases) {
    const err = code(() => ropeSpec({ ...BASE, ...extra }, 10000, 8, 128));
    assert.equal(err.code, expected, `${JSON.stringify(extra)}: ${err.message}`);
    assert.match(err.message, pattern);
  }
});
