import { test } from 'node:test';
import assert from 'node:assert/strict';
import { DEFAULT_SAMPLING, nucleusOnDevice, pickableOnDevice, Sampler, shortlistOnDevice, Xoshiro128, type SamplingParams } from '../src/engine/sampling.ts';

const params = (p: Partial<SamplingParams>): SamplingParams => ({ ...DEFAULT_SAMPLING, seed: 42, ...p });
const f32 = (xs: number[]): Float32Array => Float32Array.from(xs);
const lse = (xs: number[]): number => {
  const m = xs.reduce((a, b) => Math.max(a, b), -Infinity);
  return m + Math.log(xs.reduce((s, x) => s + Math.exp(x - m), 0));
};
const close = (a: number, b: number, eps = 1e-9): void => assert.ok(Math.abs(a - b) <= eps, `${a} vs ${b}`);

/** Draw `n` tokens with fresh histories and count them. */
function frequencies(s: Sampler, logits: number[], n: number): number[] {
  const counts = new Array(logits.length).fill(0);
  const l = f32(logits);
  for (let i = 0; i < n; i++) counts[s.sample(l, []).id]++;
  return counts.map((c) => c / n);
}

// ---------------------------------------------------------------------------------------------

test('greedy: argmax, ties to the lowest id, logprob = log_softmax(raw logits)', () => {
  const logits = [1, 2, 3, 0.5];
  const out = new Sampler(params({})).sample(f32(logits), []);
  assert.equal(out.id, 2);
  close(out.logprob, 3 - lse(logits));
  assert.equal(out.top, undefined);
  assert.equal(new Sampler(params({})).sample(f32([1, 3, 3, 2]), []).id, 1);
  // -inf and NaN are never chosen
  assert.equal(new Sampler(params({})).sample(f32([Number.NaN, -Infinity, -5]), []).id, 2);
  assert.throws(() => new Sampler(params({})).sample(f32([-Infinity, Number.NaN]), []),
    (err: { code?: string }) => err.code === 'GENERATION');
});

test('repetition penalty: HF rule over distinct ids of the history', () => {
  // [2, 1, -1, 0], history {0, 2} (0 twice), p = 2 → [1, 1, -2, 0]
  const s = new Sampler(params({ repetitionPenalty: 2 }));
  const out = s.sample(f32([2, 1, -1, 0]), [0, 2, 0]);
  assert.equal(out.id, 0); // tie 1 vs 1 → lowest id
  close(out.logprob, 1 - lse([1, 1, -2, 0]));
  // ids outside the vocabulary in the history are ignored; the buffers are reset between calls
  const again = s.sample(f32([2, 1, -1, 0]), [99, -1]);
  assert.equal(again.id, 0);
  close(again.logprob, 2 - lse([2, 1, -1, 0]));
});

test('frequency and presence penalties: OpenAI rule, counted from penaltyFrom', () => {
  const s = new Sampler(params({ frequencyPenalty: 0.5, presencePenalty: 0.25 }));
  const logits = [0, 3, 2];
  // whole history [1, 1, 2]: x1 = 3 - 0.5·2 - 0.25 = 1.75, x2 = 2 - 0.5 - 0.25 = 1.25
  const a = s.sample(f32(logits), [1, 1, 2]);
  assert.equal(a.id, 1);
  close(a.logprob, 1.75 - lse([0, 1.75, 1.25]));
  // only history[2:] = [2] counts
  const b = s.sample(f32(logits), [1, 1, 2], 2);
  close(b.logprob, 3 - lse([0, 3, 1.25]));
  // a strong penalty changes the argmax
  const c = new Sampler(params({ frequencyPenalty: 2 })).sample(f32(logits), [1]);
  assert.equal(c.id, 2);
});

test('penalties apply in TGI order: repetition first, then frequency', () => {
  const s = new Sampler(params({ repetitionPenalty: 2, frequencyPenalty: 1 }));
  // x0 = 4 / 2 - 1 = 1 (the other order would give (4 - 1) / 2 = 1.5)
  const out = s.sample(f32([4, 0]), [0]);
  close(out.logprob, 1 - lse([1, 0]));
});

