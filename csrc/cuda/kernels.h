// Launchers of the CUDA kernels (csrc/cuda/kernels.cu). Plain pointers and sizes, no torch
// types: kernels.cu includes no torch header, so nvcc compiles it in seconds per architecture;
// csrc/cuda/ops_cuda.cpp checks the tensors and calls these on the current stream.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace fusedpeft::cuda {

enum class DType { kHalf, kBFloat16, kFloat, kDouble };

struct Dropout {
  uint32_t k0, k1;
  float p;
  double keep_scale;
  bool active;
};

struct CeOptions {
  double label_smoothing, z_loss, softcap;
};

// acc = float32, or float64 when dtype is kDouble ("compute dtype"). logits/grad in dtype.
void launch_ce_forward(DType dtype, const void* logits, const int64_t* labels, const void* row_scale, void* loss,
                       void* lse, int64_t rows, int64_t vocab, CeOptions o, cudaStream_t stream);
// grad = d(scale l)/dlogits; lse_in given (backward) or computed (loss_out written): grad may alias logits.
void launch_ce_grad(DType dtype, const void* logits, void* grad, const int64_t* labels, const void* scale,
                    const void* lse_in, void* loss_out, int64_t rows, int64_t vocab, CeOptions o,
                    cudaStream_t stream);

// S [N, r] (dtype) = dropout(x) @ A^T, A [r, K] in the compute dtype.
void launch_lora_shrink(DType dtype, const void* x, const void* A, void* S, int64_t rows, int64_t K, int64_t r,
                        Dropout d, cudaStream_t stream);
// grad_x [N, K] (dtype, may be null) = dropout'(gS @ A); grad_A [r, K] (compute dtype, zeroed by
// the caller, may be null) += gS^T @ dropout(x). gS [N, r] in the compute dtype.
void launch_lora_shrink_backward(DType dtype, const void* x, const void* gS, const void* A, void* grad_x, void* grad_A,
                                 int64_t rows, int64_t K, int64_t r, Dropout d, cudaStream_t stream);

struct MoraGeom {
  int64_t K, D, R, type, pad, n_chunks;
};
// z [N, width] compute dtype from x [N, K] (dtype); cos/sin [n, R] float32 for type 6.
void launch_mora_compress(DType dtype, const void* x, void* z, const float* cos, const float* sin, int64_t rows,
                          MoraGeom g, Dropout d, cudaStream_t stream);
void launch_mora_compress_backward(DType dtype, const void* gz, void* grad_x, const float* cos, const float* sin,
                                   int64_t rows, MoraGeom g, Dropout d, cudaStream_t stream);
// y [N, D] (dtype) = bias + decompress(ys [N, width]); bias in the compute dtype or null.
void launch_mora_decompress(DType dtype, const void* ys, const void* bias, void* y, int64_t rows, int64_t width,
                            MoraGeom g, cudaStream_t stream);
// h [N, width] (compute dtype) = decompress^T(grad_y [N, D] in dtype).
void launch_mora_decompress_backward(DType dtype, const void* gy, void* h, int64_t rows, int64_t width, MoraGeom g,
                                     cudaStream_t stream);

// out [numel] (out_dtype: float, bf16 or half) = a bitsandbytes 4-bit weight dequantized, bit-exact
// (csrc/cuda/dequant_4bit.cu). absmax: float [blocks], or uint8 codes with code2 [256] / absmax2 /
// offset when code2 is not null (double quantization).
void launch_dequant_4bit(DType out_dtype, const uint8_t* packed, const float* code, const void* absmax,
                         const float* code2, const float* absmax2, float offset, int64_t n_bytes, int64_t numel,
                         int64_t blocksize, int64_t blocksize2, void* out, cudaStream_t stream);

}  // namespace fusedpeft::cuda
