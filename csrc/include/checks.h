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
  const auto r = crow.scalar_type(), c = col.scalar_type();
  if (r == at::kInt && c == at::kInt) return cpu::kI32;
  if (r == at::kLong && c == at::kLong) return cpu::kI64;
  if (r == at::kInt && c == at::kShort) return cpu::kI32C16;
  TORCH_CHECK_TYPE(false, "pysparse: index dtypes must be (int32, int32), (int64, int64) or "
                   "(int32 row pointers, int16 column indices), got ", r, " and ", c);
}

inline void check_same_device(const at::Tensor& ref, const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device() == ref.device(), "pysparse: ", what, " is on ", t.device(),
              " but the sparse values are on ", ref.device());
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* what) {
  TORCH_CHECK(t.dim() == dim, "pysparse: ", what, " must be ", dim, "-D, got shape ", t.sizes());
}

}  // namespace pysparse
