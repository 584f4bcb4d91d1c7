// CPU implementations of pysparse::bsr_spmm and pysparse::bsr_linear.
#include <torch/library.h>

#include "spmm_common.h"

namespace pysparse {
namespace cpu {

static at::Tensor bsr_spmm(const at::Tensor& crow, const at::Tensor& col, const at::Tensor& values,
                           c10::SymIntArrayRef shape, const at::Tensor& dense) {
  return launch_spmm(check_bsr(crow, col, values, shape), dense, /*linear=*/false, std::nullopt);
}

static at::Tensor bsr_linear(const at::Tensor& input, const at::Tensor& crow, const at::Tensor& col,
                             const at::Tensor& values, c10::SymIntArrayRef shape,
                             const std::optional<at::Tensor>& bias) {
  return launch_spmm(check_bsr(crow, col, values, shape), input, /*linear=*/true, bias);
}

TORCH_LIBRARY_IMPL(pysparse, CPU, m) {
  m.impl("bsr_spmm", &bsr_spmm);
  m.impl("bsr_linear", &bsr_linear);
}

}  // namespace cpu
}  // namespace pysparse
