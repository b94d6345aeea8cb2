// Native float32 matmul for the wasm backend (src/backend/wasm/native-matmul.ts): C[b] = A[b]·B[b] (or A[b]·B[b]ᵀ), computed on
// tensors that live in the TensorFlow.js wasm heap, with AVX2/FMA register-blocked kernels.
//
// Exactness: every output element is one chain of fused multiply-adds over k = 0..K-1 in order, starting from 0,
// whichever kernel (row block, column block, tail) computes it. A row's result therefore never depends on how many
// other rows share the call, so a sequence's logits do not depend on its batch (as with the wasm kernels).
#include <node_api.h>

#include <immintrin.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace {

constexpr size_t KC = 256;  // k block: a 6-row slice of A (6 KB) and a 16-column panel of B (16 KB) stay in L1
constexpr int MR = 6;

// acc[i][v] (+)= sum over k < kc of A[i, k] · B[k, 8v .. 8v+7]; C is read first unless this is the first k block.
template <int R, int NV>
__attribute__((target("avx2,fma"))) inline void Kernel(const float* A, size_t lda, const float* B, size_t ldb, float* C, size_t ldc,
                                                       size_t kc, bool first) {
  __m256 acc[R][NV];
  for (int i = 0; i < R; i++)
    for (int v = 0; v < NV; v++) acc[i][v] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(C + i * ldc + 8 * v);
  for (size_t k = 0; k < kc; k++) {
    __m256 b[NV];
    for (int v = 0; v < NV; v++) b[v] = _mm256_loadu_ps(B + k * ldb + 8 * v);
    for (int i = 0; i < R; i++) {
      const __m256 a = _mm256_broadcast_ss(A + i * lda + k);
      for (int v = 0; v < NV; v++) acc[i][v] = _mm256_fmadd_ps(a, b[v], acc[i][v]);
    }
  }
  for (int i = 0; i < R; i++)
    for (int v = 0; v < NV; v++) _mm256_storeu_ps(C + i * ldc + 8 * v, acc[i][v]);
}

// All M rows of one column block (8·NV columns); B points at the block's first column, ldb its row stride.
template <int NV>
__attribute__((target("avx2,fma"))) void Rows(const float* A, size_t lda, const float* B, size_t ldb, float* C, size_t ldc, size_t M,
                                              size_t kc, bool first) {
  size_t i = 0;
  for (; i + MR <= M; i += MR) Kernel<MR, NV>(A + i * lda, lda, B, ldb, C + i * ldc, ldc, kc, first);
  const float* a = A + i * lda;
  float* c = C + i * ldc;
  switch (M - i) {
    case 5: Kernel<5, NV>(a, lda, B, ldb, c, ldc, kc, first); break;
    case 4: Kernel<4, NV>(a, lda, B, ldb, c, ldc, kc, first); break;
    case 3: Kernel<3, NV>(a, lda, B, ldb, c, ldc, kc, first); break;
    case 2: Kernel<2, NV>(a, lda, B, ldb, c, ldc, kc, first); break;
    case 1: Kernel<1, NV>(a, lda, B, ldb, c, ldc, kc, first); break;
    default: break;
  }
}

// Few rows (decode of one or a few sequences: bound by reading B): stream B's rows in order, eight at a time, with
// C's rows resident in L1. Per element the FMAs still run over k in order from 0, as in the blocked kernels.
template <int R>
__attribute__((target("avx2,fma"))) void SmallM(const float* A, const float* B, float* C, size_t K, size_t N) {
  constexpr int U = 8;
  const size_t N8 = N - N % 8;
  for (size_t i = 0; i < R * N; i++) C[i] = 0;
  size_t k = 0;
  for (; k + U <= K; k += U) {
    const float* b = B + k * N;
    for (size_t j = 0; j < N8; j += 8) {
      __m256 x[U];
      for (int u = 0; u < U; u++) x[u] = _mm256_loadu_ps(b + u * N + j);
      for (int i = 0; i < R; i++) {
        __m256 c = _mm256_loadu_ps(C + i * N + j);
        for (int u = 0; u < U; u++) c = _mm256_fmadd_ps(_mm256_broadcast_ss(A + i * K + k + u), x[u], c);
        _mm256_storeu_ps(C + i * N + j, c);
      }
    }
    for (size_t j = N8; j < N; j++) {
      for (int i = 0; i < R; i++) {
        float c = C[i * N + j];
        for (int u = 0; u < U; u++) c = std::fma(A[i * K + k + u], B[(k + u) * N + j], c);
        C[i * N + j] = c;
      }
    }
  }
  for (; k < K; k++)
    for (size_t j = 0; j < N; j++)
      for (int i = 0; i < R; i++) C[i * N + j] = std::fma(A[i * K + k], B[k * N + j], C[i * N + j]);
}

