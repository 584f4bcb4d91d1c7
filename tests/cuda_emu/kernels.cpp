// C entry points that run pysparse's CUDA kernels (csrc/cuda/*_kernel.cuh) under the CPU emulator
// in emu.h, launched by the launchers' own plans (csrc/cuda/*_launch.cuh) with the emulator's
// launch in place of a stream's, so the test runs the launches a GPU gets. The plans' argument
// structs come from Python, filled through ctypes mirrors that emu_layout lets the test check;
// tests/test_cuda_emulated.py loads this with ctypes. Each entry point returns nullptr, or a
// message saying what the emulator caught or why the plan refused.
#include "emu.h"

#include <cstddef>
#include <cstring>

#include "csr_spmm_launch.cuh"
#include "nm_compress_launch.cuh"

using namespace pysparse::cuda;

namespace {
thread_local std::string last_error;

const char* result(std::string e) {
  last_error = std::move(e);
  return last_error.empty() ? nullptr : last_error.c_str();
}

// The plans' launch callback here: each launch under the emulator, none after one went wrong.
struct EmuLaunch {
  std::string& err;
  template <typename... P, typename... A>
  void operator()(dim3 grid, dim3 block, void (*kernel)(P...), A... args) const {
    if (err.empty()) err = pysparse_emu::launch(grid, block, kernel, args...);
  }
};

// Runs plan(EmuLaunch): the plan's refusal, else what the emulator caught, else nullptr.
template <typename Plan>
const char* run(Plan&& plan) {
  std::string err;
  const char* refused = plan(EmuLaunch{err});
  return result(refused ? std::string(refused) : err);
}

// For the emulator's own test: lane l of a warp receives lane (l + 1) % 32's value, and writes
// (first thread of its warp) + 10 * that lane. Cases 1-4 break the shuffle protocol on purpose;
// case 5 makes a misaligned 16-byte load (odd lanes, 4 bytes in).
__global__ void selftest_kernel(int which, int* out) {
  const int lane = threadIdx.x & 31;
  if (which == 1 && lane >= 5) return;
  unsigned mask = which == 2 ? 0xffffu : 0xffffffffu;
  int got = -1;
  if (which == 3 && lane % 2) got = __shfl_sync(mask, lane * 10, (lane + 1) & 31);
  else if (which == 4 && lane % 2) got = __shfl_sync(mask, lane * 10, (lane + 1) & 31);
  else if (which == 4) got = int(__shfl_sync(mask, float(lane * 10), (lane + 1) & 31));  // another function
  else if (which != 3) got = __shfl_sync(mask, lane * 10, (lane + 1) & 31);
  out[threadIdx.x] = int(threadIdx.x & ~31u) + got;
  if (which == 5) out[0] = int(load_vector<uint4>(reinterpret_cast<const char*>(out) + 4 * (threadIdx.x & 1)).x);
}
}  // namespace