test('temperature scales the logits; logprob is under the tempered distribution', () => {
  const s = new Sampler(params({ doSample: true, temperature: 0.5, topNTokens: 2 }));
  const out = s.sample(f32([1, 2]), []);
  close(out.logprob, [2, 4][out.id]! - lse([2, 4]));
  assert.deepEqual(out.top!.map((t) => t.id), [1, 0]);
  close(out.top![0]!.logprob, 4 - lse([2, 4]));
});

test('top_k keeps the k best; logprob stays the untruncated one', () => {
  const logits = [1, 2, 3, 0];
  const s = new Sampler(params({ doSample: true, topK: 2 }));
  const freq = frequencies(s, logits, 20000);
  assert.equal(freq[0], 0);
  assert.equal(freq[3], 0);
  const p1 = Math.exp(2) / (Math.exp(2) + Math.exp(3));
  assert.ok(Math.abs(freq[1]! - p1) < 0.015, `${freq[1]} vs ${p1}`);
  const out = new Sampler(params({ doSample: true, topK: 1 })).sample(f32(logits), []);
  assert.equal(out.id, 2);
  close(out.logprob, 3 - lse(logits));
});

test('top_p keeps the smallest best set whose mass reaches top_p', () => {
  const logits = [0.5, 0.3, 0.15, 0.05].map(Math.log);
  const only0 = frequencies(new Sampler(params({ doSample: true, topP: 0.45 })), logits, 2000);
  assert.deepEqual(only0, [1, 0, 0, 0]);
  const two = frequencies(new Sampler(params({ doSample: true, topP: 0.75 })), logits, 20000);
  assert.equal(two[2], 0);
  assert.equal(two[3], 0);
  assert.ok(Math.abs(two[0]! - 0.625) < 0.015, `${two[0]}`);
  const three = frequencies(new Sampler(params({ doSample: true, topP: 0.85 })), logits, 20000);
  assert.equal(three[3], 0);
  assert.ok(Math.abs(three[2]! - 0.15 / 0.95) < 0.015, `${three[2]}`);
});

test('typical_p: hand-computed typical set', () => {
  // p = [.5, .3, .15, .05]: H = 1.1421; |−ln p − H| = [.449, .062, .755, 1.854];
  // ascending: t1 (cum .3), t0 (cum .8), ... → typical_p 0.2 keeps {t1}; 0.5 keeps {t1, t0}
  const logits = [0.5, 0.3, 0.15, 0.05].map(Math.log);
  assert.deepEqual(frequencies(new Sampler(params({ doSample: true, typicalP: 0.2 })), logits, 2000), [0, 1, 0, 0]);
  const two = frequencies(new Sampler(params({ doSample: true, typicalP: 0.5 })), logits, 20000);
  assert.equal(two[2], 0);
  assert.equal(two[3], 0);
  assert.ok(Math.abs(two[1]! - 0.375) < 0.015, `${two[1]}`);
  // after top_k = 2 the typical set is computed over the renormalised survivors {t0, t1}
  const k2 = frequencies(new Sampler(params({ doSample: true, topK: 2, typicalP: 0.3 })), logits, 2000);
  assert.equal(k2[2]! + k2[3]!, 0);
});

test('sampling frequencies follow the softmax', () => {
  const logits = [0, 1, 2, -1, 0.5];
  const freq = frequencies(new Sampler(params({ doSample: true, seed: 3 })), logits, 40000);
  const z = lse(logits);
  logits.forEach((x, i) => assert.ok(Math.abs(freq[i]! - Math.exp(x - z)) < 0.012, `id ${i}: ${freq[i]} vs ${Math.exp(x - z)}`));
});

test('same seed and logits give the same tokens; another seed differs', () => {
  const run = (seed: number): number[] => {
    const s = new Sampler(params({ doSample: true, seed, temperature: 1.3, topK: 50, topP: 0.95 }));
    const out: number[] = [];
    const logits = new Float32Array(1000);
    for (let step = 0; step < 50; step++) {
      for (let i = 0; i < logits.length; i++) logits[i] = Math.sin(i * 0.37 + step) * 3;
      out.push(s.sample(logits, out).id);
    }
    return out;
  };
  assert.deepEqual(run(1), run(1));
  assert.notDeepEqual(run(1), run(2));
  // seeds beyond 2^32 are distinct too
  assert.notDeepEqual(run(2 ** 40), run(2 ** 40 + 2 ** 33));
  const a = new Xoshiro128(123), b = new Xoshiro128(123);
  for (let i = 0; i < 10; i++) {
    const x = a.nextFloat();
    assert.equal(x, b.nextFloat());
    assert.ok(x >= 0 && x < 1);
  }
});

