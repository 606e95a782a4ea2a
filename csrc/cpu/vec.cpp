// Definitions of csrc/cpu/vec.h. No torch headers: this file compiles in a second.
// exp is a Cody-Waite reduction plus a degree-7 Taylor polynomial (error < 1 ulp of float32 in
// the reduced range), written in plain arithmetic so that GCC vectorises it; inputs are clamped
// to [-87, 88], so exp(-inf) gives ~1e-38 instead of 0 (below what any fp32 sum can see).
#include "vec.h"

#include <cmath>
#include <cstring>


#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FP_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FP_MULTIVERSION
#endif

namespace fusedpeft::cpu {
namespace {

inline float fast_exp(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float n = (x * 1.44269504088896341f + magic) - magic;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float poly = 1.0f / 5040.0f;
  poly = poly * r + 1.0f / 720.0f;
  poly = poly * r + 1.0f / 120.0f;
  poly = poly * r + 1.0f / 24.0f;
  poly = poly * r + 1.0f / 6.0f;
  poly = poly * r + 0.5f;
  poly = poly * r + 1.0f;
  poly = poly * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return poly * scale;
}

}  // namespace

FP_MULTIVERSION float max_f32(const float* x, int64_t n) {
  float m = -INFINITY;
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

FP_MULTIVERSION float sum_f32(const float* x, int64_t n) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += x[j];
  return s;
}

FP_MULTIVERSION float expsum_f32(const float* x, int64_t n, float shift) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += fast_exp(x[j] - shift);
  return s;
}

FP_MULTIVERSION void ce_grad_f32(const float* z, float* g, int64_t n, float lse, float c1, float c0) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) g[j] = fast_exp(z[j] - lse) * c1 - c0;
}

FP_MULTIVERSION void apply_keep_f32(const float* in, float* out, const uint8_t* keep, float keep_scale, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) out[j] = in[j] * (keep[j] ? keep_scale : 0.0f);
}

}  // namespace fusedpeft::cpu
