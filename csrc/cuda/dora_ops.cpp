// CUDA implementation of fusedpeft_C::dora_backward_p0 (schema: csrc/ops.cpp; the CPU one is
// csrc/cpu/dora.cpp), DoRA's backward without dropout (docs/contract.md §8), g = m / n, s = scaling:
//   dYg = dY * g and colsum(dY * Y)     one pass over dY and Y (csrc/cuda/dora.cu; dYg only with dX,
//                                       else dS = dY (s g B))
//   dS = dYg (s B) [N, r];  dX = dYg W + dS A;  dA = dS^T x;  dB = s g * (S^T dY)^T    cuBLAS via ATen
// Same checks, outputs and dtypes as the CPU kernel: grad_x in dY's dtype; grad_A, grad_B and the
// colsum in the compute dtype (fp32, fp64 for fp64). dYg is one [N, D] temporary in dY's dtype,
// freed on return; no host sync.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../dora.h"
#include "dora.h"

namespace fusedpeft::cuda {
namespace {

constexpr int64_t kColumnsPerBlock = 256;  // dora.cu's threads per block
constexpr int64_t kTargetBlocks = 1024;    // enough blocks in flight for any current GPU

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dora_backward_p0(
    const at::Tensor& grad_y_in, const at::Tensor& out_in, const at::Tensor& x_in, const at::Tensor& weight,
    const at::Tensor& S_in, const at::Tensor& A_in, const at::Tensor& B_in, const at::Tensor& g_in, double scaling,
    bool need_x, bool need_A, bool need_B, bool need_g) {
  check_dora_backward_p0_args("fusedpeft_C::dora_backward_p0", grad_y_in, out_in, x_in, weight, S_in, A_in, B_in,
                              g_in);
  const c10::cuda::CUDAGuard guard(grad_y_in.device());
  const int64_t rows = grad_y_in.size(0), D = grad_y_in.size(1);
  const auto dtype = grad_y_in.scalar_type();
  const auto acc = compute_dtype(dtype);
  const auto acc_opts = grad_y_in.options().dtype(acc);
  const auto grad_y = grad_y_in.contiguous();
  const auto g = g_in.to(acc).contiguous();
  const bool need_S = need_x || need_A;
  const auto none = grad_y.new_empty({0});

  const int64_t col_blocks = std::max<int64_t>(1, (D + kColumnsPerBlock - 1) / kColumnsPerBlock);
  const int64_t max_splits = std::max<int64_t>(1, (rows + 31) / 32);
  const int64_t want = std::min<int64_t>(max_splits, std::max<int64_t>(1, kTargetBlocks / col_blocks));
  const int64_t rows_per_split = std::max<int64_t>(1, (rows + want - 1) / want);
  const int64_t splits = std::max<int64_t>(1, (rows + rows_per_split - 1) / rows_per_split);
  const auto out = need_g ? out_in.to(dtype).contiguous() : none;
  auto partial = need_g ? at::zeros({splits, D}, acc_opts) : none;
  auto dyg = need_x ? at::empty_like(grad_y) : none;  // without dX: dS = dY (s g B), no dY * g
  if (need_g || need_x) {
    const DType dt = dtype == at::kBFloat16 ? DType::kBFloat16
                     : dtype == at::kHalf   ? DType::kHalf
                     : dtype == at::kDouble ? DType::kDouble
                                            : DType::kFloat;
    launch_dora_scale_colsum(dt, grad_y.data_ptr(), need_g ? out.data_ptr() : nullptr, g.data_ptr(),
                             need_x ? dyg.data_ptr() : nullptr, need_g ? partial.data_ptr() : nullptr, rows, D, splits,
                             rows_per_split, c10::cuda::getCurrentCUDAStream().stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  auto colsum = need_g ? partial.sum(0) : none;
  auto grad_x = none, grad_A = none, grad_B = none;
  if (need_S) {
    const auto B_s = B_in.to(acc).mul(scaling);
    const auto dS = need_x ? at::mm(dyg, B_s.to(dtype)) : at::mm(grad_y, B_s.mul(g.unsqueeze(1)).to(dtype));  // [N, r]
    if (need_A) grad_A = at::mm(dS.t(), x_in.to(dtype)).to(acc);
    if (need_x) grad_x = at::mm(dyg, weight.to(dtype)).addmm_(dS, A_in.to(dtype));
  }
  if (need_B) grad_B = at::mm(S_in.to(dtype).t(), grad_y).t().to(acc).mul(g.unsqueeze(1)).mul_(scaling).contiguous();
  return {grad_x, grad_A, grad_B, colsum};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedpeft_C, CUDA, m) { m.impl("dora_backward_p0", &dora_backward_p0); }

}  // namespace fusedpeft::cuda
