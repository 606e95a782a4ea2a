// block_diag_tn_accumulate_f32 of vec.h: the diagonal R x R blocks of G^T X, what MoRA type 6's
// dM is made of (csrc/cpu/mora_rope.cpp), written for AVX-512 because MKL runs these shapes
// (R x R outputs, R ~ 128, from [N, R] column blocks of x and dY) at ~60 % of its big-GEMM speed.
//
// 64 rows at a time, both operands are copied row by row (so x and dY stream in order) into
// zero-padded panels (G: 12 columns wide, X: 32); the micro-kernel keeps a 12 x 32 block of P in
// 24 zmm accumulators and does 24 FMAs per row against 12 broadcasts and 2 loads. (Block by block
// over all N rows instead, the 4 KB-strided column blocks thrash the TLB and the L1 sets.)
// Measured on the Zen 4 dev VM, one thread: 93 GFLOP/s in the kernel (peak 117), 70 with packing.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "vec.h"

namespace fusedpeft::cpu {
namespace {

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FP_HAVE_X86_SIMD 1

constexpr int kTileA = 12, kTileB = 32;

// For each of n_blocks column blocks of width R: panels [block][panel][rows][width] =
// src[t, block R + panel width + l], zero past the block. Row by row, so src streams in order.
__attribute__((target("avx512f"))) void pack_panels(const float* src, int64_t ld, int64_t rows, int64_t n_blocks,
                                                    int64_t R, int64_t width, float* dst) {
  const int64_t n_panels = (R + width - 1) / width;
  for (int64_t t = 0; t < rows; ++t) {
    const float* row = src + t * ld;
    for (int64_t b = 0; b < n_blocks; ++b) {
      for (int64_t p = 0; p < n_panels; ++p) {
        float* out = dst + ((b * n_panels + p) * rows + t) * width;
        for (int64_t w0 = 0; w0 < width; w0 += 16) {
          const int64_t valid = std::clamp<int64_t>(R - p * width - w0, 0, 16);
          const __mmask16 load_mask = static_cast<__mmask16>((1u << valid) - 1);
          const __mmask16 store_mask = static_cast<__mmask16>((1u << std::min<int64_t>(16, width - w0)) - 1);
          _mm512_mask_storeu_ps(out + w0, store_mask, _mm512_maskz_loadu_ps(load_mask, row + b * R + p * width + w0));
        }
      }
    }
  }
}

// P[a, 0:32] += sum_t g[t, a] x[t, 0:32] for a < n_rows, columns masked by m0 | m1 << 16.
__attribute__((target("avx512f"))) void tile(const float* g, const float* x, int64_t T, float* P, int64_t ldp,
                                             int64_t n_rows, __mmask16 m0, __mmask16 m1) {
  __m512 acc0[kTileA], acc1[kTileA];
#pragma GCC unroll 12
  for (int a = 0; a < kTileA; ++a) acc0[a] = acc1[a] = _mm512_setzero_ps();
  for (int64_t t = 0; t < T; ++t) {
    const __m512 x0 = _mm512_loadu_ps(x + t * kTileB);
    const __m512 x1 = _mm512_loadu_ps(x + t * kTileB + 16);
#pragma GCC unroll 12
    for (int a = 0; a < kTileA; ++a) {
      const __m512 ga = _mm512_set1_ps(g[t * kTileA + a]);
      acc0[a] = _mm512_fmadd_ps(ga, x0, acc0[a]);
      acc1[a] = _mm512_fmadd_ps(ga, x1, acc1[a]);
    }
  }
#pragma GCC unroll 12
  for (int a = 0; a < kTileA; ++a) {
    if (a >= n_rows) break;
    float* p = P + a * ldp;
    _mm512_mask_storeu_ps(p, m0, _mm512_add_ps(_mm512_maskz_loadu_ps(m0, p), acc0[a]));
    _mm512_mask_storeu_ps(p + 16, m1, _mm512_add_ps(_mm512_maskz_loadu_ps(m1, p + 16), acc1[a]));
  }
}

__attribute__((target("avx512f"))) void accumulate(const float* G, int64_t ldg, const float* X, int64_t ldx,
                                                   int64_t T, int64_t n_blocks, int64_t R, float* P) {
  constexpr int64_t kRows = 64;  // rows packed at a time: both operands' panels stay in L2
  const int64_t a_panels = (R + kTileA - 1) / kTileA, b_panels = (R + kTileB - 1) / kTileB;
  thread_local std::vector<float> g_panels, x_panels;
  g_panels.resize(n_blocks * a_panels * kRows * kTileA);
  x_panels.resize(n_blocks * b_panels * kRows * kTileB);
  for (int64_t t0 = 0; t0 < T; t0 += kRows) {
    const int64_t rows = std::min(kRows, T - t0);
    pack_panels(G + t0 * ldg, ldg, rows, n_blocks, R, kTileA, g_panels.data());
    pack_panels(X + t0 * ldx, ldx, rows, n_blocks, R, kTileB, x_panels.data());
    for (int64_t b = 0; b < n_blocks; ++b) {
      float* Pb = P + b * R * R;
      for (int64_t j = 0; j < b_panels; ++j) {  // X's panel stays in L1 while G's panels stream past it
        const int64_t cols = std::min<int64_t>(kTileB, R - j * kTileB);
        const __mmask16 m0 = static_cast<__mmask16>((1u << std::min<int64_t>(cols, 16)) - 1);
        const __mmask16 m1 = static_cast<__mmask16>((1u << std::max<int64_t>(cols - 16, 0)) - 1);
        const float* xp = x_panels.data() + (b * b_panels + j) * rows * kTileB;
        for (int64_t i = 0; i < a_panels; ++i) {
          tile(g_panels.data() + (b * a_panels + i) * rows * kTileA, xp, rows, Pb + i * kTileA * R + j * kTileB, R,
               R - i * kTileA, m0, m1);
        }
      }
    }
  }
}
#endif

}  // namespace

bool block_diag_tn_accumulate_f32(const float* G, int64_t ldg, const float* X, int64_t ldx, int64_t T,
                                  int64_t n_blocks, int64_t R, float* P) {
#ifdef FP_HAVE_X86_SIMD
  if (cpu_isa() == CpuIsa::avx512) {
    accumulate(G, ldg, X, ldx, T, n_blocks, R, P);
    return true;
  }
#endif
  return false;
}

}  // namespace fusedpeft::cpu
