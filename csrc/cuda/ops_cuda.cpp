// CUDA implementations of the fusedpeft_C ops (schemas: csrc/ops.cpp): the same argument checks
// as the CPU path (csrc/checks.h), then the kernels of kernels.cu on the current stream. Dense
// products (B^T scaling, dtype casts of the small adapters) are ATen calls; no host sync anywhere.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../checks.h"
#include "../philox.h"
#include "kernels.h"

namespace fusedpeft::cuda {
namespace {

DType dtype_of(at::ScalarType s) {
  switch (s) {
    case at::kHalf:
      return DType::kHalf;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kDouble:
      return DType::kDouble;
    default:
      return DType::kFloat;
  }
}

Dropout dropout_of(double p, int64_t seed) {
  const DropoutParams d = make_dropout(p, seed);
  return Dropout{d.k0, d.k1, d.p, d.keep_scale, d.active};
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

void check_launch() { C10_CUDA_KERNEL_LAUNCH_CHECK(); }

const void* optional_ptr(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

MoraGeom geometry(int64_t K, int64_t D, int64_t R, int64_t type) {
  return MoraGeom{K, D, R, type, mora_pad(K, R, type), mora_chunks(K, R, type)};
}

std::tuple<at::Tensor, at::Tensor> ce_forward(const at::Tensor& logits_in, const at::Tensor& labels_in,
                                              const at::Tensor& row_scale_in, double label_smoothing, double z_loss,
                                              double softcap) {
  check_ce_args("fusedpeft_C::ce_forward", logits_in, labels_in, row_scale_in, "row_scale", label_smoothing, z_loss);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const auto logits = logits_in.contiguous();
  const auto labels = labels_in.contiguous();
  const auto row_scale = row_scale_in.contiguous();
  auto loss = at::zeros({logits.size(0)}, row_scale.options());
  auto lse = at::zeros({logits.size(0)}, row_scale.options());
  launch_ce_forward(dtype_of(logits.scalar_type()), logits.data_ptr(), labels.data_ptr<int64_t>(), row_scale.data_ptr(),
                   loss.data_ptr(), lse.data_ptr(), logits.size(0), logits.size(1),
                   CeOptions{label_smoothing, z_loss, softcap}, stream());
  check_launch();
  return {loss, lse};
}

at::Tensor ce_backward(const at::Tensor& logits_in, const at::Tensor& labels_in, const at::Tensor& scale_in,
                       const at::Tensor& lse_in, double label_smoothing, double z_loss, double softcap) {
  const char* op = "fusedpeft_C::ce_backward";
  check_ce_args(op, logits_in, labels_in, scale_in, "scale", label_smoothing, z_loss);
  check_lse(op, lse_in, logits_in);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const auto logits = logits_in.contiguous();
  const auto labels = labels_in.contiguous();
  const auto scale = scale_in.contiguous();
  const auto lse = lse_in.contiguous();
  auto grad = at::empty_like(logits);
  launch_ce_grad(dtype_of(logits.scalar_type()), logits.data_ptr(), grad.data_ptr(), labels.data_ptr<int64_t>(),
                scale.data_ptr(), lse.data_ptr(), nullptr, logits.size(0), logits.size(1),
                CeOptions{label_smoothing, z_loss, softcap}, stream());
  check_launch();
  return grad;
}

at::Tensor ce_loss_and_grad_(at::Tensor& logits, const at::Tensor& labels_in, const at::Tensor& scale_in,
                             double label_smoothing, double z_loss, double softcap) {
  const char* op = "fusedpeft_C::ce_loss_and_grad_";
  check_ce_args(op, logits, labels_in, scale_in, "scale", label_smoothing, z_loss);
  TORCH_CHECK(logits.is_contiguous(), op, ": logits must be contiguous (it is overwritten in place)");
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto labels = labels_in.contiguous();
  const auto scale = scale_in.contiguous();
  auto loss = at::zeros({logits.size(0)}, scale.options());
  launch_ce_grad(dtype_of(logits.scalar_type()), logits.data_ptr(), logits.data_ptr(), labels.data_ptr<int64_t>(),
                scale.data_ptr(), nullptr, loss.data_ptr(), logits.size(0), logits.size(1),
                CeOptions{label_smoothing, z_loss, softcap}, stream());
  check_launch();
  return loss;
}

at::Tensor lora_shrink(const at::Tensor& x_in, const at::Tensor& A_in, double dropout_p, int64_t seed) {
  const char* op = "fusedpeft_C::lora_shrink";
  check_x_and_A(op, x_in, A_in);
  check_dropout(op, dropout_p);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto x = x_in.contiguous();
  if (dropout_p == 0.0) return at::mm(x, A_in.to(x.scalar_type()).t());  // cuBLAS, as on the CPU path
  const auto A = A_in.to(compute_dtype(x.scalar_type())).contiguous();
  auto S = at::empty({x.size(0), A.size(0)}, x.options());
  launch_lora_shrink(dtype_of(x.scalar_type()), x.data_ptr(), A.data_ptr(), S.data_ptr(), x.size(0), x.size(1),
                    A.size(0), dropout_of(dropout_p, seed), stream());
  check_launch();
  return S;
}

std::tuple<at::Tensor, at::Tensor> lora_shrink_backward(const at::Tensor& x_in, const at::Tensor& grad_S_in,
                                                        const at::Tensor& A_in, double dropout_p, int64_t seed,
                                                        bool need_x, bool need_A) {
  check_shrink_backward_args("fusedpeft_C::lora_shrink_backward", x_in, grad_S_in, A_in, dropout_p);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto acc = compute_dtype(x_in.scalar_type());
  const auto x = x_in.contiguous();
  const auto gS = grad_S_in.to(acc).contiguous();
  const auto A = A_in.to(acc).contiguous();
  auto grad_x = need_x ? at::empty_like(x) : x.new_empty({0});
  auto grad_A = need_A ? at::zeros({A.size(0), A.size(1)}, x.options().dtype(acc)) : x.new_empty({0});
  if (need_x || need_A) {
    launch_lora_shrink_backward(dtype_of(x.scalar_type()), x.data_ptr(), gS.data_ptr(), A.data_ptr(),
                               need_x ? grad_x.data_ptr() : nullptr, need_A ? grad_A.data_ptr() : nullptr, x.size(0),
                               x.size(1), A.size(0), dropout_of(dropout_p, seed), stream());
    check_launch();
  }
  return {grad_x, grad_A};
}

const float* table_ptr(const c10::optional<at::Tensor>& t, int64_t mora_type, at::Tensor& keep_alive) {
  if (mora_type != 6) return nullptr;
  keep_alive = t->contiguous();
  return keep_alive.data_ptr<float>();
}

at::Tensor mora_compress(const at::Tensor& x_in, int64_t r_hat, int64_t mora_type, double dropout_p, int64_t seed,
                         const c10::optional<at::Tensor>& cos_in, const c10::optional<at::Tensor>& sin_in) {
  check_compress_args("fusedpeft_C::mora_compress", x_in, r_hat, mora_type, dropout_p, cos_in, sin_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto x = x_in.contiguous();
  const MoraGeom g = geometry(x.size(1), 0, r_hat, mora_type);
  const int64_t width = mora_type == 6 ? g.n_chunks * r_hat : r_hat;
  auto z = at::empty({x.size(0), width}, x.options().dtype(compute_dtype(x.scalar_type())));
  at::Tensor cos, sin;
  const float* cos_p = table_ptr(cos_in, mora_type, cos);
  const float* sin_p = table_ptr(sin_in, mora_type, sin);
  launch_mora_compress(dtype_of(x.scalar_type()), x.data_ptr(), z.data_ptr(), cos_p, sin_p, x.size(0), g,
                      dropout_of(dropout_p, seed), stream());
  check_launch();
  return z;
}

at::Tensor mora_compress_backward(const at::Tensor& gz_in, int64_t in_features, int64_t r_hat, int64_t mora_type,
                                  double dropout_p, int64_t seed, const c10::optional<at::Tensor>& cos_in,
                                  const c10::optional<at::Tensor>& sin_in, at::ScalarType dtype) {
  check_compress_backward_args("fusedpeft_C::mora_compress_backward", gz_in, in_features, r_hat, mora_type, dropout_p,
                               cos_in, sin_in, dtype);
  const c10::cuda::CUDAGuard guard(gz_in.device());
  const auto gz = gz_in.contiguous();
  auto grad_x = at::empty({gz.size(0), in_features}, gz.options().dtype(dtype));
  at::Tensor cos, sin;
  const float* cos_p = table_ptr(cos_in, mora_type, cos);
  const float* sin_p = table_ptr(sin_in, mora_type, sin);
  launch_mora_compress_backward(dtype_of(dtype), gz.data_ptr(), grad_x.data_ptr(), cos_p, sin_p, gz.size(0),
                               geometry(in_features, 0, r_hat, mora_type), dropout_of(dropout_p, seed), stream());
  check_launch();
  return grad_x;
}

at::Tensor mora_decompress(const at::Tensor& ys_in, int64_t out_features, int64_t r_hat, int64_t mora_type,
                           const c10::optional<at::Tensor>& bias_in, at::ScalarType dtype) {
  check_decompress_args("fusedpeft_C::mora_decompress", ys_in, out_features, r_hat, mora_type, bias_in, dtype);
  const c10::cuda::CUDAGuard guard(ys_in.device());
  const auto ys = ys_in.contiguous();
  const at::Tensor bias = bias_in.has_value() ? bias_in->to(compute_dtype(dtype)).contiguous() : at::Tensor();
  auto y = at::empty({ys.size(0), out_features}, ys.options().dtype(dtype));
  launch_mora_decompress(dtype_of(dtype), ys.data_ptr(), optional_ptr(bias), y.data_ptr(), ys.size(0), ys.size(1),
                        geometry(0, out_features, r_hat, mora_type), stream());
  check_launch();
  return y;
}

at::Tensor mora_decompress_backward(const at::Tensor& gy_in, int64_t r_hat, int64_t mora_type, int64_t n_chunks) {
  check_decompress_backward_args("fusedpeft_C::mora_decompress_backward", gy_in, r_hat, mora_type, n_chunks);
  const c10::cuda::CUDAGuard guard(gy_in.device());
  const auto gy = gy_in.contiguous();
  const int64_t width = mora_type == 6 ? n_chunks * r_hat : r_hat;
  auto h = at::empty({gy.size(0), width}, gy.options().dtype(compute_dtype(gy.scalar_type())));
  launch_mora_decompress_backward(dtype_of(gy.scalar_type()), gy.data_ptr(), h.data_ptr(), gy.size(0), width,
                                 geometry(0, gy.size(1), r_hat, mora_type), stream());
  check_launch();
  return h;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedpeft_C, CUDA, m) {
  m.impl("ce_forward", &ce_forward);
  m.impl("ce_backward", &ce_backward);
  m.impl("ce_loss_and_grad_", &ce_loss_and_grad_);
  m.impl("lora_shrink", &lora_shrink);
  m.impl("lora_shrink_backward", &lora_shrink_backward);
  m.impl("mora_compress", &mora_compress);
  m.impl("mora_compress_backward", &mora_compress_backward);
  m.impl("mora_decompress", &mora_decompress);
  m.impl("mora_decompress_backward", &mora_decompress_backward);
}

}  // namespace fusedpeft::cuda
