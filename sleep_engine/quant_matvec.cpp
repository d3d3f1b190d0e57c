// Weight-only quantized x·Wᵀ for a few rows of x (decoding, batched sampling) on x86 AVX2.
//
// Why not ATen's _weight_int4pack_mm_for_cpu / _weight_int8pack_mm: at batch 1 they cast x to
// bfloat16 and spend most of their time converting, ~2x slower than these loops on a 2-core
// AMD EPYC (numbers in README "Measured"). Here x stays float32 and the weights dequantize
// exactly (the GGUF Q4_1 grid), so the result equals x·W_floatᵀ up to summation order.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <exception>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <sched.h>
#include <thread>
#include <cmath>
#include <cstring>
#include <optional>
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

// Two output rows r, r + 1 (weights q, q + k/2) against M rows of x: each x block loaded once
// serves both rows (prompts: the loads, not the multiplies, bound the one-row loop).
template <int M>
inline void q4_row_pair(const uint8_t* q, const float* st, const float* lb, const int16_t* X16, const float* DX,
                        const float* XS, int64_t k, int64_t nb, int64_t ld_out, float* y) {
  const __m128i low4 = _mm_set1_epi8(0x0F);
  const uint8_t* q2 = q + k / 2;
  const float* st2 = st + nb;
  __m256 acc[M], acc2[M];
  for (int i = 0; i < M; ++i) acc[i] = acc2[i] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16 * b));
    __m128i v2 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q2 + 16 * b));
    __m256i c0 = _mm256_cvtepu8_epi16(_mm_and_si128(v, low4));
    __m256i c1 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(v, 4), low4));
    __m256i d0 = _mm256_cvtepu8_epi16(_mm_and_si128(v2, low4));
    __m256i d1 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(v2, 4), low4));
    for (int i = 0; i < M; ++i) {
      const int16_t* xb = X16 + i * k + 32 * b;
      const __m256i xa = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb));
      const __m256i xc = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + 16));
      const __m256i p = _mm256_add_epi32(_mm256_madd_epi16(c0, xa), _mm256_madd_epi16(c1, xc));
      const __m256i p2 = _mm256_add_epi32(_mm256_madd_epi16(d0, xa), _mm256_madd_epi16(d1, xc));
      const float dx = DX[i * nb + b];
      acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(st[b] * dx), acc[i]);
      acc2[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p2), _mm256_set1_ps(st2[b] * dx), acc2[i]);
    }
  }
  for (int i = 0; i < M; ++i) {
    y[i * ld_out] = hsum(acc[i]) + dot(lb, XS + i * nb, nb);
    y[i * ld_out + 1] = hsum(acc2[i]) + dot(lb + nb, XS + i * nb, nb);
  }
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

// Threads for the decode step. A token is ~180 small parallel loops; libgomp serves them in
// ~1 µs each from the thread that loaded the model, but from any other thread (the web app
// decodes in one thread per reply) a second OpenMP team exists, libgomp sees more threads than
// cores and stops spinning: each loop then waited on a futex, and a token took 13.6 ms instead of
// 6.9 (measured). So a step is one OpenMP region: its caller runs the step and hands out the
// loops, the region's other threads spin for them until the step ends (as llama.cpp's do).
class SpinTeam {
 public:
  // body(team) on the calling thread, the other threads of one OpenMP region serving its loops
  template <typename Body>
  static void run(int n_threads, int pauses, const Body& body) {
    n_threads = std::max(1, std::min(n_threads, usable_cpus()));   // more spinners than cores: each loop
    SpinTeam team;                                                  // would wait out a time slice
    team.pauses_ = pauses;
    std::exception_ptr error;
#pragma omp parallel num_threads(n_threads)
    {
#pragma omp single
      team.size_ = omp_get_num_threads();   // implicit barrier: every thread sees it
      if (omp_get_thread_num() == 0) {
        try { body(team); } catch (...) { error = std::current_exception(); }
        team.running_.store(false);
        team.wake();
      } else {
        team.work(omp_get_thread_num());
      }
    }
    if (error) std::rethrow_exception(error);
  }

  // fn(lo, hi) over [0, n) in size_ contiguous parts (multiples of `grain`); the caller runs part 0
  void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
    const int64_t part = (n + size_ - 1) / size_, step = (part + grain - 1) / grain * grain;
    if (size_ == 1 || n <= grain) { if (n > 0) fn(0, n); return; }
    fn_ = &fn, n_ = n, step_ = step;
    done_.store(0, std::memory_order_relaxed);
    job_.fetch_add(1);   // seq_cst: a worker going to sleep either sees it or is counted in sleepers_
    wake();
    fn(0, std::min(step, n));
    for (int spins = 0; done_.load(std::memory_order_acquire) < size_ - 1; ++spins) relax(spins);
  }

 private:
  static int usable_cpus() {
    cpu_set_t set;
    return sched_getaffinity(0, sizeof(set), &set) == 0 ? CPU_COUNT(&set) : 1;
  }

  // the waiting caller spins a while, then lets other threads run
  void relax(int spins) const {
    if (spins < pauses_) _mm_pause();
    else std::this_thread::yield();
  }

  void wake() {
    if (sleepers_.load() > 0) {
      std::lock_guard<std::mutex> g(mu_);
      cv_.notify_all();
    }
  }

  // A worker spins for the next loop `pauses_` times (the gaps between a step's loops), then
  // sleeps until one comes, so that between replies and beside other work it gives its core back.
  // The caller picks the count (DecodePlan.step; decoding.py says what each count measured).
  void work(int w) {
    uint64_t seen = 0;
    for (int spins = 0; running_.load();) {
      const uint64_t job = job_.load();
      if (job == seen) {
        if (++spins < pauses_) { _mm_pause(); continue; }
        std::unique_lock<std::mutex> lk(mu_);
        sleepers_.fetch_add(1);
        cv_.wait(lk, [&] { return job_.load() != seen || !running_.load(); });
        sleepers_.fetch_sub(1);
        spins = 0;
        continue;
      }
      spins = 0;
      seen = job;
      const int64_t lo = w * step_, hi = std::min(n_, lo + step_);
      if (lo < hi) (*fn_)(lo, hi);
      done_.fetch_add(1, std::memory_order_release);
    }
  }

  int size_ = 1, pauses_ = 0;
  std::atomic<bool> running_{true};
  std::atomic<int> sleepers_{0};
  std::mutex mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> job_{0};
  std::atomic<int> done_{0};
  const std::function<void(int64_t, int64_t)>* fn_ = nullptr;
  int64_t n_ = 0, step_ = 0;
};

// A loop over [0, n) on the step's team, or torch's threads when there is none.
template <typename Fn>
inline void par_for(SpinTeam* team, int64_t n, int64_t grain, const Fn& fn) {
  if (team) team->parallel_for(n, grain, fn);
  else at::parallel_for(0, n, grain, fn);
}

