// Hot inner loops of the CPU kernels on contiguous float32 arrays. Each is compiled several
// times (AVX-512, AVX2+FMA, baseline x86-64) and picked at load time (GCC target_clones), so
// one build runs everywhere and vectorises where the CPU allows.
#pragma once

#include <cstdint>

namespace fusedpeft::cpu {

// The widest hand-vectorised path this CPU runs (philox_keep.cpp), capped by FUSEDPEFT_CPU_ISA
// ("avx2" or "scalar"; read once) so tests can reach every path on one machine.
enum class CpuIsa { scalar, avx2, avx512 };
CpuIsa cpu_isa();

// P[i] [R, R] += G[:, i R : (i + 1) R]^T X[:, i R : (i + 1) R] over T rows (G, X float32 rows at
// strides ldg, ldx), i < n_blocks, in gemm_tn.cpp; false (P untouched) when the CPU or
// FUSEDPEFT_CPU_ISA rules out AVX-512.
bool block_diag_tn_accumulate_f32(const float* G, int64_t ldg, const float* X, int64_t ldx, int64_t T,
                                  int64_t n_blocks, int64_t R, float* P);

// keep[j] = (tl.rand(seed, first_offset + j) >= p) for j < n (offsets wrap modulo 2^32), with
// seed = k0 | k1 << 32. Defined in philox_keep.cpp, vectorised by hand (cpu_isa() picks the path).
void philox_keep(uint8_t* keep, uint32_t k0, uint32_t k1, float p, uint32_t first_offset, int64_t n);
// out[j] = x[j] * (kept[j] ? keep_scale : 0) with the mask of philox_keep, which is also written
// to keep unless keep is null; out may alias x.
void philox_dropout_f32(const float* x, float* out, uint8_t* keep, float keep_scale, uint32_t k0, uint32_t k1, float p,
                        uint32_t first_offset, int64_t n);
// The instruction set philox_keep uses: "avx512", "avx2" or "scalar".
const char* philox_keep_isa();
float max_f32(const float* x, int64_t n);
float sum_f32(const float* x, int64_t n);
// sum_j exp(x[j] - shift)
float expsum_f32(const float* x, int64_t n, float shift);
// out[j] = in[j] * (keep[j] ? keep_scale : 0); out may alias in.
void apply_keep_f32(const float* in, float* out, const uint8_t* keep, float keep_scale, int64_t n);
// g[j] = exp(z[j] - lse) * c1 - c0; g may alias z.
void ce_grad_f32(const float* z, float* g, int64_t n, float lse, float c1, float c0);
// DoRA's rank-r gradients over `rows` contiguous rows of dY, Y [rows, D], x [rows, K] and
// S [rows, r], with C = s g B [D, r] (dora_rows.cpp):
//   colsum[j] += sum_t dY[t, j] Y[t, j]             (skipped when colsum is null; Y is then not read)
//   PT[j, q]  += sum_t dY[t, j] S[t, q]   [D, r]     (S^T dY)^T, skipped when null
//   dAT[k, q] += sum_t x[t, k] dS[t, q]   [K, r]     with dS = dY C; skipped when null (x not read)
// dS: scratch of rows * r elements. Written for AVX-512 (groups of eight rows); the rows after
// the last group, and every row without AVX-512, take a plain loop several times slower than
// ATen's GEMMs, so callers check cpu_isa() first.
void dora_rank_grads_f32(const float* dY, const float* Y, const float* x, const float* S, const float* C,
                         int64_t rows, int64_t D, int64_t K, int64_t r, float* colsum, float* PT, float* dAT,
                         float* dS);
// DoRA's merged weight: out[i, :] = g[i] W[i, :] + sum_q C[i, q] A[q, :] with W, out [rows, K]
// (contiguous), C = s g B [rows, r], A [r, K], for the first rows in groups of eight; returns how
// many it did (0 where the CPU or FUSEDPEFT_CPU_ISA rules out AVX-512). dora_rows.cpp.
int64_t dora_merged_rows_f32(const float* W, const float* A, const float* C, const float* g, int64_t rows, int64_t K,
                             int64_t r, float* out);

}  // namespace fusedpeft::cpu
