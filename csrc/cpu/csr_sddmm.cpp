// CPU implementation of pysparse::csr_sddmm: the value gradient of csr_spmm and csr_linear
// (pysparse/autograd.py), computed at the stored positions only.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <tuple>

#include "checks.h"
#include "spmm_common.h"

namespace pysparse {
namespace cpu {

static at::Tensor csr_sddmm(const at::Tensor& crow, const at::Tensor& col, c10::SymIntArrayRef shape,
                            const at::Tensor& a, const at::Tensor& b) {
  check_dim(a, 2, "a");
  check_dim(b, 2, "b");
  value_dtype(a, "a");
  TORCH_CHECK_TYPE(b.scalar_type() == a.scalar_type(), "pysparse: a is ", a.scalar_type(), " but b is ",
                   b.scalar_type(), "; they must share a dtype");
  check_same_device(a, b, "b");
  // The index checks of the products (row pointers, shape); the values are the output here.
  const SparseOperand A = check_csr_pattern(crow, col, a, shape);
  TORCH_CHECK(a.size(0) == A.M, "pysparse: a must have the matrix's ", A.M, " rows, got ", a.size(0));
  TORCH_CHECK(b.size(0) == A.K, "pysparse: b must have the matrix's ", A.K, " columns as rows, got ", b.size(0));
  TORCH_CHECK(a.size(1) == b.size(1), "pysparse: a and b must have the same number of columns, got ", a.size(1),
              " and ", b.size(1));
  const int64_t nnz = col.numel(), n = a.size(1);
  checked_numel({nnz}, 4, "the SDDMM output");
  at::Tensor out = at::zeros({nnz}, a.options().dtype(at::kFloat));
  if (nnz == 0) return out.to(a.scalar_type());
  if (n == 0) {  // nothing to multiply, but the pattern must still be one of this matrix
    const at::Tensor c = A.col.to(at::kLong);
    TORCH_CHECK(!(c.lt(0) | c.ge(A.K)).any().item<bool>(), "pysparse: a column index is out of range for a matrix with ",
                A.K, " columns");
    return out.to(a.scalar_type());
  }
  const KernelTable& kt = active_kernels();
  const IType it = index_dtype(A.crow, A.col);
  const DType dt = value_dtype(a, "a");
  // Both operands as fp32 panels of nb tokens (the packing the products use: a cache-blocked
  // transpose for the token-major layouts, any strides, 16-bit widened once).
  const int nb = kt.sddmm_panel_width;
  const int64_t npanels = (n + nb - 1) / nb;
  at::Tensor ap = at::empty({checked_numel({npanels, A.M, nb}, 4, "the SDDMM panels of a")}, out.options());
  at::Tensor bp = at::empty({checked_numel({npanels, A.K, nb}, 4, "the SDDMM panels of b")}, out.options());
  for (auto [src, dst, rows] : {std::tuple{&a, &ap, A.M}, std::tuple{&b, &bp, A.K}}) {
    const PackArgs pa{src->data_ptr(), rows, n, src->stride(0), src->stride(1), dst->data_ptr<float>(), nb};
    at::parallel_for(0, npanels, 1, [&](int64_t p0, int64_t p1) { kt.pack[dt](pa, p0, p1, 0, rows); });
  }
  std::atomic<int> bad{0};
  // At least ~32k multiply-adds per task, so that small products stay on one thread.
  const int64_t per_row = saturating_mul(std::max<int64_t>(1, nnz / std::max<int64_t>(1, A.M)), std::max<int64_t>(1, n));
  const int64_t grain = std::max<int64_t>(1, 32768 / per_row);
  // The slice plan (sddmm_impl.h says why) where the ISA follows one and the pattern has one
  // (int32 rows, sorted columns in range, K <= 65536; checked when it was made), from a density
  // of 1/12 on. Measured against the row kernel (2026-12-08, 2 threads, 32-2048 tokens, 384-4096
  // columns): 50-70% sparsity 1.1-1.8x, 2:4 1.3-2.1x, 90% 0.98-1.5x, 95% 0.82-1.29x (too few
  // entries per slice to fill the sums).
  const at::Tensor plan =
      kt.csr_sddmm_plan != nullptr && A.stable && nnz >= A.M * A.K / 12 ? csr_plan(A) : at::Tensor();
  if (plan.defined()) {
    const int64_t nchunks = (A.M + kPlanRows - 1) / kPlanRows;
    at::parallel_for(0, nchunks, std::max<int64_t>(1, grain / kPlanRows), [&](int64_t c0, int64_t c1) {
      SddmmArgs s{nullptr, nullptr, ap.data_ptr<float>(), bp.data_ptr<float>(), out.data_ptr<float>(), A.M, A.K,
                  npanels, nullptr, plan.data_ptr<int64_t>()};
      kt.csr_sddmm_plan(s, c0 * kPlanRows, std::min(A.M, c1 * kPlanRows));
    });
    return out.to(a.scalar_type());
  }
  at::parallel_for(0, A.M, grain, [&](int64_t r0, int64_t r1) {
    int flag = 0;
    SddmmArgs s{A.crow.data_ptr(), A.col.data_ptr(), ap.data_ptr<float>(), bp.data_ptr<float>(),
                out.data_ptr<float>(), A.M, A.K, npanels, &flag};
    kt.csr_sddmm[it](s, r0, r1);
    if (flag) bad.store(1);
  });
  TORCH_CHECK(bad.load() == 0, "pysparse: a column index is out of range for a matrix with ", A.K, " columns");
  return out.to(a.scalar_type());
}

TORCH_LIBRARY_IMPL(pysparse, CPU, m) { m.impl("csr_sddmm", &csr_sddmm); }

}  // namespace cpu
}  // namespace pysparse
