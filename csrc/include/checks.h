// Input checks shared by the CPU (and later CUDA) launchers. Every failure is one sentence that
// names the argument and what was expected; TORCH_CHECK raises it as a Python error.
#pragma once
#include <ATen/ATen.h>
#include <ATen/TensorUtils.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <initializer_list>
#include <limits>
#include <sstream>
#include <utility>

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

// ---- Size arithmetic ------------------------------------------------------------------------
// A shape in an op's schema is bounded by no tensor, and an operand expanded with stride 0 can
// declare 2**62 columns over one float: a buffer size multiplied out of such sizes can wrap to a
// small number (then written past) or to 0 (then divided by). Every buffer, workspace and output
// size of the CPU and CUDA launchers is therefore computed by checked_numel, which also refuses
// a size this process could not allocate, before anything is allocated.

// Bytes this process can allocate at most: physical memory, or a lower RLIMIT_AS/RLIMIT_DATA.
inline int64_t memory_limit_bytes() {
  static const int64_t limit = [] {
    const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
    int64_t lim = pages > 0 && page > 0 ? int64_t(pages) * page : std::numeric_limits<int64_t>::max();
    for (int res : {RLIMIT_AS, RLIMIT_DATA}) {
      struct rlimit rl;
      if (getrlimit(res, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY)
        lim = std::min<int64_t>(lim, int64_t(std::min<rlim_t>(rl.rlim_cur, rlim_t(lim))));
    }
    return lim;
  }();
  return limit;
}

// The product of dims (an element count), or a ValueError naming `what` when the product, times
// elem_size bytes, overflows or exceeds memory_limit_bytes(). Dims must be non-negative.
inline int64_t checked_numel(std::initializer_list<int64_t> dims, int64_t elem_size, const char* what) {
  int64_t n = 1, bytes = 0;
  bool over = false;
  for (int64_t d : dims) {
    TORCH_CHECK_VALUE(d >= 0, "pysparse: ", what, " has a negative size (", d, ")");
    over = over || __builtin_mul_overflow(n, d, &n);
  }
  if (!over && n == 0) return 0;
  over = over || __builtin_mul_overflow(n, elem_size, &bytes);
  if (over || bytes > memory_limit_bytes()) {
    std::ostringstream dims_text;
    const char* sep = "";
    for (int64_t d : dims) dims_text << sep << d, sep = " x ";
    TORCH_CHECK_VALUE(false, "pysparse: ", what, " would need ", dims_text.str(), " elements of ", elem_size,
                      " bytes, more than this process can allocate (", memory_limit_bytes(), " bytes)");
  }
  return n;
}

// a * b saturated at INT64_MAX (a, b >= 0): for cost estimates that decide how to split work,
// where an operand expanded with stride 0 can make the product of true sizes overflow.
inline int64_t saturating_mul(int64_t a, int64_t b) {
  int64_t r;
  return __builtin_mul_overflow(a, b, &r) ? std::numeric_limits<int64_t>::max() : r;
}

// t made contiguous, or reshaped to `shape`, refusing (checked_numel) a copy that could not be
// allocated: an operand expanded with stride 0 can stand for more elements than memory holds.
inline at::Tensor contiguous_checked(const at::Tensor& t, const char* what) {
  if (t.is_contiguous()) return t;
  checked_numel({t.numel()}, t.element_size(), what);
  return t.contiguous();
}
inline at::Tensor reshape_checked(const at::Tensor& t, at::IntArrayRef shape, const char* what) {
  if (at::detail::computeStride(t.sizes(), t.strides(), shape)) return t.view(shape);  // no copy
  checked_numel({t.numel()}, t.element_size(), what);
  return t.reshape(shape);
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* what) {
  TORCH_CHECK(t.dim() == dim, "pysparse: ", what, " must be ", dim, "-D, got shape ", t.sizes());
}

// ---- N:M (values + kept-position bitmap), shared by the CPU and CUDA launchers ---------------

inline void check_nm_pattern(int64_t n, int64_t m) {
  TORCH_CHECK(m == 4 || m == 8 || m == 16, "pysparse: N:M needs m in (4, 8, 16), got ", m);
  TORCH_CHECK(n > 0 && n < m, "pysparse: N:M needs 0 < n < m, got ", n, ":", m);
}

// Checks values (R, K/m*n) and mask (R, ceil(K/8)) uint8 against shape; returns (R, K).
inline std::pair<int64_t, int64_t> check_nm_operand(const at::Tensor& values, const at::Tensor& mask,
                                                    c10::SymIntArrayRef shape, int64_t n, int64_t m) {
  check_nm_pattern(n, m);
  check_dim(values, 2, "N:M values");
  check_dim(mask, 2, "N:M mask");
  check_same_device(values, mask, "mask");
  TORCH_CHECK(shape.size() == 2, "pysparse: shape must have 2 entries, got ", shape.size());
  const int64_t R = shape[0].expect_int(), K = shape[1].expect_int();
  TORCH_CHECK(R >= 0 && K >= 0 && K % m == 0, "pysparse: N:M shape (", R, ", ", K,
              ") needs non-negative sizes and columns divisible by m = ", m);
  const int64_t kept = K / m * n, mbytes = K / 8 + (K % 8 != 0);  // (K + 7) / 8 can wrap
  TORCH_CHECK(values.size(0) == R && values.size(1) == kept, "pysparse: N:M values must have shape (",
              R, ", ", kept, "), got ", values.sizes());
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kByte, "pysparse: N:M mask must be uint8, got ", mask.scalar_type());
  TORCH_CHECK(mask.size(0) == R && mask.size(1) == mbytes, "pysparse: N:M mask must have shape (", R,
              ", ", mbytes, "), got ", mask.sizes());
  return {R, K};
}

// The dense input of nm_compress: 2-D, a 1/2/4-byte dtype, columns divisible by m.
inline void check_nm_compress_input(const at::Tensor& dense, int64_t n, int64_t m) {
  check_nm_pattern(n, m);
  check_dim(dense, 2, "dense");
  const auto st = dense.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf || st == at::kChar,
                   "pysparse: nm_compress takes float32, bfloat16, float16 or int8, got ", st);
  TORCH_CHECK(dense.size(1) % m == 0, "pysparse: ", dense.size(1), " columns are not a multiple of m = ", m);
}

// Raised when row `row` of dense holds a group with more than n nonzeros: names the first one.
[[noreturn]] inline void throw_nm_too_many(const at::Tensor& dense, int64_t row, int64_t n, int64_t m) {
  const int64_t K = dense.size(1);
  const at::Tensor nz = (dense[row] != 0).reshape({K / m, m}).sum(1).cpu();
  const int64_t g = (nz > n).nonzero()[0][0].item<int64_t>();
  TORCH_CHECK_VALUE(false, "pysparse: row ", row, ", group ", g, " (columns ", g * m, "..", g * m + m - 1,
                    ") has ", nz[g].item<int64_t>(), " nonzeros, more than ", n, ":", m, " allows");
  __builtin_unreachable();
}

}  // namespace pysparse
