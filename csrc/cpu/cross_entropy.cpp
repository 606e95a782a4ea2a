// Row-wise cross-entropy on CPU (docs/contract.md §4): one OpenMP task per block of rows.
//
// Forward, per row with a non-zero scale: an online logsumexp in the compute dtype over
// vocabulary blocks of kBlock values (block max, rescale the running sum once per block, then
// one exp per element), softcap applied while a block is loaded, sum(z) for label smoothing,
// z[y] read once. Reads the row once: V elements, 2 exp-free + 1 exp pass over an L1-resident block.
// Backward: g = d(scale * l)/dz = exp(z - lse) (1 + 2 z_loss lse) scale - scale eps / V, the target
// column recomputed in the compute dtype and written last (so g may alias z: ce_loss_and_grad_
// turns the logits into their gradient in place), times 1 - tanh^2 under softcap. Rows with scale
// 0 are skipped (grad rows zeroed). Bytes: forward N V s, backward 2 N V s (s = element size);
// FLOPs about 5 N V per direction plus the exps.
// Limits: labels must lie in [0, V) (checked); logits are read as contiguous rows.
#include "../checks.h"
#include "common.h"

#include <torch/library.h>

#include <algorithm>
#include <limits>

namespace fusedpeft::cpu {
namespace {

constexpr int64_t kBlock = 2048;

template <typename scalar_t, typename acc_t>
const acc_t* load_block(const scalar_t* src, int64_t n, acc_t* buf, acc_t softcap) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (softcap <= 0) return src;
  }
  if (softcap > 0) {
    for (int64_t j = 0; j < n; ++j) buf[j] = softcap * std::tanh(static_cast<acc_t>(src[j]) / softcap);
  } else {
    for (int64_t j = 0; j < n; ++j) buf[j] = static_cast<acc_t>(src[j]);
  }
  return buf;
}

template <typename acc_t>
acc_t capped(acc_t z, acc_t softcap) {
  return softcap > 0 ? softcap * std::tanh(z / softcap) : z;
}

struct Options {
  double label_smoothing, z_loss, softcap;
};

// (l_t, lse) of one row.
template <typename scalar_t, typename acc_t>
std::pair<acc_t, acc_t> row_loss(const scalar_t* z, int64_t vocab, int64_t label, const Options& o, acc_t* buf) {
  const acc_t cap = static_cast<acc_t>(o.softcap);
  acc_t run_max = -std::numeric_limits<acc_t>::infinity(), run_sum = 0, z_sum = 0;
  for (int64_t j0 = 0; j0 < vocab; j0 += kBlock) {
    const int64_t n = std::min(kBlock, vocab - j0);
    const acc_t* b = load_block<scalar_t, acc_t>(z + j0, n, buf, cap);
    const acc_t b_max = block_max(b, n);
    if (o.label_smoothing != 0.0) z_sum += block_sum(b, n);
    if (b_max > run_max) {
      run_sum = run_sum == 0 ? acc_t(0) : run_sum * std::exp(run_max - b_max);
      run_max = b_max;
    }
    run_sum += block_expsum(b, n, run_max);
  }
  const acc_t lse = run_max + std::log(run_sum);
  const acc_t z_target = capped(static_cast<acc_t>(z[label]), cap);
  const acc_t eps = static_cast<acc_t>(o.label_smoothing);
  acc_t loss = (1 - eps) * (lse - z_target) + static_cast<acc_t>(o.z_loss) * lse * lse;
  if (eps != 0) loss += eps * (lse - z_sum / static_cast<acc_t>(vocab));
  return {loss, lse};
}

// g[0, V) = d(scale * l)/dz of one row; g may alias z.
template <typename scalar_t, typename acc_t>
void row_grad(const scalar_t* z, scalar_t* g, int64_t vocab, int64_t label, acc_t scale, acc_t lse,
              const Options& o, acc_t* buf, acc_t* gbuf) {
  const acc_t cap = static_cast<acc_t>(o.softcap), eps = static_cast<acc_t>(o.label_smoothing);
  const acc_t c1 = scale * (1 + 2 * static_cast<acc_t>(o.z_loss) * lse);
  const acc_t c0 = scale * eps / static_cast<acc_t>(vocab);
  const acc_t z_target = capped(static_cast<acc_t>(z[label]), cap);
  for (int64_t j0 = 0; j0 < vocab; j0 += kBlock) {
    const int64_t n = std::min(kBlock, vocab - j0);
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      if (cap <= 0) {
        block_ce_grad(z + j0, g + j0, n, lse, c1, c0);
        continue;
      }
    }
    const acc_t* b = load_block<scalar_t, acc_t>(z + j0, n, buf, cap);
    block_ce_grad(b, gbuf, n, lse, c1, c0);
    if (cap > 0) {
      for (int64_t j = 0; j < n; ++j) {
        const acc_t t = b[j] / cap;
        gbuf[j] *= 1 - t * t;
      }
    }
    for (int64_t j = 0; j < n; ++j) g[j0 + j] = static_cast<scalar_t>(gbuf[j]);
  }
  acc_t g_target = std::exp(z_target - lse) * c1 - c0 - scale * (1 - eps);
  if (cap > 0) g_target *= 1 - (z_target / cap) * (z_target / cap);
  g[label] = static_cast<scalar_t>(g_target);
}

