// CUDA kernels of the "cuda" backend: the memory-bound parts of the three op families. The GEMMs
// (base layer, z @ M^T, the LM head) are cuBLAS calls made through ATen in
// fusedpeft/cpp_backend; no torch header here (see kernels.h).
//
// - ce_forward / ce_grad: one 256-thread block per row; online logsumexp in the compute dtype
//   (per-thread running (max, sum), merged with warp shuffles, then across warps in shared
//   memory); softcap, label smoothing and z-loss in-kernel; rows with scale 0 skipped. ce_grad
//   reads z[y] and (without lse) the whole row before the first write, so it may overwrite the
//   logits in place. Bytes: forward N V s, gradient 2 N V s (+ N V s when it also computes lse).
// - lora_shrink: one block per row; a 1024-wide tile of the dropped row (docs/contract.md §5 Philox, computed
//   once per element) in shared memory, one warp per output rank. FLOPs 2 N K r, bytes N K s.
// - lora_grad_x / lora_grad_A: dropout'(gS @ A) one thread per element; gS^T @ dropout(x) with
//   16 ranks per pass in registers, one column per thread over a 64-row chunk, atomics across
//   chunks. Limits: the mask is regenerated ceil(r / 16) times in lora_grad_A.
// - mora_*: one thread per output element, the compress / decompress maps of docs/contract.md §3 evaluated
//   by index arithmetic (wrap padding, contiguous groups, rotate-half RoPE), mask in-kernel.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cfloat>
#include <cmath>

#include "../philox.h"
#include "kernels.h"
#include "traits.cuh"

namespace fusedpeft::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kTile = 1024;
constexpr int kRanksPerPass = 16;
constexpr int kRowsPerChunk = 64;

__device__ __forceinline__ float dexp(float v) { return __expf(v); }
__device__ __forceinline__ double dexp(double v) { return exp(v); }
__device__ __forceinline__ float dlog(float v) { return logf(v); }
__device__ __forceinline__ double dlog(double v) { return log(v); }
__device__ __forceinline__ float dtanh(float v) { return tanhf(v); }
__device__ __forceinline__ double dtanh(double v) { return tanh(v); }

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Merge of two partial logsumexps (running max m, sum of exp(z - m)).
template <typename A>
__device__ __forceinline__ void lse_merge(A& m, A& s, A m2, A s2) {
  const A mx = m > m2 ? m : m2;
  if (mx == -INFINITY) return;
  s = s * dexp(m - mx) + s2 * dexp(m2 - mx);
  m = mx;
}

template <typename A>
__device__ __forceinline__ A capped(A v, A cap) {
  return cap > A(0) ? cap * dtanh(v / cap) : v;
}

// Block-wide (lse, sum z) of one row; every thread gets the result.
template <typename T, typename A>
__device__ void row_stats(const T* z, int64_t vocab, A cap, A& lse, A& z_sum) {
  __shared__ A sh_m[kThreads / 32], sh_s[kThreads / 32], sh_z[kThreads / 32];
  A m = -INFINITY, s = 0, zs = 0;
  for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) {
    const A v = capped(Traits<T>::load(z[j]), cap);
    zs += v;
    if (v > m) {
      s = s * dexp(m - v) + A(1);
      m = v;
    } else {
      s += dexp(v - m);
    }
  }
  for (int o = 16; o > 0; o >>= 1) {
    lse_merge(m, s, __shfl_xor_sync(0xffffffffu, m, o), __shfl_xor_sync(0xffffffffu, s, o));
    zs += __shfl_xor_sync(0xffffffffu, zs, o);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    sh_m[warp] = m;
    sh_s[warp] = s;
    sh_z[warp] = zs;
  }
  __syncthreads();
  m = sh_m[0];
  s = sh_s[0];
  zs = sh_z[0];
  for (int w = 1; w < static_cast<int>(blockDim.x / 32); ++w) {
    lse_merge(m, s, sh_m[w], sh_s[w]);
    zs += sh_z[w];
  }
  lse = m + dlog(s);
  z_sum = zs;
  __syncthreads();
}

template <typename A>
__device__ A row_loss(A lse, A z_target, A z_sum, int64_t vocab, const CeOptions& o) {
  const A eps = static_cast<A>(o.label_smoothing);
  A loss = (A(1) - eps) * (lse - z_target) + static_cast<A>(o.z_loss) * lse * lse;
  if (eps != A(0)) loss += eps * (lse - z_sum / static_cast<A>(vocab));
  return loss;
}

