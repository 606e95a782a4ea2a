// dequantize_4bit (CPU): a bitsandbytes NF4 / FP4 weight back to a dense matrix, bit for bit what
// bitsandbytes.functional.dequantize_4bit returns (fp32 product code[q] * absmax, then rounded to
// the output dtype to nearest even). The layout (fusedpeft/quantized.py): byte i holds element 2i
// in its high nibble and 2i + 1 in its low one; one scale per `blocksize` elements, fp32, or with
// double quantization a uint8 code decoded as code2[a] * absmax2[b / blocksize2] + offset.
//
// Memory-bound: it reads n / 2 bytes and writes n outputs. Blocks are split over the OpenMP
// threads; the AVX-512 path turns 16 bytes into 32 fp32 outputs with two 16-entry table lookups
// (vpermps on the code book held in one register), one multiply and two interleaving permutes.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <vector>

#ifdef __x86_64__
#include <immintrin.h>
#endif

#include "../dequant_4bit.h"
#include "vec.h"

namespace fusedpeft::cpu {
namespace {

constexpr const char* kOp = "fusedpeft_C::dequantize_4bit";

// code2[a] * absmax2[b / blocksize2] + offset in two fp32 roundings, as bitsandbytes computes it
// (dequantize_blockwise, then += offset): no fused multiply-add.
__attribute__((optimize("fp-contract=off"))) void decode_nested(const uint8_t* codes, const float* code2,
                                                                 const float* absmax2, int64_t blocksize2, float offset,
                                                                 int64_t n_blocks, float* out) {
  for (int64_t b = 0; b < n_blocks; ++b) {
    volatile float product = code2[codes[b]] * absmax2[b / blocksize2];
    out[b] = product + offset;
  }
}

// out[j] = code[q_j] * scale (fp32) for the n elements packed in bytes (n even except at the end).
void block_scalar(const uint8_t* bytes, const float* code, float scale, int64_t n, float* out) {
  for (int64_t j = 0; j < n; ++j) {
    const uint8_t b = bytes[j >> 1];
    out[j] = code[(j & 1) ? (b & 0xF) : (b >> 4)] * scale;
  }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FP_HAVE_DEQUANT_AVX512 1
__attribute__((target("avx512f"))) void block_avx512(const uint8_t* bytes, const float* code, float scale, int64_t n,
                                                     float* out) {
  const __m512 table = _mm512_loadu_ps(code);
  const __m512 s = _mm512_set1_ps(scale);
  const __m512i lo_mask = _mm512_set1_epi32(0xF);
  // interleave hi[i], lo[i]: the first 16 outputs take hi/lo 0-7, the next 16 hi/lo 8-15
  const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i second = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + j / 2)));
    const __m512 hi = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), table), s);
    const __m512 lo = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_and_si512(b, lo_mask), table), s);
    _mm512_storeu_ps(out + j, _mm512_permutex2var_ps(hi, first, lo));
    _mm512_storeu_ps(out + j + 16, _mm512_permutex2var_ps(hi, second, lo));
  }
  block_scalar(bytes + j / 2, code, scale, n - j, out + j);
}
#endif

using BlockFn = void (*)(const uint8_t*, const float*, float, int64_t, float*);

BlockFn block_fn() {
#ifdef FP_HAVE_DEQUANT_AVX512
  if (cpu_isa() == CpuIsa::avx512) return block_avx512;
#endif
  return block_scalar;
}

template <typename out_t>
void dequantize(const uint8_t* packed, const float* code, const float* absmax, int64_t blocksize, int64_t numel,
                out_t* out) {
  const int64_t n_blocks = (numel + blocksize - 1) / blocksize;
  const BlockFn fn = block_fn();
  // enough blocks per task to amortise the scheduling (~64 KB of output)
  const int64_t grain = std::max<int64_t>(1, 16384 / blocksize);
  at::parallel_for(0, n_blocks, grain, [&](int64_t b0, int64_t b1) {
    std::vector<float> buffer;
    if constexpr (!std::is_same_v<out_t, float>) buffer.resize(blocksize);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * blocksize, n = std::min(blocksize, numel - start);
      if constexpr (std::is_same_v<out_t, float>) {
        fn(packed + start / 2, code, absmax[b], n, out + start);
      } else {
        fn(packed + start / 2, code, absmax[b], n, buffer.data());
        for (int64_t j = 0; j < n; ++j) out[start + j] = static_cast<out_t>(buffer[j]);  // round to nearest even
      }
    }
  });
}

at::Tensor dequantize_4bit(const at::Tensor& packed, const at::Tensor& code, const at::Tensor& absmax,
                           const std::optional<at::Tensor>& code2, const std::optional<at::Tensor>& absmax2,
                           double offset, int64_t blocksize, int64_t blocksize2, int64_t numel,
                           at::ScalarType dtype) {
  check_dequant_4bit_args(kOp, packed, code, absmax, code2, absmax2, blocksize, blocksize2, numel, dtype);
  const int64_t n_blocks = (numel + blocksize - 1) / blocksize;
  const bool nested = code2.has_value();
  at::Tensor scales;
  if (nested) {
    scales = at::empty({n_blocks}, absmax.options().dtype(at::kFloat));
    const at::Tensor c2 = code2->contiguous(), a2 = absmax2->contiguous(), a = absmax.contiguous();
    decode_nested(a.data_ptr<uint8_t>(), c2.data_ptr<float>(), a2.data_ptr<float>(), blocksize2,
                  static_cast<float>(offset), n_blocks, scales.data_ptr<float>());
  } else {
    scales = absmax.contiguous();
  }
  const at::Tensor bytes = packed.contiguous(), table = code.contiguous();
  at::Tensor out = at::empty({numel}, packed.options().dtype(dtype));
  const uint8_t* p = bytes.data_ptr<uint8_t>();
  const float* c = table.data_ptr<float>();
  const float* s = scales.data_ptr<float>();
  if (dtype == at::kFloat) {
    dequantize(p, c, s, blocksize, numel, out.data_ptr<float>());
  } else if (dtype == at::kBFloat16) {
    dequantize(p, c, s, blocksize, numel, out.data_ptr<at::BFloat16>());
  } else {
    dequantize(p, c, s, blocksize, numel, out.data_ptr<at::Half>());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedpeft_C, CPU, m) { m.impl("dequantize_4bit", &dequantize_4bit); }

}  // namespace fusedpeft::cpu
