// MoRA type 6 (docs/contract.md §3) without dropout, the CPU backend's "merged" strategy: the two pieces that
// were many small ATen ops on the torch path.
//
// ΔW of type 6 is block-sparse: output row p belongs to chunk i = (p mod n R) / R (tiled when
// n R < D) and row a = p mod R of B_i = M Rot_i; its R columns are chunk i's input features
// (i R + b, wrapped past K onto the first ones).
// - mora_rope_merge: W + ΔW [D, K] in W's dtype, one pass over W split by rows; B_i's row is built
//   on the fly (B_i[a, b] = M[a, b] cos_i[b] + swap(M)[a, b] sin_i[b]).
//   FLOPs 3 D R; bytes 2 D K s (W read, the copy written).
// - mora_rope_weight_grad: dM [R, R] = sum_i (G_i^T X_i) Rot_i^T, with G_i = dY's chunk-i output
//   columns (summed over tiles) and X_i = x's chunk-i input columns, rotated and summed in the
//   compute dtype. float32 with plain column blocks on an AVX-512 CPU: gemm_tn.cpp's kernel over
//   row blocks of x and dY, split by rows over the threads (3.0-3.3 ms at N = 2048, K = D = 1024,
//   R = 128 on the 2-core VM, against 4.3 ms for MKL on the strided blocks). Otherwise: one
//   single-threaded ATen GEMM per chunk on strided views (copies for tiled or wrapped chunks).
//   FLOPs 2 N R (used chunks x R) ~ 2 N K R; bytes N K s + N D s.
#include "../checks.h"
#include "common.h"

#include <torch/library.h>

namespace fusedpeft::cpu {
namespace {

struct RopeGeometry {
  int64_t K, D, R, n_chunks, used;
  RopeGeometry(int64_t in_features, int64_t out_features, int64_t r_hat)
      : K(in_features), D(out_features), R(r_hat), n_chunks(mora_chunks(in_features, r_hat, 6)),
        used(std::min(n_chunks, (out_features + r_hat - 1) / r_hat)) {}
  int64_t input_column(int64_t chunk, int64_t b) const {
    const int64_t c = chunk * R + b;
    return c < K ? c : c - K;
  }
};

void check_rope_tables(const char* op, const at::Tensor& cos, const at::Tensor& sin, const RopeGeometry& g,
                       const at::Tensor& ref) {
  check_rope(op, cos, sin, 6, g.n_chunks, g.R, ref);
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous(), op, ": cos and sin must be contiguous");
}

at::Tensor mora_rope_merge(const at::Tensor& weight_in, const at::Tensor& M_in, int64_t r_hat, const at::Tensor& cos,
                           const at::Tensor& sin) {
  const char* op = "fusedpeft_C::mora_rope_merge";
  check_matrix(op, "weight", weight_in, "[out_features, in_features]");
  check_floating(op, "weight", weight_in);
  check_mora_geometry(op, weight_in.size(1), r_hat, 6);
  TORCH_CHECK(M_in.dim() == 2 && M_in.size(0) == r_hat && M_in.size(1) == r_hat, op, ": M must have shape [", r_hat,
              ", ", r_hat, "], got shape ", shape_str(M_in));
  check_device(op, "M", M_in, weight_in);
  const RopeGeometry g(weight_in.size(1), weight_in.size(0), r_hat);
  check_rope_tables(op, cos, sin, g, weight_in);
  const auto weight = weight_in.contiguous();
  const auto M = M_in.to(compute_dtype(M_in.scalar_type())).contiguous();
  auto out = at::empty_like(weight);
  const int64_t K = g.K, R = g.R, h = R / 2, span = g.n_chunks * R;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "mora_rope_merge", [&] {
    using w_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(M.scalar_type(), "mora_rope_merge_M", [&] {
      using m_t = scalar_t;
      const m_t* Mp = M.data_ptr<m_t>();
      const float* cp = cos.data_ptr<float>();
      const float* sp = sin.data_ptr<float>();
      at::parallel_for(0, g.D, grain_rows(K), [&](int64_t begin, int64_t end) {
        for (int64_t p = begin; p < end; ++p) {
          std::copy(weight.data_ptr<w_t>() + p * K, weight.data_ptr<w_t>() + (p + 1) * K,
                    out.data_ptr<w_t>() + p * K);
          const int64_t i = (p % span) / R, a = p % R;
          const m_t* m = Mp + a * R;
          const float* c = cp + i * R;
          const float* s = sp + i * R;
          w_t* o = out.data_ptr<w_t>() + p * K;
          for (int64_t b = 0; b < R; ++b) {
            const m_t swapped = b < h ? m[b + h] : -m[b - h];
            const m_t block = m[b] * static_cast<m_t>(c[b]) + swapped * static_cast<m_t>(s[b]);
            w_t& w = o[g.input_column(i, b)];
            w = static_cast<w_t>(w + static_cast<w_t>(block));
          }
        }
      });
    });
  });
  return out;
}

// Chunk i's columns of dY summed over the output tiles that copy it -> [N, R] (a view when there is one full tile).
at::Tensor chunk_output_grad(const at::Tensor& grad_y, int64_t i, const RopeGeometry& g) {
  const int64_t span = g.n_chunks * g.R, first = i * g.R;
  if (g.D <= span && first + g.R <= g.D) return grad_y.narrow(1, first, g.R);
  auto out = at::zeros({grad_y.size(0), g.R}, grad_y.options());
  for (int64_t start = first; start < g.D; start += span) {
    const int64_t width = std::min(g.R, g.D - start);
    out.narrow(1, 0, width).add_(grad_y.narrow(1, start, width));
  }
  return out;
}

