// Input checks shared by the CPU (and later CUDA) launchers. Every failure is one sentence that
// names the argument and what was expected; TORCH_CHECK raises it as a Python error.
#pragma once
#include <ATen/ATen.h>

#include "kernels.h"

namespace pysparse {

inline cpu::DType value_dtype(const at::Tensor& t, const char* what) {
  switch (t.scalar_type()) {
    case at::kFloat: return cpu::kF32;
    case at::kBFloat16: return cpu::kBF16;
    case at::kHalf: return cpu::kF16;
    default:
      TORCH_CHECK_TYPE(false, "pysparse: ", what, " must be float32, bfloat16 or float16, got ",
                       t.scalar_type());
  }
}

inline cpu::IType index_dtype(const at::Tensor& crow, const at::Tensor& col) {
  TORCH_CHECK_TYPE(crow.scalar_type() == col.scalar_type(),
                   "pysparse: row pointers and column indices must share one dtype, got ",
                   crow.scalar_type(), " and ", col.scalar_type());
  TORCH_CHECK_TYPE(crow.scalar_type() == at::kInt || crow.scalar_type() == at::kLong,
                   "pysparse: index tensors must be int32 or int64, got ", crow.scalar_type());
  return crow.scalar_type() == at::kInt ? cpu::kI32 : cpu::kI64;
}

inline void check_same_device(const at::Tensor& ref, const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device() == ref.device(), "pysparse: ", what, " is on ", t.device(),
              " but the sparse values are on ", ref.device());
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* what) {
  TORCH_CHECK(t.dim() == dim, "pysparse: ", what, " must be ", dim, "-D, got shape ", t.sizes());
}

}  // namespace pysparse