template <typename T>
__global__ void ce_forward_kernel(const T* logits, const int64_t* labels, const typename Traits<T>::acc* scale,
                                  typename Traits<T>::acc* loss, typename Traits<T>::acc* lse, int64_t vocab,
                                  CeOptions o) {
  using A = typename Traits<T>::acc;
  const int64_t row = blockIdx.x;
  if (scale[row] == A(0)) return;
  const T* z = logits + row * vocab;
  const A cap = static_cast<A>(o.softcap);
  A row_lse, z_sum;
  row_stats<T, A>(z, vocab, cap, row_lse, z_sum);
  if (threadIdx.x == 0) {
    const int64_t y = labels[row];
    const bool ok = y >= 0 && y < vocab;  // never read out of bounds; a bad label gives NaN
    loss[row] = ok ? row_loss(row_lse, capped(Traits<T>::load(z[y]), cap), z_sum, vocab, o) : A(NAN);
    lse[row] = row_lse;
  }
}

template <typename T>
__global__ void ce_grad_kernel(const T* logits, T* grad, const int64_t* labels, const typename Traits<T>::acc* scale,
                               const typename Traits<T>::acc* lse_in, typename Traits<T>::acc* loss_out,
                               int64_t vocab, CeOptions o) {
  using A = typename Traits<T>::acc;
  const int64_t row = blockIdx.x;
  const A sc = scale[row];
  const T* z = logits + row * vocab;
  T* g = grad + row * vocab;
  if (sc == A(0)) {
    for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) g[j] = Traits<T>::store(A(0));
    return;
  }
  const A cap = static_cast<A>(o.softcap), eps = static_cast<A>(o.label_smoothing);
  const int64_t y = labels[row];
  const bool ok = y >= 0 && y < vocab;
  const A z_target = ok ? capped(Traits<T>::load(z[y]), cap) : A(0);
  A row_lse;
  if (lse_in != nullptr) {
    row_lse = lse_in[row];
  } else {
    A z_sum;
    row_stats<T, A>(z, vocab, cap, row_lse, z_sum);
    if (threadIdx.x == 0) loss_out[row] = ok ? row_loss(row_lse, z_target, z_sum, vocab, o) : A(NAN);
  }
  __syncthreads();  // z[y] and the row are read before the first write (grad may alias logits)
  const A c1 = sc * (A(1) + A(2) * static_cast<A>(o.z_loss) * row_lse);
  const A c0 = sc * eps / static_cast<A>(vocab);
  for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) {
    const A v = capped(Traits<T>::load(z[j]), cap);
    A gj = dexp(v - row_lse) * c1 - c0;
    if (cap > A(0)) gj *= A(1) - (v / cap) * (v / cap);
    g[j] = Traits<T>::store(gj);
  }
  __syncthreads();
  if (threadIdx.x == 0 && ok) {
    A gy = dexp(z_target - row_lse) * c1 - c0 - sc * (A(1) - eps);
    if (cap > A(0)) gy *= A(1) - (z_target / cap) * (z_target / cap);
    g[y] = Traits<T>::store(gy);
  }
}

template <typename T>
__device__ __forceinline__ typename Traits<T>::acc dropped(const T* x, int64_t row, int64_t K, int64_t col,
                                                           const Dropout& d) {
  using A = typename Traits<T>::acc;
  const A v = Traits<T>::load(x[row * K + col]);
  if (!d.active) return v;
  const float u = philox_uniform(d.k0, d.k1, dropout_offset(row, K, col));
  return u >= d.p ? v * static_cast<A>(d.keep_scale) : A(0);
}

template <typename T>
__global__ void lora_shrink_kernel(const T* x, const typename Traits<T>::acc* Am, T* S, int64_t K, int64_t r,
                                   Dropout d) {
  using A = typename Traits<T>::acc;
  extern __shared__ unsigned char smem_raw[];
  A* tile = reinterpret_cast<A*>(smem_raw);
  A* acc = tile + kTile;
  const int64_t row = blockIdx.x;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, n_warps = blockDim.x / 32;
  for (int64_t i = threadIdx.x; i < r; i += blockDim.x) acc[i] = A(0);
  for (int64_t k0 = 0; k0 < K; k0 += kTile) {
    const int64_t n = K - k0 < kTile ? K - k0 : kTile;
    __syncthreads();
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) tile[j] = dropped(x, row, K, k0 + j, d);
    __syncthreads();
    for (int64_t i = warp; i < r; i += n_warps) {
      A part = 0;
      for (int64_t j = lane; j < n; j += 32) part += tile[j] * Am[i * K + k0 + j];
      part = warp_sum(part);
      if (lane == 0) acc[i] += part;
    }
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < r; i += blockDim.x) S[row * r + i] = Traits<T>::store(acc[i]);
}

