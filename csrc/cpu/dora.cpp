// DoRA's backward without dropout on CPU (SPEC §8): dX and the magnitude's column sums from one
// parallel pass over dY and the saved output Y, blocks of rows at a time.
// dora_scale_backward: per block, dYg = dY * g into per-task scratch (cache-sized) while
//   colsum[j] += dY[t, j] * Y[t, j] accumulates in the compute dtype, then one single-threaded
//   GEMM dX_block = dYg W and dX_block += dS_block A (ATen, MKL). One parallel region replaces
//   the ~10 elementwise / GEMM calls of the PyTorch path (on a busy 2-core machine each region can
//   cost a scheduler time slice). Nothing of size [N, D] is allocated.
//   FLOPs 2 N D K + 2 N r K + 3 N D; bytes 2 N D s (dY, Y) + D K s + N K s.
#include "../checks.h"
#include "common.h"

#include <torch/library.h>

namespace fusedpeft::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> dora_scale_backward(const at::Tensor& grad_y_in, const at::Tensor& out_in,
                                                       const at::Tensor& g_in, const at::Tensor& weight,
                                                       const at::Tensor& grad_S_in, const at::Tensor& A_in,
                                                       bool need_x, bool need_g) {
  const char* op = "fusedpeft_C::dora_scale_backward";
  check_matrix(op, "grad_y", grad_y_in, "[N, D]");
  check_matrix(op, "out", out_in, "[N, D]");
  check_matrix(op, "weight", weight, "[D, K]");
  check_floating(op, "grad_y", grad_y_in);
  TORCH_CHECK(out_in.sizes() == grad_y_in.sizes(), op, ": out must have grad_y's shape ", shape_str(grad_y_in),
              ", got ", shape_str(out_in));
  TORCH_CHECK(g_in.dim() == 1 && g_in.size(0) == grad_y_in.size(1), op, ": g must have shape [", grad_y_in.size(1),
              "], got ", shape_str(g_in));
  TORCH_CHECK(weight.size(0) == grad_y_in.size(1), op, ": weight must have ", grad_y_in.size(1), " rows, got ",
              shape_str(weight));
  TORCH_CHECK(grad_S_in.dim() == 2 && grad_S_in.size(0) == grad_y_in.size(0) && A_in.dim() == 2 &&
                  A_in.size(0) == grad_S_in.size(1) && A_in.size(1) == weight.size(1),
              op, ": grad_S [N, r] and lora_A [r, K] do not match, got ", shape_str(grad_S_in), " and ",
              shape_str(A_in));
  const auto dtype = grad_y_in.scalar_type();
  const auto acc = compute_dtype(dtype);
  const auto grad_y = grad_y_in.contiguous();
  const auto out = out_in.to(dtype).contiguous();
  const auto g = g_in.to(acc).contiguous();
  const auto W = weight.to(dtype);
  const auto dS = grad_S_in.to(dtype);
  const auto A = A_in.to(dtype);
  const int64_t rows = grad_y.size(0), D = grad_y.size(1), K = W.size(1);
  auto grad_x = need_x ? at::empty({rows, K}, grad_y.options()) : grad_y.new_empty({0});
  auto colsum = at::zeros({need_g ? D : 0}, grad_y.options().dtype(acc));
  if (rows == 0 || D == 0 || (!need_x && !need_g)) {
    if (need_x) grad_x.zero_();
    return {grad_x, colsum};
  }
  const int64_t step = std::max<int64_t>(16, (1 << 17) / std::max<int64_t>(1, D));
  const int64_t n_blocks = (rows + step - 1) / step;
  std::vector<at::Tensor> partial(at::get_num_threads());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "dora_scale_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* gy = grad_y.data_ptr<scalar_t>();
    const scalar_t* y = out.data_ptr<scalar_t>();
    const acc_t* gg = g.data_ptr<acc_t>();
    at::parallel_for(0, n_blocks, 1, [&](int64_t begin, int64_t end) {
      const at::NoGradGuard no_grad;
      at::Tensor scratch = at::empty({step, D}, grad_y.options());
      at::Tensor part = at::zeros({need_g ? D : 0}, grad_y.options().dtype(acc));
      scalar_t* buf = scratch.data_ptr<scalar_t>();
      acc_t* c = need_g ? part.data_ptr<acc_t>() : nullptr;
      for (int64_t blk = begin; blk < end; ++blk) {
        const int64_t m0 = blk * step, nb = std::min(step, rows - m0);
        for (int64_t m = 0; m < nb; ++m) {
          const scalar_t* gy_row = gy + (m0 + m) * D;
          const scalar_t* y_row = y + (m0 + m) * D;
          scalar_t* b_row = buf + m * D;
          if (need_x) {
            for (int64_t j = 0; j < D; ++j) b_row[j] = static_cast<scalar_t>(static_cast<acc_t>(gy_row[j]) * gg[j]);
          }
          if (need_g) {
            for (int64_t j = 0; j < D; ++j) c[j] += static_cast<acc_t>(gy_row[j]) * static_cast<acc_t>(y_row[j]);
          }
        }
        if (need_x) {
          auto gx_block = grad_x.narrow(0, m0, nb);
          at::mm_out(gx_block, scratch.narrow(0, 0, nb), W);
          gx_block.addmm_(dS.narrow(0, m0, nb), A);
        }
      }
      if (need_g) {
        at::Tensor& slot = partial[at::get_thread_num()];  // a thread may run several tasks
        slot = slot.defined() ? slot.add_(part) : part;
      }
    });
  });
  for (const auto& part : partial) {
    if (part.defined()) colsum.add_(part);
  }
  return {grad_x, colsum};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedpeft_C, CPU, m) { m.impl("dora_scale_backward", &dora_scale_backward); }

}  // namespace fusedpeft::cpu