// x as the Q4_1 kernel reads it, per block of 32: Σ x (exact, for the lo term), and x as int16
// with its scale. Kept between calls by the decode step (no allocation per token).
struct QuantX {
  std::vector<float> sum, dx;
  std::vector<int16_t> x16;
  void fill(const float* X, int64_t m, int64_t k) {
    const int64_t nb = m * k / 32;
    sum.resize(nb);
    dx.resize(nb);
    x16.resize(m * k);
    for (int64_t i = 0; i < nb; ++i) {
      const float* xb = X + 32 * i;
      float s = 0.f, top = 0.f;
      for (int j = 0; j < 32; ++j) { s += xb[j]; top = std::max(top, std::fabs(xb[j])); }
      sum[i] = s;
      dx[i] = top / 32767.f;
      const float inv = top > 0.f ? 32767.f / top : 0.f;
      for (int j = 0; j < 32; ++j) x16[32 * i + j] = static_cast<int16_t>(std::lrintf(xb[j] * inv));
    }
  }
};

// Four rows of Q4_1 W (or fewer: `rows`) as float32, code · step + lo, into w [rows, k].
inline void q4_dequant_rows(const uint8_t* q, const float* st, const float* lb, int64_t k, int rows, float* w) {
  const __m128i low4 = _mm_set1_epi8(0x0F);
  const int64_t nb = k / 32;
  for (int r = 0; r < rows; ++r)
    for (int64_t b = 0; b < nb; ++b) {
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + r * (k / 2) + 16 * b));
      const __m128i c[2] = {_mm_and_si128(v, low4), _mm_and_si128(_mm_srli_epi16(v, 4), low4)};   // codes 0..15, 16..31
      const __m256 s = _mm256_set1_ps(st[r * nb + b]), l = _mm256_set1_ps(lb[r * nb + b]);
      float* out = w + r * k + 32 * b;
      for (int h = 0; h < 2; ++h) {
        _mm256_storeu_ps(out + 16 * h, _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(c[h])), s), l));
        _mm256_storeu_ps(out + 16 * h + 8,
                         _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(c[h], 8))), s), l));
      }
    }
}

// MR rows of x against NR float32 weight rows w [NR, k]: MR·NR accumulators in registers.
template <int MR, int NR>
inline void f32_tile(const float* w, const float* X, int64_t k, int64_t ld_out, float* y) {
  __m256 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < NR; ++r) acc[i][r] = _mm256_setzero_ps();
  for (int64_t c = 0; c < k; c += 8) {
    __m256 wv[NR];
    for (int r = 0; r < NR; ++r) wv[r] = _mm256_loadu_ps(w + r * k + c);
    for (int i = 0; i < MR; ++i) {
      const __m256 xv = _mm256_loadu_ps(X + i * k + c);
      for (int r = 0; r < NR; ++r) acc[i][r] = _mm256_fmadd_ps(xv, wv[r], acc[i][r]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < NR; ++r) y[i * ld_out + r] = hsum(acc[i][r]);
}

template <int NR>
inline void f32_panel(const float* w, const float* X, int64_t m, int64_t k, int64_t ld_out, float* y) {
  int64_t i = 0;
  for (; i + 3 <= m; i += 3) f32_tile<3, NR>(w, X + i * k, k, ld_out, y + i * ld_out);
  if (i + 2 <= m) f32_tile<2, NR>(w, X + i * k, k, ld_out, y + i * ld_out), i += 2;
  if (i < m) f32_tile<1, NR>(w, X + i * k, k, ld_out, y + i * ld_out);
}

// From this many rows of x (a prompt), Q4_1 rows are dequantized to float32 four at a time and
// multiplied in float FMAs, three rows of x per pass (twelve accumulators: two rows' eight left the
// FMA units waiting on their latency): each weight is decoded once for all rows, not once per four
// as in q4_row_pair, and x stays exact. q4_linear on the embedded model's four shapes, 2 cores
// (2026-12-06): 1.16–1.39× q4_row_pair's speed at 8 rows, 1.5–1.8× at 38 (gate_up 193 GFLOP/s),
// 1.03–1.28× at 6, slower at 2–4 (0.5–0.95×). The first token of a bench prompt: 91–114 → 70–73 ms.
constexpr int64_t kPanelRows = 6;

// Y[m, n] = X·Wᵀ for Q4_1 W, m >= kPanelRows: weight rows four at a time, split over threads.
void q4_rows_panel(const float* X, int64_t m, int64_t k, int64_t n, const uint8_t* P, const float* S, const float* L,
                   float* Y, SpinTeam* team) {
  const int64_t nb = k / 32;
  par_for(team, n, 16, [&](int64_t r0, int64_t r1) {
    thread_local std::vector<float> w;
    w.resize(4 * k);
    for (int64_t r = r0; r < r1; r += 4) {
      const int rows = static_cast<int>(std::min<int64_t>(4, r1 - r));
      q4_dequant_rows(P + r * (k / 2), S + r * nb, L + r * nb, k, rows, w.data());
      switch (rows) {
        case 4: f32_panel<4>(w.data(), X, m, k, n, Y + r); break;
        case 3: f32_panel<3>(w.data(), X, m, k, n, Y + r); break;
        case 2: f32_panel<2>(w.data(), X, m, k, n, Y + r); break;
        default: f32_panel<1>(w.data(), X, m, k, n, Y + r);
      }
    }
  });
}

// Y[m, n] = X·Wᵀ for Q4_1 W (see q4_linear), rows of W split over threads.
void q4_rows(const float* X, int64_t m, int64_t k, int64_t n, const uint8_t* P, const float* S, const float* L,
             float* Y, QuantX& xq, SpinTeam* team = nullptr) {
  if (m >= kPanelRows) return q4_rows_panel(X, m, k, n, P, S, L, Y, team);
  const int64_t nb = k / 32;
  xq.fill(X, m, k);
  par_for(team, n, 16, [&](int64_t r0, int64_t r1) {
    int64_t r = r0;
    if (m > 1)   // prompts: rows in pairs
      for (; r + 2 <= r1; r += 2)
        by_chunks(m, [&](auto M, int64_t i) {
          q4_row_pair<decltype(M)::value>(P + r * (k / 2), S + r * nb, L + r * nb, xq.x16.data() + i * k,
                                          xq.dx.data() + i * nb, xq.sum.data() + i * nb, k, nb, n, Y + i * n + r);
        });
    for (; r < r1; ++r)
      by_chunks(m, [&](auto M, int64_t i) {
        q4_row<decltype(M)::value>(P + r * (k / 2), S + r * nb, L + r * nb, xq.x16.data() + i * k,
                                   xq.dx.data() + i * nb, xq.sum.data() + i * nb, k, nb, n, Y + i * n + r);
      });
  });
}

// Y[m, n] = X·Wᵀ for int8 W with one scale per group of G inputs (see q8_linear).
void q8_rows(const float* X, int64_t m, int64_t k, int64_t n, const int8_t* Q, const float* SC, int64_t G, float* Y,
             SpinTeam* team = nullptr) {
  const int64_t ng = k / G;
  par_for(team, n, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      by_chunks(m, [&](auto M, int64_t i) { q8_row<decltype(M)::value>(Q + r * k, SC + r * ng, X + i * k, k, G, n, Y + i * n + r); });
  });
}

