// MoRA's compress / decompress maps on CPU (docs/contract.md §3), types 1-4 and 6, one row of x per step:
// no padded, reshaped or rotated copy of x is ever built beyond one row of scratch. The square
// matmul z @ M^T and the base GEMM stay in ATen (fusedpeft/cpp_backend/mora.py).
//
// Per row (compute dtype, x's row dropped in-kernel with the docs/contract.md §5 mask when dropout_p > 0):
// - compress, types 1, 4: z[e mod R] += x_ext[e] over the wrap-padded row (e < n R);
//   types 2, 3: z[g] = sum of contiguous group g; type 6: z[i R + j] = the rotate-half RoPE of
//   chunk i of x_ext, z [n R] (so that z.view(N n, R) @ M^T applies M to every rotated chunk).
// - compress_backward: the adjoint (tile / group broadcast, inverse rotation, the wrapped
//   features folded back onto the first ones), times the same mask.
// - decompress: y[p] = bias[p] + y_slots[slot(p)] with slot p mod R (types 1, 3), the
//   repeat_interleave group (types 2, 4), p mod n R (type 6); decompress_backward: its adjoint.
// FLOPs: O(N (K + D)) (type 6: 3 N n R); bytes: one read of the [N, K] or [N, D] side and one
// write of the other ([N, R] or [N, n R] in the compute dtype).
#include "../checks.h"
#include "common.h"

#include <torch/library.h>

namespace fusedpeft::cpu {
namespace {

// dst[p mod P] += src[p], p < L
template <typename T>
void tile_scatter(const T* src, int64_t L, T* dst, int64_t P) {
  for (int64_t p0 = 0; p0 < L; p0 += P) {
    const int64_t n = std::min(P, L - p0);
    for (int64_t j = 0; j < n; ++j) dst[j] += src[p0 + j];
  }
}

// out[p] += src[p mod P], p < L
template <typename T>
void tile_gather(T* out, int64_t L, const T* src, int64_t P) {
  for (int64_t p0 = 0; p0 < L; p0 += P) {
    const int64_t n = std::min(P, L - p0);
    for (int64_t j = 0; j < n; ++j) out[p0 + j] += src[j];
  }
}

// Contiguous groups of docs/contract.md §3: the first L mod R groups hold L / R + 1 positions, the rest L / R.
template <typename T, typename F>
void for_groups(int64_t L, int64_t R, F&& f) {
  const int64_t q = L / R, big = L % R;
  int64_t start = 0;
  for (int64_t g = 0; g < R; ++g) {
    const int64_t size = g < big ? q + 1 : q;
    f(g, start, size);
    start += size;
  }
}

template <typename T>
void group_scatter(const T* src, int64_t L, T* dst, int64_t R) {
  for_groups<T>(L, R, [&](int64_t g, int64_t start, int64_t size) {
    T s = 0;
    for (int64_t j = 0; j < size; ++j) s += src[start + j];
    dst[g] += s;
  });
}

template <typename T>
void group_gather(T* out, int64_t L, const T* src, int64_t R) {
  for_groups<T>(L, R, [&](int64_t g, int64_t start, int64_t size) {
    for (int64_t j = 0; j < size; ++j) out[start + j] += src[g];
  });
}

// Type 6: z = RoPE(x_ext) per chunk (sign -1 pairs j < R/2 with j + R/2, +1 the other way);
// inverse = the transpose (sin negated).
template <typename T>
void rotate_chunks(const T* in, T* out, int64_t n_chunks, int64_t R, const float* cos, const float* sin,
                   bool inverse) {
  const int64_t h = R / 2;
  for (int64_t i = 0; i < n_chunks; ++i) {
    const T* a = in + i * R;
    T* o = out + i * R;
    const float* c = cos + i * R;
    const float* s = sin + i * R;
    const T sign = inverse ? T(1) : T(-1);
    for (int64_t j = 0; j < h; ++j) o[j] = a[j] * static_cast<T>(c[j]) + sign * a[j + h] * static_cast<T>(s[j]);
    for (int64_t j = h; j < R; ++j) o[j] = a[j] * static_cast<T>(c[j]) - sign * a[j - h] * static_cast<T>(s[j]);
  }
}

struct Geometry {
  int64_t K, R, type, pad, n_chunks;
  Geometry(int64_t in_features, int64_t r_hat, int64_t mora_type)
      : K(in_features), R(r_hat), type(mora_type), pad(mora_pad(in_features, r_hat, mora_type)),
        n_chunks((in_features + mora_pad(in_features, r_hat, mora_type)) / r_hat) {}
  int64_t z_width() const { return type == 6 ? n_chunks * R : R; }
};

at::Tensor mora_compress(const at::Tensor& x_in, int64_t r_hat, int64_t mora_type, double dropout_p, int64_t seed,
                         const c10::optional<at::Tensor>& cos_in, const c10::optional<at::Tensor>& sin_in) {
  const char* op = "fusedpeft_C::mora_compress";
  check_compress_args(op, x_in, r_hat, mora_type, dropout_p, cos_in, sin_in);
  const Geometry g(x_in.size(1), r_hat, mora_type);
  const auto x = x_in.contiguous();
  const int64_t rows = x.size(0), K = g.K, R = g.R, ext = g.n_chunks * R, width = g.z_width();
  auto z = at::empty({rows, width}, x.options().dtype(compute_dtype(x.scalar_type())));
  const at::Tensor cos = mora_type == 6 ? cos_in->contiguous() : at::Tensor();
  const at::Tensor sin = mora_type == 6 ? sin_in->contiguous() : at::Tensor();
  const DropoutParams d = make_dropout(dropout_p, seed);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mora_compress", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    acc_t* zp = z.data_ptr<acc_t>();
    at::parallel_for(0, rows, grain_rows(K), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> xe(std::max(ext, K));
      std::vector<uint8_t> keep(K);
      for (int64_t m = begin; m < end; ++m) {
        acc_t* out = zp + m * width;
        dropped_row(xp + m * K, xe.data(), keep.data(), d, m, K, 0, K);
        std::copy(xe.begin(), xe.begin() + g.pad, xe.begin() + K);
        if (mora_type == 6) {
          rotate_chunks(xe.data(), out, g.n_chunks, R, cos.data_ptr<float>(), sin.data_ptr<float>(), false);
          continue;
        }
        std::fill(out, out + R, acc_t(0));
        if (mora_type == 1 || mora_type == 4) {
          tile_scatter(xe.data(), ext, out, R);
        } else {
          group_scatter(xe.data(), K, out, R);
        }
      }
    });
  });
  return z;
}