// Chunk i's input columns of x -> [N, R] (a view unless the chunk wraps past K).
at::Tensor chunk_input(const at::Tensor& x, int64_t i, const RopeGeometry& g) {
  const int64_t start = i * g.R;
  if (start + g.R <= g.K) return x.narrow(1, start, g.R);
  return at::cat({x.narrow(1, start, g.K - start), x.narrow(1, 0, start + g.R - g.K)}, 1);
}

// dM[a, :] += rotate(P[a, :]) = P[a, :] cos_i + rotate_half(P[a, :]) sin_i, a < R.
template <typename scalar_t>
void rotate_add(const scalar_t* P, scalar_t* dM, const float* c, const float* s, int64_t R) {
  const int64_t h = R / 2;
  for (int64_t a = 0; a < R; ++a) {
    const scalar_t* row = P + a * R;
    scalar_t* o = dM + a * R;
    for (int64_t b = 0; b < R; ++b) {
      const scalar_t half_turn = b < h ? -row[b + h] : row[b - h];
      o[b] += row[b] * static_cast<scalar_t>(c[b]) + half_turn * static_cast<scalar_t>(s[b]);
    }
  }
}

// Every used chunk reads a plain column block of x and of dY (no wrap, no tiling, no truncation).
bool plain_chunks(const RopeGeometry& g) {
  return g.D <= g.n_chunks * g.R && g.used * g.R <= g.D && g.used * g.R <= g.K;
}

at::Tensor mora_rope_weight_grad(const at::Tensor& x_in, const at::Tensor& grad_y_in, int64_t r_hat,
                                 const at::Tensor& cos, const at::Tensor& sin) {
  const char* op = "fusedpeft_C::mora_rope_weight_grad";
  check_matrix(op, "x", x_in, "[N, in_features]");
  check_matrix(op, "grad_y", grad_y_in, "[N, out_features]");
  check_floating(op, "x", x_in);
  check_device(op, "grad_y", grad_y_in, x_in);
  TORCH_CHECK(grad_y_in.size(0) == x_in.size(0), op, ": grad_y must have ", x_in.size(0), " rows like x, got shape ",
              shape_str(grad_y_in));
  check_mora_geometry(op, x_in.size(1), r_hat, 6);
  const RopeGeometry g(x_in.size(1), grad_y_in.size(1), r_hat);
  check_rope_tables(op, cos, sin, g, x_in);
  const auto acc = compute_dtype(x_in.scalar_type());
  const auto x = x_in.to(acc).contiguous();
  const auto grad_y = grad_y_in.to(acc).contiguous();
  const int64_t R = g.R, N = x.size(0);
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  std::vector<at::Tensor> partial(at::get_num_threads());  // dM per thread, summed at the end
  auto add_to_partial = [&](const at::Tensor& part) {
    at::Tensor& slot = partial[at::get_thread_num()];  // a thread may run several tasks
    slot = slot.defined() ? slot.add_(part) : part;
  };
  if (acc == at::kFloat && plain_chunks(g) && cpu_isa() == CpuIsa::avx512) {
    // Rows split over the threads; each reads its rows of x and dY once, in order.
    constexpr int64_t kRowBlock = 64;
    const float* xp = x.data_ptr<float>();
    const float* gp = grad_y.data_ptr<float>();
    at::parallel_for(0, (N + kRowBlock - 1) / kRowBlock, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> products(g.used * R * R, 0.0f);  // G_i^T X_i of this task's rows
      const int64_t t0 = begin * kRowBlock, rows = std::min(end * kRowBlock, N) - t0;
      block_diag_tn_accumulate_f32(gp + t0 * g.D, g.D, xp + t0 * g.K, g.K, rows, g.used, R, products.data());
      auto part = at::zeros({R, R}, x.options());
      for (int64_t i = 0; i < g.used; ++i) {
        rotate_add(products.data() + i * R * R, part.data_ptr<float>(), cp + i * R, sp + i * R, R);
      }
      add_to_partial(part);
    });
  } else {
    AT_DISPATCH_FLOATING_TYPES(acc, "mora_rope_weight_grad", [&] {
      at::parallel_for(0, g.used, 1, [&](int64_t begin, int64_t end) {
        const at::NoGradGuard no_grad;
        auto part = at::zeros({R, R}, x.options());
        for (int64_t i = begin; i < end; ++i) {
          const auto product = at::mm(chunk_output_grad(grad_y, i, g).t(), chunk_input(x, i, g)).contiguous();
          rotate_add(product.data_ptr<scalar_t>(), part.data_ptr<scalar_t>(), cp + i * R, sp + i * R, R);
        }
        add_to_partial(part);
      });
    });
  }
  auto grad_M = at::zeros({R, R}, x.options());
  for (const auto& part : partial) {
    if (part.defined()) grad_M.add_(part);
  }
  return grad_M;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedpeft_C, CPU, m) {
  m.impl("mora_rope_merge", &mora_rope_merge);
  m.impl("mora_rope_weight_grad", &mora_rope_weight_grad);
}

}  // namespace fusedpeft::cpu
