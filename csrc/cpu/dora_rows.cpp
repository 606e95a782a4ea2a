// The DoRA loops of vec.h, for csrc/cpu/dora.cpp.
//
// dora_rank_grads_f32: the rank-r part of DoRA's p = 0 backward without dX, in one pass over dY,
// Y and x. With r on the vector lanes, row j of C = s g B [D, r] and of P^T [D, r] is one vector
// (r <= 16 in fp32; wider r in blocks of 16), so per element dY[t, j] (broadcast) the products are
//   dS[t, :] += dY[t, j] C[j, :]      (dS stays in a register for the whole row)
//   P^T[j, :] += dY[t, j] S[t, :]
// then dA^T[k, :] += x[t, k] dS[t, :]. No horizontal sums; eight rows per pass (10 loads and 1
// store per 16 FMAs), so C and P^T (64 KB each at D = 1024, r = 16) stream from L2 once per eight
// rows. Measured 1.85 ms at 2048 x 1024 -> 1024, r = 16, one thread (2.1 ms before the prefetch of
// the rows ahead and the split FMA chains; ATen's GEMMs per block of rows plus the colsum: 2.4 ms;
// a dot-product form over j, r at a time, vectorised by GCC: 2.7 ms). On the machine it was tuned
// on, an FMA fed by a fresh load ran at about half the rate of one on registers, and the time did
// not change with D from 64 to 1024 (C and P^T in L1 or in L2), so the loads, not L2, bound it.
// FLOPs 2 T r (2 D + K) + 2 T D; bytes (2 D + K) T 4 streamed (dY, Y, x) plus r (2 D + K) 4 from L2.
//
// dora_merged_rows_f32: W'' = g W + C A, eight rows per pass over A (each vector of A feeds eight
// rows); 0.42 ms at 1024 x 1024, r = 16, one thread, against 0.64 for ATen's scaling pass plus addmm_.
#include <cstdint>

#include "vec.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif

