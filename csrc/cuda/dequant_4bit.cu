// dequantize_4bit (CUDA): a bitsandbytes NF4 / FP4 weight back to a dense matrix, bit for bit what
// bitsandbytes.functional.dequantize_4bit returns (layout: fusedpeft/quantized.py). Memory-bound:
// one thread per packed byte (two outputs), the 16-entry code book in shared memory; the product
// code * absmax in fp32 rounded once to the output dtype (nearest even); double-quantized scales
// decoded as code2[a] * absmax2[b / blocksize2] + offset with explicit round-to-nearest fp32
// intrinsics, so nvcc cannot contract them into one FMA (bitsandbytes rounds twice).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kernels.h"

namespace fusedpeft::cuda {
namespace {

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

template <typename T>
__global__ void dequant_4bit_kernel(const uint8_t* packed, const float* code, const void* absmax, const float* code2,
                                    const float* absmax2, float offset, int64_t n_bytes, int64_t numel,
                                    int64_t blocksize, int64_t blocksize2, T* out) {
  __shared__ float table[16];
  if (threadIdx.x < 16) table[threadIdx.x] = code[threadIdx.x];
  __syncthreads();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n_bytes; i += stride) {
    const uint8_t b = packed[i];
    const int64_t block = (2 * i) / blocksize;  // blocksize is even: both codes of a byte share it
    float scale;
    if (code2 != nullptr) {
      const uint8_t a = static_cast<const uint8_t*>(absmax)[block];
      scale = __fadd_rn(__fmul_rn(code2[a], absmax2[block / blocksize2]), offset);
    } else {
      scale = static_cast<const float*>(absmax)[block];
    }
    out[2 * i] = from_float<T>(__fmul_rn(table[b >> 4], scale));
    if (2 * i + 1 < numel) out[2 * i + 1] = from_float<T>(__fmul_rn(table[b & 15], scale));
  }
}

template <typename T>
void launch(const uint8_t* packed, const float* code, const void* absmax, const float* code2, const float* absmax2,
            float offset, int64_t n_bytes, int64_t numel, int64_t blocksize, int64_t blocksize2, void* out,
            cudaStream_t stream) {
  constexpr int kThreads = 256;
  const int64_t blocks = (n_bytes + kThreads - 1) / kThreads;
  const int grid = static_cast<int>(blocks < 65535 * 8 ? blocks : 65535 * 8);
  dequant_4bit_kernel<T><<<grid, kThreads, 0, stream>>>(packed, code, absmax, code2, absmax2, offset, n_bytes, numel,
                                                       blocksize, blocksize2, static_cast<T*>(out));
}

}  // namespace

void launch_dequant_4bit(DType out_dtype, const uint8_t* packed, const float* code, const void* absmax,
                         const float* code2, const float* absmax2, float offset, int64_t n_bytes, int64_t numel,
                         int64_t blocksize, int64_t blocksize2, void* out, cudaStream_t stream) {
  if (n_bytes == 0) return;
  switch (out_dtype) {
    case DType::kBFloat16:
      launch<__nv_bfloat16>(packed, code, absmax, code2, absmax2, offset, n_bytes, numel, blocksize, blocksize2, out,
                            stream);
      break;
    case DType::kHalf:
      launch<__half>(packed, code, absmax, code2, absmax2, offset, n_bytes, numel, blocksize, blocksize2, out, stream);
      break;
    default:
      launch<float>(packed, code, absmax, code2, absmax2, offset, n_bytes, numel, blocksize, blocksize2, out, stream);
  }
}

}  // namespace fusedpeft::cuda
