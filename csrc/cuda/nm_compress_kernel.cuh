// Device code for pysparse::nm_compress / nm_decompress on CUDA (raw pointers, no torch: this
// header compiles with nvcc alone). Layout as on the CPU: values (R, K/m*n) in column order, mask
// (R, ceil(K/8)) uint8 bitmap of kept positions, exactly n per group of m columns; a group with
// fewer nonzeros keeps them and then its lowest-indexed zero positions.
//
// One thread per "unit" of max(8, m) columns (one or two whole groups and one or two whole mask
// bytes), so no two threads write the same byte and no atomics are needed on the mask. Both kernels
// stride over the grid, so any grid covers every unit; the launchers' grid and arguments are in
// nm_compress_launch.cuh, which the CPU emulation test (tests/cuda_emu/) runs too.
#pragma once
#include <cstdint>

namespace pysparse {
namespace cuda {

template <typename U>
__device__ __forceinline__ bool nm_is_zero(U bits) {
  if constexpr (sizeof(U) == 1) return bits == 0;
  else if constexpr (sizeof(U) == 2) return (bits & 0x7fffu) == 0;
  else return (bits & 0x7fffffffu) == 0;
}

// grid-stride over R * (K / unit) units; *first_bad receives the lowest row holding a group with
// more than n nonzeros (initialised to R by the launcher).
template <typename U>
__global__ void nm_compress_kernel(const U* __restrict__ src, int64_t R, int64_t K, int n, int m,
                                   U* __restrict__ vals, uint8_t* __restrict__ mask,
                                   unsigned long long* first_bad) {
  const int unit = m > 8 ? m : 8;
  const int64_t units_per_row = K / unit + (K % unit ? 1 : 0);
  const int64_t kept = K / m * n, mbytes = (K + 7) / 8;
  for (int64_t u = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; u < R * units_per_row;
       u += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = u / units_per_row, c0 = (u % units_per_row) * unit;
    uint32_t bits = 0;  // kept positions of this unit, bit j = column c0 + j
    for (int64_t g0 = c0; g0 < c0 + unit && g0 < K; g0 += m) {
      const U* grp = src + r * K + g0;
      uint32_t nz = 0;
      for (int j = 0; j < m; ++j) nz |= uint32_t(!nm_is_zero(grp[j])) << j;
      int cnt = __popc(nz);
      if (cnt > n) atomicMin(first_bad, (unsigned long long)r);
      for (int j = 0; cnt < n; ++j)
        if (!(nz >> j & 1)) { nz |= 1u << j; ++cnt; }
      U* v = vals + r * kept + g0 / m * n;
      int w = 0;
      for (int j = 0; j < m && w < n; ++j)
        if (nz >> j & 1) v[w++] = grp[j];
      bits |= (nz & ((1u << m) - 1u)) << (g0 - c0);
    }
    for (int b = 0; b < unit / 8 && c0 / 8 + b < mbytes; ++b)
      mask[r * mbytes + c0 / 8 + b] = uint8_t(bits >> (8 * b));
  }
}

template <typename U>
__global__ void nm_decompress_kernel(const U* __restrict__ vals, const uint8_t* __restrict__ mask,
                                     int64_t R, int64_t K, int n, int m, U* __restrict__ out) {
  const int unit = m > 8 ? m : 8;
  const int64_t units_per_row = K / unit + (K % unit ? 1 : 0);
  const int64_t kept = K / m * n, mbytes = (K + 7) / 8;
  for (int64_t u = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; u < R * units_per_row;
       u += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = u / units_per_row, c0 = (u % units_per_row) * unit;
    uint32_t bits = 0;
    for (int b = 0; b < unit / 8 && c0 / 8 + b < mbytes; ++b) bits |= uint32_t(mask[r * mbytes + c0 / 8 + b]) << (8 * b);
    for (int64_t g0 = c0; g0 < c0 + unit && g0 < K; g0 += m) {
      const uint32_t g = (bits >> (g0 - c0)) & ((1u << m) - 1u);
      const U* v = vals + r * kept + g0 / m * n;
      int w = 0;  // a malformed group can only misplace its own n values: reads stay inside them
      for (int j = 0; j < m; ++j) out[r * K + g0 + j] = (g >> j & 1) && w < n ? v[w++] : U(0);
    }
  }
}

}  // namespace cuda
}  // namespace pysparse