// C[M, N] = A[M, K] · B[K, N], all row-major and dense.
__attribute__((target("avx2,fma"))) void Gemm(const float* A, const float* B, float* C, size_t M, size_t K, size_t N) {
  if (K == 0) {
    for (size_t i = 0; i < M * N; i++) C[i] = 0;
    return;
  }
  switch (M) {
    case 1: return SmallM<1>(A, B, C, K, N);
    case 2: return SmallM<2>(A, B, C, K, N);
    case 3: return SmallM<3>(A, B, C, K, N);
    case 4: return SmallM<4>(A, B, C, K, N);
    default: break;
  }
  alignas(64) static thread_local float panel[KC * 16];
  const size_t N16 = N - N % 16;
  const size_t N8 = N - N % 8;
  for (size_t k0 = 0; k0 < K; k0 += KC) {
    const size_t kc = K - k0 < KC ? K - k0 : KC;
    const bool first = k0 == 0;
    const float* Ak = A + k0;
    const float* Bk = B + k0 * N;
    size_t j = 0;
    if (M > 32) {
      // Many rows: copy the block's 16-column panel of B to contiguous memory once (rows of B far apart in memory
      // map to the same cache sets), then run every row block over it.
      for (; j < N16; j += 16) {
        for (size_t k = 0; k < kc; k++) {
          _mm256_store_ps(panel + k * 16, _mm256_loadu_ps(Bk + k * N + j));
          _mm256_store_ps(panel + k * 16 + 8, _mm256_loadu_ps(Bk + k * N + j + 8));
        }
        Rows<2>(Ak, K, panel, 16, C + j, N, M, kc, first);
      }
    }
    for (; j < N16; j += 16) Rows<2>(Ak, K, Bk + j, N, C + j, N, M, kc, first);
    for (; j < N8; j += 8) Rows<1>(Ak, K, Bk + j, N, C + j, N, M, kc, first);
    for (; j < N; j++) {
      for (size_t i = 0; i < M; i++) {
        float acc = first ? 0.0f : C[i * N + j];
        for (size_t k = 0; k < kc; k++) acc = std::fma(Ak[i * K + k], Bk[k * N + j], acc);
        C[i * N + j] = acc;
      }
    }
  }
}

// Packed B (pack below): 16-column panels, panel p holding B[k, 16p .. 16p+15] for k = 0..K-1 contiguously, so every
// kernel streams B in address order (a row-major B makes a column panel 16 floats from each of K rows 4·N bytes apart:
// cache-set conflicts and too many streams for the prefetchers). Same FMA chains as Gemm, so the same results.
__attribute__((target("avx2,fma"))) void GemmPacked(const float* A, const float* P, float* C, size_t M, size_t K, size_t N) {
  if (K == 0) {
    for (size_t i = 0; i < M * N; i++) C[i] = 0;
    return;
  }
  if (M > 32) {
    // Many rows: A's k block is reused across the panels.
    for (size_t k0 = 0; k0 < K; k0 += KC) {
      const size_t kc = K - k0 < KC ? K - k0 : KC;
      for (size_t j = 0; j < N; j += 16) Rows<2>(A + k0, K, P + j * K + k0 * 16, 16, C + j, N, M, kc, k0 == 0);
    }
    return;
  }
  // Few rows: one panel at a time, its K rows read once, in order.
  for (size_t j = 0; j < N; j += 16)
    for (size_t k0 = 0; k0 < K; k0 += KC) {
      const size_t kc = K - k0 < KC ? K - k0 : KC;
      Rows<2>(A + k0, K, P + j * K + k0 * 16, 16, C + j, N, M, kc, k0 == 0);
    }
}

bool Supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

napi_value Throw(napi_env env, const char* msg) {
  napi_throw_error(env, "NATIVE_MATMUL", msg);
  return nullptr;
}