template <typename T>
__global__ void lora_grad_x_kernel(const typename Traits<T>::acc* gS, const typename Traits<T>::acc* Am, T* grad_x,
                                   int64_t K, int64_t r, Dropout d) {
  using A = typename Traits<T>::acc;
  extern __shared__ unsigned char smem_raw[];
  A* g_row = reinterpret_cast<A*>(smem_raw);
  const int64_t row = blockIdx.x, col = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  for (int64_t i = threadIdx.x; i < r; i += blockDim.x) g_row[i] = gS[row * r + i];
  __syncthreads();
  if (col >= K) return;
  A acc = 0;
  for (int64_t i = 0; i < r; ++i) acc += g_row[i] * Am[i * K + col];
  if (d.active) {
    const float u = philox_uniform(d.k0, d.k1, dropout_offset(row, K, col));
    acc = u >= d.p ? acc * static_cast<A>(d.keep_scale) : A(0);
  }
  grad_x[row * K + col] = Traits<T>::store(acc);
}

template <typename T>
__global__ void lora_grad_A_kernel(const T* x, const typename Traits<T>::acc* gS, typename Traits<T>::acc* grad_A,
                                   int64_t rows, int64_t K, int64_t r, Dropout d) {
  using A = typename Traits<T>::acc;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= K) return;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kRowsPerChunk;
  const int64_t m1 = m0 + kRowsPerChunk < rows ? m0 + kRowsPerChunk : rows;
  for (int64_t i0 = 0; i0 < r; i0 += kRanksPerPass) {
    A acc[kRanksPerPass];
#pragma unroll
    for (int ii = 0; ii < kRanksPerPass; ++ii) acc[ii] = A(0);
    for (int64_t m = m0; m < m1; ++m) {
      const A v = dropped(x, m, K, col, d);
#pragma unroll
      for (int ii = 0; ii < kRanksPerPass; ++ii) {
        if (i0 + ii < r) acc[ii] += gS[m * r + i0 + ii] * v;
      }
    }
#pragma unroll
    for (int ii = 0; ii < kRanksPerPass; ++ii) {
      if (i0 + ii < r) atomicAdd(grad_A + (i0 + ii) * K + col, acc[ii]);
    }
  }
}

// ----------------------------------------------------------------------------- MoRA maps

// Contiguous groups of docs/contract.md §3 over L positions and R slots.
__device__ __forceinline__ void group_range(int64_t L, int64_t R, int64_t g, int64_t& start, int64_t& size) {
  const int64_t q = L / R, big = L % R;
  start = g * q + (g < big ? g : big);
  size = q + (g < big ? 1 : 0);
}

__device__ __forceinline__ int64_t group_of(int64_t L, int64_t R, int64_t p) {
  const int64_t q = L / R, big = L % R, edge = big * (q + 1);
  return p < edge ? p / (q + 1) : big + (p - edge) / q;
}

__device__ __forceinline__ int64_t feature_of(int64_t e, int64_t K) { return e < K ? e : e - K; }

template <typename T>
__global__ void mora_compress_kernel(const T* x, typename Traits<T>::acc* z, const float* cos, const float* sin,
                                     int64_t width, MoraGeom g, Dropout d) {
  using A = typename Traits<T>::acc;
  const int64_t row = blockIdx.x, s = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (s >= width) return;
  const int64_t K = g.K, R = g.R;
  A acc = 0;
  if (g.type == 1 || g.type == 4) {
    for (int64_t e = s; e < g.n_chunks * R; e += R) acc += dropped(x, row, K, feature_of(e, K), d);
  } else if (g.type == 2 || g.type == 3) {
    int64_t start, size;
    group_range(K, R, s, start, size);
    for (int64_t f = start; f < start + size; ++f) acc += dropped(x, row, K, f, d);
  } else {
    const int64_t i = s / R, j = s % R, half = R / 2;
    const A a = dropped(x, row, K, feature_of(s, K), d);
    const A b = dropped(x, row, K, feature_of(i * R + (j + half) % R, K), d);
    const A sign = j < half ? A(-1) : A(1);
    acc = a * static_cast<A>(cos[s]) + sign * b * static_cast<A>(sin[s]);
  }
  z[row * width + s] = acc;
}

