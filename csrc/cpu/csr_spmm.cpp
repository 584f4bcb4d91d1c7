// CPU implementations of pysparse::csr_spmm and pysparse::csr_linear.
#include <torch/library.h>

#include "spmm_common.h"

namespace pysparse {
namespace cpu {

static at::Tensor csr_spmm(const at::Tensor& crow, const at::Tensor& col, const at::Tensor& values,
                           c10::SymIntArrayRef shape, const at::Tensor& dense) {
  return launch_spmm(check_csr(crow, col, values, shape), dense, /*linear=*/false, std::nullopt);
}

static at::Tensor csr_linear(const at::Tensor& input, const at::Tensor& crow, const at::Tensor& col,
                             const at::Tensor& values, c10::SymIntArrayRef shape,
                             const std::optional<at::Tensor>& bias) {
  return launch_spmm(check_csr(crow, col, values, shape), input, /*linear=*/true, bias);
}

TORCH_LIBRARY_IMPL(pysparse, CPU, m) {
  m.impl("csr_spmm", &csr_spmm);
  m.impl("csr_linear", &csr_linear);
}

}  // namespace cpu
}  // namespace pysparse
