// Weight-only quantized x·Wᵀ for a few rows of x (decoding, batched sampling) on x86 AVX2.
//
// Why not ATen's _weight_int4pack_mm_for_cpu / _weight_int8pack_mm: at batch 1 they cast x to
// bfloat16 and spend most of their time converting, ~2x slower than these loops on a 2-core
// AMD EPYC (numbers in README "Measured"). Here x stays float32 and the weights dequantize
// exactly (the GGUF Q4_1 grid), so the result equals x·W_floatᵀ up to summation order.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

constexpr int64_t kMaxRows = 64;

// Σ a_i b_i, 8 lanes at a time and a scalar tail
inline float dot(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float s = hsum(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}


// One output row r of Q4_1 weights against M rows of x, accumulators in registers. x comes
// as int16 per block of 32 (x ≈ x16 · dx, relative error ≤ 2⁻¹⁵ of the block's largest |x|), so
// sixteen code·x products take one madd instead of float conversions of every code.
template <int M>
inline void q4_row(const uint8_t* q, const float* st, const float* lb, const int16_t* X16, const float* DX,
                   const float* XS, int64_t k, int64_t nb, int64_t ld_out, float* y) {
  const __m128i low4 = _mm_set1_epi8(0x0F);
  __m256 acc[M];
  for (int i = 0; i < M; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16 * b));
    __m256i c0 = _mm256_cvtepu8_epi16(_mm_and_si128(v, low4));                      // codes 0..15
    __m256i c1 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(v, 4), low4));   // codes 16..31
    for (int i = 0; i < M; ++i) {
      const int16_t* xb = X16 + i * k + 32 * b;
      __m256i p = _mm256_add_epi32(
          _mm256_madd_epi16(c0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb))),
          _mm256_madd_epi16(c1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + 16))));
      acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(st[b] * DX[i * nb + b]), acc[i]);
    }
  }
  // + Σ_b lo_b · Σ_{j in b} x_j, vectorized apart (a scalar chain in the loop above cost ~20%)
  for (int i = 0; i < M; ++i) y[i * ld_out] = hsum(acc[i]) + dot(lb, XS + i * nb, nb);
}

// One output row of int8 weights against M rows of x, one scale per group of G inputs
// (G = 32: the GGUF Q8_0 blocks the embedded model's output head comes from, reproduced exactly).
template <int M>
inline void q8_row(const int8_t* q, const float* scale, const float* X, int64_t k, int64_t G, int64_t ld_out,
                   float* y) {
  __m256 acc[M];
  for (int i = 0; i < M; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t g0 = 0, g = 0; g0 < k; g0 += G, ++g) {
    __m256 t[M];
    for (int i = 0; i < M; ++i) t[i] = _mm256_setzero_ps();
    for (int64_t c = g0; c < g0 + G; c += 16) {
      __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + c))));
      __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + c + 8))));
      for (int i = 0; i < M; ++i)
        t[i] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(X + i * k + c + 8), _mm256_fmadd_ps(w0, _mm256_loadu_ps(X + i * k + c), t[i]));
    }
    const __m256 sg = _mm256_set1_ps(scale[g]);
    for (int i = 0; i < M; ++i) acc[i] = _mm256_fmadd_ps(t[i], sg, acc[i]);
  }
  for (int i = 0; i < M; ++i) y[i * ld_out] = hsum(acc[i]);
}

// x rows in chunks of 4, 2, 1 (the weight row stays in L1 between chunks)
template <typename RowFn>
inline void by_chunks(int64_t m, RowFn fn) {
  int64_t i = 0;
  for (; i + 4 <= m; i += 4) fn(std::integral_constant<int, 4>{}, i);
  for (; i + 2 <= m; i += 2) fn(std::integral_constant<int, 2>{}, i);
  for (; i < m; ++i) fn(std::integral_constant<int, 1>{}, i);
}

}  // namespace