// Gradient reaching ext position e of the wrap-padded row from grad_z (one row).
template <typename A>
__device__ __forceinline__ A compress_grad_at(const A* h, int64_t e, int64_t f, const float* cos, const float* sin,
                                              const MoraGeom& g) {
  const int64_t R = g.R;
  if (g.type == 1 || g.type == 4) return h[e % R];
  if (g.type == 2 || g.type == 3) return h[group_of(g.K, R, f)];
  const int64_t i = e / R, j = e % R, half = R / 2;
  const A sign = j < half ? A(-1) : A(1);
  return h[e] * static_cast<A>(cos[e]) - sign * h[i * R + (j + half) % R] * static_cast<A>(sin[e]);
}

template <typename T>
__global__ void mora_compress_backward_kernel(const typename Traits<T>::acc* gz, T* grad_x, const float* cos,
                                              const float* sin, int64_t width, MoraGeom g, Dropout d) {
  using A = typename Traits<T>::acc;
  const int64_t row = blockIdx.x, f = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (f >= g.K) return;
  const A* h = gz + row * width;
  A acc = compress_grad_at<A>(h, f, f, cos, sin, g);
  if (f < g.pad) acc += compress_grad_at<A>(h, g.K + f, f, cos, sin, g);
  if (d.active) {
    const float u = philox_uniform(d.k0, d.k1, dropout_offset(row, g.K, f));
    acc = u >= d.p ? acc * static_cast<A>(d.keep_scale) : A(0);
  }
  grad_x[row * g.K + f] = Traits<T>::store(acc);
}

template <typename T>
__global__ void mora_decompress_kernel(const typename Traits<T>::acc* ys, const typename Traits<T>::acc* bias, T* y,
                                       int64_t width, MoraGeom g) {
  using A = typename Traits<T>::acc;
  const int64_t row = blockIdx.x, p = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (p >= g.D) return;
  const int64_t slot = (g.type == 2 || g.type == 4) ? group_of(g.D, g.R, p) : p % width;
  const A acc = (bias != nullptr ? bias[p] : A(0)) + ys[row * width + slot];
  y[row * g.D + p] = Traits<T>::store(acc);
}

template <typename T>
__global__ void mora_decompress_backward_kernel(const T* gy, typename Traits<T>::acc* h, int64_t width, MoraGeom g) {
  using A = typename Traits<T>::acc;
  const int64_t row = blockIdx.x, s = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (s >= width) return;
  const T* in = gy + row * g.D;
  A acc = 0;
  if (g.type == 2 || g.type == 4) {
    int64_t start, size;
    group_range(g.D, g.R, s, start, size);
    for (int64_t p = start; p < start + size; ++p) acc += Traits<T>::load(in[p]);
  } else {
    for (int64_t p = s; p < g.D; p += width) acc += Traits<T>::load(in[p]);
  }
  h[row * width + s] = acc;
}

unsigned blocks_for(int64_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

}  // namespace

#define FP_DISPATCH(dtype, ...)                   \
  switch (dtype) {                                \
    case DType::kHalf: {                          \
      using T = __half;                           \
      __VA_ARGS__;                                \
      break;                                      \
    }                                             \
    case DType::kBFloat16: {                      \
      using T = __nv_bfloat16;                    \
      __VA_ARGS__;                                \
      break;                                      \
    }                                             \
    case DType::kFloat: {                         \
      using T = float;                            \
      __VA_ARGS__;                                \
      break;                                      \
    }                                             \
    case DType::kDouble: {                        \
      using T = double;                           \
      __VA_ARGS__;                                \
      break;                                      \
    }                                             \
  }

#define ACC(ptr) static_cast<typename Traits<T>::acc*>(ptr)
#define CACC(ptr) static_cast<const typename Traits<T>::acc*>(ptr)

void launch_ce_forward(DType dtype, const void* logits, const int64_t* labels, const void* row_scale, void* loss,
                       void* lse, int64_t rows, int64_t vocab, CeOptions o, cudaStream_t stream) {
  if (rows == 0) return;
  FP_DISPATCH(dtype, ce_forward_kernel<T><<<rows, kThreads, 0, stream>>>(
                         static_cast<const T*>(logits), labels, CACC(row_scale), ACC(loss), ACC(lse), vocab, o));
}