// y[n] = W x for float32 W [n, k], rows split over threads.
void f32_rows(const float* x, int64_t k, int64_t n, const float* W, float* y, SpinTeam* team = nullptr) {
  par_for(team, n, 32, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) y[r] = dot(W + r * k, x, k);
  });
}

// One new token's attention (see attend_one); out [n_heads · d] is overwritten. Heads split
// over threads: at a 1,000-token context this is ~35 MFLOP per token.
void attend(const float* QKV, float* K, float* V, int64_t KV, int64_t L, int64_t d, int64_t n_heads, int64_t pos,
            const float* C, const float* S, float* O, SpinTeam* team = nullptr) {
  const int64_t half = d / 2;
  std::vector<float> q(n_heads * d);
  auto rotate = [&](const float* x, float* y) {
    for (int64_t i = 0; i < half; ++i) y[i] = x[i] * C[i] - x[i + half] * S[i];
    for (int64_t i = half; i < d; ++i) y[i] = x[i] * C[i] + x[i - half] * S[i];
  };
  for (int64_t h = 0; h < n_heads; ++h) rotate(QKV + h * d, q.data() + h * d);
  for (int64_t g = 0; g < KV; ++g) {
    rotate(QKV + (n_heads + g) * d, K + (g * L + pos) * d);
    std::copy(QKV + (n_heads + KV + g) * d, QKV + (n_heads + KV + g + 1) * d, V + (g * L + pos) * d);
  }
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  par_for(team, n_heads, pos > 256 ? 1 : n_heads, [&](int64_t h0, int64_t h1) {
    std::vector<float> w(pos + 1);
    for (int64_t h = h0; h < h1; ++h) {
      const int64_t g = h / (n_heads / KV);
      float top = -INFINITY, total = 0.f;
      for (int64_t p = 0; p <= pos; ++p) top = std::max(top, w[p] = dot(q.data() + h * d, K + (g * L + p) * d, d) * scale);
      for (int64_t p = 0; p <= pos; ++p) total += (w[p] = std::exp(w[p] - top));
      float* o = O + h * d;
      std::fill(o, o + d, 0.f);
      for (int64_t p = 0; p <= pos; ++p) {
        const float a = w[p] / total;
        const float* v = V + (g * L + p) * d;
        for (int64_t i = 0; i < d; ++i) o[i] += a * v[i];
      }
    }
  });
}

// y = x / sqrt(mean(x²) + eps) · weight for one row of d floats, d % 8 == 0.
void rms_row(const float* xr, const float* W, int64_t d, float eps, float* y) {
  __m256 a = _mm256_setzero_ps();
  for (int64_t c = 0; c < d; c += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(xr + c), _mm256_loadu_ps(xr + c), a);
  __m256 r = _mm256_set1_ps(1.0f / std::sqrt(hsum(a) / d + eps));
  for (int64_t c = 0; c < d; c += 8)
    _mm256_storeu_ps(y + c, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(xr + c), r), _mm256_loadu_ps(W + c)));
}

}  // namespace

// y = x·Wᵀ with W[r, 32b + j] = code · step[r, b] + lo[r, b]; packed[r, 16b + j] holds code j
// in its low nibble and code 16 + j in its high nibble (the GGUF Q4_1 order).
// x: float32 [m, k], m <= 64; packed: uint8 [n, k/2]; step, lo: float32 [n, k/32]. Returns [m, n].
torch::Tensor q4_linear(torch::Tensor x, torch::Tensor packed, torch::Tensor step, torch::Tensor lo) {
  const int64_t m = x.size(0), k = x.size(1), n = packed.size(0);
  TORCH_CHECK(m <= kMaxRows && k % 32 == 0 && packed.size(1) == k / 2, "q4_linear: bad shapes");
  auto xc = x.contiguous();
  auto out = torch::empty({m, n}, x.options());
  QuantX xq;
  q4_rows(xc.data_ptr<float>(), m, k, n, packed.data_ptr<uint8_t>(), step.data_ptr<float>(), lo.data_ptr<float>(),
          out.data_ptr<float>(), xq);
  return out;
}

// W as float32 [n, k] from Q4_1 blocks (the layout q4_linear reads): W[r, 32b + j] =
// code · step[r, b] + lo[r, b]. Long prompts multiply by W with torch's float32 GEMM; dequantizing
// there with torch ops (unpack, cat, convert, scale: five passes over the weight) took 0.25 s of a
// 1,000-token prompt's 2.24 s (2 cores, 2026-12-05).
// Bit for bit what torch computes (a product, rounded, then a sum): not contracted into an FMA,
// so that weights dequantized here and by torch ops (and readings kept from either) agree.
// Out at::BFloat16: those values as bfloat16 (a long prompt's products where the CPU has them,
// backbone.bf16_many_rows), rounded to nearest even as torch's conversion is; in one pass, without
// writing the float32 weight and converting it (69 + ~50 of a 1,000-token prompt's ~1,050 ms on
// 2 cores, 2026-12-06).
template <typename Out>
__attribute__((optimize("fp-contract=off"))) static void q4_dequant_block(const uint8_t* p, float s, float l, Out* w) {
  for (int j = 0; j < 16; ++j) {
    const float lo_code = static_cast<float>(p[j] & 15) * s, hi_code = static_cast<float>(p[j] >> 4) * s;
    w[j] = static_cast<Out>(lo_code + l);
    w[16 + j] = static_cast<Out>(hi_code + l);
  }
}

torch::Tensor q4_dequant(torch::Tensor packed, torch::Tensor step, torch::Tensor lo, bool bf16) {
  const int64_t n = packed.size(0), k = packed.size(1) * 2, nb = k / 32;
  TORCH_CHECK(packed.is_contiguous() && step.is_contiguous() && lo.is_contiguous() && k % 32 == 0 &&
              step.size(0) == n && step.size(1) == nb && lo.sizes() == step.sizes(), "q4_dequant: bad shapes");
  auto out = torch::empty({n, k}, step.options().dtype(bf16 ? torch::kBFloat16 : torch::kFloat32));
  const uint8_t* P = packed.data_ptr<uint8_t>();
  const float *S = step.data_ptr<float>(), *L = lo.data_ptr<float>();
  at::BFloat16* W16 = bf16 ? out.data_ptr<at::BFloat16>() : nullptr;
  float* W32 = bf16 ? nullptr : out.data_ptr<float>();
  at::parallel_for(0, n * nb, 256, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      if (W16) q4_dequant_block(P + 16 * b, S[b], L[b], W16 + 32 * b);
      else q4_dequant_block(P + 16 * b, S[b], L[b], W32 + 32 * b);
    }
  });
  return out;
}