test('top-n: best alternatives under the same distribution, ties to the lowest id', () => {
  const logits = [1, 3, 3, 2];
  const out = new Sampler(params({ topNTokens: 3 })).sample(f32(logits), []);
  assert.equal(out.id, 1);
  assert.deepEqual(out.top!.map((t) => t.id), [1, 2, 3]);
  out.top!.forEach((t) => close(t.logprob, logits[t.id]! - lse(logits)));
  assert.equal(out.top![0]!.logprob, out.logprob);
  // more than V asked for
  assert.equal(new Sampler(params({ topNTokens: 5 })).sample(f32([0, 1]), []).top!.length, 2);
});

test('large vocabulary: partial selection agrees with a full-sort reference', () => {
  const V = 150_000;
  const logits = new Float32Array(V);
  let s = 99;
  for (let i = 0; i < V; i++) { s = (Math.imul(s, 1664525) + 1013904223) >>> 0; logits[i] = (s / 2 ** 32) * 12 - 6; }
  // a few strong tokens, as with real models
  for (const i of [10, 77_777, 149_999]) logits[i] = 9;

  /** Reference: sort everything, filter top_k → top_p → typical_p, draw in id order with the same PRNG stream. */
  function reference(p: SamplingParams, draws: number): number[] {
    const rng = new Xoshiro128(p.seed);
    const x = Float64Array.from(logits, (v) => v / p.temperature);
    const order = Array.from({ length: V }, (_, i) => i).sort((a, b) => x[b]! - x[a]! || a - b);
    const max = x[order[0]!]!;
    let cand = p.topK > 0 ? order.slice(0, p.topK) : order;
    if (p.topP < 1) {
      const total = cand.reduce((acc, i) => acc + Math.exp(x[i]! - max), 0);
      let cum = 0;
      let keep = 0;
      while (keep < cand.length && cum < p.topP * total) cum += Math.exp(x[cand[keep++]!]! - max);
      cand = cand.slice(0, Math.max(1, keep));
    }
    if (p.typicalP < 1) {
      const z = lse(cand.map((i) => x[i]!));
      const lp = new Map(cand.map((i) => [i, x[i]! - z]));
      const h = -cand.reduce((acc, i) => acc + lp.get(i)! * Math.exp(lp.get(i)!), 0);
      const score = (i: number): number => Math.abs(-lp.get(i)! - h);
      const byScore = [...cand].sort((a, b) => score(a) - score(b) || a - b);
      let cum = 0;
      let lastInd = 0;
      for (const i of byScore) { cum += Math.exp(lp.get(i)!); if (cum < p.typicalP) lastInd++; else break; }
      const threshold = score(byScore[Math.min(lastInd, byScore.length - 1)]!);
      cand = cand.filter((i) => score(i) <= threshold);
    }
    cand = [...cand].sort((a, b) => a - b);
    const out: number[] = [];
    for (let d = 0; d < draws; d++) {
      const mass = cand.reduce((acc, i) => acc + Math.exp(x[i]! - max), 0);
      let u = rng.nextFloat() * mass;
      let pick = cand[cand.length - 1]!;
      for (const i of cand) { u -= Math.exp(x[i]! - max); if (u < 0) { pick = i; break; } }
      out.push(pick);
    }
    return out;
  }

  for (const p of [
    params({ doSample: true, topK: 40, seed: 5 }),
    params({ doSample: true, topP: 0.9, temperature: 0.8, seed: 6 }),
    params({ doSample: true, topK: 1000, topP: 0.5, seed: 7 }),
    params({ doSample: true, topP: 0.999, seed: 8 }), // most of the flat tail survives
    params({ doSample: true, typicalP: 0.9, seed: 9 }),
    params({ doSample: true, topP: 0.95, typicalP: 0.5, temperature: 2, seed: 10 }),
  ]) {
    const sampler = new Sampler(p);
    const got = Array.from({ length: 20 }, () => sampler.sample(logits, []).id);
    assert.deepEqual(got, reference(p, 20), JSON.stringify(p));
  }
});

