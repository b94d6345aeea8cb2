/**
 * Adapter merging (src/lora/merge.ts, src/lora/merged-adapter.ts) against the plain-loop reference
 * (test/reference/merge.ts): every strategy on odd sizes with weights ≠ 1 (negative and zero too), both majority
 * sign methods, several densities, DARE with several seeds; hand-made tables for the sign election and ties in
 * magnitude; the adapter-level merge (module union, per-module weights, the first source's config) and its
 * refusals; the merge id.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { isServeError } from '../src/errors.ts';
import {
  dareStream, disjointMerge, magnitudePrune, majoritySign, mergeTaskTensors, randomPrune, type MergeMath,
} from '../src/lora/merge.ts';
import { mergeId, mergeSources, type MergeSource } from '../src/lora/merged-adapter.ts';
import type { MergeSpec } from '../src/lora/types.ts';
import { parsePeftConfig } from '../src/lora/peft-config.ts';
import { parseSafetensors } from '../src/formats/safetensors.ts';
import type { LinearModule } from '../src/model/types.ts';
import {
  refMagnitudePrune, refMajorityMask, refMergeAdapters, refMergeTensors, refRandomPrune, refStream, type RefStrategy,
} from './reference/merge.ts';

/** Deterministic values in (-1, 1) (mulberry32). */
function values(n: number, seed: number): Float32Array {
  let a = seed >>> 0;
  return Float32Array.from({ length: n }, () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 2 ** 31 - 1;
  });
}

function assertClose(actual: Float32Array, expected: Float64Array, what: string): void {
  assert.equal(actual.length, expected.length, what);
  for (let e = 0; e < actual.length; e++) {
    const tol = 1e-6 * Math.max(1, Math.abs(expected[e]!));
    assert.ok(Math.abs(actual[e]! - expected[e]!) <= tol, `${what}: element ${e} is ${actual[e]}, expected ${expected[e]}`);
  }
}

const STRATEGIES: RefStrategy[] = ['linear', 'ties', 'dare_linear', 'dare_ties'];

test('every strategy equals the reference: odd sizes, weights ≠ 1, both sign methods, densities 0 to 1, DARE seeds', () => {
  const cases = [
    { n: 37, weights: [0.7, 1.3, -0.4] },
    { n: 1, weights: [2, 0.5] },
    { n: 96, weights: [1, 0, 1.5, 0.25] },
  ];
  let checked = 0;
  for (const { n, weights } of cases) {
    const tensors = weights.map((_, i) => values(n, 100 * n + i));
    for (const strategy of STRATEGIES) {
      for (const density of [0, 0.3, 0.5, 0.9, 1]) {
        for (const signMethod of ['total', 'frequency'] as const) {
          for (const seed of strategy.startsWith('dare') ? [0, 1, 12345, 2 ** 40 + 3] : [0]) {
            const m: MergeMath = { strategy, density, majoritySignMethod: signMethod };
            const got = mergeTaskTensors(tensors, weights, m, (i) => dareStream(seed, 'model.layers.0.q_proj', 'A', i));
            const want = refMergeTensors(tensors, weights, { strategy, density, signMethod, seed }, (i) => refStream(seed, 'model.layers.0.q_proj', 'A', i));
            assertClose(got, want, `${strategy} n=${n} density=${density} ${signMethod} seed=${seed}`);
            checked++;
          }
        }
      }
    }
  }
  assert.equal(checked, 3 * (2 * 5 * 2 * 1 + 2 * 5 * 2 * 4));
});

test('magnitude pruning keeps floor(density·n) largest magnitudes, equal ones from the left, as the reference', () => {
  const t = Float32Array.from([1, -1, 0.5, 1, -2, 0]);
  assert.deepEqual([...magnitudePrune(t, 0.5)], [1, -1, 0, 0, -2, 0]); // k = 3: -2, then the first two of the |1|s
  assert.deepEqual([...magnitudePrune(t, 0.4)], [1, 0, 0, 0, -2, 0]); // k = 2
  assert.deepEqual([...magnitudePrune(t, 0.1)], [0, 0, 0, 0, 0, 0]); // k = 0
  assert.deepEqual([...magnitudePrune(t, 1)], [...t]);
  // Random values, and values on a coarse grid (many equal magnitudes, the quickselect's hard case).
  const grid = values(1000, 4).map((x) => Math.round(x * 8) / 8);
  for (const x of [values(53, 9), values(1000, 10), grid]) {
    for (const density of [0.001, 0.1, 0.25, 0.5, 0.75, 0.999]) {
      assert.deepEqual([...magnitudePrune(x, density)], [...refMagnitudePrune(x, density)].map(Math.fround), `n=${x.length} density ${density}`);
    }
  }
});