// The inverse, for loading: float32 W [n, k] → Q4_1 blocks (packed codes [n, k/2], step and lo
// [n, k/32]), bit for bit what backbone.QuantLinear's torch ops give: lo = min, step =
// max(max − lo, 1e-8) / 15, code = round-half-even((w − lo) / step) in 0..15. The torch ops took
// ~0.35 s of every start of the embedded model (ten passes over 106 M weights; 2 cores).
__attribute__((optimize("fp-contract=off"))) static void q4_quantize_block(const float* w, uint8_t* p, float* step,
                                                                           float* lo) {
  float mn = w[0], mx = w[0];
  for (int j = 1; j < 32; ++j) { mn = std::min(mn, w[j]); mx = std::max(mx, w[j]); }
  const float s = std::max(mx - mn, 1e-8f) / 15.f;
  uint8_t c[32];
  for (int j = 0; j < 32; ++j) c[j] = static_cast<uint8_t>(std::min(15.f, std::max(0.f, std::nearbyint((w[j] - mn) / s))));
  for (int j = 0; j < 16; ++j) p[j] = c[j] | (c[16 + j] << 4);
  *step = s;
  *lo = mn;
}

std::vector<torch::Tensor> q4_quantize(torch::Tensor w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kFloat && w.size(1) % 32 == 0, "q4_quantize: float32 [n, k], k % 32 == 0");
  auto wc = w.contiguous();
  const int64_t n = wc.size(0), k = wc.size(1), nb = k / 32;
  auto packed = torch::empty({n, k / 2}, wc.options().dtype(torch::kUInt8));
  auto step = torch::empty({n, nb}, wc.options()), lo = torch::empty({n, nb}, wc.options());
  const float* W = wc.data_ptr<float>();
  uint8_t* P = packed.data_ptr<uint8_t>();
  float *S = step.data_ptr<float>(), *L = lo.data_ptr<float>();
  at::parallel_for(0, n * nb, 256, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) q4_quantize_block(W + 32 * b, P + 16 * b, S + b, L + b);
  });
  return {packed, step, lo};
}

// float32 W [n, k] → int8 with one scale per group of k / groups inputs: scale = max(max |w|,
// 1e-8) / 127, q = round-half-even(w / scale) in −127..127, as QuantLinear's torch ops give.
__attribute__((optimize("fp-contract=off"))) static void q8_quantize_group(const float* w, int64_t G, int8_t* q,
                                                                           float* scale) {
  float mx = 0.f;
  for (int64_t j = 0; j < G; ++j) mx = std::max(mx, std::fabs(w[j]));
  const float s = std::max(mx, 1e-8f) / 127.f;
  for (int64_t j = 0; j < G; ++j) q[j] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, std::nearbyint(w[j] / s))));
  *scale = s;
}

std::vector<torch::Tensor> q8_quantize(torch::Tensor w, int64_t groups) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kFloat && groups > 0 && w.size(1) % groups == 0,
              "q8_quantize: float32 [n, k], k divisible by groups");
  auto wc = w.contiguous();
  const int64_t n = wc.size(0), k = wc.size(1), G = k / groups;
  auto q = torch::empty({n, k}, wc.options().dtype(torch::kInt8));
  auto scale = torch::empty({n, groups}, wc.options());
  const float* W = wc.data_ptr<float>();
  int8_t* Q = q.data_ptr<int8_t>();
  float* S = scale.data_ptr<float>();
  at::parallel_for(0, n * groups, 64, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) q8_quantize_group(W + G * g, G, Q + G * g, S + g);
  });
  return {q, scale};
}

// y = x·Wᵀ with W[r, c] = q[r, c] · scale[r, c / G], G = k / scale.size(1) (int8).
// x: float32 [m, k], m <= 64; q: int8 [n, k]; scale: float32 [n, k / G], G % 16 == 0. Returns [m, n].
torch::Tensor q8_linear(torch::Tensor x, torch::Tensor q8, torch::Tensor scale) {
  const int64_t m = x.size(0), k = x.size(1), n = q8.size(0), G = k / scale.size(1);
  TORCH_CHECK(m <= kMaxRows && G % 16 == 0 && G * scale.size(1) == k && q8.size(1) == k, "q8_linear: bad shapes");
  auto xc = x.contiguous();
  auto out = torch::empty({m, n}, x.options());
  q8_rows(xc.data_ptr<float>(), m, k, n, q8.data_ptr<int8_t>(), scale.data_ptr<float>(), G, out.data_ptr<float>());
  return out;
}

// One decoding step of attention for one new token at position `pos` (batch 1, float32):
// rotary embedding on its query and key (transformers' rotate_half convention), key and value
// written into the caches at `pos`, then softmax(q·Kᵀ/√d)·V over positions 0..pos, query heads
// sharing key/value heads in groups (GQA).
// qkv: [H + 2·KV, d] (queries, keys, values); k_cache, v_cache: [KV, max_len, d];
// cos, sin: [d] for this position. Returns [H · d]. (The decode step calls `attend` itself; this
// binding is how tests/test_kernels.py checks it against rotary + SDPA.)
torch::Tensor attend_one(torch::Tensor qkv, torch::Tensor k_cache, torch::Tensor v_cache,
                         torch::Tensor cos, torch::Tensor sin, int64_t n_heads, int64_t pos) {
  const int64_t KV = k_cache.size(0), L = k_cache.size(1), d = k_cache.size(2);
  TORCH_CHECK(qkv.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous() && pos < L &&
              qkv.numel() == (n_heads + 2 * KV) * d && n_heads % KV == 0, "attend_one: bad shapes");
  auto out = torch::empty({n_heads * d}, qkv.options());
  attend(qkv.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), KV, L, d, n_heads, pos,
         cos.data_ptr<float>(), sin.data_ptr<float>(), out.data_ptr<float>());
  return out;
}

namespace {

// The memory path of one MemoryMLP for one row x [D] (see memory_delta); y [D] += delta,
// g [E] = the gates (with the dead zone `floor`, memory.routed_gate). h [R] and hh [rank + F] are scratch.
void memory_row(const float* x, const float* WI, const float* B, const float* WO, const int64_t* EX, int64_t D,
                int64_t R, int64_t E, int64_t rank, float floor, float* h, float* hh, float* y, float* g,
                SpinTeam* team = nullptr) {
  const int64_t RO = R - E;
  f32_rows(x, D, R, WI, h, team);
  for (int64_t e = 0; e < E; ++e) {
    const float s = 1.0f / (1.0f + std::exp(-(h[rank + e] + B[e])));
    g[e] = floor > 0.0f ? std::max(0.0f, s - floor) / (1.0f - floor) : s;
  }
  for (int64_t j = 0; j < rank; ++j) hh[j] = h[j] * g[EX[j]];
  for (int64_t f = rank; f < RO; ++f) hh[f] = h[f + E];
  par_for(team, D, 64, [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o) y[o] += dot(WO + o * RO, hh, RO);
  });
}

}  // namespace

