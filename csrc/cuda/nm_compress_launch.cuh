// Host side of pysparse::nm_compress / nm_decompress on CUDA: the launch of the kernels in
// nm_compress_kernel.cuh (which kernel, grid, block and arguments), in one place for the launcher
// (nm_compress.cu, on its stream) and the CPU emulation test (tests/cuda_emu/, under the
// emulator). No torch: compiles with nvcc alone, or as host code under the emulator.
#pragma once
#include <cstdint>
#include <type_traits>

#include "nm_compress_kernel.cuh"

namespace pysparse {
namespace cuda {

constexpr unsigned kNmThreads = 256;
// Work items of an (R, K) matrix: units of max(8, m) columns.
inline int64_t nm_units(int64_t R, int64_t K, int64_t m) {
  const int64_t unit = m > 8 ? m : 8;
  return R * ((K + unit - 1) / unit);
}
// Blocks for `units` work items: one thread each, capped at 65535 blocks beyond which the threads
// stride.
inline unsigned nm_grid(int64_t units) {
  const int64_t blocks = (units + kNmThreads - 1) / kNmThreads;
  return unsigned(blocks < 65535 ? (blocks > 0 ? blocks : 1) : 65535);
}

// Every argument of nm_compress on an (R, K) matrix (layouts: nm_compress_kernel.cuh). Elements
// are elem_size bytes (4, 2 or 1), compared and moved as bits, so one kernel serves every dtype of
// a size. A C struct: the emulation test fills it from Python (ctypes).
struct NmCompressArgs {
  const void* dense;              // (R, K), row-major
  void* values;                   // (R, K / m * n)
  uint8_t* mask;                  // (R, ceil(K / 8))
  unsigned long long* first_bad;  // set to R before; lowered to the first row with a group of > n nonzeros
  int64_t R, K;
  int32_t n, m, elem_size;
};
// Every argument of nm_decompress, likewise.
struct NmDecompressArgs {
  const void* values;   // (R, K / m * n)
  const uint8_t* mask;  // (R, ceil(K / 8))
  void* dense;          // (R, K), row-major
  int64_t R, K;
  int32_t n, m, elem_size;
};
static_assert(std::is_standard_layout_v<NmCompressArgs> && std::is_trivially_copyable_v<NmCompressArgs> &&
                  std::is_standard_layout_v<NmDecompressArgs> && std::is_trivially_copyable_v<NmDecompressArgs>,
              "C structs: the emulation test mirrors them with ctypes");

// The bits type U of elem_size-byte elements: calls run(U()) and returns null, or says why not.
template <typename F>
inline const char* nm_with_bits(int32_t elem_size, F&& run) {
  switch (elem_size) {
    case 4: run(uint32_t()); return nullptr;
    case 2: run(uint16_t()); return nullptr;
    case 1: run(uint8_t()); return nullptr;
    default: return "elements must be 4, 2 or 1 bytes";
  }
}

// Each runs its kernel with launch(grid, block, kernel, args...), once, or not at all for an empty
// matrix; over nm_grid's blocks, or `blocks` when > 0 (the emulation test: one block, so every
// thread strides over several units). Returns null, or why the kernel cannot run (an element
// size it has no instance for; the launcher rules that out before).
template <typename F>
inline const char* nm_compress_launch(const NmCompressArgs& a, F&& launch, unsigned blocks = 0) {
  const int64_t units = nm_units(a.R, a.K, a.m);
  const dim3 grid(blocks ? blocks : nm_grid(units)), block(kNmThreads);
  return nm_with_bits(a.elem_size, [&](auto bits) {
    using U = decltype(bits);
    if (units > 0)
      launch(grid, block, nm_compress_kernel<U>, static_cast<const U*>(a.dense), a.R, a.K, a.n, a.m,
             static_cast<U*>(a.values), a.mask, a.first_bad);
  });
}
template <typename F>
inline const char* nm_decompress_launch(const NmDecompressArgs& a, F&& launch, unsigned blocks = 0) {
  const int64_t units = nm_units(a.R, a.K, a.m);
  const dim3 grid(blocks ? blocks : nm_grid(units)), block(kNmThreads);
  return nm_with_bits(a.elem_size, [&](auto bits) {
    using U = decltype(bits);
    if (units > 0)
      launch(grid, block, nm_decompress_kernel<U>, static_cast<const U*>(a.values), a.mask, a.R, a.K, a.n,
             a.m, static_cast<U*>(a.dense));
  });
}

}  // namespace cuda
}  // namespace pysparse