// argv[0] is the heap (a Uint8Array), argv[1..count] are non-negative integers (into n). On a bad argument it throws
// `<fn>: <what is wrong>` and returns false.
bool HeapArgs(napi_env env, const napi_value* argv, const char* fn, const char* numbers, int count, uint8_t** heap, size_t* length, double* n) {
  napi_typedarray_type type;
  void* data = nullptr;
  napi_value buffer;
  size_t byteOffset = 0;
  if (napi_get_typedarray_info(env, argv[0], &type, length, &data, &buffer, &byteOffset) != napi_ok || type != napi_uint8_array) {
    Throw(env, (std::string(fn) + ": heap must be a Uint8Array").c_str());
    return false;
  }
  for (int i = 0; i < count; i++) {
    if (napi_get_value_double(env, argv[i + 1], &n[i]) != napi_ok || !(n[i] >= 0) || n[i] != std::floor(n[i])) {
      Throw(env, (std::string(fn) + ": " + numbers + " must be non-negative integers").c_str());
      return false;
    }
  }
  *heap = static_cast<uint8_t*>(data);
  return true;
}

// matmul(heap: Uint8Array, aOffset, bOffset, cOffset, batch, M, K, N, aBatchStride, bBatchStride, transposeB)
// Offsets are byte offsets into heap; batch strides are in elements (0: the same matrix for every batch entry).
// With transposeB, B[b] is stored [N, K].
napi_value MatMul(napi_env env, napi_callback_info info) {
  size_t argc = 12;
  napi_value argv[12];
  if (napi_get_cb_info(env, info, &argc, argv, nullptr, nullptr) != napi_ok || argc < 11 || argc > 12) return Throw(env, "matmul: expected 11 or 12 arguments");
  uint8_t* heap = nullptr;
  size_t length = 0;
  double n[9];
  if (!HeapArgs(env, argv, "matmul", "offsets, sizes and strides", 9, &heap, &length, n)) return nullptr;
  bool transposeB = false;
  if (napi_get_value_bool(env, argv[10], &transposeB) != napi_ok) return Throw(env, "matmul: transposeB must be a boolean");
  bool packedB = false;
  if (argc == 12 && napi_get_value_bool(env, argv[11], &packedB) != napi_ok) return Throw(env, "matmul: packedB must be a boolean");
  const size_t aOff = n[0], bOff = n[1], cOff = n[2], batch = n[3], M = n[4], K = n[5], N = n[6], sa = n[7], sb = n[8];
  if (aOff % 4 || bOff % 4 || cOff % 4) return Throw(env, "matmul: offsets must be 4-byte aligned");
  if (packedB && (transposeB || N % 16 != 0)) return Throw(env, "matmul: a packed B is never transposed and has a multiple of 16 columns");
  // Bounds: the last batch entry of each operand must lie inside the heap.
  const auto end = [&](size_t off, size_t stride, size_t size) { return off + 4 * ((batch - 1) * stride + size); };
  if (batch > 0 && (end(aOff, sa, M * K) > length || end(bOff, sb, K * N) > length || end(cOff, M * N, M * N) > length)) {
    return Throw(env, "matmul: an operand lies outside the heap");
  }
  std::vector<float> bt;
  if (transposeB) bt.resize(K * N);
  for (size_t b = 0; b < batch; b++) {
    const float* A = reinterpret_cast<const float*>(heap + aOff) + b * sa;
    const float* B = reinterpret_cast<const float*>(heap + bOff) + b * sb;
    float* C = reinterpret_cast<float*>(heap + cOff) + b * M * N;
    if (transposeB) {
      if (b == 0 || sb != 0) {
        for (size_t r = 0; r < N; r++)
          for (size_t k = 0; k < K; k++) bt[k * N + r] = B[r * K + k];
      }
      B = bt.data();
    }
    if (packedB) GemmPacked(A, B, C, M, K, N);
    else Gemm(A, B, C, M, K, N);
  }
  return nullptr;
}

// pack(heap: Uint8Array, srcOffset, dstOffset, K, N): B [K, N] row-major at srcOffset → the panel layout of GemmPacked
// at dstOffset (K·N floats each; they must not overlap). N must be a multiple of 16.
napi_value Pack(napi_env env, napi_callback_info info) {
  size_t argc = 5;
  napi_value argv[5];
  if (napi_get_cb_info(env, info, &argc, argv, nullptr, nullptr) != napi_ok || argc != 5) return Throw(env, "pack: expected 5 arguments");
  uint8_t* heap = nullptr;
  size_t length = 0;
  double n[4];
  if (!HeapArgs(env, argv, "pack", "offsets and sizes", 4, &heap, &length, n)) return nullptr;
  const size_t src = n[0], dst = n[1], K = n[2], N = n[3];
  if (src % 4 || dst % 4) return Throw(env, "pack: offsets must be 4-byte aligned");
  if (N % 16 != 0) return Throw(env, "pack: N must be a multiple of 16");
  const size_t bytes = 4 * K * N;
  if (src + bytes > length || dst + bytes > length) return Throw(env, "pack: an operand lies outside the heap");
  if (src < dst + bytes && dst < src + bytes && bytes > 0) return Throw(env, "pack: source and destination overlap");
  const float* B = reinterpret_cast<const float*>(heap + src);
  float* P = reinterpret_cast<float*>(heap + dst);
  for (size_t j = 0; j < N; j += 16)
    for (size_t k = 0; k < K; k++)
      for (size_t c = 0; c < 16; c++) P[j * K + k * 16 + c] = B[k * N + j + c];
  return nullptr;
}