// The memory path of one MemoryMLP for a few rows (float32), as MemoryMLP.delta computes it:
// h = x·w_inᵀ; gates g_e = max(0, σ(h[rank + e] + b_e) − ε) / (1 − ε), ε = floor;
// delta = w_out · [h[:rank] ⊙ g[expand], h[rank + E:]].
// x: [m, D]; w_in: [rank + E + F, D]; b_gate: [E]; w_out: [D, rank + F]; expand: int64 [rank].
// Returns (delta [m, D], gates [m, E]).
std::vector<torch::Tensor> memory_delta(torch::Tensor x, torch::Tensor w_in, torch::Tensor b_gate,
                                        torch::Tensor w_out, torch::Tensor expand, int64_t n_experts, double floor) {
  const int64_t m = x.size(0), D = x.size(1), R = w_in.size(0), E = n_experts, rank = expand.size(0);
  TORCH_CHECK(x.is_contiguous() && w_in.is_contiguous() && w_out.is_contiguous() && w_out.size(1) == R - E &&
              w_in.size(1) == D && w_out.size(0) == D, "memory_delta: bad shapes");
  auto delta = torch::zeros({m, D}, x.options());
  auto gates = torch::empty({m, E}, x.options());
  std::vector<float> h(R), hh(R - E);
  for (int64_t i = 0; i < m; ++i)
    memory_row(x.data_ptr<float>() + i * D, w_in.data_ptr<float>(), E ? b_gate.data_ptr<float>() : nullptr,
               w_out.data_ptr<float>(), expand.data_ptr<int64_t>(), D, R, E, rank, static_cast<float>(floor), h.data(), hh.data(),
               delta.data_ptr<float>() + i * D, gates.data_ptr<float>() + i * E);
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
  for (int64_t i = 0; i < m; ++i)
    rms_row(xc.data_ptr<float>() + i * d, weight.data_ptr<float>(), d, static_cast<float>(eps), out.data_ptr<float>() + i * d);
  return out;
}

// ---- the whole one-token step of a Llama-family decoder (Wake) ------------------------------
// Python builds the plan once per decoder (the frozen base) and sets each layer's memory path
// at the start of a reply; `step` then runs every layer in C++: per token, ~10 µs of Python
// instead of ~12 calls per layer (profiled: ~3 ms a token of call overhead at 30 layers).

namespace {

// One linear layer as the step reads it, from the tensors Python passes (bias last, empty if
// none): Q4_1 [packed uint8, step, lo, bias], int8 [q, scale per group, bias], float32 [w, bias].
struct Weight {
  std::vector<torch::Tensor> t;   // kept alive here
  int kind = 0;                   // 4, 8 or 32
  int64_t n = 0, k = 0, G = 0;

  explicit Weight(std::vector<torch::Tensor> tensors) : t(std::move(tensors)) {
    TORCH_CHECK(t.size() >= 2, "Weight: tensors then bias");
    for (auto& x : t) TORCH_CHECK(x.is_contiguous() && x.device().is_cpu(), "Weight: contiguous CPU tensors");
    const auto dtype = t[0].scalar_type();
    n = t[0].size(0);
    if (dtype == torch::kUInt8) {
      kind = 4, k = 2 * t[0].size(1);
      TORCH_CHECK(t.size() == 4 && k % 32 == 0 && t[1].size(1) == k / 32, "Weight: Q4_1 shapes");
    } else if (dtype == torch::kInt8) {
      kind = 8, k = t[0].size(1), G = k / t[1].size(1);
      TORCH_CHECK(t.size() == 3 && G % 16 == 0 && G * t[1].size(1) == k, "Weight: int8 shapes");
    } else {
      kind = 32, k = t[0].size(1);
      TORCH_CHECK(t.size() == 2 && dtype == torch::kFloat, "Weight: float32 [n, k] and bias");
    }
    const auto& bias = t.back();
    TORCH_CHECK(bias.numel() == 0 || (bias.numel() == n && bias.scalar_type() == torch::kFloat), "Weight: bias");
  }

  // Y[m, n] = X[m, k]·Wᵀ + bias
  void apply(const float* X, int64_t m, float* Y, QuantX& xq, SpinTeam* team) const {
    if (kind == 4) q4_rows(X, m, k, n, t[0].data_ptr<uint8_t>(), t[1].data_ptr<float>(), t[2].data_ptr<float>(), Y, xq, team);
    else if (kind == 8) q8_rows(X, m, k, n, t[0].data_ptr<int8_t>(), t[1].data_ptr<float>(), G, Y, team);
    else for (int64_t i = 0; i < m; ++i) f32_rows(X + i * k, k, n, t[0].data_ptr<float>(), Y + i * n, team);
    if (t.back().numel()) {
      const float* b = t.back().data_ptr<float>();
      for (int64_t i = 0; i < m; ++i)
        for (int64_t r = 0; r < n; ++r) Y[i * n + r] += b[r];
    }
  }
};

struct Memory {   // a MemoryMLP's fused weights (see memory_delta)
  torch::Tensor w_in, b_gate, w_out, expand;
  int64_t E = 0, R = 0, rank = 0;
  float floor = 0.0f;
};

struct Layer {
  torch::Tensor norm1, norm2;
  float eps1, eps2;
  Weight qkv, o, gate_up, down;
  std::optional<Memory> memory;
};

}  // namespace

class DecodePlan {
 public:
  // embed [V, D]; norm: the final norm's weight; head: the output head's tensors;
  // k_cache, v_cache: [layers, 1, KV, max_len, d]; cos, sin: [max_len, d].
  DecodePlan(torch::Tensor embed, torch::Tensor norm, double eps, std::vector<torch::Tensor> head,
             torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor cos, torch::Tensor sin, int64_t n_heads)
      : embed_(embed), norm_(norm), eps_(eps), head_(std::move(head)), k_(k_cache), v_(v_cache), cos_(cos), sin_(sin),
        n_heads_(n_heads), D_(embed.size(1)) {
    TORCH_CHECK(embed.scalar_type() == torch::kFloat && embed.is_contiguous() && D_ % 8 == 0 && head_.k == D_ &&
                k_cache.scalar_type() == torch::kFloat && cos.scalar_type() == torch::kFloat &&
                k_cache.is_contiguous() && v_cache.is_contiguous() && cos.is_contiguous() && sin.is_contiguous() &&
                cos.size(1) == k_cache.size(4) && n_heads % k_cache.size(2) == 0, "DecodePlan: bad shapes");
  }

  void add_layer(torch::Tensor norm1, double eps1, std::vector<torch::Tensor> qkv, std::vector<torch::Tensor> o,
                 torch::Tensor norm2, double eps2, std::vector<torch::Tensor> gate_up, std::vector<torch::Tensor> down) {
    const int64_t KV = k_.size(2), d = k_.size(4);
    Layer L{norm1, norm2, static_cast<float>(eps1), static_cast<float>(eps2), Weight(std::move(qkv)), Weight(std::move(o)),
            Weight(std::move(gate_up)), Weight(std::move(down)), std::nullopt};
    TORCH_CHECK(static_cast<int64_t>(layers_.size()) < k_.size(0) && L.qkv.k == D_ && L.qkv.n == (n_heads_ + 2 * KV) * d &&
                L.o.k == n_heads_ * d && L.o.n == D_ && L.gate_up.k == D_ && L.gate_up.n == 2 * L.down.k &&
                L.down.n == D_, "DecodePlan.add_layer: bad shapes");
    layers_.push_back(std::move(L));
  }

