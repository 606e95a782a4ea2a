// docs/contract.md §5 dropout randomness, shared by the CPU (csrc/cpu) and CUDA (csrc/cuda) kernels.
//
// u(seed, offset) = Triton's tl.rand(seed, offset) for a 32-bit offset, bit for bit:
// Philox4x32-10 with key (seed low word, seed high word) and counter (offset, 0, 0, 0); the
// first output word w read as int32, negatives folded (x -> -x - 1), u = float(x) * 4.6566127342e-10f.
// Element (m, j) of the 2-D view x[M, K] uses offset (m * K + j) mod 2^32 and is kept when u >= p.
// Cost: 10 rounds of two 32x32->64 multiplies and four xors, about 60 integer operations.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FP_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FP_HOST_DEVICE inline
#endif

namespace fusedpeft {

constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr float kUniformScale = 4.6566127342e-10f;

// First output word of Philox4x32-10 for key (k0, k1) and counter (c0, 0, 0, 0).
FP_HOST_DEVICE uint32_t philox_first_word(uint32_t k0, uint32_t k1, uint32_t c0) {
  uint32_t c1 = 0, c2 = 0, c3 = 0;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint64_t prod_b = static_cast<uint64_t>(kPhiloxRoundB) * c2;
    const uint64_t prod_a = static_cast<uint64_t>(kPhiloxRoundA) * c0;
    const uint32_t n0 = static_cast<uint32_t>(prod_b >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(prod_a >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(prod_b);
    c3 = static_cast<uint32_t>(prod_a);
    c0 = n0;
    c2 = n2;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return c0;
}

// tl.rand(seed, offset): uniform float in [0, 1).
FP_HOST_DEVICE float philox_uniform(uint32_t k0, uint32_t k1, uint32_t offset) {
  const int32_t word = static_cast<int32_t>(philox_first_word(k0, k1, offset));
  const int32_t folded = word < 0 ? -word - 1 : word;
  return static_cast<float>(folded) * kUniformScale;
}

// The dropout state of one call: key words, threshold and the multiplier of kept elements.
struct DropoutParams {
  uint32_t k0;
  uint32_t k1;
  float p;           // keep when u >= p (p compared in float32, as tl.rand's result is)
  double keep_scale; // 1 / (1 - p)
  bool active;       // p > 0
};

inline DropoutParams make_dropout(double p, int64_t seed) {
  const uint64_t s = static_cast<uint64_t>(seed);
  return DropoutParams{static_cast<uint32_t>(s & 0xFFFFFFFFu), static_cast<uint32_t>(s >> 32),
                       static_cast<float>(p), p > 0.0 ? 1.0 / (1.0 - p) : 1.0, p > 0.0};
}

// Philox counter of element (row, col) of an [M, K] input: (row * K + col) mod 2^32.
FP_HOST_DEVICE uint32_t dropout_offset(int64_t row, int64_t n_cols, int64_t col) {
  return static_cast<uint32_t>(static_cast<uint64_t>(row) * static_cast<uint64_t>(n_cols) +
                               static_cast<uint64_t>(col));
}

}  // namespace fusedpeft
