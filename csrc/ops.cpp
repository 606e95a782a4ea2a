// The schemas of the extension's ops, namespace "fusedpeft_C" (the Python custom ops in
// fusedpeft/ops own the "fusedpeft" namespace; these are the kernels they call through
// fusedpeft/cpp_backend). CPU implementations: csrc/cpu/*.cpp; CUDA: csrc/cuda/ops_cuda.cpp.
// All ops are functional except ce_loss_and_grad_, which overwrites its logits with the gradient.
// "compute dtype" below = float64 for float64 inputs, else float32.
#include <torch/extension.h>

#include "cpu/vec.h"

TORCH_LIBRARY(fusedpeft_C, m) {
  // logits [N, V] (fp16/bf16/fp32/fp64), labels [N] int64, row_scale [N] compute dtype ->
  // (l_t [N], lse [N]) compute dtype, both 0 on rows with row_scale == 0. softcap <= 0: none.
  m.def("ce_forward(Tensor logits, Tensor labels, Tensor row_scale, float label_smoothing, float z_loss, "
        "float softcap) -> (Tensor, Tensor)");
  // -> d(sum_t scale_t l_t)/d logits [N, V] in logits' dtype (zero rows where scale == 0).
  m.def("ce_backward(Tensor logits, Tensor labels, Tensor scale, Tensor lse, float label_smoothing, "
        "float z_loss, float softcap) -> Tensor");
  // logits <- d(sum_t scale_t l_t)/d logits in place; returns l_t [N] (compute dtype).
  m.def("ce_loss_and_grad_(Tensor(a!) logits, Tensor labels, Tensor scale, float label_smoothing, "
        "float z_loss, float softcap) -> Tensor");
  // x [N, K], lora_A [r, K] -> S = dropout(x) @ A^T [N, r] in x's dtype (docs/contract.md §5 mask in-kernel).
  m.def("lora_shrink(Tensor x, Tensor lora_A, float dropout_p, int seed) -> Tensor");
  // grad_S [N, r] -> (dropout'(grad_S @ A) [N, K] in x's dtype, grad_S^T @ dropout(x) [r, K]
  // compute dtype); an output not asked for is empty [0].
  m.def("lora_shrink_backward(Tensor x, Tensor grad_S, Tensor lora_A, float dropout_p, int seed, "
        "bool need_x, bool need_A) -> (Tensor, Tensor)");
  // x [N, K] -> z: types 1-4 [N, R] (compress of dropout(x)); type 6 [N, n R] (rotated chunks of
  // the wrap-padded dropout(x)), compute dtype. cos, sin [n, R] fp32 (type 6 only).
  m.def("mora_compress(Tensor x, int r_hat, int mora_type, float dropout_p, int seed, Tensor? cos, "
        "Tensor? sin) -> Tensor");
  // adjoint of mora_compress: grad_z -> grad_x [N, in_features] in dtype.
  m.def("mora_compress_backward(Tensor grad_z, int in_features, int r_hat, int mora_type, float dropout_p, "
        "int seed, Tensor? cos, Tensor? sin, ScalarType dtype) -> Tensor");
  // y_slots [N, R] (types 1-4) or [N, n R] (type 6) -> bias + decompress(y_slots) [N, D] in dtype.
  m.def("mora_decompress(Tensor y_slots, int out_features, int r_hat, int mora_type, Tensor? bias, "
        "ScalarType dtype) -> Tensor");
  // adjoint of mora_decompress: grad_y [N, D] -> [N, R] or [N, n R], compute dtype.
  m.def("mora_decompress_backward(Tensor grad_y, int r_hat, int mora_type, int n_chunks) -> Tensor");
  // CPU only: grad_y [N, D], S [N, r], lora_B [D, r] -> (grad_S = scaling grad_y @ lora_B [N, r],
  // grad_B = scaling grad_y^T @ S [D, r]), both compute dtype, from one pass over grad_y.
  m.def("lora_expand_backward(Tensor grad_y, Tensor S, Tensor lora_B, float scaling) -> (Tensor, Tensor)");
  // CPU only (csrc/cpu/dora.cpp): DoRA's backward without dropout from one pass over grad_y and out
  // (the layer's output, [N, D]); x [N, K], weight [D, K], S [N, r], lora_A [r, K], lora_B [D, r], g [D]
  // -> (grad_x = (grad_y * g) @ weight + grad_S @ lora_A [N, K] in grad_y's dtype, grad_A = grad_S^T @ x,
  // grad_B = scaling g * grad_y^T @ S, colsum = sum over rows of grad_y * out [D]; compute dtype),
  // grad_S = scaling (grad_y * g) @ lora_B. Unneeded outputs are empty.
  m.def("dora_backward_p0(Tensor grad_y, Tensor out, Tensor x, Tensor weight, Tensor S, Tensor lora_A, "
        "Tensor lora_B, Tensor g, float scaling, bool need_x, bool need_A, bool need_B, bool need_g) -> "
        "(Tensor, Tensor, Tensor, Tensor)");
  // CPU only (csrc/cpu/dora.cpp): weight [D, K] fp32 / fp64, lora_A [r, K], lora_B [D, r], g [D] ->
  // g * weight + (scaling g * lora_B) @ lora_A [D, K] in weight's dtype (DoRA's merged weight).
  m.def("dora_merged_weight(Tensor weight, Tensor lora_A, Tensor lora_B, Tensor g, float scaling) -> Tensor");
  // CPU only, type 6 without dropout (csrc/cpu/mora_rope.cpp): weight [D, K] + ΔW(M) in weight's
  // dtype, and dM [R, R] (compute dtype) from x [N, K] and grad_y [N, D]; cos, sin [n, R] fp32.
  m.def("mora_rope_merge(Tensor weight, Tensor M, int r_hat, Tensor cos, Tensor sin) -> Tensor");
  m.def("mora_rope_weight_grad(Tensor x, Tensor grad_y, int r_hat, Tensor cos, Tensor sin) -> Tensor");
  // A bitsandbytes 4-bit weight (layout: fusedpeft/quantized.py) -> [numel] in dtype, bit-exact with
  // bitsandbytes' dequantize_4bit. packed uint8 [(numel + 1) / 2], code [16] fp32, absmax [blocks]
  // fp32, or uint8 with code2 [256] / absmax2 [ceil(blocks / blocksize2)] / offset (double quant).
  m.def("dequantize_4bit(Tensor packed, Tensor code, Tensor absmax, Tensor? code2, Tensor? absmax2, float offset, "
        "int blocksize, int blocksize2, int numel, ScalarType dtype) -> Tensor");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "fusedpeft._C: registers the torch.ops.fusedpeft_C kernels (CPU, and CUDA when built)";
  module.attr("built_with_cuda") =
#ifdef FUSEDPEFT_WITH_CUDA
      true;
#else
      false;
#endif
  module.def("philox_isa", &fusedpeft::cpu::philox_keep_isa,
             "instruction set of the CPU dropout-mask generator: avx512, avx2 or scalar");
  module.def(
      "philox_keep",
      [](at::Tensor keep, int64_t seed, double p, int64_t first_offset) {
        TORCH_CHECK(keep.device().is_cpu() && keep.scalar_type() == at::kByte && keep.is_contiguous(),
                    "philox_keep: keep must be a contiguous uint8 CPU tensor, got ", keep.scalar_type(), " on ",
                    keep.device());
        const uint64_t s = static_cast<uint64_t>(seed);
        fusedpeft::cpu::philox_keep(keep.data_ptr<uint8_t>(), static_cast<uint32_t>(s), static_cast<uint32_t>(s >> 32),
                                    static_cast<float>(p), static_cast<uint32_t>(first_offset), keep.numel());
      },
      "keep[j] = tl.rand(seed, first_offset + j mod 2^32) >= p, in place (for tests)");
}