  // The memory path of layer i (see memory_delta), or none when w_in is empty.
  void set_memory(int64_t i, torch::Tensor w_in, torch::Tensor b_gate, torch::Tensor w_out, torch::Tensor expand,
                  int64_t n_experts, double floor) {
    auto& L = layers_.at(i);
    if (w_in.numel() == 0) { L.memory.reset(); return; }
    const int64_t R = w_in.size(0);
    TORCH_CHECK(w_in.is_contiguous() && w_out.is_contiguous() && w_in.size(1) == D_ && w_out.size(0) == D_ &&
                w_out.size(1) == R - n_experts && w_in.scalar_type() == torch::kFloat, "set_memory: bad shapes");
    L.memory = Memory{w_in, b_gate, w_out, expand, n_experts, R, expand.size(0), static_cast<float>(floor)};
  }

  // Tokens at positions pos, pos + 1, … (a new token, or up to kMaxRows of a prompt): their keys
  // and values go into the caches; returns the last one's (logits [1, V], gates [layers, max E]:
  // zeros where a layer has fewer experts).
  // pauses: how long the step's threads spin for the next loop before they sleep; < 0: no team of
  // its own, torch's threads serve the loops.
  std::vector<torch::Tensor> step(std::vector<int64_t> tokens, int64_t pos, int64_t pauses) {
    const int64_t n_layers = layers_.size(), T = tokens.size();
    TORCH_CHECK(T >= 1 && T <= kMaxRows && pos + T <= k_.size(3), "DecodePlan.step: 1 to 64 tokens inside the cache");
    for (int64_t t : tokens) TORCH_CHECK(t >= 0 && t < embed_.size(0), "DecodePlan.step: token out of range");
    int64_t max_e = 0;
    for (auto& layer : layers_) if (layer.memory) max_e = std::max(max_e, layer.memory->E);
    auto gates = torch::zeros({n_layers, max_e}, embed_.options());
    auto logits = torch::empty({1, head_.n}, embed_.options());
    if (pauses < 0) run_layers(tokens, pos, max_e, gates, logits, nullptr);
    else SpinTeam::run(at::get_num_threads(), static_cast<int>(pauses),
                       [&](SpinTeam& t) { run_layers(tokens, pos, max_e, gates, logits, &t); });
    return {logits, gates};
  }

 private:
  void run_layers(const std::vector<int64_t>& tokens, int64_t pos, int64_t max_e, torch::Tensor& gates,
                  torch::Tensor& logits, SpinTeam* team) {
    const int64_t n_layers = layers_.size(), KV = k_.size(2), L = k_.size(3), d = k_.size(4), D = D_;
    const int64_t T = tokens.size(), QKV = (n_heads_ + 2 * KV) * d, A = n_heads_ * d;
    std::vector<float> x(T * D), h(T * D), y(T * D), qkv(T * QKV), att(T * A), mh, mhh, scratch_gates(max_e);
    for (int64_t t = 0; t < T; ++t) std::copy_n(embed_.data_ptr<float>() + tokens[t] * D, D, x.data() + t * D);
    auto norm_rows = [&](const torch::Tensor& w, float eps) {
      for (int64_t t = 0; t < T; ++t) rms_row(x.data() + t * D, w.data_ptr<float>(), D, eps, h.data() + t * D);
    };
    for (int64_t i = 0; i < n_layers; ++i) {
      const Layer& ly = layers_[i];
      const int64_t cache = i * KV * L * d;
      norm_rows(ly.norm1, ly.eps1);
      ly.qkv.apply(h.data(), T, qkv.data(), xq_, team);
      for (int64_t t = 0; t < T; ++t)   // in order: row t attends to the rows before it, already cached
        attend(qkv.data() + t * QKV, k_.data_ptr<float>() + cache, v_.data_ptr<float>() + cache, KV, L, d, n_heads_,
               pos + t, cos_.data_ptr<float>() + (pos + t) * d, sin_.data_ptr<float>() + (pos + t) * d,
               att.data() + t * A, team);
      ly.o.apply(att.data(), T, y.data(), xq_, team);
      for (int64_t c = 0; c < T * D; ++c) x[c] += y[c];
      norm_rows(ly.norm2, ly.eps2);
      const int64_t inter = ly.down.k;
      gu_.resize(2 * inter * T), act_.resize(inter * T);
      ly.gate_up.apply(h.data(), T, gu_.data(), xq_, team);
      for (int64_t t = 0; t < T; ++t)
        for (int64_t j = 0; j < inter; ++j) {
          const float g = gu_[t * 2 * inter + j];
          act_[t * inter + j] = g / (1.0f + std::exp(-g)) * gu_[t * 2 * inter + inter + j];   // silu(g)·u
        }
      ly.down.apply(act_.data(), T, y.data(), xq_, team);
      if (ly.memory) {
        const Memory& m = *ly.memory;
        mh.resize(m.R), mhh.resize(m.R - m.E);
        for (int64_t t = 0; t < T; ++t)
          memory_row(h.data() + t * D, m.w_in.data_ptr<float>(), m.E ? m.b_gate.data_ptr<float>() : nullptr,
                     m.w_out.data_ptr<float>(), m.expand.data_ptr<int64_t>(), D, m.R, m.E, m.rank, m.floor, mh.data(), mhh.data(),
                     y.data() + t * D, t == T - 1 ? gates.data_ptr<float>() + i * max_e : scratch_gates.data(), team);
      }
      for (int64_t c = 0; c < T * D; ++c) x[c] += y[c];
    }
    rms_row(x.data() + (T - 1) * D, norm_.data_ptr<float>(), D, static_cast<float>(eps_), h.data());
    head_.apply(h.data(), 1, logits.data_ptr<float>(), xq_, team);
  }

  torch::Tensor embed_, norm_;
  double eps_;
  Weight head_;
  torch::Tensor k_, v_, cos_, sin_;
  int64_t n_heads_, D_;
  std::vector<Layer> layers_;
  QuantX xq_;
  std::vector<float> gu_, act_;
};

// ---------------------------------------------------------------------------------------------
// A prompt's causal attention (after any cached positions), in bfloat16 dot products with float32
// accumulation (AVX512-BF16: `vdpbf16ps`), for head size 64. The lab calls it only where the CPU
// has those instructions (backbone.native_bf16) and a long prompt's products are bfloat16
// anyway. Per head and block of 4 query rows: the scores against every key up to the last row
// (64 keys per tile), a softmax over each row (float32), then the weights (bfloat16) times the
// values. Keys are packed as bfloat16 pairs along the head dimension, values as pairs along
// the keys, so each `vdpbf16ps` multiplies 16 keys (or 16 value columns) by one broadcast pair.
#if (defined(__clang__) && __clang_major__ >= 9) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 10)
#define SLEEPLAB_BF16 1   // the compiler knows the avx512bf16 target (GCC 10+, clang 9+)
#endif

