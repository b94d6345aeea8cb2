/**
 * An independent, slow reference forward pass: plain loops over Float64Array, written from the
 * Hugging Face model definitions (transformers `modeling_gpt2.py`, `modeling_llama.py`, the RoPE variants
 * of `modeling_rope_utils.py`, the sliding windows of `modeling_mistral.py`/`modeling_qwen2.py` and
 * `masking_utils.py`), taking
 * the RAW `config.json` object and tensors by their RAW checkpoint names. Test code only: nothing
 * here comes from src/, so the fast TensorFlow.js path can be checked against it.
 *
 * Every vector is one token's activations, a Float64Array; a sequence is an array of them.
 * Weights stay the checkpoint's Float32Arrays and are read element by element (float32 → float64
 * is exact), so all arithmetic is float64. HF computes RoPE's inv_freq and angles in float32;
 * here they are float64 (differences ~1e-7 relative, far below float32 model noise).
 */

import { refLoraDelta, type RefLoraMap } from './lora.ts';

export type { RefLora, RefLoraMap } from './lora.ts';

/** A host tensor: row-major float32 data with its shape. */
export interface RefTensor {
  shape: readonly number[];
  data: Float32Array;
}

/**
 * Tensor by raw checkpoint name. A missing name throws (or returns undefined); a getter may also
 * carry `has(name)`, which is then used for the optional tensors (biases, lm_head, name prefix).
 */
export interface GetTensor {
  (name: string): RefTensor;
  has?: (name: string) => boolean;
}

/** A GetTensor over a Map, with `has` (convenient for tests). */
export function getterFromMap(tensors: ReadonlyMap<string, RefTensor>): GetTensor {
  const get = (name: string): RefTensor => {
    const t = tensors.get(name);
    if (t === undefined) throw new Error(`reference: no tensor ${name}`);
    return t;
  };
  get.has = (name: string): boolean => tensors.has(name);
  return get;
}

type Vec = Float64Array;

// ---------------------------------------------------------------------------------------------
// Tensor access

function hasTensor(get: GetTensor, name: string): boolean {
  if (get.has !== undefined) return get.has(name);
  try {
    return get(name) != null;
  } catch {
    return false;
  }
}

/** A required tensor, with its shape checked. */
function need(get: GetTensor, name: string, shape: readonly number[]): RefTensor {
  const t = get(name);
  if (t == null) throw new Error(`reference: missing tensor ${name}`);
  if (t.shape.length !== shape.length || t.shape.some((n, i) => n !== shape[i])) {
    throw new Error(`reference: ${name} has shape [${t.shape.join(', ')}], expected [${shape.join(', ')}]`);
  }
  if (t.data.length !== shape.reduce((a, b) => a * b, 1)) {
    throw new Error(`reference: ${name} has ${t.data.length} values for shape [${shape.join(', ')}]`);
  }
  return t;
}

/** An optional tensor (a bias): undefined when the checkpoint does not have it. */
function maybe(get: GetTensor, name: string, shape: readonly number[]): RefTensor | undefined {
  return hasTensor(get, name) ? need(get, name, shape) : undefined;
}

function int(config: Record<string, any>, key: string, fallback?: number): number {
  const v = config[key] ?? fallback;
  if (!Number.isInteger(v) || v <= 0) throw new Error(`reference: config.${key} must be a positive integer, got ${v}`);
  return v;
}

// ---------------------------------------------------------------------------------------------
// Building blocks, each a plain loop

/** nn.Linear, W stored [out, in]: y[o] = Σ_i W[o, i]·x[i] + b[o]. */
function linear(x: Vec, W: RefTensor, b: RefTensor | undefined): Vec {
  const [nOut, nIn] = W.shape as [number, number];
  const y = new Float64Array(nOut);
  for (let o = 0; o < nOut; o++) {
    let sum = b === undefined ? 0 : b.data[o]!;
    for (let i = 0; i < nIn; i++) sum += W.data[o * nIn + i]! * x[i]!;
    y[o] = sum;
  }
  return y;
}

