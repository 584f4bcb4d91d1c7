// Host side of pysparse::csr_spmm / csr_linear on CUDA: for one batch of products, every launch
// of the kernels in csr_spmm_kernel.cuh (which kernel, grid, block and arguments). The only place
// that decides them: the launcher (csr_spmm.cu) passes a callback that launches on its stream,
// the CPU emulation test (tests/cuda_emu/) one that runs the emulator, so the test covers the
// launches a GPU gets. No torch: compiles with nvcc alone, or as host code under the emulator.
#pragma once
#include <cstdint>
#include <type_traits>

#include "csr_spmm_kernel.cuh"
#include "kernels.h"  // cpu::DType and cpu::IType, the project's one numbering of element types

namespace pysparse {
namespace cuda {

constexpr int64_t kMaxGridY = 65535;  // CUDA's limit on gridDim.y (and gridDim.z)

// out[z] (M, n) = A @ B[z] (+ bias) for z < batch, one CSR matrix A (M, K) for all: every
// argument of the launches. A C struct with untyped pointers, whose element types dtype and itype
// name, so the emulation test fills it from Python (ctypes) as the launcher does from tensors.
// Strides are in elements.
struct CsrSpmmArgs {
  const void* crow;      // (M + 1) row pointers, int32 or int64 (itype)
  const void* col;       // (nnz) column indices, int32, int64 or int16 (itype)
  const void* val;       // (nnz) values (dtype)
  const int64_t* perm;   // (M) rows in launch order (the launcher's: longest first)
  const void* B;         // B[z][k][j] at B + z * sbb + k * ldb + j * ldbc (dtype)
  const void* bias;      // (M), or null (dtype)
  void* out;             // out[z][r][j] at out + z * sbo + r * ldo + j * ldoc (dtype)
  int* bad;              // set to 1 on an index out of range, or null (indices checked before)
  int64_t M, K, nnz, n, batch;
  int64_t ldb, ldbc, sbb;
  int64_t ldo, ldoc, sbo;  // ldbc and ldoc must be 1 unless the narrow kernel runs (n <= kCsrNarrow)
  cpu::DType dtype;
  cpu::IType itype;
};
static_assert(std::is_standard_layout_v<CsrSpmmArgs> && std::is_trivially_copyable_v<CsrSpmmArgs>,
              "CsrSpmmArgs is a C struct: the emulation test mirrors it with ctypes");

// Choices of the plan that a test may force (the emulation test runs every kernel on any width,
// and the column and batch chunk loops, which real sizes reach only past 2M columns or 65535
// matrices). Zero-initialised fields (and -1 for vec) leave the plan's choice.
struct CsrSpmmOverrides {
  int32_t vec = -1;       // columns per lane: 0 the narrow kernel, 1, 4, or 8 (2-byte elements)
  int64_t max_cols = 0;   // columns per launch when > 0
  int64_t max_batch = 0;  // matrices per launch when > 0
};
static_assert(std::is_standard_layout_v<CsrSpmmOverrides> && std::is_trivially_copyable_v<CsrSpmmOverrides>,
              "CsrSpmmOverrides is a C struct: the emulation test mirrors it with ctypes");

// VEC output columns per lane: as many as one 16-byte load of B holds (Sputnik's vector width:
// 4 fp32, 8 fp16/bf16) once n fills a warp's 32 * VEC columns, else 4 from 128 columns, else 1.
// A wider lane costs the same two shuffles per nonzero for more columns.
inline int csr_spmm_vec(int64_t n, int elem_size) {
  const int wide = 16 / elem_size;
  return n >= 32 * wide ? wide : (n >= 128 ? 4 : 1);
}
// grid.x: one warp per row, kWarpsPerBlock rows per block; grid.y: 32 * VEC columns per block, so
// a launch covers at most csr_spmm_columns_per_launch(VEC) columns; grid.z: one matrix of a batch
// each, at most kMaxGridY.
inline int64_t csr_spmm_columns_per_launch(int vec) { return kMaxGridY * 32 * vec; }
inline dim3 csr_spmm_grid(int64_t M, int64_t n, int vec, int64_t batch) {
  return dim3(unsigned((M + kWarpsPerBlock - 1) / kWarpsPerBlock), unsigned((n + 32 * vec - 1) / (32 * vec)),
              unsigned(batch));
}
// Whether a lane's VEC columns of every row of every matrix of B are one aligned vector (every
// lane starts at a multiple of VEC columns, so the base pointer and the strides decide it).
inline bool csr_spmm_aligned(const void* B, int64_t ldb, int64_t sbb, int vec, int elem_size) {
  return vec > 1 && uintptr_t(B) % (uintptr_t(vec) * uintptr_t(elem_size)) == 0 && ldb % vec == 0 && sbb % vec == 0;
}

template <int VEC, bool ALIGNED>
struct CsrKernel {  // VEC = 0: csr_spmm_narrow_kernel, else csr_spmm_kernel<..., VEC, ALIGNED>
  static constexpr int vec = VEC;
  static constexpr bool aligned = ALIGNED;
};

template <typename T, typename RT, typename CT, typename F>
inline const char* csr_spmm_launch_typed(const CsrSpmmArgs& a, F& launch, const CsrSpmmOverrides& ov) {
  const int vec = ov.vec >= 0 ? ov.vec : (a.n <= kCsrNarrow ? 0 : csr_spmm_vec(a.n, sizeof(T)));
  const int64_t cols = ov.max_cols > 0 ? ov.max_cols : (vec == 0 ? a.n : csr_spmm_columns_per_launch(vec));
  const int64_t mats = ov.max_batch > 0 ? ov.max_batch : kMaxGridY;
  if (vec == 0 && cols > kCsrNarrow) return "the narrow kernel takes at most kCsrNarrow columns per launch";
  if (vec != 0 && (a.ldbc != 1 || a.ldoc != 1)) return "the wide kernel needs unit column strides";
  const auto* crow = static_cast<const RT*>(a.crow);
  const auto* col = static_cast<const CT*>(a.col);
  const auto* val = static_cast<const T*>(a.val);
  const auto* B = static_cast<const T*>(a.B);
  const auto* bias = static_cast<const T*>(a.bias);
  auto* out = static_cast<T*>(a.out);
  const dim3 block(kCsrSpmmThreads);
  // Batch chunks [z, z + nz) x column chunks [c, c + nc), one launch each.
  auto launches = [&](auto kernel) {
    using Kn = decltype(kernel);
    for (int64_t z = 0; z < a.batch; z += mats) {
      const int64_t nz = mats < a.batch - z ? mats : a.batch - z;
      for (int64_t c = 0; c < a.n; c += cols) {
        const int64_t nc = cols < a.n - c ? cols : a.n - c;
        const T* b = B + z * a.sbb + c * a.ldbc;
        T* y = out + z * a.sbo + c * a.ldoc;
        if constexpr (Kn::vec == 0)
          launch(csr_spmm_grid(a.M, 1, 1, nz), block, csr_spmm_narrow_kernel<T, RT, CT>, crow, col, val, a.perm,
                 a.M, a.K, a.nnz, b, a.ldb, a.ldbc, a.sbb, int(nc), bias, y, a.ldo, a.ldoc, a.sbo, a.bad);
        else
          launch(csr_spmm_grid(a.M, nc, Kn::vec, nz), block, csr_spmm_kernel<T, RT, CT, Kn::vec, Kn::aligned>, crow,
                 col, val, a.perm, a.M, a.K, a.nnz, b, a.ldb, a.sbb, nc, bias, y, a.ldo, a.sbo, a.bad);
      }
    }
  };
  // Aligned vector loads when every lane's VEC columns of every row are one aligned vector; the
  // chunk starts must keep that, hence cols % VEC.
  auto vectors = [&](auto aligned, auto plain) {
    constexpr int V = decltype(plain)::vec;
    if (csr_spmm_aligned(B, a.ldb, a.sbb, V, sizeof(T)) && cols % V == 0) launches(aligned);
    else launches(plain);
  };
  if (vec == 0) launches(CsrKernel<0, false>());
  else if (vec == 1) launches(CsrKernel<1, false>());
  else if (vec == 4) vectors(CsrKernel<4, true>(), CsrKernel<4, false>());
  else if constexpr (sizeof(T) == 2) {
    if (vec == 8) vectors(CsrKernel<8, true>(), CsrKernel<8, false>());
    else return "no kernel takes that many columns per lane";
  } else {
    return "no kernel takes that many columns per lane";
  }
  return nullptr;
}

// Runs the launches of a product: launch(grid, block, kernel, args...) for each, with kernel a
// __global__ function and args its arguments, in order, batch chunks outermost. Returns null, or
// why nothing was launched (the launcher rules every case out before: dtype or itype unknown,
// column strides the wide kernel cannot take; or overrides no kernel can follow).
template <typename F>
inline const char* csr_spmm_launch(const CsrSpmmArgs& a, F&& launch, const CsrSpmmOverrides& ov = {}) {
  auto with_index = [&](auto value) -> const char* {
    using T = decltype(value);
    switch (a.itype) {
      case cpu::kI32: return csr_spmm_launch_typed<T, int32_t, int32_t>(a, launch, ov);
      case cpu::kI64: return csr_spmm_launch_typed<T, int64_t, int64_t>(a, launch, ov);
      case cpu::kI32C16: return csr_spmm_launch_typed<T, int32_t, int16_t>(a, launch, ov);
      default: return "unknown index types";
    }
  };
  switch (a.dtype) {
    case cpu::kF32: return with_index(float());
    case cpu::kF16: return with_index(__half());
    case cpu::kBF16: return with_index(__nv_bfloat16());
    default: return "unknown value type";
  }
}

}  // namespace cuda
}  // namespace pysparse
