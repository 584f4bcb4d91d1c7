// The one TORCH_LIBRARY block: every pysparse op's schema. Kernels register per backend in
// csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu; fake (meta) implementations live in pysparse/ops.py.
//
// Layout conventions shared by the ops:
//   *_spmm(crow, col, values, shape, dense)          A (shape) @ dense (K, n)     -> (M, n)
//   *_linear(input, crow, col, values, shape, bias)  input (..., K) @ A^T + bias  -> (..., M)
// values and dense/input/bias share a dtype (float32, bfloat16, float16); accumulation is fp32.
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu/spmm_common.h"

#ifndef PYSPARSE_TORCH_VERSION
#error "setup.py defines PYSPARSE_TORCH_VERSION"
#endif

TORCH_LIBRARY(pysparse, m) {
  m.def("csr_spmm(Tensor crow_indices, Tensor col_indices, Tensor values, SymInt[] shape, Tensor dense) -> Tensor");
  m.def("csr_linear(Tensor input, Tensor crow_indices, Tensor col_indices, Tensor values, SymInt[] shape, Tensor? bias) -> Tensor");
  m.def("bsr_spmm(Tensor crow_indices, Tensor col_indices, Tensor values, SymInt[] shape, Tensor dense) -> Tensor");
  m.def("bsr_linear(Tensor input, Tensor crow_indices, Tensor col_indices, Tensor values, SymInt[] shape, Tensor? bias) -> Tensor");
  // N:M semi-structured (2:4 included): values (M, K/m*n), mask (M, ceil(K/8)) uint8 bitmap.
  m.def("nm_compress(Tensor dense, int n, int m) -> (Tensor values, Tensor mask)");
  m.def("nm_decompress(Tensor values, Tensor mask, SymInt[] shape, int n, int m) -> Tensor");
  m.def("nm_spmm(Tensor values, Tensor mask, SymInt[] shape, int n, int m, Tensor dense) -> Tensor");
  m.def("nm_linear(Tensor input, Tensor values, Tensor mask, SymInt[] shape, int n, int m, Tensor? bias, str activation=\"none\") -> Tensor");
}

// Build facts and ISA control for pysparse.info() and the tests; not ops.
PYBIND11_MODULE(_C, mod) {
  mod.def("torch_version", [] { return std::string(PYSPARSE_TORCH_VERSION); });
  mod.def("cuda_compiled", [] {
#ifdef PYSPARSE_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
  mod.def("cpu_isa_supported", &pysparse::cpu::supported_isas);
  mod.def("cpu_isa", [] { return std::string(pysparse::cpu::active_kernels().name); });
  mod.def("set_cpu_isa", &pysparse::cpu::set_cpu_isa);
}