// y = x·Wᵀ with W[r, 32b + j] = code · step[r, b] + lo[r, b]; packed[r, 16b + j] holds code j
// in its low nibble and code 16 + j in its high nibble (the GGUF Q4_1 order).
// x: float32 [m, k], m <= 64; packed: uint8 [n, k/2]; step, lo: float32 [n, k/32]. Returns [m, n].
torch::Tensor q4_linear(torch::Tensor x, torch::Tensor packed, torch::Tensor step, torch::Tensor lo) {
  const int64_t m = x.size(0), k = x.size(1), n = packed.size(0), nb = k / 32;
  TORCH_CHECK(m <= kMaxRows && k % 32 == 0 && packed.size(1) == k / 2, "q4_linear: bad shapes");
  auto xc = x.contiguous();
  auto out = torch::empty({m, n}, x.options());
  const float* X = xc.data_ptr<float>();
  // per block of 32: Σ x (exact, for the lo term), and x as int16 with its scale
  std::vector<float> xsum(m * nb), dx(m * nb);
  std::vector<int16_t> x16(m * k);
  for (int64_t i = 0; i < m * nb; ++i) {
    const float* xb = X + 32 * i;
    float s = 0.f, top = 0.f;
    for (int j = 0; j < 32; ++j) { s += xb[j]; top = std::max(top, std::fabs(xb[j])); }
    xsum[i] = s;
    dx[i] = top / 32767.f;
    const float inv = top > 0.f ? 32767.f / top : 0.f;
    for (int j = 0; j < 32; ++j) x16[32 * i + j] = static_cast<int16_t>(std::lrintf(xb[j] * inv));
  }
  const float* XS = xsum.data();
  const uint8_t* P = packed.data_ptr<uint8_t>();
  const float* S = step.data_ptr<float>();
  const float* L = lo.data_ptr<float>();
  float* Y = out.data_ptr<float>();
  at::parallel_for(0, n, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      by_chunks(m, [&](auto M, int64_t i) {
        q4_row<decltype(M)::value>(P + r * (k / 2), S + r * nb, L + r * nb, x16.data() + i * k, dx.data() + i * nb,
                                   XS + i * nb, k, nb, n, Y + i * n + r);
      });
  });
  return out;
}

// y = x·Wᵀ with W[r, c] = q[r, c] · scale[r, c / G], G = k / scale.size(1) (int8).
// x: float32 [m, k], m <= 64; q: int8 [n, k]; scale: float32 [n, k / G], G % 16 == 0. Returns [m, n].
torch::Tensor q8_linear(torch::Tensor x, torch::Tensor q8, torch::Tensor scale) {
  const int64_t m = x.size(0), k = x.size(1), n = q8.size(0), G = k / scale.size(1);
  TORCH_CHECK(m <= kMaxRows && G % 16 == 0 && G * scale.size(1) == k && q8.size(1) == k, "q8_linear: bad shapes");
  auto xc = x.contiguous();
  auto out = torch::empty({m, n}, x.options());
  const float* X = xc.data_ptr<float>();
  const int8_t* Q = q8.data_ptr<int8_t>();
  const float* SC = scale.data_ptr<float>();
  const int64_t ng = k / G;
  float* Y = out.data_ptr<float>();
  at::parallel_for(0, n, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      by_chunks(m, [&](auto M, int64_t i) {
        q8_row<decltype(M)::value>(Q + r * k, SC + r * ng, X + i * k, k, G, n, Y + i * n + r);
      });
  });
  return out;
}

// One decoding step of attention for one new token at position `pos` (batch 1, float32):
// rotary embedding on its query and key (transformers' rotate_half convention), key and value
// written into the caches at `pos`, then softmax(q·Kᵀ/√d)·V over positions 0..pos, query heads
// sharing key/value heads in groups (GQA).
// qkv: [H + 2·KV, d] (queries, keys, values); k_cache, v_cache: [KV, max_len, d];
// cos, sin: [d] for this position. Returns [H · d].
torch::Tensor attend_one(torch::Tensor qkv, torch::Tensor k_cache, torch::Tensor v_cache,
                         torch::Tensor cos, torch::Tensor sin, int64_t n_heads, int64_t pos) {
  const int64_t KV = k_cache.size(0), L = k_cache.size(1), d = k_cache.size(2), half = d / 2;
  TORCH_CHECK(qkv.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous() && pos < L &&
              qkv.numel() == (n_heads + 2 * KV) * d && n_heads % KV == 0, "attend_one: bad shapes");
  const float* QKV = qkv.data_ptr<float>();
  const float* C = cos.data_ptr<float>();
  const float* S = sin.data_ptr<float>();
  float* K = k_cache.data_ptr<float>();
  float* V = v_cache.data_ptr<float>();
  std::vector<float> q(n_heads * d), w(pos + 1);
  auto rotate = [&](const float* x, float* y) {
    for (int64_t i = 0; i < half; ++i) y[i] = x[i] * C[i] - x[i + half] * S[i];
    for (int64_t i = half; i < d; ++i) y[i] = x[i] * C[i] + x[i - half] * S[i];
  };
  for (int64_t h = 0; h < n_heads; ++h) rotate(QKV + h * d, q.data() + h * d);
  for (int64_t g = 0; g < KV; ++g) {
    rotate(QKV + (n_heads + g) * d, K + (g * L + pos) * d);
    std::copy(QKV + (n_heads + KV + g) * d, QKV + (n_heads + KV + g + 1) * d, V + (g * L + pos) * d);
  }
  auto out = torch::zeros({n_heads * d}, qkv.options());
  float* O = out.data_ptr<float>();
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  for (int64_t h = 0; h < n_heads; ++h) {
    const int64_t g = h / (n_heads / KV);
    float top = -INFINITY, total = 0.f;
    for (int64_t p = 0; p <= pos; ++p) top = std::max(top, w[p] = dot(q.data() + h * d, K + (g * L + p) * d, d) * scale);
    for (int64_t p = 0; p <= pos; ++p) total += (w[p] = std::exp(w[p] - top));
    float* o = O + h * d;
    for (int64_t p = 0; p <= pos; ++p) {
      const float a = w[p] / total;
      const float* v = V + (g * L + p) * d;
      for (int64_t i = 0; i < d; ++i) o[i] += a * v[i];
    }
  }
  return out;
}