test('majority sign: total weighs magnitudes, frequency counts votes; zero sums elect +; zeros never agree', () => {
  const ts = [Float32Array.from([3, 1, 0, 0]), Float32Array.from([-1, -1, 0, 2]), Float32Array.from([-1, 1, 0, -2])];
  assert.deepEqual([...majoritySign(ts, 'total')], [1, 1, 1, 1]); // sums 1, 1, 0, 0
  assert.deepEqual([...majoritySign(ts, 'frequency')], [-1, 1, 1, 1]); // votes -1, 1, 0, 0
  // Element 0 by frequency: the two -1s agree, mean of their weighted values; element 2: nobody agrees → 0.
  const merged = disjointMerge(ts, [1, 2, 4], majoritySign(ts, 'frequency'));
  assert.deepEqual([...merged], [(-1 * 2 + -1 * 4) / 2, (1 * 1 + 1 * 4) / 2, 0, 2 * 2]);
  const mask = refMajorityMask(ts, 'frequency');
  assert.deepEqual(mask.map((r) => r[0]), [false, true, true]);
});

test('DARE keeps about density of the elements and rescales them by 1/density; a seed fixes the mask', () => {
  const t = values(20000, 3);
  for (const density of [0.2, 0.5, 0.8]) {
    const out = randomPrune(t, density, dareStream(7, 'm', 'A', 0), true);
    let kept = 0;
    for (let e = 0; e < t.length; e++) {
      if (out[e] !== 0) {
        kept++;
        assert.equal(out[e], Math.fround(t[e]! / density));
      }
    }
    assert.ok(Math.abs(kept / t.length - density) < 0.02, `density ${density}: kept ${kept / t.length}`);
    assert.deepEqual(out, randomPrune(t, density, dareStream(7, 'm', 'A', 0), true), 'same seed, same mask');
    assert.notDeepEqual(out, randomPrune(t, density, dareStream(8, 'm', 'A', 0), true), 'another seed, another mask');
    assert.notDeepEqual(out, randomPrune(t, density, dareStream(7, 'm', 'B', 0), true), 'each tensor has its own stream');
    assertClose(out, refRandomPrune(t, density, refStream(7, 'm', 'A', 0)), `density ${density}`);
  }
  assert.deepEqual(randomPrune(t, 0, dareStream(1, 'm', 'A', 0), true), new Float32Array(t.length));
  assert.deepEqual(randomPrune(t, 1, () => assert.fail('density 1 draws nothing'), true), t);
});

// ------------------------------------------------------------------------------------------------
// Adapter level

const mod = (path: string, layer: number, inFeatures: number, outFeatures: number): LinearModule =>
  ({ path, layer, key: path, name: path.split('.').at(-1)!, inFeatures, outFeatures }) as unknown as LinearModule;
const Q = mod('model.layers.0.self_attn.q_proj', 0, 6, 6);
const V = mod('model.layers.0.self_attn.v_proj', 0, 6, 4);
const O = mod('model.layers.1.self_attn.o_proj', 1, 6, 6);

function source(id: string, raw: Record<string, unknown>, modules: LinearModule[], seed: number): MergeSource {
  const r = raw.r as number;
  const pairs = modules.map((module, k) => ({
    module, r, A: values(r * module.inFeatures, seed + 10 * k), B: values(module.outFeatures * r, seed + 10 * k + 5),
  }));
  return { id, rawConfig: raw, config: parsePeftConfig(raw, { maxRank: 64 }), pairs };
}

const cfg = (o: Record<string, unknown>) => ({ peft_type: 'LORA', r: 2, lora_alpha: 4, target_modules: ['q_proj', 'v_proj', 'o_proj'], ...o });

const spec = (o: Partial<MergeSpec>): MergeSpec =>
  ({ ids: ['a', 'b', 'c'], weights: [0.6, -1.2, 2], strategy: 'ties', density: 0.5, majoritySignMethod: 'total', seed: 0, ...o });