void check_labels_cpu(const char* op, const at::Tensor& labels, int64_t vocab) {
  const int64_t* y = labels.data_ptr<int64_t>();
  for (int64_t i = 0; i < labels.numel(); ++i) {
    TORCH_CHECK(y[i] >= 0 && y[i] < vocab, op, ": labels[", i, "] = ", y[i], " is outside [0, ", vocab, ")");
  }
}

std::tuple<at::Tensor, at::Tensor> ce_forward(const at::Tensor& logits_in, const at::Tensor& labels_in,
                                              const at::Tensor& row_scale_in, double label_smoothing, double z_loss,
                                              double softcap) {
  const char* op = "fusedpeft_C::ce_forward";
  const Options o{label_smoothing, z_loss, softcap};
  check_ce_args(op, logits_in, labels_in, row_scale_in, "row_scale", label_smoothing, z_loss);
  const auto logits = logits_in.contiguous();
  const auto labels = labels_in.contiguous();
  const auto row_scale = row_scale_in.contiguous();
  check_labels_cpu(op, labels, logits.size(1));
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  auto loss = at::zeros({rows}, row_scale.options());
  auto lse = at::zeros({rows}, row_scale.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "ce_forward", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* z = logits.data_ptr<scalar_t>();
    const int64_t* y = labels.data_ptr<int64_t>();
    const acc_t* w = row_scale.data_ptr<acc_t>();
    acc_t* loss_out = loss.data_ptr<acc_t>();
    acc_t* lse_out = lse.data_ptr<acc_t>();
    at::parallel_for(0, rows, grain_rows(vocab), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> buf(kBlock);
      for (int64_t t = begin; t < end; ++t) {
        if (w[t] == 0) continue;
        const auto [l, s] = row_loss<scalar_t, acc_t>(z + t * vocab, vocab, y[t], o, buf.data());
        loss_out[t] = l;
        lse_out[t] = s;
      }
    });
  });
  return {loss, lse};
}

template <typename scalar_t>
void grad_rows(const at::Tensor& logits, at::Tensor& grad, const at::Tensor& labels, const at::Tensor& scale,
               const at::Tensor* lse, at::Tensor* loss, const Options& o) {
  using acc_t = acc_type<scalar_t>;
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  const scalar_t* z = logits.data_ptr<scalar_t>();
  scalar_t* g = grad.data_ptr<scalar_t>();
  const int64_t* y = labels.data_ptr<int64_t>();
  const acc_t* s = scale.data_ptr<acc_t>();
  const acc_t* lse_in = lse ? lse->data_ptr<acc_t>() : nullptr;
  acc_t* loss_out = loss ? loss->data_ptr<acc_t>() : nullptr;
  at::parallel_for(0, rows, grain_rows(vocab), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(kBlock), gbuf(kBlock);
    for (int64_t t = begin; t < end; ++t) {
      scalar_t* g_row = g + t * vocab;
      if (s[t] == 0) {
        std::fill(g_row, g_row + vocab, scalar_t(0));
        continue;
      }
      acc_t row_lse;
      if (lse_in) {
        row_lse = lse_in[t];
      } else {
        const auto [l, lse_t] = row_loss<scalar_t, acc_t>(z + t * vocab, vocab, y[t], o, buf.data());
        loss_out[t] = l;
        row_lse = lse_t;
      }
      row_grad<scalar_t, acc_t>(z + t * vocab, g_row, vocab, y[t], s[t], row_lse, o, buf.data(), gbuf.data());
    }
  });
}

at::Tensor ce_backward(const at::Tensor& logits_in, const at::Tensor& labels_in, const at::Tensor& scale_in,
                       const at::Tensor& lse_in, double label_smoothing, double z_loss, double softcap) {
  const char* op = "fusedpeft_C::ce_backward";
  const Options o{label_smoothing, z_loss, softcap};
  check_ce_args(op, logits_in, labels_in, scale_in, "scale", label_smoothing, z_loss);
  check_lse(op, lse_in, logits_in);
  const auto logits = logits_in.contiguous();
  const auto labels = labels_in.contiguous();
  const auto scale = scale_in.contiguous();
  const auto lse = lse_in.contiguous();
  check_labels_cpu(op, labels, logits.size(1));
  auto grad = at::empty_like(logits);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "ce_backward", [&] {
    grad_rows<scalar_t>(logits, grad, labels, scale, &lse, nullptr, o);
  });
  return grad;
}

at::Tensor ce_loss_and_grad_(at::Tensor& logits, const at::Tensor& labels_in, const at::Tensor& scale_in,
                             double label_smoothing, double z_loss, double softcap) {
  const char* op = "fusedpeft_C::ce_loss_and_grad_";
  const Options o{label_smoothing, z_loss, softcap};
  check_ce_args(op, logits, labels_in, scale_in, "scale", label_smoothing, z_loss);
  TORCH_CHECK(logits.is_contiguous(), op, ": logits must be contiguous (it is overwritten in place)");
  const auto labels = labels_in.contiguous();
  const auto scale = scale_in.contiguous();
  check_labels_cpu(op, labels, logits.size(1));
  auto loss = at::zeros({logits.size(0)}, scale.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "ce_loss_and_grad_", [&] {
    grad_rows<scalar_t>(logits, logits, labels, scale, nullptr, &loss, o);
  });
  return loss;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedpeft_C, CPU, m) {
  m.impl("ce_forward", &ce_forward);
  m.impl("ce_backward", &ce_backward);
  m.impl("ce_loss_and_grad_", &ce_loss_and_grad_);
}

}  // namespace fusedpeft::cpu