test('logit_bias: +100 makes greedy pick the token, -100 bans it; the mask leaves only allowed ids', () => {
  const logits = Float32Array.from([2, 1, 0.5, -1, 3]);
  assert.equal(new Sampler(params({})).sample(logits, []).id, 4);
  assert.equal(new Sampler(params({ logitBias: [[3, 100]] })).sample(logits, []).id, 3);
  assert.equal(new Sampler(params({ logitBias: [[4, -100]] })).sample(logits, []).id, 0);
  for (let i = 0; i < 50; i++) {
    const banned = new Sampler(params({ doSample: true, seed: i, logitBias: [[4, -100], [0, -100]] })).sample(logits, []);
    assert.ok(banned.id !== 4 && banned.id !== 0);
  }
  const allowed = Uint8Array.from([0, 1, 1, 0, 0]);
  assert.equal(new Sampler(params({})).sample(logits, [], 0, allowed).id, 1);
  for (let i = 0; i < 50; i++) {
    const s = new Sampler(params({ doSample: true, seed: i, topP: 0.5, topK: 3 })).sample(logits, [], 0, allowed);
    assert.ok(s.id === 1 || s.id === 2);
    // renormalised over the allowed ids
    const lse = Math.log(Math.exp(1) + Math.exp(0.5));
    assert.ok(Math.abs(s.logprob - (logits[s.id]! - lse)) < 1e-6);
  }
});

test('a shortlist (the 64 best ids and the tempered normaliser) samples the same tokens as the whole row, top_k ≤ 64, low temperatures too', () => {
  const V = 3000;
  let s = 7;
  const next = () => ((s = (Math.imul(s, 1664525) + 1013904223) >>> 0) / 2 ** 32);
  const cases: Partial<SamplingParams>[] = [
    { topK: 1 }, { topK: 5 }, { topK: 40, topP: 0.8, temperature: 0.6 }, { topK: 64, typicalP: 0.9, temperature: 1.3 }, { topK: 64, topP: 0.95, typicalP: 0.5 },
    { topK: 20, temperature: 0.01 }, { topK: 64, topP: 0.9, temperature: 1e-4 },
  ];
  for (let round = 0; round < 20; round++) {
    // Few distinct values (many ties, −0 among them), NaN and −∞ entries.
    const row = Float32Array.from({ length: V }, () => Math.round(next() * 16 - 8) / 2);
    for (let i = 0; i < 30; i++) row[Math.floor(next() * V)] = i % 2 ? NaN : -Infinity;
    const value = (v: number) => (Number.isNaN(row[v]) ? -Infinity : row[v]!);
    const order = Array.from({ length: V }, (_, v) => v).sort((a, b) => (value(b) > value(a) ? 1 : value(b) < value(a) ? -1 : a - b));
    const ids = Int32Array.from(order.slice(0, 64));
    for (const c of cases) {
      const p = params({ doSample: true, seed: 1000 + round, ...c });
      const inv = 1 / p.temperature;
      const top = value(ids[0]!);
      // The normaliser relative to the largest logit, rounded to float32 as the device gives it.
      const logNorm = Math.fround(lse(Array.from(row).filter(Number.isFinite).map((x) => (x - top) * inv)));
      const shortlist = { ids, logits: Float32Array.from(ids, (v) => value(v)), logNorm };
      const whole = new Sampler(p);
      const short = new Sampler(p);
      for (let t = 0; t < 5; t++) {
        const a = whole.sample(row, []);
        const b = short.sampleShortlist(shortlist, V)!;
        assert.ok(short.shortlistDecides(shortlist, V));
        assert.equal(b.id, a.id, `round ${round}, ${JSON.stringify(c)}, draw ${t}`);
        // float32 rounding of a normaliser between 0 and log V, whatever the temperature; never above 0 for the best
        close(b.logprob, a.logprob, 1e-6 + 1e-12 * Math.abs(a.logprob));
        assert.ok(b.logprob <= 0, `round ${round}: logprob ${b.logprob} above 0`);
      }
    }
  }
  // A shortlist whose normaliser is NaN (a +∞ logit) or −∞ (no finite logit) fails as sample() does.
  const p = params({ doSample: true, topK: 3 });
  assert.throws(() => new Sampler(p).sampleShortlist({ ids: Int32Array.of(0, 1, 2), logits: f32([Infinity, 1, 0]), logNorm: NaN }, 10), /\+inf/);
  assert.throws(() => new Sampler(p).sampleShortlist({ ids: Int32Array.of(0, 1, 2), logits: f32([-Infinity, -Infinity, -Infinity]), logNorm: -Infinity }, 10), /-inf or NaN/);
});