/** GPT-2 Conv1D, W stored [in, out] (the transpose of nn.Linear): y[o] = Σ_i x[i]·W[i, o] + b[o]. */
function conv1d(x: Vec, W: RefTensor, b: RefTensor | undefined): Vec {
  const [nIn, nOut] = W.shape as [number, number];
  const y = new Float64Array(nOut);
  for (let o = 0; o < nOut; o++) {
    let sum = b === undefined ? 0 : b.data[o]!;
    for (let i = 0; i < nIn; i++) sum += x[i]! * W.data[i * nOut + o]!;
    y[o] = sum;
  }
  return y;
}

/** nn.LayerNorm: (x − mean) / sqrt(var + eps) · g + b, with the biased variance. */
function layerNorm(x: Vec, g: RefTensor, b: RefTensor, eps: number): Vec {
  const n = x.length;
  let mean = 0;
  for (let i = 0; i < n; i++) mean += x[i]!;
  mean /= n;
  let variance = 0;
  for (let i = 0; i < n; i++) variance += (x[i]! - mean) * (x[i]! - mean);
  variance /= n;
  const y = new Float64Array(n);
  for (let i = 0; i < n; i++) y[i] = ((x[i]! - mean) / Math.sqrt(variance + eps)) * g.data[i]! + b.data[i]!;
  return y;
}

/** Llama RMSNorm: x / sqrt(mean(x²) + eps) · g. */
function rmsNorm(x: Vec, g: RefTensor, eps: number): Vec {
  const n = x.length;
  let meanSquare = 0;
  for (let i = 0; i < n; i++) meanSquare += x[i]! * x[i]!;
  meanSquare /= n;
  const y = new Float64Array(n);
  for (let i = 0; i < n; i++) y[i] = (x[i]! / Math.sqrt(meanSquare + eps)) * g.data[i]!;
  return y;
}

/** GPT-2's "gelu_new" (tanh approximation): 0.5·x·(1 + tanh(sqrt(2/π)·(x + 0.044715·x³))). */
export function geluNew(x: number): number {
  return 0.5 * x * (1 + Math.tanh(Math.sqrt(2 / Math.PI) * (x + 0.044715 * x * x * x)));
}

/** SiLU: x·sigmoid(x). */
export function silu(x: number): number {
  return x / (1 + Math.exp(-x));
}

/**
 * HF rotary embedding for one head vector v [hd] at position `pos` (the rotate_half convention:
 * element i is paired with element i + hd/2, not with its neighbour), with the default frequencies
 * inv_freq_i = theta^(−2i/hd). See ropeRotateWith.
 */
export function ropeRotate(v: Vec, pos: number, theta: number): Vec {
  return ropeRotateWith(v, pos, { invFreq: refInvFreqDefault(theta, v.length), scale: 1 });
}

/**
 * Rotary embedding with given frequencies and cos/sin scale, for i in [0, hd/2):
 *   angle_i = pos · inv_freq_i
 *   v'[i]        = scale·(v[i]·cos(angle_i) − v[i + hd/2]·sin(angle_i))
 *   v'[i + hd/2] = scale·(v[i + hd/2]·cos(angle_i) + v[i]·sin(angle_i))
 */
