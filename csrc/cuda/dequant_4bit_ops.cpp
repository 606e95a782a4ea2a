// CUDA implementation of fusedpeft_C::dequantize_4bit (schema: csrc/ops.cpp): the shared checks
// (csrc/dequant_4bit.h), then the kernel of dequant_4bit.cu on the current stream; no host sync.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../dequant_4bit.h"
#include "kernels.h"

namespace fusedpeft::cuda {
namespace {

at::Tensor dequantize_4bit(const at::Tensor& packed_in, const at::Tensor& code_in, const at::Tensor& absmax_in,
                           const std::optional<at::Tensor>& code2, const std::optional<at::Tensor>& absmax2,
                           double offset, int64_t blocksize, int64_t blocksize2, int64_t numel, at::ScalarType dtype) {
  const char* op = "fusedpeft_C::dequantize_4bit";
  check_dequant_4bit_args(op, packed_in, code_in, absmax_in, code2, absmax2, blocksize, blocksize2, numel, dtype);
  const c10::cuda::CUDAGuard guard(packed_in.device());
  const auto packed = packed_in.contiguous(), code = code_in.contiguous(), absmax = absmax_in.contiguous();
  at::Tensor c2, a2;
  if (code2.has_value()) {
    c2 = code2->contiguous();
    a2 = absmax2->contiguous();
  }
  auto out = at::empty({numel}, packed.options().dtype(dtype));
  const DType out_dtype = dtype == at::kBFloat16 ? DType::kBFloat16 : dtype == at::kHalf ? DType::kHalf : DType::kFloat;
  launch_dequant_4bit(out_dtype, packed.data_ptr<uint8_t>(), code.data_ptr<float>(), absmax.data_ptr(),
                      c2.defined() ? c2.data_ptr<float>() : nullptr, a2.defined() ? a2.data_ptr<float>() : nullptr,
                      static_cast<float>(offset), packed.numel(), numel, blocksize, code2.has_value() ? blocksize2 : 1,
                      out.data_ptr(), c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedpeft_C, CUDA, m) { m.impl("dequantize_4bit", &dequantize_4bit); }

}  // namespace fusedpeft::cuda