// The memory path of one MemoryMLP for a few rows (float32), as MemoryMLP.delta computes it:
// h = x·w_inᵀ; gates g_e = σ(h[rank + e] + b_e); delta = w_out · [h[:rank] ⊙ g[expand], h[rank + E:]].
// x: [m, D]; w_in: [rank + E + F, D]; b_gate: [E]; w_out: [D, rank + F]; expand: int64 [rank].
// Returns (delta [m, D], gates [m, E]).
std::vector<torch::Tensor> memory_delta(torch::Tensor x, torch::Tensor w_in, torch::Tensor b_gate,
                                        torch::Tensor w_out, torch::Tensor expand, int64_t n_experts) {
  const int64_t m = x.size(0), D = x.size(1), R = w_in.size(0), E = n_experts, rank = expand.size(0);
  const int64_t RO = w_out.size(1);   // rank + F
  TORCH_CHECK(x.is_contiguous() && w_in.is_contiguous() && w_out.is_contiguous() && RO == R - E &&
              w_in.size(1) == D && w_out.size(0) == D, "memory_delta: bad shapes");
  auto delta = torch::empty({m, D}, x.options());
  auto gates = torch::empty({m, E}, x.options());
  const float* X = x.data_ptr<float>();
  const float* WI = w_in.data_ptr<float>();
  const float* WO = w_out.data_ptr<float>();
  const float* B = E ? b_gate.data_ptr<float>() : nullptr;
  const int64_t* EX = expand.data_ptr<int64_t>();
  float* Y = delta.data_ptr<float>();
  float* G = gates.data_ptr<float>();
  std::vector<float> h(R), hh(RO);
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t r = 0; r < R; ++r) h[r] = dot(WI + r * D, X + i * D, D);
    for (int64_t e = 0; e < E; ++e) G[i * E + e] = 1.0f / (1.0f + std::exp(-(h[rank + e] + B[e])));
    for (int64_t j = 0; j < rank; ++j) hh[j] = h[j] * G[i * E + EX[j]];
    for (int64_t f = rank; f < RO; ++f) hh[f] = h[f + E];
    for (int64_t o = 0; o < D; ++o) Y[i * D + o] = dot(WO + o * RO, hh.data(), RO);
  }
  return {delta, gates};
}

// RMSNorm of each row of x (float32 [m, d], d % 8 == 0): x / sqrt(mean(x²) + eps) · weight.
// One call instead of torch's six small ops per norm (60 norms per decoded token).
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  const int64_t d = x.size(-1), m = x.numel() / d;
  TORCH_CHECK(d % 8 == 0 && x.scalar_type() == torch::kFloat && weight.scalar_type() == torch::kFloat,
              "rms_norm: float32, size divisible by 8");
  auto xc = x.contiguous();
  auto out = torch::empty_like(xc);
  const float* X = xc.data_ptr<float>();
  const float* W = weight.data_ptr<float>();
  float* Y = out.data_ptr<float>();
  for (int64_t i = 0; i < m; ++i) {
    const float* xr = X + i * d;
    __m256 a = _mm256_setzero_ps();
    for (int64_t c = 0; c < d; c += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(xr + c), _mm256_loadu_ps(xr + c), a);
    __m256 r = _mm256_set1_ps(1.0f / std::sqrt(hsum(a) / d + static_cast<float>(eps)));
    for (int64_t c = 0; c < d; c += 8)
      _mm256_storeu_ps(Y + i * d + c, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(xr + c), r), _mm256_loadu_ps(W + c)));
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("q4_linear", &q4_linear, "x·Wᵀ, W in Q4_1 blocks of 32 (float32 x, AVX2)");
  m.def("attend_one", &attend_one, "one decoding step of attention with rotary embedding and KV cache write");
  m.def("memory_delta", &memory_delta, "the memory path of a MemoryMLP for a few rows");
  m.def("rms_norm", &rms_norm, "RMSNorm of each row (float32, AVX2)");
  m.def("q8_linear", &q8_linear, "x·Wᵀ, W int8 with one scale per row (float32 x, AVX2)");
}