#ifdef SLEEPLAB_BF16
namespace {

#define BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,fma")))
constexpr int kAttRows = 4, kAttD = 64, kAttKeys = 64;   // query rows per block, head size, keys per tile

inline uint16_t to_bf16(float f) { return c10::BFloat16(f).x; }   // round to nearest even

inline uint32_t bf16_pair(float lo, float hi) { return to_bf16(lo) | (uint32_t(to_bf16(hi)) << 16); }

BF16_TARGET inline __m512 exp512(__m512 x) {
  // 2^n · p(r): n = round(x · log2 e), r = x − n · ln 2 in two parts, p degree 6 (rel. error ~2e-7)
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  for (float c : {1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

// Scores of kAttRows query rows (bf16 pairs Q [rows][32]) against keys [k0, k0 + 64): S[i][k0 + ...].
BF16_TARGET inline void score_tile(const uint32_t* Q, const uint32_t* Kp, int64_t ld_k, int64_t k0, float* S, int64_t ld_s) {
  __m512 acc[kAttRows][4];
  for (int i = 0; i < kAttRows; ++i)
    for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int d2 = 0; d2 < kAttD / 2; ++d2) {
    __m512i kv[4];
    for (int j = 0; j < 4; ++j) kv[j] = _mm512_loadu_si512(Kp + d2 * ld_k + k0 + 16 * j);
    for (int i = 0; i < kAttRows; ++i) {
      const __m512i q = _mm512_set1_epi32(static_cast<int>(Q[i * (kAttD / 2) + d2]));
      for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], (__m512bh)q, (__m512bh)kv[j]);
    }
  }
  for (int i = 0; i < kAttRows; ++i)
    for (int j = 0; j < 4; ++j) _mm512_storeu_ps(S + i * ld_s + k0 + 16 * j, acc[i][j]);
}

// Softmax of S[0..n) in place as bf16 weights P (pairs, zero from n up to `to`); returns 1 / sum.
BF16_TARGET inline float softmax_row(const float* S, int64_t n, int64_t to, uint16_t* P) {
  __m512 m = _mm512_set1_ps(-INFINITY);
  int64_t c = 0;
  for (; c + 16 <= n; c += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(S + c));
  const __mmask16 tail = static_cast<__mmask16>((1u << (n - c)) - 1);
  if (n > c) m = _mm512_mask_max_ps(m, tail, m, _mm512_maskz_loadu_ps(tail, S + c));
  const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(m));
  __m512 sum = _mm512_setzero_ps();
  for (c = 0; c < to; c += 16) {
    const int64_t left = n - c;
    const __mmask16 keep = left >= 16 ? 0xFFFF : left <= 0 ? 0 : static_cast<__mmask16>((1u << left) - 1);
    const __m512 e = _mm512_maskz_mov_ps(keep, exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(keep, S + c), mx)));
    sum = _mm512_add_ps(sum, e);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(P + c), (__m256i)_mm512_cvtneps_pbh(e));
  }
  return 1.0f / _mm512_reduce_add_ps(sum);
}

// O[i] = Σ_t P[i][t] V[t] for kAttRows rows, over key pairs [0, pairs): scaled by inv[i] into out rows.
BF16_TARGET inline void weigh_values(const uint16_t* P, int64_t ld_p, const uint32_t* Vp, int64_t pairs,
                                     const float* inv, float* out, int64_t ld_out, int rows) {
  __m512 acc[kAttRows][4];
  for (int i = 0; i < kAttRows; ++i)
    for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t t2 = 0; t2 < pairs; ++t2) {
    __m512i v[4];
    for (int j = 0; j < 4; ++j) v[j] = _mm512_loadu_si512(Vp + t2 * kAttD + 16 * j);
    for (int i = 0; i < kAttRows; ++i) {
      uint32_t pair;
      std::memcpy(&pair, P + i * ld_p + 2 * t2, 4);
      const __m512i p = _mm512_set1_epi32(static_cast<int>(pair));
      for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], (__m512bh)p, (__m512bh)v[j]);
    }
  }
  for (int i = 0; i < rows; ++i)
    for (int j = 0; j < 4; ++j) _mm512_storeu_ps(out + i * ld_out + 16 * j, _mm512_mul_ps(acc[i][j], _mm512_set1_ps(inv[i])));
}

// bfloat16 copies for attend_prompt_bf16: Q pairs [H][nb·rows][32] scaled by 1/√64 (rows past T
// zero), K pairs [KV][32][Tk] along the head dimension, V pairs [KV][Tk/2][64] along the keys
// (keys past L zero).
struct AttentionPacks {
  std::vector<uint32_t> Q, K, V;
  AttentionPacks(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, int64_t Tk, int64_t nb) {
    const int64_t H = q.size(0), T = q.size(1), KV = k.size(0), L = k.size(1), half = kAttD / 2;
    Q.assign(H * nb * kAttRows * half, 0), K.assign(KV * half * Tk, 0), V.assign(KV * (Tk / 2) * kAttD, 0);
    const float scale = 1.0f / std::sqrt(static_cast<float>(kAttD));
    const float *Qf = q.data_ptr<float>(), *Kf = k.data_ptr<float>(), *Vf = v.data_ptr<float>();
    at::parallel_for(0, std::max(H, KV) * L, 256, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const int64_t h = i / L, t = i % L;
        if (h < H && t < T) {
          const float* row = Qf + h * q.stride(0) + t * q.stride(1);
          for (int64_t c = 0; c < half; ++c) Q[(h * nb * kAttRows + t) * half + c] = bf16_pair(scale * row[2 * c], scale * row[2 * c + 1]);
        }
        if (h < KV) {
          const float* kr = Kf + h * k.stride(0) + t * k.stride(1);
          for (int64_t c = 0; c < half; ++c) K[(h * half + c) * Tk + t] = bf16_pair(kr[2 * c], kr[2 * c + 1]);
          const float* vr = Vf + h * v.stride(0) + t * v.stride(1);
          uint16_t* vp = reinterpret_cast<uint16_t*>(V.data() + (h * (Tk / 2) + t / 2) * kAttD);
          for (int64_t c = 0; c < kAttD; ++c) vp[2 * c + (t & 1)] = to_bf16(vr[c]);   // (t even, t odd) pairs
        }
      }
    });
  }
};

// the bfloat16 values at p (mask m) as float32: bfloat16 is float32's upper half
BF16_TARGET inline __m512 load_bf16(const uint16_t* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

// silu(g) · u over n columns of bfloat16 g and u, in float32, rounded once to bfloat16
BF16_TARGET void silu_mul_row(const uint16_t* g, const uint16_t* u, int64_t n, uint16_t* out) {
  for (int64_t c = 0; c < n; c += 16) {
    const __mmask16 m = n - c >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - c)) - 1);
    const __m512 x = load_bf16(g + c, m), y = load_bf16(u + c, m);
    const __m512 one = _mm512_set1_ps(1.0f);
    const __m512 sig = _mm512_div_ps(one, _mm512_add_ps(one, exp512(_mm512_sub_ps(_mm512_setzero_ps(), x))));
    const __m256bh r = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_mul_ps(x, sig), y));   // nearest even
    __m256i bits;
    std::memcpy(&bits, &r, sizeof bits);
    _mm256_mask_storeu_epi16(out + c, m, bits);
  }
}

}  // namespace

