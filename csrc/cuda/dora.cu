// DoRA's memory-bound pass on CUDA (docs/contract.md §8), for the dropout-0 backward: one read of
// dY and the saved output Y gives dY * g (the input of dX = (dY g) W + dS A and dS = s (dY g) B,
// cuBLAS through ATen in csrc/cuda/dora_ops.cpp) and the magnitude gradient's numerator
// colsum(dY * Y). One thread per column j over a split of rows: consecutive threads read
// consecutive elements of a row (coalesced); per-split partial sums [splits, D] are summed by
// ATen afterwards (deterministic, no atomics). Bytes 2 N D s read + N D s written; FLOPs 3 N D.
#include "dora.h"
#include "traits.cuh"

namespace fusedpeft::cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void dora_scale_colsum_kernel(const T* __restrict__ gy, const T* __restrict__ y,
                                         const typename Traits<T>::acc* __restrict__ g, T* __restrict__ dyg,
                                         typename Traits<T>::acc* __restrict__ partial, int64_t rows, int64_t D,
                                         int64_t rows_per_split) {
  using A = typename Traits<T>::acc;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (j >= D) return;
  const int64_t t0 = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int64_t t1 = t0 + rows_per_split < rows ? t0 + rows_per_split : rows;
  const A gj = g[j];
  A sum = 0;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t e = t * D + j;
    const A d = Traits<T>::load(gy[e]);
    if (dyg != nullptr) dyg[e] = Traits<T>::store(d * gj);
    if (partial != nullptr) sum += d * Traits<T>::load(y[e]);
  }
  if (partial != nullptr) partial[static_cast<int64_t>(blockIdx.y) * D + j] = sum;
}

template <typename T>
void launch(const void* gy, const void* y, const void* g, void* dyg, void* partial, int64_t rows, int64_t D,
            int64_t splits, int64_t rows_per_split, cudaStream_t stream) {
  using A = typename Traits<T>::acc;
  const dim3 grid(static_cast<unsigned>((D + kThreads - 1) / kThreads), static_cast<unsigned>(splits));
  dora_scale_colsum_kernel<T><<<grid, kThreads, 0, stream>>>(
      static_cast<const T*>(gy), static_cast<const T*>(y), static_cast<const A*>(g), static_cast<T*>(dyg),
      static_cast<A*>(partial), rows, D, rows_per_split);
}

}  // namespace

void launch_dora_scale_colsum(DType dtype, const void* grad_y, const void* y, const void* g, void* dyg, void* partial,
                              int64_t rows, int64_t D, int64_t splits, int64_t rows_per_split, cudaStream_t stream) {
  if (rows == 0 || D == 0) return;
  switch (dtype) {
    case DType::kBFloat16:
      launch<__nv_bfloat16>(grad_y, y, g, dyg, partial, rows, D, splits, rows_per_split, stream);
      break;
    case DType::kHalf:
      launch<__half>(grad_y, y, g, dyg, partial, rows, D, splits, rows_per_split, stream);
      break;
    case DType::kDouble:
      launch<double>(grad_y, y, g, dyg, partial, rows, D, splits, rows_per_split, stream);
      break;
    default:
      launch<float>(grad_y, y, g, dyg, partial, rows, D, splits, rows_per_split, stream);
  }
}

}  // namespace fusedpeft::cuda
