// CPU implementation of pysparse::csr_sddmm: the value gradient of csr_spmm and csr_linear
// (pysparse/autograd.py), computed at the stored positions only.
#include <ATen/Parallel.h>
#include <torch/library.h>

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
