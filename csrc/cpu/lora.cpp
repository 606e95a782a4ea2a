// LoRA's dropout on CPU (SPEC §2, §5): the shrink S = dropout(x) @ A^T and its backward, the mask
// generated in-kernel. The rank-r products themselves are ATen GEMMs (MKL beats any
// hand-written loop at r <= 64), so the kernels work on blocks of rows: Philox (vectorised, one
// evaluation per element and pass) writes the dropped block, in the compute dtype, and its keep
// mask into cache-sized scratch [~64K elements], and one single-threaded GEMM per block consumes
// it, blocks spread over the threads. Nothing of size x is stored. Without dropout: plain GEMMs.
// lora_shrink: FLOPs 2 N K r; bytes N K s (x read once) + N r s.
// lora_shrink_backward: grad_A = grad_S^T @ dropout(x) and grad_x = dropout'(grad_S @ A) from one
//   mask generation per element; FLOPs 4 N K r; bytes N K s (x, if grad_A) + N K s (grad_x).
#include "../checks.h"
#include "common.h"

#include <torch/library.h>

namespace fusedpeft::cpu {
namespace {

// Rows of x per block: the dropped block (compute dtype) and its mask stay cache-sized.
int64_t block_rows(int64_t K) { return std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, K)); }

// xd [nb, K] = dropout(x)[m0 : m0 + nb] in the compute dtype; keep [nb, K] its mask.
template <typename scalar_t, typename acc_t>
void dropped_block(const scalar_t* x, acc_t* xd, uint8_t* keep, const DropoutParams& d, int64_t m0, int64_t nb,
                   int64_t K) {
  for (int64_t i = 0; i < nb; ++i) dropped_row(x + (m0 + i) * K, xd + i * K, keep + i * K, d, m0 + i, K, 0, K);
}

// One parallel region per op (an OpenMP barrier per block costs a time slice on a busy machine):
// each task takes whole blocks, generates them and runs their GEMMs single-threaded.
template <typename F>
void for_blocks(int64_t rows, int64_t step, F&& f) {
  const int64_t n_blocks = (rows + step - 1) / step;
  at::parallel_for(0, n_blocks, 1, [&](int64_t begin, int64_t end) {
    const at::NoGradGuard no_grad;  // worker threads start with grad mode on; these GEMMs are kernels, not graph
    for (int64_t b = begin; b < end; ++b) f(b * step, std::min(step, rows - b * step));
  });
}

at::Tensor lora_shrink(const at::Tensor& x_in, const at::Tensor& A_in, double dropout_p, int64_t seed) {
  const char* op = "fusedpeft_C::lora_shrink";
  check_x_and_A(op, x_in, A_in);
  check_dropout(op, dropout_p);
  const auto x = x_in.contiguous();
  const DropoutParams d = make_dropout(dropout_p, seed);
  if (!d.active) return at::mm(x, A_in.to(x.scalar_type()).t());
  const auto acc = compute_dtype(x.scalar_type());
  const auto A_t = A_in.to(acc).t();
  const int64_t rows = x.size(0), K = x.size(1), step = block_rows(K);
  auto S = at::empty({rows, A_in.size(0)}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_shrink", [&] {
    using acc_t = acc_type<scalar_t>;
    for_blocks(rows, step, [&](int64_t m0, int64_t nb) {
      auto xd = at::empty({nb, K}, x.options().dtype(acc));
      std::vector<uint8_t> keep(nb * K);
      dropped_block(x.data_ptr<scalar_t>(), xd.data_ptr<acc_t>(), keep.data(), d, m0, nb, K);
      auto S_block = S.narrow(0, m0, nb);
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        at::mm_out(S_block, xd, A_t);
      } else {
        S_block.copy_(at::mm(xd, A_t));
      }
    });
  });
  return S;
}

std::tuple<at::Tensor, at::Tensor> lora_shrink_backward(const at::Tensor& x_in, const at::Tensor& grad_S_in,
                                                        const at::Tensor& A_in, double dropout_p, int64_t seed,
                                                        bool need_x, bool need_A) {
  check_shrink_backward_args("fusedpeft_C::lora_shrink_backward", x_in, grad_S_in, A_in, dropout_p);
  const auto acc = compute_dtype(x_in.scalar_type());
  const auto x = x_in.contiguous();
  const auto gS = grad_S_in.to(acc).contiguous();
  const auto A = A_in.to(acc).contiguous();
  const int64_t rows = x.size(0), K = x.size(1), r = A.size(0), step = block_rows(K);
  auto grad_x = need_x ? at::empty_like(x) : x.new_empty({0});
  auto grad_A = need_A ? at::zeros({r, K}, x.options().dtype(acc)) : x.new_empty({0});
  if (!need_x && !need_A) return {grad_x, grad_A};
  const DropoutParams d = make_dropout(dropout_p, seed);
  std::vector<at::Tensor> partial(at::get_num_threads());  // grad_A per thread, summed at the end
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_shrink_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    const acc_t scale = static_cast<acc_t>(d.keep_scale);
    for_blocks(rows, step, [&](int64_t m0, int64_t nb) {
      std::vector<uint8_t> keep(nb * K);
      const auto gS_block = gS.narrow(0, m0, nb);
      if (need_A) {
        auto xd = at::empty({nb, K}, x.options().dtype(acc));
        dropped_block(x.data_ptr<scalar_t>(), xd.data_ptr<acc_t>(), keep.data(), d, m0, nb, K);
        at::Tensor& part = partial[at::get_thread_num()];
        if (!part.defined()) part = at::zeros({r, K}, xd.options());
        part.addmm_(gS_block.t(), xd);
      } else if (d.active) {
        for (int64_t i = 0; i < nb; ++i) {
          philox_keep(keep.data() + i * K, d.k0, d.k1, d.p, dropout_offset(m0 + i, K, 0), K);
        }
      }
      if (!need_x) return;
      const auto t = at::mm(gS_block, A);  // [nb, K], compute dtype
      const acc_t* tp = t.data_ptr<acc_t>();
      scalar_t* out = grad_x.data_ptr<scalar_t>() + m0 * K;
      for (int64_t j = 0; j < nb * K; ++j) {
        out[j] = static_cast<scalar_t>(!d.active ? tp[j] : (keep[j] ? tp[j] * scale : acc_t(0)));
      }
    });
  });
  for (const auto& part : partial) {
    if (part.defined()) grad_A.add_(part);
  }
  return {grad_x, grad_A};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedpeft_C, CPU, m) {
  m.impl("lora_shrink", &lora_shrink);
  m.impl("lora_shrink_backward", &lora_shrink_backward);
}

}  // namespace fusedpeft::cpu