/** The shortlist of `row` as the device makes it (shortlist.ts): the 64 best, and the tempered normaliser in float32, moved by `nudge`. */
function shortlistOf(row: Float32Array, temperature: number, nudge = 0) {
  const value = (v: number) => (Number.isNaN(row[v]) ? -Infinity : row[v]!);
  const order = Array.from({ length: row.length }, (_, v) => v).sort((a, b) => (value(b) > value(a) ? 1 : value(b) < value(a) ? -1 : a - b));
  const ids = Int32Array.from(order.slice(0, 64));
  const top = value(ids[0]!);
  const logNorm = Math.fround(Math.max(0, lse(Array.from(row).filter(Number.isFinite).map((x) => (x - top) / temperature)) + nudge)); // Σ ≥ exp(0)
  return { ids, logits: Float32Array.from(ids, (v) => value(v)), logNorm };
}

test('top_p alone and plain sampling from a shortlist: the same tokens as the whole row where it decides, the random numbers in step where it does not', () => {
  const V = 5000;
  let s = 11;
  const next = () => ((s = (Math.imul(s, 1664525) + 1013904223) >>> 0) / 2 ** 32);
  let decided = 0;
  let undecided = 0;
  for (let round = 0; round < 40; round++) {
    // Peaked rows of varied spread: the nucleus lies within the 64 best, or reaches past them.
    const spread = 1 + (round % 8) * 1.5;
    const row = Float32Array.from({ length: V }, () => -Math.log(-Math.log(next())) - next() * 12);
    for (let i = 0; i < 40; i++) row[Math.floor(next() * V)] = Math.round(next() * spread * 4) / 4 + 6; // ties among the best
    row[Math.floor(next() * V)] = NaN;
    for (const topP of [0.3, 0.8, 0.95, 1]) { // 1: plain sampling, its draw walking the ranking
      for (const temperature of [1, 0.6, 1.7, 0.01]) {
        const p = params({ doSample: true, seed: 500 + round, topP, temperature });
        assert.ok(nucleusOnDevice(p) && !shortlistOnDevice(p));
        // The device's normaliser is float32: exact, and off by 2e-6 each way.
        for (const nudge of [0, 2e-6, -2e-6]) {
          const shortlist = shortlistOf(row, temperature, nudge);
          const whole = new Sampler(p);
          const short = new Sampler(p);
          for (let t = 0; t < 4; t++) {
            const a = whole.sample(row, []);
            const decides = short.shortlistDecides(shortlist, V); // before the draw: plain sampling's looks at its number
            const b = short.sampleShortlist(shortlist, V);
            assert.equal(b !== null, decides);
            if (b === null) {
              undecided++;
              // the caller then samples the row: the same draw, the random numbers still in step
              assert.equal(short.sample(row, []).id, a.id);
              continue;
            }
            decided++;
            assert.equal(b.id, a.id, `round ${round}, top_p ${topP}, T ${temperature}, nudge ${nudge}, draw ${t}`);
            close(b.logprob, a.logprob, 1e-5 + 1e-12 * Math.abs(a.logprob));
            assert.ok(b.logprob <= 0);
          }
        }
      }
    }
  }
  // Both happen, and the shortlist decides most draws on such rows.
  assert.ok(undecided > 0 && decided > 3 * undecided, `decided ${decided}, undecided ${undecided}`);

  // A row with fewer finite logits than the shortlist holds: the shortlist is the whole row, and always decides.
  const sparse = new Float32Array(V).fill(-Infinity);
  for (let i = 0; i < 30; i++) sparse[i * 97] = (i % 5) * 0.5;
  for (let seed = 0; seed < 30; seed++) {
    const p = params({ doSample: true, seed, topP: 0.9, temperature: 3 });
    const b = new Sampler(p).sampleShortlist(shortlistOf(sparse, 3), V);
    assert.ok(b !== null);
    assert.equal(b.id, new Sampler(p).sample(sparse, []).id);
  }
  // Tempering that makes distinct logits equal (T = 1e300 on tiny logits): the shortlist cannot rank them as the host
  // does, and top_p weighs the whole row: the row is read.
  const tiny = Float32Array.from({ length: V }, (_, i) => (1 + ((i * 7919) % 997) / 997) * 1e-22);
  const hot = params({ doSample: true, topP: 0.5, temperature: 1e300, seed: 3 });
  const hotList = shortlistOf(tiny, 1e300);
  const hotSampler = new Sampler(hot);
  assert.equal(hotSampler.shortlistDecides(hotList, V), false);
  assert.equal(hotSampler.sampleShortlist(hotList, V), null);
  assert.equal(hotSampler.sample(tiny, []).id, new Sampler(hot).sample(tiny, []).id, 'no random number drawn');
  // top_k with top_p, typical_p or more than 64 top-n alternatives are not nucleus rows; penalties and logit_bias are (as edits).
  for (const q of [{ topK: 10 }, { typicalP: 0.9 }, { topNTokens: 65 }, { doSample: false }]) {
    assert.ok(!nucleusOnDevice(params({ doSample: true, topP: 0.9, ...q })), JSON.stringify(q));
  }
  assert.ok(nucleusOnDevice(params({ doSample: true, topP: 0.9, repetitionPenalty: 1.1, logitBias: [[1, 2]] })));
  // Penalties that float32 edits would overflow stay on the host.
  assert.ok(pickableOnDevice(params({ repetitionPenalty: 1.2 })));
  for (const repetitionPenalty of [1e-38, 1e39]) assert.ok(!pickableOnDevice(params({ repetitionPenalty })), String(repetitionPenalty));
});

