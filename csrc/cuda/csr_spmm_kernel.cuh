// Device code for pysparse::csr_spmm / csr_linear on CUDA (raw pointers, no torch: compiles with
// nvcc alone). out (M, n) = A (M, K) @ B (K, n), A in CSR, B row-major with row stride ldb, fp32
// accumulation, out row-major (ldo) in T, optional bias[m].
//
// Design, after Sputnik (Gale et al., SC20): one warp owns one row of A and a tile of 32 * VEC
// output columns (VEC consecutive columns per lane, so B rows are read as coalesced vectors).
// The warp reads the row's column indices and values 32 at a time (one coalesced load each) and
// broadcasts them lane to lane with __shfl_sync, so every nonzero costs VEC FMAs per lane and no
// shared memory. Rows are visited in the order `perm` gives (longest first, made by the
// launcher), which evens out warps of one block and keeps the long rows from finishing last.
// Column indices outside [0, K) and inconsistent row pointers are clamped, never followed, and
// reported through *bad.
#pragma once
#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace pysparse {
namespace cuda {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

constexpr int kWarpsPerBlock = 4;

template <typename T, typename RT, typename CT, int VEC>
__global__ void __launch_bounds__(32 * kWarpsPerBlock)
csr_spmm_kernel(const RT* __restrict__ crow, const CT* __restrict__ col, const T* __restrict__ val,
                const int64_t* __restrict__ perm, int64_t M, int64_t K, int64_t nnz,
                const T* __restrict__ B, int64_t ldb, int64_t n, const T* __restrict__ bias,
                T* __restrict__ out, int64_t ldo, int* bad) {
  const int lane = threadIdx.x & 31;
  const int64_t w = blockIdx.x * int64_t(kWarpsPerBlock) + (threadIdx.x >> 5);
  if (w >= M) return;
  const int64_t r = perm[w];
  const int64_t c0 = blockIdx.y * int64_t(32 * VEC) + int64_t(lane) * VEC;
  int64_t start = int64_t(crow[r]), end = int64_t(crow[r + 1]);
  if (start < 0 || end < start || end > nnz) {
    if (lane == 0) atomicOr(bad, 1);
    start = start < 0 ? 0 : (start > nnz ? nnz : start);
    end = end < start ? start : (end > nnz ? nnz : end);
  }
  float acc[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) acc[v] = 0.f;
  for (int64_t p0 = start; p0 < end; p0 += 32) {
    const int cnt = end - p0 < 32 ? int(end - p0) : 32;
    int64_t my_col = 0;
    float my_val = 0.f;
    if (lane < cnt) {
      my_col = int64_t(col[p0 + lane]);
      my_val = to_float(val[p0 + lane]);
      if (my_col < 0 || my_col >= K) {
        atomicOr(bad, 1);
        my_col = 0, my_val = 0.f;
      }
    }
    for (int j = 0; j < cnt; ++j) {
      const int64_t cj = __shfl_sync(0xffffffffu, my_col, j);
      const float vj = __shfl_sync(0xffffffffu, my_val, j);
      const T* brow = B + cj * ldb + c0;
#pragma unroll
      for (int v = 0; v < VEC; ++v)
        if (c0 + v < n) acc[v] += vj * to_float(brow[v]);
    }
  }
  const float b = bias ? to_float(bias[r]) : 0.f;
#pragma unroll
  for (int v = 0; v < VEC; ++v)
    if (c0 + v < n) out[r * ldo + c0 + v] = from_float<T>(acc[v] + b);
}

}  // namespace cuda
}  // namespace pysparse