extern "C" {

const char* emu_selftest(int which, int* out) {
  return result(pysparse_emu::launch(dim3(1), dim3(64), selftest_kernel, which, out));
}

// A batch of products exactly as the CUDA launcher launches it (csr_spmm_launch), unless the
// overrides force a kernel or shorter launches (the chunk loops that real sizes reach only past
// 2M columns or 65535 matrices).
const char* emu_csr_spmm(const CsrSpmmArgs* args, const CsrSpmmOverrides* overrides) {
  return run([&](auto launch) { return csr_spmm_launch(*args, launch, *overrides); });
}

// The launcher's choice of aligned vector loads for this B (vec columns per lane) and its choice
// of vec for n columns.
int emu_csr_spmm_aligned(const void* B, int64_t ldb, int64_t sbb, int vec, int elem_size) {
  return csr_spmm_aligned(B, ldb, sbb, vec, elem_size);
}
int emu_csr_spmm_vec(int64_t n, int elem_size) { return csr_spmm_vec(n, elem_size); }

// nm_compress / nm_decompress as the CUDA launcher launches them, over `blocks` blocks when > 0.
const char* emu_nm_compress(const NmCompressArgs* args, unsigned blocks) {
  return run([&](auto launch) { return nm_compress_launch(*args, launch, blocks); });
}
const char* emu_nm_decompress(const NmDecompressArgs* args, unsigned blocks) {
  return run([&](auto launch) { return nm_decompress_launch(*args, launch, blocks); });
}

// Where field `field` of struct `type` lies (both by name; field "" for the whole struct): 1 and
// its offset and size, or 0 for a name not listed here. The test checks its ctypes mirrors of the
// structs against this before any call, so a field out of order or of another width fails there
// rather than handing a kernel the wrong argument.
int emu_layout(const char* type, const char* field, int64_t* offset, int64_t* size) {
  struct Field {
    const char *type, *field;
    size_t offset, size;
  };
#define PYSPARSE_STRUCT(S) {#S, "", 0, sizeof(S)}
#define PYSPARSE_FIELD(S, f) {#S, #f, offsetof(S, f), sizeof(S::f)}
  static const Field fields[] = {
      PYSPARSE_STRUCT(CsrSpmmArgs),
      PYSPARSE_FIELD(CsrSpmmArgs, crow), PYSPARSE_FIELD(CsrSpmmArgs, col), PYSPARSE_FIELD(CsrSpmmArgs, val),
      PYSPARSE_FIELD(CsrSpmmArgs, perm), PYSPARSE_FIELD(CsrSpmmArgs, B), PYSPARSE_FIELD(CsrSpmmArgs, bias),
      PYSPARSE_FIELD(CsrSpmmArgs, out), PYSPARSE_FIELD(CsrSpmmArgs, bad), PYSPARSE_FIELD(CsrSpmmArgs, M),
      PYSPARSE_FIELD(CsrSpmmArgs, K), PYSPARSE_FIELD(CsrSpmmArgs, nnz), PYSPARSE_FIELD(CsrSpmmArgs, n),
      PYSPARSE_FIELD(CsrSpmmArgs, batch), PYSPARSE_FIELD(CsrSpmmArgs, ldb), PYSPARSE_FIELD(CsrSpmmArgs, ldbc),
      PYSPARSE_FIELD(CsrSpmmArgs, sbb), PYSPARSE_FIELD(CsrSpmmArgs, ldo), PYSPARSE_FIELD(CsrSpmmArgs, ldoc),
      PYSPARSE_FIELD(CsrSpmmArgs, sbo), PYSPARSE_FIELD(CsrSpmmArgs, dtype), PYSPARSE_FIELD(CsrSpmmArgs, itype),
      PYSPARSE_STRUCT(CsrSpmmOverrides),
      PYSPARSE_FIELD(CsrSpmmOverrides, vec), PYSPARSE_FIELD(CsrSpmmOverrides, max_cols),
      PYSPARSE_FIELD(CsrSpmmOverrides, max_batch),
      PYSPARSE_STRUCT(NmCompressArgs),
      PYSPARSE_FIELD(NmCompressArgs, dense), PYSPARSE_FIELD(NmCompressArgs, values),
      PYSPARSE_FIELD(NmCompressArgs, mask), PYSPARSE_FIELD(NmCompressArgs, first_bad),
      PYSPARSE_FIELD(NmCompressArgs, R), PYSPARSE_FIELD(NmCompressArgs, K), PYSPARSE_FIELD(NmCompressArgs, n),
      PYSPARSE_FIELD(NmCompressArgs, m), PYSPARSE_FIELD(NmCompressArgs, elem_size),
      PYSPARSE_STRUCT(NmDecompressArgs),
      PYSPARSE_FIELD(NmDecompressArgs, values), PYSPARSE_FIELD(NmDecompressArgs, mask),
      PYSPARSE_FIELD(NmDecompressArgs, dense), PYSPARSE_FIELD(NmDecompressArgs, R),
      PYSPARSE_FIELD(NmDecompressArgs, K), PYSPARSE_FIELD(NmDecompressArgs, n), PYSPARSE_FIELD(NmDecompressArgs, m),
      PYSPARSE_FIELD(NmDecompressArgs, elem_size),
  };
#undef PYSPARSE_FIELD
#undef PYSPARSE_STRUCT
  for (const Field& f : fields)
    if (std::strcmp(f.type, type) == 0 && std::strcmp(f.field, field) == 0) {
      *offset = int64_t(f.offset), *size = int64_t(f.size);
      return 1;
    }
  return 0;
}

}  // extern "C"