// layout(A, B, r, in, out, s, At, Bt) → all finite: At[i][j] = A[j][i] (A [r, in]) and Bt[j][o] = s·B[o][j] (B [out, r]),
// the device layout of src/lora/adapter-file.ts (toDeviceLayout is the plain-JS version of the same loops).
napi_value Layout(napi_env env, napi_callback_info info) {
  size_t argc = 8;
  napi_value argv[8];
  if (napi_get_cb_info(env, info, &argc, argv, nullptr, nullptr) != napi_ok || argc != 8) return Throw(env, "layout: expected 8 arguments");
  float* arrays[4];
  size_t lengths[4];
  const int which[4] = {0, 1, 6, 7};
  for (int n = 0; n < 4; n++) {
    napi_typedarray_type type;
    void* data = nullptr;
    napi_value buffer;
    size_t offset = 0;
    if (napi_get_typedarray_info(env, argv[which[n]], &type, &lengths[n], &data, &buffer, &offset) != napi_ok || type != napi_float32_array) {
      return Throw(env, "layout: A, B, At and Bt must be Float32Arrays");
    }
    arrays[n] = static_cast<float*>(data);
  }
  double d[4];
  for (int n = 0; n < 4; n++) {
    if (napi_get_value_double(env, argv[2 + n], &d[n]) != napi_ok) return Throw(env, "layout: r, in, out and s must be numbers");
  }
  if (!(d[0] >= 0 && d[1] >= 0 && d[2] >= 0) || d[0] != std::floor(d[0]) || d[1] != std::floor(d[1]) || d[2] != std::floor(d[2])) {
    return Throw(env, "layout: r, in and out must be non-negative integers");
  }
  const size_t r = d[0], in = d[1], out = d[2];
  const double s = d[3];  // s·b in double, rounded once to float: exactly what the JavaScript loop stores
  if (lengths[0] != r * in || lengths[2] != r * in || lengths[1] != out * r || lengths[3] != r * out) return Throw(env, "layout: array lengths do not match r, in and out");
  const float* A = arrays[0];
  const float* B = arrays[1];
  float* At = arrays[2];
  float* Bt = arrays[3];
  float probe = 0;  // x·0 is 0 for finite x and NaN otherwise
  for (size_t i = 0; i < in; i++)
    for (size_t j = 0; j < r; j++) {
      const float a = A[j * in + i];
      At[i * r + j] = a;
      probe += a * 0.0f;
    }
  for (size_t o = 0; o < out; o++)
    for (size_t j = 0; j < r; j++) {
      const float b = B[o * r + j];
      Bt[j * out + o] = static_cast<float>(s * static_cast<double>(b));
      probe += b * 0.0f;
    }
  napi_value result;
  napi_get_boolean(env, probe == 0.0f, &result);
  return result;
}

napi_value Init(napi_env env, napi_value exports) {
  napi_value fn, supported;
  napi_create_function(env, "matmul", NAPI_AUTO_LENGTH, MatMul, nullptr, &fn);
  napi_set_named_property(env, exports, "matmul", fn);
  napi_value pack;
  napi_create_function(env, "pack", NAPI_AUTO_LENGTH, Pack, nullptr, &pack);
  napi_set_named_property(env, exports, "pack", pack);
  napi_value layout;
  napi_create_function(env, "layout", NAPI_AUTO_LENGTH, Layout, nullptr, &layout);
  napi_set_named_property(env, exports, "layout", layout);
  napi_get_boolean(env, Supported(), &supported);
  napi_set_named_property(env, exports, "supported", supported);
  return exports;
}

}  // namespace

NAPI_MODULE(NODE_GYP_MODULE_NAME, Init)