namespace fusedpeft::cpu {
namespace {

// Rows t < rows one at a time (any r), dS[t, :] kept in the caller's scratch [rows, r]: a plain
// loop for the rows after the last group of eight.
void rank_grads_rows(const float* dY, const float* Y, const float* x, const float* S, const float* C, int64_t rows,
                     int64_t D, int64_t K, int64_t r, float* colsum, float* PT, float* dAT, float* dS) {
  for (int64_t t = 0; t < rows; ++t) {
    const float* d = dY + t * D;
    if (colsum) {
      const float* y = Y + t * D;
#pragma omp simd
      for (int64_t j = 0; j < D; ++j) colsum[j] += d[j] * y[j];
    }
    float* ds = dS + t * r;
    const float* s = S + t * r;
    for (int64_t q = 0; q < r; ++q) ds[q] = 0;
    for (int64_t j = 0; j < D; ++j) {
      const float dv = d[j];
      const float* c = C + j * r;
      if (dAT) {
#pragma omp simd
        for (int64_t q = 0; q < r; ++q) ds[q] += dv * c[q];
      }
      if (PT) {
        float* p = PT + j * r;
#pragma omp simd
        for (int64_t q = 0; q < r; ++q) p[q] += dv * s[q];
      }
    }
    if (!dAT) continue;
    const float* xr = x + t * K;
    for (int64_t k = 0; k < K; ++k) {
      const float xv = xr[k];
      float* a = dAT + k * r;
#pragma omp simd
      for (int64_t q = 0; q < r; ++q) a[q] += xv * ds[q];
    }
  }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FP_HAVE_X86_SIMD 1

inline __attribute__((target("avx512f"))) __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
}

constexpr int kRows = 8;

// Rows of dY, Y and x ahead of the current group that eight_rows prefetches into L2: without it each
// group's rows (one 4 KB page per row at D = 1024, where the hardware prefetcher stops) start cold.
constexpr int kPrefetchRows = 2 * kRows;

// Eight rows t0 .. t0 + 7, lanes q0 .. q0 + 15 of r (masked by m). ahead_d / ahead_y / ahead_x: the
// kRows rows of dY / Y / x kPrefetchRows after these, prefetched a line per two j (k) steps, or null.
// The P^T and dA^T sums run as two chains of four FMAs (even and odd rows) rather than one of eight.
template <bool kWithP, bool kWithA>
__attribute__((target("avx512f"))) void eight_rows(const float* d, const float* x, const float* S, const float* C,
                                                   int64_t D, int64_t K, int64_t r, int64_t q0, __mmask16 m, float* PT,
                                                   float* dAT, const char* ahead_d, const char* ahead_y,
                                                   const char* ahead_x) {
  constexpr int64_t kBytesPerStep = kRows * sizeof(float);  // kRows rows of D floats over D steps
  __m512 ds[kRows], s[kRows];
#pragma GCC unroll 8
  for (int i = 0; i < kRows; ++i) {
    ds[i] = _mm512_setzero_ps();
    s[i] = _mm512_maskz_loadu_ps(m, S + i * r + q0);
  }
  for (int64_t j = 0; j < D; ++j) {
    if (ahead_d && !(j & 1)) {
      _mm_prefetch(ahead_d + j * kBytesPerStep, _MM_HINT_T1);
      if (ahead_y) _mm_prefetch(ahead_y + j * kBytesPerStep, _MM_HINT_T1);
    }
    const __m512 c = kWithA ? _mm512_maskz_loadu_ps(m, C + j * r + q0) : _mm512_setzero_ps();
    __m512 p_even = kWithP ? _mm512_maskz_loadu_ps(m, PT + j * r + q0) : _mm512_setzero_ps();
    __m512 p_odd = _mm512_setzero_ps();
#pragma GCC unroll 8
    for (int i = 0; i < kRows; i += 2) {
      const __m512 dv_even = _mm512_set1_ps(d[i * D + j]);
      const __m512 dv_odd = _mm512_set1_ps(d[(i + 1) * D + j]);
      if (kWithA) {
        ds[i] = _mm512_fmadd_ps(dv_even, c, ds[i]);
        ds[i + 1] = _mm512_fmadd_ps(dv_odd, c, ds[i + 1]);
      }
      if (kWithP) {
        p_even = _mm512_fmadd_ps(dv_even, s[i], p_even);
        p_odd = _mm512_fmadd_ps(dv_odd, s[i + 1], p_odd);
      }
    }
    if (kWithP) _mm512_mask_storeu_ps(PT + j * r + q0, m, _mm512_add_ps(p_even, p_odd));
  }
  if (!kWithA) return;
  for (int64_t k = 0; k < K; ++k) {
    if (ahead_x && !(k & 1)) _mm_prefetch(ahead_x + k * kBytesPerStep, _MM_HINT_T1);
    __m512 a_even = _mm512_maskz_loadu_ps(m, dAT + k * r + q0), a_odd = _mm512_setzero_ps();
#pragma GCC unroll 8
    for (int i = 0; i < kRows; i += 2) {
      a_even = _mm512_fmadd_ps(_mm512_set1_ps(x[i * K + k]), ds[i], a_even);
      a_odd = _mm512_fmadd_ps(_mm512_set1_ps(x[(i + 1) * K + k]), ds[i + 1], a_odd);
    }
    _mm512_mask_storeu_ps(dAT + k * r + q0, m, _mm512_add_ps(a_even, a_odd));
  }
}

// Groups of eight rows; returns how many rows it did (a multiple of eight).
__attribute__((target("avx512f"))) int64_t rank_grads_avx512(const float* dY, const float* Y, const float* x,
                                                             const float* S, const float* C, int64_t rows, int64_t D,
                                                             int64_t K, int64_t r, float* colsum, float* PT,
                                                             float* dAT) {
  int64_t t0 = 0;
  for (; t0 + kRows <= rows; t0 += kRows) {
    const float* d = dY + t0 * D;
    if (colsum) {
      const float* y = Y + t0 * D;
      for (int64_t j = 0; j < D; j += 16) {
        const __mmask16 m = tail_mask(D - j);
        __m512 c = _mm512_maskz_loadu_ps(m, colsum + j);
#pragma GCC unroll 8
        for (int i = 0; i < kRows; ++i)
          c = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, d + i * D + j), _mm512_maskz_loadu_ps(m, y + i * D + j), c);
        _mm512_mask_storeu_ps(colsum + j, m, c);
      }
    }
    const float* xr = dAT ? x + t0 * K : nullptr;
    const bool ahead = t0 + kPrefetchRows + kRows <= rows;
    for (int64_t q0 = 0; q0 < r; q0 += 16) {
      const __mmask16 m = tail_mask(r - q0);
      const float* s = S + t0 * r;
      const bool fetch = ahead && q0 == 0;
      const char* ahead_d = fetch ? reinterpret_cast<const char*>(d + kPrefetchRows * D) : nullptr;
      const char* ahead_y = fetch && colsum ? reinterpret_cast<const char*>(Y + (t0 + kPrefetchRows) * D) : nullptr;
      const char* ahead_x = fetch && xr ? reinterpret_cast<const char*>(xr + kPrefetchRows * K) : nullptr;
      if (PT && dAT) {
        eight_rows<true, true>(d, xr, s, C, D, K, r, q0, m, PT, dAT, ahead_d, ahead_y, ahead_x);
      } else if (PT) {
        eight_rows<true, false>(d, xr, s, C, D, K, r, q0, m, PT, dAT, ahead_d, ahead_y, ahead_x);
      } else if (dAT) {
        eight_rows<false, true>(d, xr, s, C, D, K, r, q0, m, PT, dAT, ahead_d, ahead_y, ahead_x);
      }
    }
  }
  return t0;
}