at::Tensor mora_compress_backward(const at::Tensor& gz_in, int64_t in_features, int64_t r_hat, int64_t mora_type,
                                  double dropout_p, int64_t seed, const c10::optional<at::Tensor>& cos_in,
                                  const c10::optional<at::Tensor>& sin_in, at::ScalarType dtype) {
  const char* op = "fusedpeft_C::mora_compress_backward";
  check_compress_backward_args(op, gz_in, in_features, r_hat, mora_type, dropout_p, cos_in, sin_in, dtype);
  const Geometry g(in_features, r_hat, mora_type);
  const auto gz = gz_in.contiguous();
  const int64_t rows = gz.size(0), K = g.K, R = g.R, ext = g.n_chunks * R, width = g.z_width();
  auto grad_x = at::empty({rows, K}, gz.options().dtype(dtype));
  const at::Tensor cos = mora_type == 6 ? cos_in->contiguous() : at::Tensor();
  const at::Tensor sin = mora_type == 6 ? sin_in->contiguous() : at::Tensor();
  const DropoutParams d = make_dropout(dropout_p, seed);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "mora_compress_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    const acc_t* gp = gz.data_ptr<acc_t>();
    scalar_t* out = grad_x.data_ptr<scalar_t>();
    const acc_t scale = static_cast<acc_t>(d.keep_scale);
    at::parallel_for(0, rows, grain_rows(K), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> ge(std::max(ext, K));
      std::vector<uint8_t> keep(K);
      for (int64_t m = begin; m < end; ++m) {
        const acc_t* h = gp + m * width;
        if (mora_type == 6) {
          rotate_chunks(h, ge.data(), g.n_chunks, R, cos.data_ptr<float>(), sin.data_ptr<float>(), true);
        } else {
          std::fill(ge.begin(), ge.end(), acc_t(0));
          if (mora_type == 1 || mora_type == 4) {
            tile_gather(ge.data(), ext, h, R);
          } else {
            group_gather(ge.data(), K, h, R);
          }
        }
        for (int64_t j = 0; j < g.pad; ++j) ge[j] += ge[K + j];
        scalar_t* o = out + m * K;
        if (d.active) {
          philox_keep(keep.data(), d.k0, d.k1, d.p, dropout_offset(m, K, 0), K);
          apply_keep(ge.data(), o, keep.data(), scale, K);
        } else {
          for (int64_t k = 0; k < K; ++k) o[k] = static_cast<scalar_t>(ge[k]);
        }
      }
    });
  });
  return grad_x;
}

