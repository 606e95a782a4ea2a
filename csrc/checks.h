// Argument checks shared by the CPU and CUDA implementations: every failure names the op, the
// argument, what it got and what it needs, and happens before any kernel runs.
#pragma once

#include <ATen/ATen.h>

#include <string>

namespace fusedpeft {

inline std::string shape_str(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + "]";
}

inline void check_matrix(const char* op, const char* name, const at::Tensor& t, const char* layout) {
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be a 2-D tensor ", layout, ", got shape ", shape_str(t));
}

inline void check_floating_type(const char* op, const char* name, at::ScalarType s) {
  TORCH_CHECK(s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16, op, ": ", name,
              " must be float16, bfloat16, float32 or float64, got ", s);
}

inline void check_floating(const char* op, const char* name, const at::Tensor& t) {
  check_floating_type(op, name, t.scalar_type());
}

inline void check_dtype(const char* op, const char* name, const at::Tensor& t, at::ScalarType want) {
  TORCH_CHECK(t.scalar_type() == want, op, ": ", name, " must be ", want, ", got ", t.scalar_type());
}

inline void check_rows(const char* op, const char* name, const at::Tensor& t, int64_t rows) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == rows, op, ": ", name, " must have shape [", rows, "], got shape ",
              shape_str(t));
}

inline void check_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), ", the other inputs on ",
              ref.device());
}

inline void check_dropout(const char* op, double p) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, op, ": dropout_p must be in [0, 1), got ", p);
}

inline void check_mora_type(const char* op, int64_t mora_type) {
  TORCH_CHECK(mora_type == 1 || mora_type == 2 || mora_type == 3 || mora_type == 4 || mora_type == 6, op,
              ": mora_type must be 1, 2, 3, 4 or 6, got ", mora_type);
}

inline at::ScalarType compute_dtype(at::ScalarType s) { return s == at::kDouble ? at::kDouble : at::kFloat; }

// Wrap padding of types 1, 4, 6 (docs/contract.md §3) and the number of chunks n = (K + pad) / R.
inline int64_t mora_pad(int64_t in_features, int64_t r_hat, int64_t mora_type) {
  if (mora_type == 2 || mora_type == 3 || in_features % r_hat == 0) return 0;
  return r_hat - in_features % r_hat;
}

inline int64_t mora_chunks(int64_t in_features, int64_t r_hat, int64_t mora_type) {
  return (in_features + mora_pad(in_features, r_hat, mora_type)) / r_hat;
}

inline void check_mora_geometry(const char* op, int64_t in_features, int64_t r_hat, int64_t mora_type) {
  check_mora_type(op, mora_type);
  TORCH_CHECK(r_hat > 0, op, ": r_hat must be positive, got ", r_hat);
  TORCH_CHECK(mora_type != 6 || r_hat % 2 == 0, op, ": r_hat must be even for mora_type 6, got ", r_hat);
  TORCH_CHECK(mora_pad(in_features, r_hat, mora_type) <= in_features, op, ": wrap padding ",
              mora_pad(in_features, r_hat, mora_type), " exceeds in_features ", in_features, " (r_hat ", r_hat,
              " too large)");
}

// cos / sin [n, R] float32 tables for type 6, on x's device.
inline void check_rope(const char* op, const c10::optional<at::Tensor>& cos, const c10::optional<at::Tensor>& sin,
                       int64_t mora_type, int64_t n_chunks, int64_t r_hat, const at::Tensor& ref) {
  if (mora_type != 6) return;
  TORCH_CHECK(cos.has_value() && sin.has_value(), op, ": cos and sin tables are required for mora_type 6");
  for (const auto& [name, t] : {std::pair<const char*, at::Tensor>{"cos", *cos}, {"sin", *sin}}) {
    TORCH_CHECK(t.dim() == 2 && t.size(0) == n_chunks && t.size(1) == r_hat, op, ": ", name, " must have shape [",
                n_chunks, ", ", r_hat, "], got shape ", shape_str(t));
    check_dtype(op, name, t, at::kFloat);
    check_device(op, name, t, ref);
  }
}

// ------------------------------------------------------------------ per-op argument checks

inline void check_ce_args(const char* op, const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& scale,
                          const char* scale_name, double label_smoothing, double z_loss) {
  check_matrix(op, "logits", logits, "[N, V]");
  check_floating(op, "logits", logits);
  TORCH_CHECK(logits.size(1) > 0, op, ": logits must have at least one column, got shape ", shape_str(logits));
  check_rows(op, "labels", labels, logits.size(0));
  check_dtype(op, "labels", labels, at::kLong);
  check_rows(op, scale_name, scale, logits.size(0));
  check_dtype(op, scale_name, scale, compute_dtype(logits.scalar_type()));
  check_device(op, "labels", labels, logits);
  check_device(op, scale_name, scale, logits);
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, op, ": label_smoothing must be in [0, 1], got ",
              label_smoothing);
  TORCH_CHECK(z_loss >= 0.0, op, ": z_loss must be >= 0, got ", z_loss);
}

