// Helpers shared by the CPU kernels: compute-dtype block primitives (float32 through the
// multiversioned loops of vec.h, float64 in plain loops with std::exp) and the dropout row mask.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../philox.h"
#include "vec.h"

namespace fusedpeft::cpu {

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

inline float block_max(const float* x, int64_t n) { return max_f32(x, n); }
inline float block_sum(const float* x, int64_t n) { return sum_f32(x, n); }
inline float block_expsum(const float* x, int64_t n, float shift) { return expsum_f32(x, n, shift); }
inline void block_ce_grad(const float* z, float* g, int64_t n, float lse, float c1, float c0) {
  ce_grad_f32(z, g, n, lse, c1, c0);
}

inline double block_max(const double* x, int64_t n) {
  double m = -INFINITY;
  for (int64_t j = 0; j < n; ++j) m = x[j] > m ? x[j] : m;
  return m;
}
inline double block_sum(const double* x, int64_t n) {
  double s = 0.0;
  for (int64_t j = 0; j < n; ++j) s += x[j];
  return s;
}
inline double block_expsum(const double* x, int64_t n, double shift) {
  double s = 0.0;
  for (int64_t j = 0; j < n; ++j) s += std::exp(x[j] - shift);
  return s;
}
inline void block_ce_grad(const double* z, double* g, int64_t n, double lse, double c1, double c0) {
  for (int64_t j = 0; j < n; ++j) g[j] = std::exp(z[j] - lse) * c1 - c0;
}

// out[j] = in[j] * keep[j] / (1 - p): a dropout mask applied, NaN kept where the reference keeps it
// (it multiplies by the 0/1 mask rather than selecting).
template <typename in_t, typename out_t, typename acc_t>
inline void apply_keep(const in_t* in, out_t* out, const uint8_t* keep, acc_t keep_scale, int64_t n) {
  if constexpr (std::is_same_v<in_t, float> && std::is_same_v<out_t, float>) {
    apply_keep_f32(in, out, keep, keep_scale, n);
    return;
  }
  for (int64_t j = 0; j < n; ++j) {
    out[j] = static_cast<out_t>(static_cast<acc_t>(in[j]) * (keep[j] ? keep_scale : acc_t(0)));
  }
}

// out[j] = dropout(x)[row, col0 + j] for j < n in the compute dtype; keep is scratch of n bytes
// (unused for float32 x, dropped in the generator's own pass).
template <typename scalar_t, typename acc_t>
inline void dropped_row(const scalar_t* x, acc_t* out, uint8_t* keep, const DropoutParams& d, int64_t row,
                        int64_t n_cols, int64_t col0, int64_t n) {
  if (!d.active) {
    for (int64_t j = 0; j < n; ++j) out[j] = static_cast<acc_t>(x[j]);
    return;
  }
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
    philox_dropout_f32(x, out, nullptr, static_cast<float>(d.keep_scale), d.k0, d.k1, d.p,
                       dropout_offset(row, n_cols, col0), n);
    return;
  }
  philox_keep(keep, d.k0, d.k1, d.p, dropout_offset(row, n_cols, col0), n);
  apply_keep(x, out, keep, static_cast<acc_t>(d.keep_scale), n);
}

// Elements per parallel task: 32 K (128 KB of fp32) are several microseconds of work, so the cost of
// handing a task to an OpenMP thread (about a microsecond) stays small; a tensor smaller than this
// runs on one thread (at::parallel_for runs serially below one grain).
constexpr int64_t kTaskElements = 1 << 15;

// Rows per parallel task so that a task handles about `work` elements.
inline int64_t grain_rows(int64_t row_elements, int64_t work = kTaskElements) {
  return std::max<int64_t>(1, work / std::max<int64_t>(1, row_elements));
}

}  // namespace fusedpeft::cpu
