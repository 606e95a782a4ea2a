// Argument checks of fusedpeft_C::dora_backward_p0, shared by its CPU (csrc/cpu/dora.cpp) and CUDA
// (csrc/cuda/dora_ops.cpp) implementations.
#pragma once

#include "checks.h"

namespace fusedpeft {

inline void check_dora_backward_p0_args(const char* op, const at::Tensor& grad_y, const at::Tensor& out,
                                        const at::Tensor& x, const at::Tensor& weight, const at::Tensor& S,
                                        const at::Tensor& A, const at::Tensor& B, const at::Tensor& g) {
  check_matrix(op, "grad_y", grad_y, "[N, D]");
  check_matrix(op, "out", out, "[N, D]");
  check_matrix(op, "x", x, "[N, K]");
  check_matrix(op, "weight", weight, "[D, K]");
  check_matrix(op, "S", S, "[N, r]");
  check_matrix(op, "lora_A", A, "[r, K]");
  check_matrix(op, "lora_B", B, "[D, r]");
  check_floating(op, "grad_y", grad_y);
  const int64_t rows = grad_y.size(0), D = grad_y.size(1), K = x.size(1), r = S.size(1);
  TORCH_CHECK(out.sizes() == grad_y.sizes(), op, ": out must have grad_y's shape ", shape_str(grad_y), ", got ",
              shape_str(out));
  TORCH_CHECK(x.size(0) == rows && S.size(0) == rows, op, ": x and S must have ", rows, " rows, got ", shape_str(x),
              " and ", shape_str(S));
  TORCH_CHECK(weight.size(0) == D && weight.size(1) == K, op, ": weight must have shape [", D, ", ", K, "], got ",
              shape_str(weight));
  TORCH_CHECK(A.size(0) == r && A.size(1) == K && B.size(0) == D && B.size(1) == r, op, ": lora_A must be [", r, ", ",
              K, "] and lora_B [", D, ", ", r, "], got ", shape_str(A), " and ", shape_str(B));
  TORCH_CHECK(g.dim() == 1 && g.size(0) == D, op, ": g must have shape [", D, "], got ", shape_str(g));
}

}  // namespace fusedpeft