bool bf16_dot_supported() { return __builtin_cpu_supports("avx512bf16"); }
#else
bool bf16_dot_supported() { return false; }
#endif

// q [H, T, 64] at positions start..start+T-1, k and v [KV, start+T, 64] float32 (the last
// dimension contiguous; rotary applied) → out [T, H, 64] float32: softmax(q kᵀ / 8 + causal mask) v.
torch::Tensor attend_prompt_bf16(torch::Tensor q, torch::Tensor k, torch::Tensor v, int64_t start) {
#ifndef SLEEPLAB_BF16
  TORCH_CHECK(false, "attend_prompt_bf16: built without AVX512-BF16 support");
  return q;
#else
  const int64_t H = q.size(0), T = q.size(1), KV = k.size(0), d = q.size(2), L = start + T;
  TORCH_CHECK(bf16_dot_supported(), "attend_prompt_bf16: this CPU has no AVX512-BF16");
  TORCH_CHECK(d == kAttD && k.size(2) == d && v.sizes() == k.sizes() && k.size(1) == L && start >= 0 && H % KV == 0 &&
              q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1 && q.scalar_type() == torch::kFloat32 &&
              k.scalar_type() == torch::kFloat32 && v.scalar_type() == torch::kFloat32, "attend_prompt_bf16: bad shapes");
  const int64_t Tk = (L + kAttKeys - 1) / kAttKeys * kAttKeys, nb = (T + kAttRows - 1) / kAttRows, half = d / 2;
  const AttentionPacks packs(q, k, v, Tk, nb);
  auto out = torch::empty({T, H, d}, q.options());
  float* O = out.data_ptr<float>();
  // item i: head i % H, row block j = i / H taken from both ends in turn, so that each thread's
  // contiguous share of items holds short and long rows alike (a causal block's cost grows with it)
  at::parallel_for(0, H * nb, 1, [&](int64_t b, int64_t e) {
    std::vector<float> S(kAttRows * Tk);
    std::vector<uint16_t> P(kAttRows * Tk);
    for (int64_t i = b; i < e; ++i) {
      const int64_t h = i % H, j = i / H, g = h / (H / KV);
      const int64_t blk = j % 2 == 0 ? j / 2 : nb - 1 - j / 2, r0 = blk * kAttRows;
      const int rows = static_cast<int>(std::min<int64_t>(kAttRows, T - r0));
      const int64_t keys = start + r0 + rows, tiles = (keys + kAttKeys - 1) / kAttKeys * kAttKeys;
      const uint32_t* Qb = packs.Q.data() + (h * nb * kAttRows + r0) * half;
      for (int64_t k0 = 0; k0 < tiles; k0 += kAttKeys) score_tile(Qb, packs.K.data() + g * half * Tk, Tk, k0, S.data(), Tk);
      float inv[kAttRows] = {0, 0, 0, 0};
      const int64_t to = (keys + 15) / 16 * 16;
      for (int r = 0; r < kAttRows; ++r)   // rows past T: zero weights (their output is not stored)
        inv[r] = r < rows ? softmax_row(S.data() + r * Tk, start + r0 + r + 1, to, P.data() + r * Tk)
                          : (std::fill_n(P.data() + r * Tk, to, uint16_t(0)), 0.0f);
      weigh_values(P.data(), Tk, packs.V.data() + g * (Tk / 2) * d, to / 2, inv, O + (r0 * H + h) * d, H * d, rows);
    }
  });
  return out;
#endif
}

// A long prompt's MLP activation: [.., 2I] bfloat16 = [gate | up] → silu(gate) · up [.., I] bfloat16,
// in one pass rounded once (torch's silu and product: two passes over 3 MB a layer, rounded twice;
// ~1.6 ms a layer at 1,000 tokens on 2 cores, 2026-12-06).
torch::Tensor silu_mul_bf16(torch::Tensor gate_up) {
#ifndef SLEEPLAB_BF16
  TORCH_CHECK(false, "silu_mul_bf16: built without AVX512-BF16 support");
  return gate_up;
#else
  TORCH_CHECK(bf16_dot_supported(), "silu_mul_bf16: this CPU has no AVX512-BF16");
  TORCH_CHECK(gate_up.scalar_type() == torch::kBFloat16 && gate_up.is_contiguous() && gate_up.dim() >= 1 &&
              gate_up.size(-1) % 2 == 0, "silu_mul_bf16: bad shapes");
  const int64_t I = gate_up.size(-1) / 2, rows = gate_up.numel() / std::max<int64_t>(1, 2 * I);
  auto sizes = gate_up.sizes().vec();
  sizes.back() = I;
  auto out = torch::empty(sizes, gate_up.options());
  const uint16_t* G = reinterpret_cast<const uint16_t*>(gate_up.data_ptr<at::BFloat16>());
  uint16_t* O = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  at::parallel_for(0, rows, 8, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) silu_mul_row(G + r * 2 * I, G + r * 2 * I + I, I, O + r * I);
  });
  return out;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("q4_linear", &q4_linear, "x·Wᵀ, W in Q4_1 blocks of 32 (float32 x, AVX2)");
  m.def("attend_one", &attend_one, "one decoding step of attention with rotary embedding and KV cache write");
  m.def("memory_delta", &memory_delta, "the memory path of a MemoryMLP for a few rows");
  m.def("rms_norm", &rms_norm, "RMSNorm of each row (float32, AVX2)");
  m.def("q4_dequant", &q4_dequant, "Q4_1 blocks → float32 [n, k], or bfloat16", py::arg("packed"), py::arg("step"),
        py::arg("lo"), py::arg("bf16") = false);
  m.def("q4_quantize", &q4_quantize, "float32 [n, k] → Q4_1 blocks [packed, step, lo]");
  m.def("q8_quantize", &q8_quantize, "float32 [n, k] → int8 [q, scale per group]");
  m.def("q8_linear", &q8_linear, "x·Wᵀ, W int8 with one scale per row (float32 x, AVX2)");
  m.def("bf16_dot_supported", &bf16_dot_supported, "the CPU has AVX512-BF16 (attend_prompt_bf16 can run)");
  m.def("silu_mul_bf16", &silu_mul_bf16, "silu(gate) · up of bfloat16 [.., 2I] = [gate | up], rounded once (AVX512-BF16)");
  m.def("attend_prompt_bf16", &attend_prompt_bf16, "a prompt's causal attention after `start` cached positions (head size 64, AVX512-BF16)");
  py::class_<DecodePlan>(m, "DecodePlan")
      .def(py::init<torch::Tensor, torch::Tensor, double, std::vector<torch::Tensor>, torch::Tensor, torch::Tensor,
                    torch::Tensor, torch::Tensor, int64_t>())
      .def("add_layer", &DecodePlan::add_layer)
      .def("set_memory", &DecodePlan::set_memory)
      .def("step", &DecodePlan::step, py::arg("tokens"), py::arg("pos"), py::arg("pauses") = 2048,
           py::call_guard<py::gil_scoped_release>());
}