// out = g W + C A, eight rows by two vectors of K (32 columns) per step: each vector of A feeds eight
// FMAs and each broadcast of C two (four rows by one vector: 0.49 ms against 0.42 at 1024 x 1024,
// r = 16, one thread; prefetching the next rows of W made it slower). Returns how many rows it did
// (a multiple of eight).
__attribute__((target("avx512f"))) int64_t merged_rows_avx512(const float* W, const float* A, const float* C,
                                                              const float* g, int64_t rows, int64_t K, int64_t r,
                                                              float* out) {
  constexpr int kRowsM = 8;
  int64_t i0 = 0;
  for (; i0 + kRowsM <= rows; i0 += kRowsM) {
    const float* c = C + i0 * r;
    for (int64_t k = 0; k < K; k += 32) {
      const __mmask16 m_lo = tail_mask(K - k), m_hi = tail_mask(K - k > 16 ? K - k - 16 : 0);
      __m512 lo[kRowsM], hi[kRowsM];
#pragma GCC unroll 8
      for (int i = 0; i < kRowsM; ++i) {
        const __m512 gi = _mm512_set1_ps(g[i0 + i]);
        lo[i] = _mm512_mul_ps(gi, _mm512_maskz_loadu_ps(m_lo, W + (i0 + i) * K + k));
        hi[i] = _mm512_mul_ps(gi, _mm512_maskz_loadu_ps(m_hi, W + (i0 + i) * K + k + 16));
      }
      for (int64_t q = 0; q < r; ++q) {
        const __m512 a_lo = _mm512_maskz_loadu_ps(m_lo, A + q * K + k);
        const __m512 a_hi = _mm512_maskz_loadu_ps(m_hi, A + q * K + k + 16);
#pragma GCC unroll 8
        for (int i = 0; i < kRowsM; ++i) {
          const __m512 ci = _mm512_set1_ps(c[i * r + q]);
          lo[i] = _mm512_fmadd_ps(ci, a_lo, lo[i]);
          hi[i] = _mm512_fmadd_ps(ci, a_hi, hi[i]);
        }
      }
#pragma GCC unroll 8
      for (int i = 0; i < kRowsM; ++i) {
        _mm512_mask_storeu_ps(out + (i0 + i) * K + k, m_lo, lo[i]);
        _mm512_mask_storeu_ps(out + (i0 + i) * K + k + 16, m_hi, hi[i]);
      }
    }
  }
  return i0;
}
#endif

}  // namespace

void dora_rank_grads_f32(const float* dY, const float* Y, const float* x, const float* S, const float* C,
                         int64_t rows, int64_t D, int64_t K, int64_t r, float* colsum, float* PT, float* dAT,
                         float* dS) {
  int64_t done = 0;
#ifdef FP_HAVE_X86_SIMD
  if (cpu_isa() == CpuIsa::avx512) done = rank_grads_avx512(dY, Y, x, S, C, rows, D, K, r, colsum, PT, dAT);
#endif
  if (done < rows) {
    rank_grads_rows(dY + done * D, Y ? Y + done * D : nullptr, x ? x + done * K : nullptr, S + done * r, C,
                    rows - done, D, K, r, colsum, PT, dAT, dS);
  }
}

int64_t dora_merged_rows_f32(const float* W, const float* A, const float* C, const float* g, int64_t rows, int64_t K,
                             int64_t r, float* out) {
#ifdef FP_HAVE_X86_SIMD
  if (cpu_isa() == CpuIsa::avx512) return merged_rows_avx512(W, A, C, g, rows, K, r, out);
#endif
  return 0;
}

}  // namespace fusedpeft::cpu
