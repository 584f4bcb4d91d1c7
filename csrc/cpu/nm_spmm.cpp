// CPU implementations of pysparse::nm_spmm and pysparse::nm_linear (N:M semi-structured, 2:4
// included). nm_linear's bias and ReLU run in the kernels' epilogue, gelu, gelu_tanh and silu
// over the finished output (launch_spmm).
#include <torch/library.h>

#include "spmm_common.h"

namespace pysparse {
namespace cpu {

static at::Tensor nm_spmm(const at::Tensor& values, const at::Tensor& mask, c10::SymIntArrayRef shape,
                          int64_t n, int64_t m, const at::Tensor& dense) {
  return launch_spmm(check_nm(values, mask, shape, n, m), dense, /*linear=*/false, std::nullopt);
}

static at::Tensor nm_linear(const at::Tensor& input, const at::Tensor& values, const at::Tensor& mask,
                            c10::SymIntArrayRef shape, int64_t n, int64_t m,
                            const std::optional<at::Tensor>& bias, c10::string_view activation) {
  return launch_spmm(check_nm(values, mask, shape, n, m), input, /*linear=*/true, bias,
                     parse_activation(activation));
}

TORCH_LIBRARY_IMPL(pysparse, CPU, m) {
  m.impl("nm_spmm", &nm_spmm);
  m.impl("nm_linear", &nm_linear);
}

}  // namespace cpu
}  // namespace pysparse