export function ropeRotateWith(v: Vec, pos: number, rope: RefRope): Vec {
  const hd = v.length;
  if (hd % 2 !== 0) throw new Error(`reference: RoPE needs an even head_dim, got ${hd}`);
  const half = hd / 2;
  if (rope.invFreq.length !== half) throw new Error(`reference: ${rope.invFreq.length} frequencies for head_dim ${hd}`);
  const out = new Float64Array(hd);
  for (let i = 0; i < half; i++) {
    const angle = pos * rope.invFreq[i]!;
    const cos = rope.scale * Math.cos(angle);
    const sin = rope.scale * Math.sin(angle);
    out[i] = v[i]! * cos - v[i + half]! * sin;
    out[i + half] = v[i + half]! * cos + v[i]! * sin;
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// RoPE variants (transformers modeling_rope_utils.py), each from its formula

/** Frequencies of the hd/2 rotated pairs and the factor transformers multiplies cos and sin by. */
export interface RefRope {
  invFreq: Float64Array;
  scale: number;
}

function refInvFreqDefault(theta: number, hd: number): Float64Array {
  const inv = new Float64Array(hd / 2);
  for (let i = 0; i < hd / 2; i++) inv[i] = 1 / Math.pow(theta, (2 * i) / hd);
  return inv;
}

/**
 * The rotary embedding transformers uses for a forward call whose largest position is seqLen − 1 (only dynamic and
 * longrope depend on it: both recompute inv_freq from torch.max(position_ids) + 1 at each call).
 */
export function refRope(config: Record<string, any>, hd: number, seqLen: number): RefRope {
  const theta: number = config.rope_theta ?? 10000;
  const maxPos: number = config.max_position_embeddings ?? 2048;
  const rs = config.rope_scaling;
  if (rs != null && rs.type != null && rs.rope_type != null && rs.type !== rs.rope_type) throw new Error('reference: rope_scaling type and rope_type differ');
  const type = rs == null ? 'default' : rs.rope_type ?? rs.type;
  const inv = refInvFreqDefault(theta, hd);
  const half = hd / 2;
  switch (type) {
    case 'default':
      return { invFreq: inv, scale: 1 };
    case 'linear':
      for (let i = 0; i < half; i++) inv[i] = inv[i]! / rs.factor;
      return { invFreq: inv, scale: 1 };
    case 'dynamic': {
      // base' = θ·(factor·L/max − (factor − 1))^(hd/(hd − 2)), L = max(seqLen, max_position_embeddings)
      const L = Math.max(seqLen, maxPos);
      const base = theta * Math.pow((rs.factor * L) / maxPos - (rs.factor - 1), hd / (hd - 2));
      return { invFreq: refInvFreqDefault(base, hd), scale: 1 };
    }
    case 'llama3': {
      const lowWavelen = rs.original_max_position_embeddings / rs.low_freq_factor;
      const highWavelen = rs.original_max_position_embeddings / rs.high_freq_factor;
      for (let i = 0; i < half; i++) {
        const f = inv[i]!;
        const wavelen = (2 * Math.PI) / f;
        if (wavelen > lowWavelen) {
          inv[i] = f / rs.factor;
        } else if (wavelen >= highWavelen) {
          const smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor);
          inv[i] = (1 - smooth) * (f / rs.factor) + smooth * f;
        }
      }
      return { invFreq: inv, scale: 1 };
    }
    case 'yarn': {
      const factor: number = rs.factor;
      const original: number = rs.original_max_position_embeddings || maxPos;
      const mscaleOf = (s: number, m: number) => (s <= 1 ? 1 : 0.1 * m * Math.log(s) + 1);
      let scale: number;
      if (rs.attention_factor != null) scale = rs.attention_factor;
      else if (rs.mscale && rs.mscale_all_dim) scale = mscaleOf(factor, rs.mscale) / mscaleOf(factor, rs.mscale_all_dim);
      else scale = mscaleOf(factor, 1);
      // dimension index at which a frequency makes `turns` rotations over the original context
      const dimFor = (turns: number) => (hd * Math.log(original / (turns * 2 * Math.PI))) / (2 * Math.log(theta));
      let low = dimFor(rs.beta_fast || 32);
      let high = dimFor(rs.beta_slow || 1);
      if (rs.truncate !== false) {
        low = Math.floor(low);
        high = Math.ceil(high);
      }
      low = Math.max(low, 0);
      high = Math.min(high, hd - 1);
      if (low === high) high += 0.001;
      for (let i = 0; i < half; i++) {
        let ramp = (i - low) / (high - low);
        if (ramp < 0) ramp = 0;
        if (ramp > 1) ramp = 1;
        // ramp 0: keep the frequency (extrapolate); ramp 1: divide it by factor (interpolate)
        inv[i] = ramp * (inv[i]! / factor) + (1 - ramp) * inv[i]!;
      }
      return { invFreq: inv, scale };
    }
    case 'longrope': {
      const original: number = config.original_max_position_embeddings ?? maxPos;
      const factor: number = rs.factor ?? maxPos / original;
      const scale: number = rs.attention_factor ?? (factor <= 1 ? 1 : Math.sqrt(1 + Math.log(factor) / Math.log(original)));
      const ext: number[] = seqLen > original ? rs.long_factor : rs.short_factor;
      for (let i = 0; i < half; i++) inv[i] = inv[i]! / ext[i]!;
      return { invFreq: inv, scale };
    }
    default:
      throw new Error(`reference: rope type ${type} is unsupported in reference`);
  }
}

/**
 * Causal attention with grouped key/value heads. q[t]: [nHead·hd]; k[t], v[t]: [nKv·hd].
 * Query head h reads kv head g = floor(h / (nHead / nKv)); for position t and head h:
 *   w_s = softmax over s ≤ t of (q_t,h · k_s,g) / sqrt(hd)
 *   out[t][h·hd + j] = Σ_{s ≤ t} w_s · v_s,g[j]
 * Returns out[t]: [nHead·hd] (heads concatenated).
 */
/**
 * Causal attention; with a sliding `window` W, position t sees only the positions s with t − W < s ≤ t
 * (transformers masking_utils.py: sliding_window_overlay `kv_idx > q_idx - sliding_window` and
 * causal_mask_function `kv_idx <= q_idx`).
 */
function causalAttention(q: Vec[], k: Vec[], v: Vec[], nHead: number, nKv: number, hd: number, window: number | null = null): Vec[] {
  const T = q.length;
  const group = nHead / nKv;
  const out: Vec[] = [];
  for (let t = 0; t < T; t++) {
    const o = new Float64Array(nHead * hd);
    const first = window === null ? 0 : Math.max(0, t - window + 1);
    for (let h = 0; h < nHead; h++) {
      const g = Math.floor(h / group);
      // scores over the visible positions s = first..t (the others are masked out)
      const scores = new Float64Array(t + 1 - first);
      for (let s = first; s <= t; s++) {
        let dot = 0;
        for (let j = 0; j < hd; j++) dot += q[t]![h * hd + j]! * k[s]![g * hd + j]!;
        scores[s - first] = dot / Math.sqrt(hd);
      }
      const weights = softmax(scores);
      for (let s = first; s <= t; s++) {
        for (let j = 0; j < hd; j++) o[h * hd + j] += weights[s - first]! * v[s]![g * hd + j]!;
      }
    }
    out.push(o);
  }
  return out;
}

function softmax(x: Vec): Vec {
  let max = -Infinity;
  for (let i = 0; i < x.length; i++) max = Math.max(max, x[i]!);
  const y = new Float64Array(x.length);
  let sum = 0;
  for (let i = 0; i < x.length; i++) {
    y[i] = Math.exp(x[i]! - max);
    sum += y[i]!;
  }
  for (let i = 0; i < x.length; i++) y[i] = y[i]! / sum;
  return y;
}

/** log_softmax in float64: x_i − max − log Σ_j exp(x_j − max). */
export function logSoftmax(logits: Float64Array): Float64Array {
  let max = -Infinity;
  for (let i = 0; i < logits.length; i++) max = Math.max(max, logits[i]!);
  let sum = 0;
  for (let i = 0; i < logits.length; i++) sum += Math.exp(logits[i]! - max);
  const logSum = Math.log(sum);
  const out = new Float64Array(logits.length);
  for (let i = 0; i < logits.length; i++) out[i] = logits[i]! - max - logSum;
  return out;
}

/** Index of the largest value; the first one on ties (as torch.argmax). */
export function argmax(x: Float64Array): number {
  let best = 0;
  for (let i = 1; i < x.length; i++) if (x[i]! > x[best]!) best = i;
  return best;
}

function add(a: Vec, b: Vec): Vec {
  const y = new Float64Array(a.length);
  for (let i = 0; i < a.length; i++) y[i] = a[i]! + b[i]!;
  return y;
}

/** logits[o] = Σ_i E[o, i]·x[i] for an output matrix E [vocab, d] (lm_head, or the tied embedding). */
function unembed(x: Vec, E: RefTensor): Float64Array {
  return linear(x, E, undefined);
}

function embedRow(E: RefTensor, token: number): Vec {
  const [vocab, d] = E.shape as [number, number];
  if (!Number.isInteger(token) || token < 0 || token >= vocab) {
    throw new Error(`reference: token id ${token} outside the vocabulary [0, ${vocab})`);
  }
  const row = new Float64Array(d);
  for (let i = 0; i < d; i++) row[i] = E.data[token * d + i]!;
  return row;
}

// ---------------------------------------------------------------------------------------------
// LoRA

/** Adds scale·B·(A·x) to module outputs the adapter targets; remembers which entries were used. */
class LoraApplier {
  private readonly used = new Set<string>();
  constructor(private readonly map: RefLoraMap | undefined) {}

  /** y (the module's output for input x) += the LoRA delta of module `path`, if targeted. */
  apply(path: string, x: Vec, y: Vec): Vec {
    const l = this.map?.get(path);
    if (l === undefined) return y;
    this.used.add(path);
    if (l.outFeatures !== y.length) {
      throw new Error(`reference LoRA: ${path} outputs ${y.length} features, adapter has ${l.outFeatures}`);
    }
    return add(y, refLoraDelta(x, l));
  }

  /** A LoRA entry for a module the forward never ran is a mistake (wrong path or prefix): throw. */
  assertAllUsed(): void {
    for (const path of this.map?.keys() ?? []) {
      if (!this.used.has(path)) throw new Error(`reference LoRA: no module ${path} in this model`);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// GPT-2

/** Final hidden states (after ln_f) and the output matrix (tied wte). */
function gpt2Hidden(config: Record<string, any>, get: GetTensor, tokens: readonly number[], lora: LoraApplier) {
  const d = int(config, 'n_embd');
  const nLayer = int(config, 'n_layer');
  const nHead = int(config, 'n_head');
  const nPos = int(config, 'n_positions');
  const inner = int(config, 'n_inner', 4 * d); // n_inner: null means 4·d
  const eps: number = config.layer_norm_epsilon ?? 1e-5;
  const act: string = config.activation_function ?? 'gelu_new';
  if (act !== 'gelu_new' && act !== 'gelu_pytorch_tanh') {
    throw new Error(`reference: GPT-2 activation_function ${act} is unsupported in reference`);
  }
  if (config.scale_attn_weights === false || config.scale_attn_by_inverse_layer_idx === true) {
    throw new Error('reference: GPT-2 attention scaling options are unsupported in reference');
  }
  if (d % nHead !== 0) throw new Error(`reference: n_embd ${d} not divisible by n_head ${nHead}`);
  const hd = d / nHead;
  if (tokens.length > nPos) throw new Error(`reference: ${tokens.length} tokens exceed n_positions ${nPos}`);

  // GPT2LMHeadModel saves names with "transformer."; the hub's original gpt2 file has none.
  const prefix = hasTensor(get, 'transformer.wte.weight') ? 'transformer.' : '';
  const vocab = int(config, 'vocab_size', get(`${prefix}wte.weight`).shape[0]);
  const wte = need(get, `${prefix}wte.weight`, [vocab, d]);
  const wpe = need(get, `${prefix}wpe.weight`, [nPos, d]);

  // x_t = wte[token_t] + wpe[t]
  let xs: Vec[] = tokens.map((token, t) => add(embedRow(wte, token), embedRow(wpe, t)));

  for (let l = 0; l < nLayer; l++) {
    const n = `${prefix}h.${l}.`; // tensor names
    const path = `transformer.h.${l}.`; // PEFT module paths always follow the model class
    const ln1g = need(get, `${n}ln_1.weight`, [d]);
    const ln1b = need(get, `${n}ln_1.bias`, [d]);
    const cAttnW = need(get, `${n}attn.c_attn.weight`, [d, 3 * d]); // Conv1D [in, out]
    const cAttnB = need(get, `${n}attn.c_attn.bias`, [3 * d]);
    const cProjW = need(get, `${n}attn.c_proj.weight`, [d, d]);
    const cProjB = need(get, `${n}attn.c_proj.bias`, [d]);
    const ln2g = need(get, `${n}ln_2.weight`, [d]);
    const ln2b = need(get, `${n}ln_2.bias`, [d]);
    const fcW = need(get, `${n}mlp.c_fc.weight`, [d, inner]);
    const fcB = need(get, `${n}mlp.c_fc.bias`, [inner]);
    const mProjW = need(get, `${n}mlp.c_proj.weight`, [inner, d]);
    const mProjB = need(get, `${n}mlp.c_proj.bias`, [d]);

    // x = x + attn(ln_1(x)); c_attn's output is q | k | v, each [d] = nHead heads of hd
    const q: Vec[] = [];
    const k: Vec[] = [];
    const v: Vec[] = [];
    for (const x of xs) {
      const h = layerNorm(x, ln1g, ln1b, eps);
      const qkv = lora.apply(`${path}attn.c_attn`, h, conv1d(h, cAttnW, cAttnB));
      q.push(qkv.slice(0, d));
      k.push(qkv.slice(d, 2 * d));
      v.push(qkv.slice(2 * d, 3 * d));
    }
    const heads = causalAttention(q, k, v, nHead, nHead, hd);
    xs = xs.map((x, t) => add(x, lora.apply(`${path}attn.c_proj`, heads[t]!, conv1d(heads[t]!, cProjW, cProjB))));

    // x = x + mlp(ln_2(x)),  mlp(h) = c_proj(gelu_new(c_fc(h)))
    xs = xs.map((x) => {
      const h = layerNorm(x, ln2g, ln2b, eps);
      const fc = lora.apply(`${path}mlp.c_fc`, h, conv1d(h, fcW, fcB));
      const a = fc.map(geluNew);
      return add(x, lora.apply(`${path}mlp.c_proj`, a, conv1d(a, mProjW, mProjB)));
    });
  }

  const lnfG = need(get, `${prefix}ln_f.weight`, [d]);
  const lnfB = need(get, `${prefix}ln_f.bias`, [d]);
  return { hidden: xs.map((x) => layerNorm(x, lnfG, lnfB, eps)), output: wte };
}

// ---------------------------------------------------------------------------------------------
// Llama family (llama, mistral, qwen2)

function llamaHidden(config: Record<string, any>, get: GetTensor, tokens: readonly number[], lora: LoraApplier, callEnd: readonly number[]) {
  const d = int(config, 'hidden_size');
  const nLayer = int(config, 'num_hidden_layers');
  const nHead = int(config, 'num_attention_heads');
  const nKv = int(config, 'num_key_value_heads', nHead);
  const hd = int(config, 'head_dim', d / nHead);
  const inner = int(config, 'intermediate_size');
  const vocab = int(config, 'vocab_size');
  const eps: number = config.rms_norm_eps ?? 1e-6;
  if (config.partial_rotary_factor != null && config.partial_rotary_factor !== 1) {
    throw new Error('reference: partial_rotary_factor is unsupported in reference');
  }
  if ((config.hidden_act ?? 'silu') !== 'silu') {
    throw new Error(`reference: hidden_act ${config.hidden_act} is unsupported in reference`);
  }
  const windows = slidingWindows(config, nLayer);
  if (nHead % nKv !== 0) throw new Error(`reference: num_attention_heads ${nHead} not divisible by num_key_value_heads ${nKv}`);

  const embed = need(get, 'model.embed_tokens.weight', [vocab, d]);
  let xs: Vec[] = tokens.map((token) => embedRow(embed, token));
  // Position t was computed in a forward call whose largest position is callEnd[t].
  const ropes = tokens.map((_, t) => refRope(config, hd, callEnd[t]! + 1));

  for (let l = 0; l < nLayer; l++) {
    const n = `model.layers.${l}.`; // tensor names and PEFT module paths agree for Llama
    // nn.Linear weights [out, in]; a bias exists only if the checkpoint has it (Qwen2: q, k, v)
    const proj = (name: string, nOut: number, nIn: number) => ({
      path: `${n}${name}`,
      W: need(get, `${n}${name}.weight`, [nOut, nIn]),
      b: maybe(get, `${n}${name}.bias`, [nOut]),
    });
    const run = (p: ReturnType<typeof proj>, x: Vec): Vec => lora.apply(p.path, x, linear(x, p.W, p.b));
    const inNorm = need(get, `${n}input_layernorm.weight`, [d]);
    const qProj = proj('self_attn.q_proj', nHead * hd, d);
    const kProj = proj('self_attn.k_proj', nKv * hd, d);
    const vProj = proj('self_attn.v_proj', nKv * hd, d);
    const oProj = proj('self_attn.o_proj', d, nHead * hd);
    const postNorm = need(get, `${n}post_attention_layernorm.weight`, [d]);
    const gate = proj('mlp.gate_proj', inner, d);
    const up = proj('mlp.up_proj', inner, d);
    const down = proj('mlp.down_proj', d, inner);

    // x = x + attn(rmsnorm(x)), with RoPE applied to every head of q and k at its position
    const q: Vec[] = [];
    const k: Vec[] = [];
    const v: Vec[] = [];
    xs.forEach((x, t) => {
      const h = rmsNorm(x, inNorm, eps);
      q.push(ropeEachHead(run(qProj, h), nHead, hd, t, ropes[t]!));
      k.push(ropeEachHead(run(kProj, h), nKv, hd, t, ropes[t]!));
      v.push(run(vProj, h));
    });
    const heads = causalAttention(q, k, v, nHead, nKv, hd, windows[l] ?? null);
    xs = xs.map((x, t) => add(x, run(oProj, heads[t]!)));

    // x = x + down(silu(gate(h)) · up(h)),  h = rmsnorm(x)
    xs = xs.map((x) => {
      const h = rmsNorm(x, postNorm, eps);
      const g = run(gate, h);
      const u = run(up, h);
      const a = new Float64Array(inner);
      for (let i = 0; i < inner; i++) a[i] = silu(g[i]!) * u[i]!;
      return add(x, run(down, a));
    });
  }

  const finalNorm = need(get, 'model.norm.weight', [d]);
  const tied = config.tie_word_embeddings === true || !hasTensor(get, 'lm_head.weight');
  const output = tied ? embed : need(get, 'lm_head.weight', [vocab, d]);
  return { hidden: xs.map((x) => rmsNorm(x, finalNorm, eps)), output };
}

/**
 * Each layer's sliding window (null: full attention), as transformers' configuration and modeling files set it:
 * MistralConfig's `sliding_window` defaults to 4096 (an explicit null: none) and MistralModel uses it in every
 * layer. Qwen2Config sets `sliding_window` to None unless `use_sliding_window`; its `layer_types` default is
 * "sliding_attention" for layers i >= max_window_layers (default 28) when a window is set; Qwen2Attention uses
 * `config.sliding_window` in "sliding_attention" layers, and create_sliding_window_causal_mask raises when it is None.
 * LlamaModel has no window.
 */
function slidingWindows(config: Record<string, any>, nLayer: number): (number | null)[] {
  const declared = (): number | null => ('sliding_window' in config ? config.sliding_window : 4096);
  if (config.model_type === 'mistral') return new Array(nLayer).fill(declared());
  if (config.model_type !== 'qwen2') return new Array(nLayer).fill(null);
  const window = config.use_sliding_window === true ? declared() : null;
  const maxWindowLayers = config.max_window_layers ?? 28;
  const types: string[] = config.layer_types ??
    Array.from({ length: nLayer }, (_, i) => (window !== null && i >= maxWindowLayers ? 'sliding_attention' : 'full_attention'));
  if (types.length !== nLayer) throw new Error(`reference: layer_types has ${types.length} entries for ${nLayer} layers`);
  return types.map((type) => {
    if (type === 'full_attention') return null;
    if (type !== 'sliding_attention') throw new Error(`reference: layer type ${type} is unsupported in reference`);
    if (window === null) throw new Error('reference: a sliding_attention layer without sliding_window');
    return window;
  });
}

/** Applies ropeRotateWith to each of the nHeads head slices [hd] of a projected vector. */
function ropeEachHead(x: Vec, nHeads: number, hd: number, pos: number, rope: RefRope): Vec {
  const out = new Float64Array(nHeads * hd);
  for (let h = 0; h < nHeads; h++) out.set(ropeRotateWith(x.slice(h * hd, (h + 1) * hd), pos, rope), h * hd);
  return out;
}

// ---------------------------------------------------------------------------------------------
// Entry points

/**
 * How the sequence was split into forward calls, for the RoPE variants whose frequencies depend on the call
 * (longrope, dynamic); cached keys keep the rotation of the call that computed them. `calls`: the token counts of
 * the first calls, in order (a prompt prefilled in chunks); `prefill`: one first call of that many tokens
 * (generate() with a KV cache). Tokens after them run one per call. Default: the whole sequence in one call
 * (a forward without cache).
 */
export interface RefSteps {
  prefill?: number;
  calls?: number[];
}

/** For each position, the last position of the forward call that computed it. */
function callEnds(length: number, steps: RefSteps): number[] {
  const calls = steps.calls ?? [steps.prefill ?? length];
  const ends: number[] = [];
  for (const n of calls) {
    if (!Number.isInteger(n) || n < 1) throw new Error(`reference: call of ${n} tokens`);
    for (let i = 0; i < n; i++) ends.push(ends.length + n - i - 1);
  }
  if (ends.length > length) throw new Error(`reference: calls cover ${ends.length} tokens, the sequence has ${length}`);
  while (ends.length < length) ends.push(ends.length);
  return ends;
}

function hiddenStates(config: Record<string, any>, get: GetTensor, tokens: readonly number[], lora?: RefLoraMap, steps: RefSteps = {}) {
  if (tokens.length === 0) throw new Error('reference: empty token sequence');
  const ends = callEnds(tokens.length, steps);
  const applier = new LoraApplier(lora);
  const modelType = config.model_type;
  let result: { hidden: Vec[]; output: RefTensor };
  if (modelType === 'gpt2') result = gpt2Hidden(config, get, tokens, applier);
  else if (modelType === 'llama' || modelType === 'mistral' || modelType === 'qwen2') result = llamaHidden(config, get, tokens, applier, ends);
  else throw new Error(`reference: model_type ${modelType} is unsupported in reference`);
  applier.assertAllUsed();
  return result;
}

/** Full causal forward over one sequence; returns logits for every position: Float64Array[T] each of length vocab. */
export function referenceForward(
  config: Record<string, any>,
  get: GetTensor,
  tokens: readonly number[],
  lora?: RefLoraMap,
  steps?: RefSteps,
): Float64Array[] {
  const { hidden, output } = hiddenStates(config, get, tokens, lora, steps);
  return hidden.map((h) => unembed(h, output));
}

/**
 * Greedy generation by re-running the full forward each step (no KV cache — intentionally simple), with the
 * rotation generate() gives with a cache: the prompt in one call (or in `promptCalls` chunks), then one token per
 * call (RefSteps).
 * Returns only the maxNewTokens new token ids (argmax, first index on ties); it does not stop at
 * eos — truncate at the eos id yourself (greedy decoding makes every prefix valid).
 */
export function referenceGreedy(
  config: Record<string, any>,
  get: GetTensor,
  prompt: readonly number[],
  maxNewTokens: number,
  lora?: RefLoraMap,
  promptCalls?: number[],
): number[] {
  const sequence = [...prompt];
  const generated: number[] = [];
  for (let step = 0; step < maxNewTokens; step++) {
    const { hidden, output } = hiddenStates(config, get, sequence, lora, { calls: promptCalls ?? [prompt.length] });
    const next = argmax(unembed(hidden[hidden.length - 1]!, output));
    generated.push(next);
    sequence.push(next);
  }
  return generated;
}
