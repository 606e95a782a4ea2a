// DoRA's p = 0 backward on CPU (docs/contract.md §8), g = m / n, s = scaling, and the merged form's
// weight W'' = g W + (s g B) A (fusedpeft/host/dora.py merged_strategy) in one pass over W.
//
// dora_backward_p0, from ONE parallel pass over dY and the saved output Y, blocks of rows at a time:
//   dYg = dY * g                     per-task scratch of ~512K elements, never [N, D] (with dX only:
//                                    without, dS = dY (s g B) directly, in blocks of ~128K elements)
//   colsum[j] += dY[t, j] Y[t, j]    the magnitude's gradient numerator (compute dtype)
//   dS = s dYg B                     [nb, r], while dYg is in cache
//   dX = dYg W + dS A                one single-threaded ATen GEMM per block, plus the rank-r update
//   dA += dS^T x,  P += S^T dY       per-task partials, summed at the end; dB = s g * P^T
// One parallel region replaces ~12 elementwise / GEMM calls of the PyTorch path (on a busy 2-core
// machine each region can cost a scheduler time slice) and dY is read once. Without dX (the merged
// form computes dX = dY W'' itself) in fp32 on AVX-512, the rank-r part is csrc/cpu/dora_rows.cpp's
// loop instead of the per-block ATen GEMMs: 2.1 vs 2.4 ms at 2048 x 1024 -> 1024, r = 16, one thread.
// FLOPs 2 N D K + 4 N r (D + K) + 3 N D; bytes 2 N D s (dY, Y) + N K s (x, if dA) + N K s (dX) + D K s.
#include "../dora.h"
#include "common.h"

#include <torch/library.h>

#include <array>
#include <vector>

#include "vec.h"