test('edits(): logit_bias and penalties as edits of the row (applied in float32, as on the device) give the tokens sample() gives with the history', () => {
  const V = 700;
  let s = 21;
  const next = () => ((s = (Math.imul(s, 1664525) + 1013904223) >>> 0) / 2 ** 32);
  const apply = (row: Float32Array, e: NonNullable<ReturnType<Sampler['edits']>>) => {
    const out = Float32Array.from(row);
    const f = Math.fround;
    e.ids.forEach((id, j) => {
      let v = f(out[id]! + e.bias[j]!);
      if (e.repetition[j] !== 1) v = v > 0 ? f(v / e.repetition[j]!) : f(v * e.repetition[j]!);
      out[id] = f(v - e.minus[j]!);
    });
    return out;
  };
  const cases: Partial<SamplingParams>[] = [
    { repetitionPenalty: 1.3 }, { frequencyPenalty: 0.8, presencePenalty: -0.4 }, { logitBias: [[3, 5], [3, -1], [699, 9], [700, 50]] },
    { doSample: true, topK: 30, repetitionPenalty: 0.8, frequencyPenalty: 0.3, seed: 4 }, { doSample: true, topP: 0.7, temperature: 0.5, presencePenalty: 1, logitBias: [[10, 4]], seed: 5 },
  ];
  assert.equal(new Sampler(params({})).edits([1, 2], [3], 0, V), undefined, 'no bias or penalty: no edits');
  for (let round = 0; round < 30; round++) {
    const row = Float32Array.from({ length: V }, () => next() * 12 - 6);
    const prompt = Array.from({ length: 20 }, () => Math.floor(next() * V));
    const generated = Array.from({ length: 15 }, () => Math.floor(next() * 40)); // repeats
    generated.push(V + 5); // an id past the vocabulary is ignored by both
    for (const c of cases) {
      for (const from of [0, prompt.length]) {
        const p = params({ seed: round, ...c });
        const e = new Sampler(p).edits(prompt, generated, from, V)!;
        assert.ok(e && new Set(e.ids).size === e.ids.length, 'distinct ids');
        // Counted incrementally, token by token, as the engine asks each step: the same edits.
        const stepwise = new Sampler(p);
        for (let k = 0; k < generated.length; k++) stepwise.edits(prompt, generated.slice(0, k), from, V);
        assert.deepEqual(stepwise.edits(prompt, generated, from, V), e);
        const host = new Sampler(p);
        const device = new Sampler(p);
        for (let t = 0; t < 3; t++) {
          const a = host.sample(row, [...prompt, ...generated], from);
          const b = device.sample(apply(row, e), [], 0, undefined, true);
          assert.equal(b.id, a.id, `round ${round}, ${JSON.stringify(c)}, from ${from}`);
          close(b.logprob, a.logprob, 1e-5);
        }
      }
    }
  }
});