at::Tensor mora_decompress(const at::Tensor& ys_in, int64_t out_features, int64_t r_hat, int64_t mora_type,
                           const c10::optional<at::Tensor>& bias_in, at::ScalarType dtype) {
  const char* op = "fusedpeft_C::mora_decompress";
  check_decompress_args(op, ys_in, out_features, r_hat, mora_type, bias_in, dtype);
  const auto acc = compute_dtype(dtype);
  const auto ys = ys_in.contiguous();
  const auto bias = bias_in.has_value() ? bias_in->to(acc).contiguous() : at::zeros({out_features}, ys.options());
  const int64_t rows = ys.size(0), D = out_features, width = ys.size(1);
  auto y = at::empty({rows, D}, ys.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "mora_decompress", [&] {
    using acc_t = acc_type<scalar_t>;
    const acc_t* s = ys.data_ptr<acc_t>();
    const acc_t* b = bias.data_ptr<acc_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain_rows(D), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> buf(D);
      for (int64_t m = begin; m < end; ++m) {
        std::copy(b, b + D, buf.begin());
        if (mora_type == 2 || mora_type == 4) {
          group_gather(buf.data(), D, s + m * width, r_hat);
        } else {
          tile_gather(buf.data(), D, s + m * width, width);
        }
        for (int64_t p = 0; p < D; ++p) yp[m * D + p] = static_cast<scalar_t>(buf[p]);
      }
    });
  });
  return y;
}

at::Tensor mora_decompress_backward(const at::Tensor& gy_in, int64_t r_hat, int64_t mora_type, int64_t n_chunks) {
  const char* op = "fusedpeft_C::mora_decompress_backward";
  check_decompress_backward_args(op, gy_in, r_hat, mora_type, n_chunks);
  const auto gy = gy_in.contiguous();
  const int64_t rows = gy.size(0), D = gy.size(1), width = mora_type == 6 ? n_chunks * r_hat : r_hat;
  auto h = at::empty({rows, width}, gy.options().dtype(compute_dtype(gy.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gy.scalar_type(), "mora_decompress_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* g = gy.data_ptr<scalar_t>();
    acc_t* hp = h.data_ptr<acc_t>();
    at::parallel_for(0, rows, grain_rows(D), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> buf(D);
      for (int64_t m = begin; m < end; ++m) {
        for (int64_t p = 0; p < D; ++p) buf[p] = static_cast<acc_t>(g[m * D + p]);
        acc_t* out = hp + m * width;
        std::fill(out, out + width, acc_t(0));
        if (mora_type == 2 || mora_type == 4) {
          group_scatter(buf.data(), D, out, r_hat);
        } else {
          tile_scatter(buf.data(), D, out, width);
        }
      }
    });
  });
  return h;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedpeft_C, CPU, m) {
  m.impl("mora_compress", &mora_compress);
  m.impl("mora_compress_backward", &mora_compress_backward);
  m.impl("mora_decompress", &mora_decompress);
  m.impl("mora_decompress_backward", &mora_decompress_backward);
}

}  // namespace fusedpeft::cpu