namespace fusedpeft::cpu {
namespace {

// Rows below which a second thread costs more than it saves (a few microseconds of work).
constexpr int64_t kRowsPerTask = 64;

// Without dX, fp32 on AVX-512: (colsum(dY * Y) [D], dA = dS^T x [r, K], P^T = dY^T S [D, r]) with
// dS = dY C, C = s g B [D, r], from dora_rank_grads (csrc/cpu/dora_rows.cpp): one contiguous range
// of rows per thread, each into its own partial sums. An unneeded result is undefined.
std::array<at::Tensor, 3> rank_grads_without_dx(const at::Tensor& grad_y, const at::Tensor& out, const at::Tensor& x,
                                                const at::Tensor& S_in, const at::Tensor& C, bool need_A, bool need_B,
                                                bool need_g) {
  const int64_t rows = grad_y.size(0), D = grad_y.size(1), K = x.size(1), r = C.size(1);
  const auto S = S_in.contiguous();
  const auto opts = grad_y.options();
  std::vector<std::array<at::Tensor, 3>> partial(at::get_num_threads());  // colsum, dA^T [K, r], P^T
  at::parallel_for(0, rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
    const int64_t n = end - begin;
    const at::Tensor parts[3] = {need_g ? at::zeros({D}, opts) : at::Tensor(),
                                 need_A ? at::zeros({K, r}, opts) : at::Tensor(),
                                 need_B ? at::zeros({D, r}, opts) : at::Tensor()};
    auto dS = at::empty({n, r}, opts);
    const auto ptr = [](const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; };
    dora_rank_grads_f32(grad_y.data_ptr<float>() + begin * D, need_g ? out.data_ptr<float>() + begin * D : nullptr,
                        need_A ? x.data_ptr<float>() + begin * K : nullptr, S.data_ptr<float>() + begin * r,
                        C.data_ptr<float>(), n, D, K, r, ptr(parts[0]), ptr(parts[2]), ptr(parts[1]),
                        dS.data_ptr<float>());
    auto& slot = partial[at::get_thread_num()];  // a thread may run several tasks
    for (int i = 0; i < 3; ++i) {
      if (parts[i].defined()) slot[i] = slot[i].defined() ? slot[i].add_(parts[i]) : parts[i];
    }
  });
  std::array<at::Tensor, 3> sums;
  for (const auto& slot : partial) {
    for (int i = 0; i < 3; ++i) {
      if (slot[i].defined()) sums[i] = sums[i].defined() ? sums[i].add_(slot[i]) : slot[i];
    }
  }
  if (sums[1].defined()) sums[1] = sums[1].t().contiguous();
  return sums;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dora_backward_p0(
    const at::Tensor& grad_y_in, const at::Tensor& out_in, const at::Tensor& x_in, const at::Tensor& weight,
    const at::Tensor& S_in, const at::Tensor& A_in, const at::Tensor& B_in, const at::Tensor& g_in, double scaling,
    bool need_x, bool need_A, bool need_B, bool need_g) {
  check_dora_backward_p0_args("fusedpeft_C::dora_backward_p0", grad_y_in, out_in, x_in, weight, S_in, A_in, B_in,
                              g_in);
  const int64_t rows = grad_y_in.size(0), D = grad_y_in.size(1), K = x_in.size(1), r = S_in.size(1);
  const auto dtype = grad_y_in.scalar_type();
  const auto acc = compute_dtype(dtype);
  const auto acc_opts = grad_y_in.options().dtype(acc);
  const auto grad_y = grad_y_in.contiguous();
  const auto out = out_in.to(dtype).contiguous();
  const auto x = x_in.to(dtype).contiguous();
  const auto g = g_in.to(acc).contiguous();
  const auto W = weight.to(dtype);
  const auto S = S_in.to(acc);
  const auto A = A_in.to(acc);
  const auto B_s = B_in.to(acc).mul(scaling);  // s B [D, r]
  const bool need_S = need_x || need_A;
  if (rows > 0 && D > 0 && !need_x && (need_A || need_B || need_g) && dtype == at::kFloat &&
      cpu_isa() == CpuIsa::avx512) {
    const auto sums = rank_grads_without_dx(grad_y, out, x, S, B_s.mul(g.unsqueeze(1)).contiguous(), need_A, need_B,
                                            need_g);
    const auto none = grad_y.new_empty({0});
    return {none, need_A ? sums[1] : none, need_B ? sums[2].mul_(g.unsqueeze(1)).mul_(scaling) : none,
            need_g ? sums[0] : none};
  }
  auto grad_x = need_x ? at::empty({rows, K}, grad_y.options()) : grad_y.new_empty({0});
  auto grad_A = need_A ? at::zeros({r, K}, acc_opts) : grad_y.new_empty({0});
  auto P = need_B ? at::zeros({r, D}, acc_opts) : grad_y.new_empty({0});  // S^T dY
  auto colsum = need_g ? at::zeros({D}, acc_opts) : grad_y.new_empty({0});
  if (rows > 0 && D > 0 && (need_S || need_B || need_g)) {
    // with dX, large blocks (its GEMMs dominate); without, cache-sized ones (measured 2.3x faster
    // for the rank-r products, 2048 x 1024 -> 1024, r = 16, one thread)
    const int64_t step = std::max<int64_t>(16, (need_x ? 1 << 19 : 1 << 17) / std::max<int64_t>(1, std::max(D, K)));
    const auto B_gs = need_x ? at::Tensor() : B_s.mul(g.unsqueeze(1));  // without dX: dS = dY (s g B), no dY * g
    const int64_t n_blocks = (rows + step - 1) / step;
    struct Partial {
      at::Tensor colsum, P, dA;
    };
    std::vector<Partial> partial(at::get_num_threads());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "dora_backward_p0", [&] {
      using acc_t = acc_type<scalar_t>;
      const scalar_t* gy = grad_y.data_ptr<scalar_t>();
      const scalar_t* y = out.data_ptr<scalar_t>();
      const acc_t* gg = g.data_ptr<acc_t>();
      at::parallel_for(0, n_blocks, 1, [&](int64_t begin, int64_t end) {
        const at::NoGradGuard no_grad;  // worker threads start with grad mode on
        at::Tensor scratch = at::empty({need_x ? step : 0, D}, grad_y.options());  // dY * g of one block
        at::Tensor c_part = need_g ? at::zeros({D}, acc_opts) : at::Tensor();
        at::Tensor P_part = need_B ? at::zeros({r, D}, acc_opts) : at::Tensor();
        at::Tensor dA_part = need_A ? at::zeros({r, K}, acc_opts) : at::Tensor();
        scalar_t* buf = scratch.data_ptr<scalar_t>();
        acc_t* c = need_g ? c_part.data_ptr<acc_t>() : nullptr;
        for (int64_t blk = begin; blk < end; ++blk) {
          const int64_t m0 = blk * step, nb = std::min(step, rows - m0);
          for (int64_t m = 0; m < nb; ++m) {
            const scalar_t* gy_row = gy + (m0 + m) * D;
            if (need_x) {
              scalar_t* b_row = buf + m * D;
              for (int64_t j = 0; j < D; ++j) b_row[j] = static_cast<scalar_t>(static_cast<acc_t>(gy_row[j]) * gg[j]);
            }
            if (need_g) {
              const scalar_t* y_row = y + (m0 + m) * D;
              for (int64_t j = 0; j < D; ++j) c[j] += static_cast<acc_t>(gy_row[j]) * static_cast<acc_t>(y_row[j]);
            }
          }
          const auto gy_block = grad_y.narrow(0, m0, nb).to(acc);  // a view for fp32 / fp64
          if (need_B) P_part.addmm_(S.narrow(0, m0, nb).t(), gy_block);
          if (!need_S) continue;
          const auto dyg = need_x ? scratch.narrow(0, 0, nb) : at::Tensor();
          const auto dS = need_x ? at::mm(dyg.to(acc), B_s) : at::mm(gy_block, B_gs);  // [nb, r]
          if (need_A) dA_part.addmm_(dS.t(), x.narrow(0, m0, nb).to(acc));
          if (need_x) {
            auto gx_block = grad_x.narrow(0, m0, nb);
            at::mm_out(gx_block, dyg, W);
            if constexpr (std::is_same_v<scalar_t, acc_t>) {
              gx_block.addmm_(dS, A);
            } else {
              gx_block.add_(at::mm(dS, A));
            }
          }
        }
        Partial& slot = partial[at::get_thread_num()];  // a thread may run several tasks
        if (need_g) slot.colsum = slot.colsum.defined() ? slot.colsum.add_(c_part) : c_part;
        if (need_B) slot.P = slot.P.defined() ? slot.P.add_(P_part) : P_part;
        if (need_A) slot.dA = slot.dA.defined() ? slot.dA.add_(dA_part) : dA_part;
      });
    });
    for (const auto& part : partial) {
      if (part.colsum.defined()) colsum.add_(part.colsum);
      if (part.P.defined()) P.add_(part.P);
      if (part.dA.defined()) grad_A.add_(part.dA);
    }
  } else if (need_x) {
    grad_x.zero_();
  }
  // dB = s g * (S^T dY)^T [D, r], compute dtype
  auto grad_B = need_B ? P.t().mul(g.unsqueeze(1)).mul_(scaling).contiguous() : grad_y.new_empty({0});
  return {grad_x, grad_A, grad_B, colsum};
}

// W'' = g W + (s g B) A [D, K] in weight's dtype (fp32 / fp64): the "merged" form's weight
// (fusedpeft/host/dora.py merged_strategy) in one pass over W instead of a scaling pass and a
// rank-r update pass (csrc/cpu/dora_rows.cpp).
at::Tensor dora_merged_weight(const at::Tensor& weight_in, const at::Tensor& A_in, const at::Tensor& B_in,
                              const at::Tensor& g_in, double scaling) {
  const char* op = "fusedpeft_C::dora_merged_weight";
  check_matrix(op, "weight", weight_in, "[D, K]");
  check_matrix(op, "lora_A", A_in, "[r, K]");
  check_matrix(op, "lora_B", B_in, "[D, r]");
  const auto dtype = weight_in.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, op, ": weight must be float32 or float64, got ", dtype);
  const int64_t D = weight_in.size(0), K = weight_in.size(1), r = A_in.size(0);
  TORCH_CHECK(A_in.size(1) == K && B_in.size(0) == D && B_in.size(1) == r, op, ": lora_A must be [", r, ", ", K,
              "] and lora_B [", D, ", ", r, "], got ", shape_str(A_in), " and ", shape_str(B_in));
  TORCH_CHECK(g_in.dim() == 1 && g_in.size(0) == D, op, ": g must have shape [", D, "], got ", shape_str(g_in));
  const auto W = weight_in.contiguous();
  const auto A = A_in.to(dtype).contiguous();
  const auto g = g_in.to(dtype).contiguous();
  const auto C = B_in.to(dtype).mul(g.unsqueeze(1)).mul_(scaling).contiguous();  // s g B [D, r]
  auto out = at::empty({D, K}, W.options());
  at::parallel_for(0, D, kRowsPerTask, [&](int64_t begin, int64_t end) {
    int64_t rows_done = 0;
    if (dtype == at::kFloat) {
      rows_done = dora_merged_rows_f32(W.data_ptr<float>() + begin * K, A.data_ptr<float>(),
                                       C.data_ptr<float>() + begin * r, g.data_ptr<float>() + begin, end - begin, K, r,
                                       out.data_ptr<float>() + begin * K);
    }
    if (begin + rows_done < end) {  // the rest (fp64, no AVX-512, the rows after the last group of eight) by ATen
      const at::NoGradGuard no_grad;
      const int64_t from = begin + rows_done, n = end - from;
      auto rest = out.narrow(0, from, n);
      at::mul_out(rest, W.narrow(0, from, n), g.narrow(0, from, n).unsqueeze(1));
      rest.addmm_(C.narrow(0, from, n), A);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedpeft_C, CPU, m) {
  m.impl("dora_backward_p0", &dora_backward_p0);
  m.impl("dora_merged_weight", &dora_merged_weight);
}

}  // namespace fusedpeft::cpu