test('a shortlist of edited logits is not edited again: logit_bias counts once, the vocabulary within the shortlist too', () => {
  const V = 50; // ≤ 64: the shortlist is the whole row, sampled as a row
  const row = Float32Array.from({ length: V }, (_, i) => (i === 3 ? 5 : i === 8 ? 4 : (i % 7) * 0.1));
  const p = params({ doSample: true, topK: 1, logitBias: [[3, -0.6]] }); // once: 4.4, still the best; twice: 3.8, not
  const e = new Sampler(p).edits([], [], 0, V)!;
  const edited = Float32Array.from(row);
  e.ids.forEach((id, j) => (edited[id] = Math.fround(edited[id]! + e.bias[j]!)));
  const order = Array.from({ length: V }, (_, i) => i).sort((a, b) => edited[b]! - edited[a]! || a - b);
  const ids = Int32Array.from({ length: 64 }, (_, j) => (j < V ? order[j]! : -1));
  const logits = Float32Array.from({ length: 64 }, (_, j) => (j < V ? edited[order[j]!]! : -Infinity));
  const logNorm = Math.fround(Math.log(Array.from(edited).reduce((sum, x) => sum + Math.exp(x - edited[3]!), 0)));
  assert.equal(new Sampler(p).sample(row, []).id, 3, 'the host: bias once');
  assert.equal(new Sampler(p).sampleShortlist({ ids, logits, logNorm }, V)!.id, 3);
});

test('top-n alternatives (≤ 64) and greedy rows from a shortlist: the whole row\'s token and alternatives, logprobs to float32 rounding', () => {
  const V = 3000;
  let s = 5;
  const next = () => ((s = (Math.imul(s, 1664525) + 1013904223) >>> 0) / 2 ** 32);
  const cases: Partial<SamplingParams>[] = [
    { topNTokens: 5 }, { temperature: 0.5, topNTokens: 3 }, { temperature: 2 }, { doSample: true, topK: 20, topNTokens: 4 },
    { doSample: true, topP: 0.8, topNTokens: 2 }, { doSample: true, topNTokens: 64, temperature: 0.7 },
  ];
  let decided = 0;
  for (let round = 0; round < 20; round++) {
    const row = Float32Array.from({ length: V }, () => Math.round((next() * 16 - 8) * 4) / 4); // ties
    row[Math.floor(next() * V)] = 9;
    for (const c of cases) {
      const p = params({ seed: 70 + round, ...c });
      assert.ok(shortlistOnDevice(p) || nucleusOnDevice(p), JSON.stringify(c));
      assert.ok(!pickableOnDevice(p));
      const shortlist = shortlistOf(row, p.temperature);
      const whole = new Sampler(p);
      const short = new Sampler(p);
      for (let t = 0; t < 3; t++) {
        const a = whole.sample(row, []);
        const b = short.sampleShortlist(shortlist, V) ?? short.sample(row, []);
        decided++;
        assert.equal(b.id, a.id, `round ${round}, ${JSON.stringify(c)}`);
        close(b.logprob, a.logprob, 1e-5);
        assert.deepEqual(b.top?.map((x) => x.id), a.top?.map((x) => x.id));
        b.top?.forEach((x, j) => close(x.logprob, a.top![j]!.logprob, 1e-5));
      }
    }
  }
  assert.ok(decided > 0);
  // Tempering that makes distinct logits equal (T = 1e300): the alternatives are ranked by id among them, as the host ranks them.
  const tiny = new Float32Array(200).fill(-5);
  [[10, 1e-30], [3, 2e-30], [7, 3e-30]].forEach(([id, v]) => (tiny[id!] = v!));
  const hot = params({ temperature: 1e300, topNTokens: 4 });
  assert.deepEqual(new Sampler(hot).sampleShortlist(shortlistOf(tiny, 1e300), 200)!.top!.map((t) => t.id), new Sampler(hot).sample(tiny, []).top!.map((t) => t.id));
  // More than 64 alternatives: the row is read.
  assert.ok(!shortlistOnDevice(params({ topNTokens: 65 })) && !nucleusOnDevice(params({ doSample: true, topNTokens: 65 })));
});
