import { test } from 'node:test';
import assert from 'node:assert/strict';
import { DEFAULT_SAMPLING } from '../src/engine/sampling.ts';
import { fitLengths, openAISampling, tgiSampling } from '../src/server/params.ts';

const isValidation = (err: { code?: string }): boolean => err.code === 'VALIDATION';

test('tgiSampling: TGI rules for implied sampling and ranges', () => {
  const d = tgiSampling({});
  assert.equal(d.doSample, false);
  assert.ok(Number.isSafeInteger(d.seed) && d.seed >= 0);
  assert.notEqual(tgiSampling({}).seed, tgiSampling({}).seed);
  assert.equal(tgiSampling({ seed: 7 }).seed, 7);

  assert.equal(tgiSampling({ temperature: 1 }).doSample, false); // TGI: has_warpers is false
  assert.equal(tgiSampling({ temperature: 0.7 }).doSample, true);
  assert.equal(tgiSampling({ top_k: 5 }).doSample, true);
  assert.equal(tgiSampling({ top_p: 0.9 }).doSample, true);
  assert.equal(tgiSampling({ typical_p: 0.9 }).doSample, true);
  assert.equal(tgiSampling({ top_p: 1, top_k: 0, typical_p: 1 }).doSample, false);
  assert.equal(tgiSampling({ do_sample: true }).doSample, true);
  assert.equal(tgiSampling({ repetition_penalty: 1.2 }).doSample, false);
  assert.deepEqual(
    { ...tgiSampling({ temperature: null, top_k: null, seed: 1, top_n_tokens: null }) },
    { ...DEFAULT_SAMPLING, seed: 1 },
  );
  assert.equal(tgiSampling({ top_n_tokens: 5 }).topNTokens, 5);

  for (const bad of [
    { temperature: 0 }, { temperature: -1 }, { top_p: 0 }, { top_p: 1.1 }, { typical_p: 0 }, { typical_p: 1.5 },
    { top_k: -1 }, { top_k: 1.5 }, { repetition_penalty: 0 }, { frequency_penalty: 2.5 }, { presence_penalty: -3 },
    { seed: -1 }, { seed: 0.5 }, { top_n_tokens: 6 }, { top_n_tokens: -1 }, { temperature: Number.NaN },
    { temperature: '1' as unknown as number }, { do_sample: 'yes' as unknown as boolean },
  ]) {
    assert.throws(() => tgiSampling(bad), isValidation, JSON.stringify(bad));
  }
});

test('openAISampling: temperature 0 is greedy and ignores the warpers; otherwise it samples', () => {
  const greedy = openAISampling({ temperature: 0, top_p: 0.5, top_k: 3, seed: 1 }, 0);
  assert.deepEqual({ ...greedy }, { ...DEFAULT_SAMPLING, seed: 1 });
  const sampled = openAISampling({ top_p: 0.9, frequency_penalty: 0.5, seed: 2 }, 3);
  assert.deepEqual({ ...sampled }, { ...DEFAULT_SAMPLING, doSample: true, topP: 0.9, frequencyPenalty: 0.5, seed: 2, topNTokens: 3 });
  assert.equal(openAISampling({}, 0).doSample, true);
  assert.throws(() => openAISampling({ top_p: 2 }, 0), isValidation);
});

test('fitLengths: truncate keeps the last tokens; a default max-new-tokens is shortened to fit, a given one is kept', () => {
  const limits = { maxInputLength: 8, maxTotalTokens: 12 };
  const ids = [1, 2, 3, 4, 5, 6];
  const cases: [Parameters<typeof fitLengths>[2], readonly number[], number][] = [
    [{ maxNew: null, defaultMaxNew: 4 }, ids, 4],
    [{ maxNew: undefined, defaultMaxNew: 20 }, ids, 6],
    [{ maxNew: 20, defaultMaxNew: 4 }, ids, 20], // the engine rejects it (checkLengths)
    [{ maxNew: null, defaultMaxNew: 20, truncate: 2 }, [5, 6], 10],
    [{ maxNew: null, defaultMaxNew: 20, truncate: 8 }, ids, 6],
  ];
  for (const [opts, inputIds, maxNewTokens] of cases) {
    assert.deepEqual(fitLengths(limits, ids, opts), { inputIds, maxNewTokens }, JSON.stringify(opts));
  }
  assert.equal(fitLengths(limits, Array(14).fill(1), { maxNew: null, defaultMaxNew: 4 }).maxNewTokens, 1);
  assert.throws(() => fitLengths(limits, ids, { maxNew: null, defaultMaxNew: 4, truncate: 9 }), /`truncate` must be <= 8/);
});
