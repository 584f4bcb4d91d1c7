// C entry points that run pysparse's CUDA kernels (csrc/cuda/*_kernel.cuh) under the CPU emulator
// in emu.h, with the launchers' own geometry helpers; tests/test_cuda_emulated.py loads this with
// ctypes. Each returns nullptr, or a message saying what the emulator caught.
#include "emu.h"

#include "csr_spmm_kernel.cuh"
#include "nm_compress_kernel.cuh"

using namespace pysparse::cuda;

namespace {
thread_local std::string last_error;

const char* result(std::string e) {
  last_error = std::move(e);
  return last_error.empty() ? nullptr : last_error.c_str();
}

// A batch of products as the launcher runs it: csr_spmm_batches' chunks (at most max_batch
// matrices each when > 0) x csr_spmm_plan's kernels and column chunks.
struct CsrArgs {
  int force_vec;
  int64_t max_cols, max_batch, M, K, nnz, ldb, ldbc, sbb, n, batch, ldo, ldoc, sbo;
  const void *B, *crow, *col, *val, *bias;
  const int64_t* perm;
  void* out;
  int* bad;
};

template <typename T, typename RT, typename CT>
std::string csr_run(const CsrArgs& a) {
  const RT* cr = static_cast<const RT*>(a.crow);
  const CT* cl = static_cast<const CT*>(a.col);
  const T* v = static_cast<const T*>(a.val);
  const T* bi = static_cast<const T*>(a.bias);
  std::string err;
  csr_spmm_batches(a.batch, [&](int64_t z, int64_t nz) {
    const T* b = static_cast<const T*>(a.B) + z * a.sbb;
    T* o = static_cast<T*>(a.out) + z * a.sbo;
    csr_spmm_plan<sizeof(T)>(a.n, b, a.ldb, a.sbb, [&](auto kernel, int64_t c, int64_t nc) {
      using Kn = decltype(kernel);
      if (!err.empty()) return;
      if constexpr (Kn::vec == 0)
        err = pysparse_emu::launch(csr_spmm_grid(a.M, 1, 1, nz), dim3(kCsrSpmmThreads), csr_spmm_narrow_kernel<T, RT, CT>,
                                   cr, cl, v, a.perm, a.M, a.K, a.nnz, b + c * a.ldbc, a.ldb, a.ldbc, a.sbb, int(nc),
                                   bi, o + c * a.ldoc, a.ldo, a.ldoc, a.sbo, a.bad);
      else if (a.ldbc != 1 || a.ldoc != 1)
        err = "the wide kernel needs unit column strides";
      else
        err = pysparse_emu::launch(csr_spmm_grid(a.M, nc, Kn::vec, nz), dim3(kCsrSpmmThreads),
                                   csr_spmm_kernel<T, RT, CT, Kn::vec, Kn::aligned>, cr, cl, v, a.perm, a.M, a.K, a.nnz,
                                   b + c, a.ldb, a.sbb, nc, bi, o + c, a.ldo, a.sbo, a.bad);
    }, a.force_vec, a.max_cols);
  }, a.max_batch > 0 ? a.max_batch : kMaxGridY);
  return err;
}

template <typename T>
std::string csr_index(int index_kind, const CsrArgs& a) {
  switch (index_kind) {
    case 0: return csr_run<T, int32_t, int32_t>(a);
    case 1: return csr_run<T, int64_t, int64_t>(a);
    default: return csr_run<T, int32_t, int16_t>(a);
  }
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


// out[z] (M, n) = A @ B[z] (+ bias) for z < batch, as the CUDA launcher runs it, unless `vec`
// forces a kernel (0 narrow, 1, 4 or (2-byte elements) 8 columns per lane; -1 the launcher's
// choice), `max_cols` > 0 shortens the launches (the column-chunk loop, which real sizes reach
// only past 2M columns) or `max_batch` > 0 the batch chunks (real ones hold 65535 matrices).
// B[z][k][j] is at B + z * sbb + k * ldb + j * ldbc, out likewise (ldbc and ldoc must be 1 but
// for the narrow kernel). dtype: 0 fp32, 1 fp16, 2 bf16; index_kind: 0 int32/int32, 1
// int64/int64, 2 int32/int16.
const char* emu_csr_spmm(int dtype, int index_kind, int vec, int64_t max_cols, int64_t max_batch, const void* crow,
                         const void* col, const void* val, const int64_t* perm, int64_t M, int64_t K, int64_t nnz,
                         const void* B, int64_t ldb, int64_t ldbc, int64_t sbb, int64_t n, int64_t batch,
                         const void* bias, void* out, int64_t ldo, int64_t ldoc, int64_t sbo, int* bad) {
  const CsrArgs a{vec, max_cols, max_batch, M,    K,   nnz, ldb, ldbc, sbb,  n,   batch,
                  ldo, ldoc,     sbo,       B,    crow, col, val, bias, perm, out, bad};
  switch (dtype) {
    case 0: return result(csr_index<float>(index_kind, a));
    case 1: return result(csr_index<__half>(index_kind, a));
    default: return result(csr_index<__nv_bfloat16>(index_kind, a));
  }
}

// The launcher's choice of aligned vector loads for this B (vec columns per lane) and its choice
// of vec for n columns.
int emu_csr_spmm_aligned(const void* B, int64_t ldb, int64_t sbb, int vec, int elem_size) {
  return csr_spmm_aligned(B, ldb, sbb, vec, elem_size);
}
int emu_csr_spmm_vec(int64_t n, int elem_size) { return csr_spmm_vec(n, elem_size); }

// nm_compress / nm_decompress on elements of elem_size bytes (4, 2, 1) over `blocks` blocks (0: the
// launcher's nm_grid).
const char* emu_nm_compress(int elem_size, const void* src, int64_t R, int64_t K, int n, int m, void* vals,
                            uint8_t* mask, unsigned long long* first_bad, unsigned blocks) {
  const int64_t units = nm_units(R, K, m);
  if (units == 0) return result("");
  const dim3 grid(blocks ? blocks : nm_grid(units)), block(kNmThreads);
  switch (elem_size) {
    case 4: return result(pysparse_emu::launch(grid, block, nm_compress_kernel<uint32_t>, static_cast<const uint32_t*>(src), R, K, n, m, static_cast<uint32_t*>(vals), mask, first_bad));
    case 2: return result(pysparse_emu::launch(grid, block, nm_compress_kernel<uint16_t>, static_cast<const uint16_t*>(src), R, K, n, m, static_cast<uint16_t*>(vals), mask, first_bad));
    default: return result(pysparse_emu::launch(grid, block, nm_compress_kernel<uint8_t>, static_cast<const uint8_t*>(src), R, K, n, m, static_cast<uint8_t*>(vals), mask, first_bad));
  }
}

const char* emu_nm_decompress(int elem_size, const void* vals, const uint8_t* mask, int64_t R, int64_t K, int n, int m,
                              void* out, unsigned blocks) {
  const int64_t units = nm_units(R, K, m);
  if (units == 0) return result("");
  const dim3 grid(blocks ? blocks : nm_grid(units)), block(kNmThreads);
  switch (elem_size) {
    case 4: return result(pysparse_emu::launch(grid, block, nm_decompress_kernel<uint32_t>, static_cast<const uint32_t*>(vals), mask, R, K, n, m, static_cast<uint32_t*>(out)));
    case 2: return result(pysparse_emu::launch(grid, block, nm_decompress_kernel<uint16_t>, static_cast<const uint16_t*>(vals), mask, R, K, n, m, static_cast<uint16_t*>(out)));
    default: return result(pysparse_emu::launch(grid, block, nm_decompress_kernel<uint8_t>, static_cast<const uint8_t*>(vals), mask, R, K, n, m, static_cast<uint8_t*>(out)));
  }
}

}  // extern "C"
