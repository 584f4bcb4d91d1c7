// Device code for pysparse::csr_spmm / csr_linear on CUDA (raw pointers, no torch: compiles with
// nvcc alone). out (M, n) = A (M, K) @ B (K, n), A in CSR, B row-major with row stride ldb, fp32
// accumulation, out row-major (ldo) in T, optional bias[m]. A batch of products with one A runs
// in one launch: matrix z = blockIdx.z of B and out starts z * sbb and z * sbo elements in.
//
// Design, after Sputnik (Gale et al., SC20): one warp owns one row of A and a tile of 32 * VEC
// output columns (VEC consecutive columns per lane, so B rows are read as coalesced vectors: one
// VEC * sizeof(T)-byte load per lane when B's rows are aligned for it, which the launcher checks;
// VEC is 16 bytes' worth once n fills a warp, 8 columns for fp16/bf16, 4 for fp32).
// The warp reads the row's column indices and values 32 at a time (one coalesced load each) and
// broadcasts them lane to lane with __shfl_sync, so every nonzero costs VEC FMAs per lane and no
// shared memory. Rows are visited in the order `perm` gives (longest first, made by the
// launcher), which evens out warps of one block and keeps the long rows from finishing last.
// Narrow outputs (n <= kCsrNarrow: decode) would leave 32 - n lanes of that design idle, so they
// take csr_spmm_narrow_kernel: still a warp per row, but each lane a strided share of the row's
// nonzeros with all n columns in registers, then a butterfly sum across the warp (the CSR-vector
// SpMV of Bell & Garland, SC09). It reads B and writes out through a column stride too (ldbc,
// ldoc), so the nn.Linear layout (B = x^T, out = y^T) needs no transposed copies at decode.
// Column indices outside [0, K) and inconsistent row pointers are clamped, never followed, and
// reported through *bad (bad may be null: the launcher passes null for indices it has already
// checked, see csrc/include/checked_indices.h).
//
// Which kernel runs, over which grid, with which arguments: csr_spmm_launch.cuh, the one plan
// that the launcher and the CPU emulation test (tests/cuda_emu/) both run.
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
constexpr unsigned kCsrSpmmThreads = 32 * kWarpsPerBlock;
constexpr int kCsrNarrow = 8;  // widest n for csr_spmm_narrow_kernel

// VEC elements loaded as one vector instruction: read as the built-in vector type of their size
// (a struct copy compiles to one load per element).
template <int BYTES> struct VecBits;
template <> struct VecBits<4> { using type = unsigned; };
template <> struct VecBits<8> { using type = uint2; };
template <> struct VecBits<16> { using type = uint4; };
// One vector load. Under the CPU emulator (tests/cuda_emu) its alignment is checked: on a GPU a
// misaligned vector load is a fatal "misaligned address" error.
template <typename V>
__device__ __forceinline__ V load_vector(const void* p) {
#ifdef PYSPARSE_CUDA_EMU
  pysparse_emu::check_vector_load(p, sizeof(V));
#endif
  return *reinterpret_cast<const V*>(p);
}

template <typename T, int VEC>
union Pack {
  typename VecBits<sizeof(T) * VEC>::type bits;
  T v[VEC];
  __device__ Pack() {}
};

__device__ __forceinline__ void report(int* bad) {
  if (bad) atomicOr(bad, 1);
}

// Row r's nonzeros [start, end), clamped into [0, nnz] and reported through *bad if inconsistent.
template <typename RT>
__device__ __forceinline__ void row_range(const RT* crow, int64_t r, int64_t nnz, int lane, int* bad,
                                          int64_t& start, int64_t& end) {
  start = int64_t(crow[r]), end = int64_t(crow[r + 1]);
  if (start < 0 || end < start || end > nnz) {
    if (lane == 0) report(bad);
    start = start < 0 ? 0 : (start > nnz ? nnz : start);
    end = end < start ? start : (end > nnz ? nnz : end);
  }
}

// The calling warp's share of a launch: its lane, row r (the perm[w]-th for warp w) and the row's
// nonzeros [start, end). False for the warps past the last row (whole warps: every lane of one
// has the same w).
template <typename RT>
__device__ __forceinline__ bool warp_row(const RT* crow, const int64_t* perm, int64_t M, int64_t nnz, int* bad,
                                         int& lane, int64_t& r, int64_t& start, int64_t& end) {
  lane = threadIdx.x & 31;
  const int64_t w = blockIdx.x * int64_t(kWarpsPerBlock) + (threadIdx.x >> 5);
  if (w >= M) return false;
  r = perm[w];
  row_range(crow, r, nnz, lane, bad, start, end);
  return true;
}