test('mergeSources: every module over the sources that have it, A and B separately, as the reference; the first source\'s config', async () => {
  const sources = [
    source('a', cfg({ lora_alpha: 16, use_rslora: true, layers_to_transform: [0] }), [Q, V], 1),
    source('b', cfg({ lora_alpha: 4 }), [Q, O], 2),
    source('c', cfg({ lora_alpha: 8 }), [Q, V, O], 3),
  ];
  for (const strategy of STRATEGIES) {
    for (const seed of [0, 99]) {
      const s = spec({ strategy, seed, majoritySignMethod: seed ? 'frequency' : 'total' });
      const { config, weights } = await mergeSources(sources, s);
      assert.deepEqual(config.target_modules, [Q.path, V.path, O.path].sort());
      assert.equal(config.lora_alpha, 16);
      assert.equal(config.use_rslora, true);
      assert.equal(config.layers_to_transform, undefined, 'selection fields of the first source are dropped');
      const ref = refMergeAdapters(
        sources.map((src) => ({ config: src.rawConfig as never, modules: new Map(src.pairs.map((p) => [p.module.path, { A: p.A, B: p.B }])) })),
        s.weights, { strategy, density: s.density, signMethod: s.majoritySignMethod, seed },
      );
      assert.equal(ref.scale, 16 / Math.sqrt(2));
      const st = parseSafetensors(weights);
      for (const [path, want] of ref.modules) {
        const A = st.readFloat32(`base_model.model.${path}.lora_A.weight`);
        const B = st.readFloat32(`base_model.model.${path}.lora_B.weight`);
        assertClose(A, want.A, `${strategy} seed ${seed} ${path} A`);
        assertClose(B, want.B, `${strategy} seed ${seed} ${path} B`);
      }
      assert.equal(st.tensors.size, 2 * ref.modules.size);
    }
  }
});

test('linear merge of one module in one source is w·A and w·B (so the delta is w²·B·A, as LoRAX computes)', async () => {
  const a = source('a', cfg({}), [O], 5);
  const b = source('b', cfg({}), [Q], 6);
  const st = parseSafetensors((await mergeSources([a, b], spec({ ids: ['a', 'b'], weights: [0.5, 3], strategy: 'linear' }))).weights);
  assert.deepEqual(st.readFloat32(`base_model.model.${O.path}.lora_A.weight`), a.pairs[0]!.A.map((x) => x * 0.5));
  assert.deepEqual(st.readFloat32(`base_model.model.${Q.path}.lora_B.weight`), b.pairs[0]!.B.map((x) => x * 3));
});

test('mergeSources refuses different ranks, a module of another rank, and rank or alpha patterns, with MERGE_INCOMPATIBLE', async () => {
  const refused = (sources: MergeSource[], re: RegExp) => assert.rejects(mergeSources(sources, spec({ ids: sources.map((s) => s.id), weights: sources.map(() => 1) })),
    (e) => isServeError(e) && e.code === 'MERGE_INCOMPATIBLE' && e.status === 422 && re.test(e.message));
  await refused([source('a', cfg({ r: 2 }), [Q], 1), source('b', cfg({ r: 4 }), [Q], 2)], /different ranks \("a": r=2, "b": r=4\)/);
  const odd = source('b', cfg({ r: 2 }), [Q], 2);
  const wide = { ...odd, pairs: [{ module: Q, r: 3, A: values(18, 1), B: values(18, 2) }] };
  await refused([source('a', cfg({}), [Q], 1), wide], /module "model\.layers\.0\.self_attn\.q_proj" has rank 2 in "a" but 3 in "b"/);
  await refused([source('a', cfg({}), [Q], 1), source('b', cfg({ rank_pattern: { q_proj: 2 } }), [Q], 2)], /"b" has rank_pattern or alpha_pattern/);
  await refused([source('a', cfg({ alpha_pattern: { q_proj: 8 } }), [Q], 1), source('b', cfg({}), [Q], 2)], /"a" has rank_pattern or alpha_pattern/);
});

test('mergeId: the parameters that change the weights, and only those', () => {
  const base = spec({ strategy: 'linear' });
  assert.match(mergeId(base), /^merge:[0-9a-f]{16}$/);
  assert.equal(mergeId(base), mergeId({ ...base, density: 0.1, seed: 5, majoritySignMethod: 'frequency' }), 'linear ignores density, sign method, seed');
  assert.notEqual(mergeId(base), mergeId({ ...base, weights: [0.6, -1.2, 2.5] }));
  assert.notEqual(mergeId(base), mergeId({ ...base, ids: ['b', 'a', 'c'] }));
  const ties = spec({ strategy: 'ties' });
  assert.equal(mergeId(ties), mergeId({ ...ties, seed: 5 }), 'ties draws nothing');
  assert.notEqual(mergeId(ties), mergeId({ ...ties, majoritySignMethod: 'frequency' }));
  const dare = spec({ strategy: 'dare_linear' });
  assert.equal(mergeId(dare), mergeId({ ...dare, majoritySignMethod: 'frequency' }), 'dare_linear elects no sign');
  assert.notEqual(mergeId(dare), mergeId({ ...dare, seed: 5 }));
  assert.notEqual(mergeId(dare), mergeId({ ...dare, density: 0.25 }));
});
