// Argument checks of fusedpeft_C::dequantize_4bit, shared by the CPU and CUDA implementations
// (csrc/cpu/dequant_4bit.cpp, csrc/cuda/dequant_4bit_ops.cpp); the layout is fusedpeft/quantized.py's.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "checks.h"

namespace fusedpeft {

inline void check_dequant_4bit_args(const char* op, const at::Tensor& packed, const at::Tensor& code,
                                    const at::Tensor& absmax, const std::optional<at::Tensor>& code2,
                                    const std::optional<at::Tensor>& absmax2, int64_t blocksize, int64_t blocksize2,
                                    int64_t numel, at::ScalarType dtype) {
  check_dtype(op, "packed", packed, at::kByte);
  check_dtype(op, "code", code, at::kFloat);
  TORCH_CHECK(code.numel() == 16, op, ": code must hold the 16 values of the 4-bit code book, got ", code.numel());
  TORCH_CHECK(blocksize >= 2 && blocksize % 2 == 0, op, ": blocksize must be even and >= 2, got ", blocksize);
  TORCH_CHECK(numel >= 0 && packed.numel() == (numel + 1) / 2, op, ": packed must hold (numel + 1) / 2 = ",
              (numel + 1) / 2, " bytes for numel = ", numel, ", got ", packed.numel());
  const int64_t n_blocks = (numel + blocksize - 1) / blocksize;
  TORCH_CHECK(absmax.numel() == n_blocks, op, ": absmax must hold one scale per block (", n_blocks, "), got ",
              absmax.numel());
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op,
              ": dtype must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(code2.has_value() == absmax2.has_value(), op, ": code2 and absmax2 come together (double quantization)");
  for (const auto* t : {&code, &absmax}) check_device(op, "code / absmax", *t, packed);
  if (code2.has_value()) {
    check_dtype(op, "absmax (double quantized)", absmax, at::kByte);
    check_dtype(op, "code2", *code2, at::kFloat);
    check_dtype(op, "absmax2", *absmax2, at::kFloat);
    TORCH_CHECK(code2->numel() == 256, op, ": code2 must hold 256 values, got ", code2->numel());
    TORCH_CHECK(blocksize2 > 0 && absmax2->numel() == (n_blocks + blocksize2 - 1) / blocksize2, op,
                ": absmax2 must hold ceil(", n_blocks, " / blocksize2=", blocksize2, ") values, got ",
                absmax2->numel());
    check_device(op, "code2", *code2, packed);
    check_device(op, "absmax2", *absmax2, packed);
  } else {
    check_dtype(op, "absmax", absmax, at::kFloat);
  }
}

}  // namespace fusedpeft