template <typename T, typename RT, typename CT, int VEC, bool ALIGNED>
__global__ void __launch_bounds__(kCsrSpmmThreads)
csr_spmm_kernel(const RT* __restrict__ crow, const CT* __restrict__ col, const T* __restrict__ val,
                const int64_t* __restrict__ perm, int64_t M, int64_t K, int64_t nnz,
                const T* __restrict__ B, int64_t ldb, int64_t sbb, int64_t n, const T* __restrict__ bias,
                T* __restrict__ out, int64_t ldo, int64_t sbo, int* bad) {
  static_assert(!ALIGNED || VEC > 1, "aligned vector loads need VEC > 1");
  int lane;
  int64_t r, start, end;
  if (!warp_row(crow, perm, M, nnz, bad, lane, r, start, end)) return;
  B += blockIdx.z * sbb;  // matrix blockIdx.z of the batch
  out += blockIdx.z * sbo;
  const int64_t c0 = blockIdx.y * int64_t(32 * VEC) + int64_t(lane) * VEC;
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
        report(bad);
        my_col = 0, my_val = 0.f;
      }
    }
    for (int j = 0; j < cnt; ++j) {
      const int64_t cj = __shfl_sync(0xffffffffu, my_col, j);
      const float vj = __shfl_sync(0xffffffffu, my_val, j);
      const T* brow = B + cj * ldb + c0;
      if constexpr (ALIGNED) {
        if (c0 + VEC <= n) {  // the ragged last lane takes the scalar loads below
          Pack<T, VEC> p;
          p.bits = load_vector<decltype(p.bits)>(brow);
#pragma unroll
          for (int v = 0; v < VEC; ++v) acc[v] += vj * to_float(p.v[v]);
          continue;
        }
      }
#pragma unroll
      for (int v = 0; v < VEC; ++v)
        if (c0 + v < n) acc[v] += vj * to_float(brow[v]);
    }
  }
  const float b = bias ? to_float(bias[r]) : 0.f;
  // Stores stay per element: one per output against one load per nonzero, and nvcc splits them.
#pragma unroll
  for (int v = 0; v < VEC; ++v)
    if (c0 + v < n) out[r * ldo + c0 + v] = from_float<T>(acc[v] + b);
}

// n <= kCsrNarrow, grid.x and grid.z as above, grid.y = 1. B[k][j] is B[k * ldb + j * ldbc] and
// out[r][j] is out[r * ldo + j * ldoc].
template <typename T, typename RT, typename CT>
__global__ void __launch_bounds__(kCsrSpmmThreads)
csr_spmm_narrow_kernel(const RT* __restrict__ crow, const CT* __restrict__ col, const T* __restrict__ val,
                       const int64_t* __restrict__ perm, int64_t M, int64_t K, int64_t nnz,
                       const T* __restrict__ B, int64_t ldb, int64_t ldbc, int64_t sbb, int n,
                       const T* __restrict__ bias, T* __restrict__ out, int64_t ldo, int64_t ldoc, int64_t sbo,
                       int* bad) {
  int lane;
  int64_t r, start, end;
  if (!warp_row(crow, perm, M, nnz, bad, lane, r, start, end)) return;
  B += blockIdx.z * sbb;  // matrix blockIdx.z of the batch
  out += blockIdx.z * sbo;
  float acc[kCsrNarrow];
#pragma unroll
  for (int v = 0; v < kCsrNarrow; ++v) acc[v] = 0.f;
  for (int64_t p = start + lane; p < end; p += 32) {
    const int64_t c = int64_t(col[p]);
    if (c < 0 || c >= K) {
      report(bad);
      continue;
    }
    const float a = to_float(val[p]);
    const T* brow = B + c * ldb;
#pragma unroll
    for (int v = 0; v < kCsrNarrow; ++v)
      if (v < n) acc[v] += a * to_float(brow[v * ldbc]);
  }
  const float b = bias ? to_float(bias[r]) : 0.f;
#pragma unroll
  for (int v = 0; v < kCsrNarrow; ++v) {
    if (v >= n) break;  // n is the same for the whole warp: every lane leaves here together
    float s = acc[v];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    if (lane == 0) out[r * ldo + v * ldoc] = from_float<T>(s + b);
  }
}

}  // namespace cuda
}  // namespace pysparse