void launch_ce_grad(DType dtype, const void* logits, void* grad, const int64_t* labels, const void* scale,
                    const void* lse_in, void* loss_out, int64_t rows, int64_t vocab, CeOptions o,
                    cudaStream_t stream) {
  if (rows == 0) return;
  FP_DISPATCH(dtype, ce_grad_kernel<T><<<rows, kThreads, 0, stream>>>(static_cast<const T*>(logits),
                                                                      static_cast<T*>(grad), labels, CACC(scale),
                                                                      CACC(lse_in), ACC(loss_out), vocab, o));
}

void launch_lora_shrink(DType dtype, const void* x, const void* A, void* S, int64_t rows, int64_t K, int64_t r,
                        Dropout d, cudaStream_t stream) {
  if (rows == 0) return;
  FP_DISPATCH(dtype, {
    const size_t smem = (kTile + r) * sizeof(typename Traits<T>::acc);
    lora_shrink_kernel<T><<<rows, kThreads, smem, stream>>>(static_cast<const T*>(x), CACC(A), static_cast<T*>(S), K,
                                                            r, d);
  });
}

void launch_lora_shrink_backward(DType dtype, const void* x, const void* gS, const void* A, void* grad_x, void* grad_A,
                                 int64_t rows, int64_t K, int64_t r, Dropout d, cudaStream_t stream) {
  if (rows == 0) return;
  FP_DISPATCH(dtype, {
    if (grad_x != nullptr) {
      const dim3 grid(rows, blocks_for(K));
      lora_grad_x_kernel<T><<<grid, kThreads, r * sizeof(typename Traits<T>::acc), stream>>>(
          CACC(gS), CACC(A), static_cast<T*>(grad_x), K, r, d);
    }
    if (grad_A != nullptr) {
      const dim3 grid(static_cast<unsigned>((K + 127) / 128), static_cast<unsigned>((rows + kRowsPerChunk - 1) /
                                                                                     kRowsPerChunk));
      lora_grad_A_kernel<T><<<grid, 128, 0, stream>>>(static_cast<const T*>(x), CACC(gS), ACC(grad_A), rows, K, r, d);
    }
  });
}

void launch_mora_compress(DType dtype, const void* x, void* z, const float* cos, const float* sin, int64_t rows,
                          MoraGeom g, Dropout d, cudaStream_t stream) {
  const int64_t width = g.type == 6 ? g.n_chunks * g.R : g.R;
  if (rows == 0) return;
  const dim3 grid(rows, blocks_for(width));
  FP_DISPATCH(dtype, mora_compress_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(x), ACC(z), cos,
                                                                            sin, width, g, d));
}

void launch_mora_compress_backward(DType dtype, const void* gz, void* grad_x, const float* cos, const float* sin,
                                   int64_t rows, MoraGeom g, Dropout d, cudaStream_t stream) {
  const int64_t width = g.type == 6 ? g.n_chunks * g.R : g.R;
  if (rows == 0) return;
  const dim3 grid(rows, blocks_for(g.K));
  FP_DISPATCH(dtype, mora_compress_backward_kernel<T><<<grid, kThreads, 0, stream>>>(
                         CACC(gz), static_cast<T*>(grad_x), cos, sin, width, g, d));
}

void launch_mora_decompress(DType dtype, const void* ys, const void* bias, void* y, int64_t rows, int64_t width,
                            MoraGeom g, cudaStream_t stream) {
  if (rows == 0) return;
  const dim3 grid(rows, blocks_for(g.D));
  FP_DISPATCH(dtype, mora_decompress_kernel<T><<<grid, kThreads, 0, stream>>>(CACC(ys), CACC(bias),
                                                                              static_cast<T*>(y), width, g));
}

void launch_mora_decompress_backward(DType dtype, const void* gy, void* h, int64_t rows, int64_t width, MoraGeom g,
                                     cudaStream_t stream) {
  if (rows == 0) return;
  const dim3 grid(rows, blocks_for(width));
  FP_DISPATCH(dtype, mora_decompress_backward_kernel<T><<<grid, kThreads, 0, stream>>>(
                         static_cast<const T*>(gy), ACC(h), width, g));
}

}  // namespace fusedpeft::cuda
