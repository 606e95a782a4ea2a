// Launcher of the DoRA kernel of csrc/cuda/dora.cu (no torch types, as kernels.h).
#pragma once

#include "kernels.h"

namespace fusedpeft::cuda {

// One pass over dY [N, D] (and Y [N, D]), both in dtype, row-major: dyg = dY * g (dtype, skipped
// when null) and partial[s, j] = sum over the rows of split s of dY[t, j] Y[t, j] (compute dtype,
// skipped when null; splits of rows_per_split rows). g [D] in the compute dtype.
void launch_dora_scale_colsum(DType dtype, const void* grad_y, const void* y, const void* g, void* dyg, void* partial,
                              int64_t rows, int64_t D, int64_t splits, int64_t rows_per_split, cudaStream_t stream);

}  // namespace fusedpeft::cuda
