// CPU implementations of pysparse::nm_spmm and pysparse::nm_linear (N:M semi-structured, 2:4
// included), with the bias and activation fused into the kernels' epilogue.
#include <torch/library.h>

#include "spmm_common.h"

namespace pysparse {
namespace cpu {

static int parse_activation(c10::string_view act) {
  if (act == "none") return kActNone;
  if (act == "relu") return kActRelu;
  if (act == "gelu") return kActGelu;
  if (act == "silu") return kActSilu;
  TORCH_CHECK(false, "pysparse: activation must be none, relu, gelu or silu, got '", std::string(act), "'");
}

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