inline void check_lse(const char* op, const at::Tensor& lse, const at::Tensor& logits) {
  check_rows(op, "lse", lse, logits.size(0));
  check_dtype(op, "lse", lse, compute_dtype(logits.scalar_type()));
  check_device(op, "lse", lse, logits);
}

inline void check_x_and_A(const char* op, const at::Tensor& x, const at::Tensor& A) {
  check_matrix(op, "x", x, "[N, K]");
  check_matrix(op, "lora_A", A, "[r, K]");
  check_floating(op, "x", x);
  check_floating(op, "lora_A", A);
  TORCH_CHECK(A.size(1) == x.size(1), op, ": lora_A must have shape [r, ", x.size(1), "] to match x ",
              shape_str(x), ", got ", shape_str(A));
  check_device(op, "lora_A", A, x);
}

inline void check_shrink_backward_args(const char* op, const at::Tensor& x_in, const at::Tensor& grad_S_in,
                                       const at::Tensor& A_in, double dropout_p) {
  check_x_and_A(op, x_in, A_in);
  check_matrix(op, "grad_S", grad_S_in, "[N, r]");
  check_floating(op, "grad_S", grad_S_in);
  TORCH_CHECK(grad_S_in.size(0) == x_in.size(0) && grad_S_in.size(1) == A_in.size(0), op,
              ": grad_S must have shape [", x_in.size(0), ", ", A_in.size(0), "], got ", shape_str(grad_S_in));
  check_device(op, "grad_S", grad_S_in, x_in);
  check_dropout(op, dropout_p);
}

inline void check_compress_args(const char* op, const at::Tensor& x_in, int64_t r_hat, int64_t mora_type,
                                double dropout_p, const c10::optional<at::Tensor>& cos_in,
                                const c10::optional<at::Tensor>& sin_in) {
  check_matrix(op, "x", x_in, "[N, K]");
  check_floating(op, "x", x_in);
  check_dropout(op, dropout_p);
  check_mora_geometry(op, x_in.size(1), r_hat, mora_type);
  check_rope(op, cos_in, sin_in, mora_type, mora_chunks(x_in.size(1), r_hat, mora_type), r_hat, x_in);
}

inline void check_compress_backward_args(const char* op, const at::Tensor& gz_in, int64_t in_features, int64_t r_hat,
                                         int64_t mora_type, double dropout_p, const c10::optional<at::Tensor>& cos_in,
                                         const c10::optional<at::Tensor>& sin_in, at::ScalarType dtype) {
  check_matrix(op, "grad_z", gz_in, "[N, R] or [N, n R]");
  check_dropout(op, dropout_p);
  check_mora_geometry(op, in_features, r_hat, mora_type);
  const int64_t n_chunks = mora_chunks(in_features, r_hat, mora_type);
  check_rope(op, cos_in, sin_in, mora_type, n_chunks, r_hat, gz_in);
  const int64_t width = mora_type == 6 ? n_chunks * r_hat : r_hat;
  TORCH_CHECK(gz_in.size(1) == width, op, ": grad_z must have ", width, " columns for mora_type ",
              mora_type, ", got shape ", shape_str(gz_in));
  check_floating_type(op, "dtype", dtype);
  check_dtype(op, "grad_z", gz_in, compute_dtype(dtype));
}

inline void check_decompress_args(const char* op, const at::Tensor& ys_in, int64_t out_features, int64_t r_hat,
                                  int64_t mora_type, const c10::optional<at::Tensor>& bias_in, at::ScalarType dtype) {
  check_matrix(op, "y_slots", ys_in, "[N, R] or [N, n R]");
  check_mora_type(op, mora_type);
  TORCH_CHECK(r_hat > 0 && out_features > 0, op, ": r_hat and out_features must be positive, got ", r_hat, " and ",
              out_features);
  const int64_t width = ys_in.size(1);
  TORCH_CHECK(mora_type == 6 ? (width % r_hat == 0 && width > 0) : width == r_hat, op, ": y_slots must have ",
              mora_type == 6 ? "a positive multiple of r_hat" : "r_hat", " (", r_hat, ") columns, got shape ",
              shape_str(ys_in));
  check_floating_type(op, "dtype", dtype);
  check_dtype(op, "y_slots", ys_in, compute_dtype(dtype));
  if (bias_in.has_value()) {
    check_rows(op, "bias", *bias_in, out_features);
    check_floating(op, "bias", *bias_in);
    check_device(op, "bias", *bias_in, ys_in);
  }
}

inline void check_decompress_backward_args(const char* op, const at::Tensor& gy_in, int64_t r_hat, int64_t mora_type,
                                           int64_t n_chunks) {
  check_matrix(op, "grad_y", gy_in, "[N, D]");
  check_floating(op, "grad_y", gy_in);
  check_mora_type(op, mora_type);
  TORCH_CHECK(r_hat > 0, op, ": r_hat must be positive, got ", r_hat);
  // n_chunks only sizes type 6's slots; types 2 and 3 allow r_hat > in_features (n_chunks 0)
  TORCH_CHECK(mora_type != 6 || n_chunks > 0, op, ": n_chunks must be positive for mora_type 6, got ", n_chunks);
}

}  // namespace fusedpeft
