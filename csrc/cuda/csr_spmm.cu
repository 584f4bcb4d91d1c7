// CUDA launchers of pysparse::csr_spmm and pysparse::csr_linear (kernels in csr_spmm_kernel.cuh,
// their launches in csr_spmm_launch.cuh). Checks what is cheap to check on the host and launches
// on the current stream under a device guard. A matrix's first product also checks its indices
// (the kernel flags a bad one; reading the flag synchronises) and orders its rows by length,
// longest first; both are remembered with the index tensors (checked_indices.h), so later
// products neither synchronise nor sort, and can be captured in a CUDA graph. A batch of dense
// operands is one launch (grid.z). The linear layout runs as out^T = A @ x^T: up to kCsrNarrow
// tokens (decode) the narrow kernel reads x and writes the (T, M) output through strides; more
// tokens go through transposed copies, since the wide kernel wants rows of B and out contiguous.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "checked_indices.h"
#include "checks.h"
#include "csr_spmm_launch.cuh"
#include "stream_launch.cuh"

namespace pysparse {
namespace cuda {

// Never destroyed: the row orders it holds are CUDA tensors, which must not be freed after the
// CUDA runtime has shut down at exit.
static CheckedIndices& checked() {
  static auto* memo = new CheckedIndices();
  return *memo;
}

// out[i] (M, n) = A @ B[i] for B (batch, K, n), any strides; bias per row of out. Returns out
// (batch, M, n), or with `transposed` its transpose (batch, n, M), contiguous. The batch is one launch.
static at::Tensor spmm_mn(const at::Tensor& crow_in, const at::Tensor& col_in, const at::Tensor& values_in,
                          c10::SymIntArrayRef shape, const at::Tensor& B_in, const std::optional<at::Tensor>& bias,
                          bool transposed) {
  const cpu::DType dtype = value_dtype(values_in, "values");
  check_dim(crow_in, 1, "crow_indices");
  check_dim(col_in, 1, "col_indices");
  check_dim(values_in, 1, "values");
  TORCH_CHECK(shape.size() == 2, "pysparse: shape must have 2 entries, got ", shape.size());
  const int64_t M = shape[0].expect_int(), K = shape[1].expect_int();
  TORCH_CHECK(M >= 0 && K >= 0, "pysparse: shape must be non-negative, got (", M, ", ", K, ")");
  TORCH_CHECK(crow_in.numel() - 1 == M, "pysparse: crow_indices must have ", uint64_t(M) + 1, " entries, got ",
              crow_in.numel());  // not M + 1 in int64: a declared row count can be INT64_MAX
  TORCH_CHECK(col_in.numel() == values_in.numel(), "pysparse: col_indices and values must have the same length, got ",
              col_in.numel(), " and ", values_in.numel());
  for (const at::Tensor* t : {&crow_in, &col_in, &B_in}) check_same_device(values_in, *t, "operand");
  TORCH_CHECK_TYPE(B_in.scalar_type() == values_in.scalar_type(), "pysparse: dense dtype ", B_in.scalar_type(),
                   " differs from the sparse values' dtype ", values_in.scalar_type());
  TORCH_CHECK(B_in.size(1) == K, "pysparse: dense has ", B_in.size(1), " rows but the sparse matrix has ", K, " columns");
  if (bias) {
    check_same_device(values_in, *bias, "bias");
    TORCH_CHECK_TYPE(bias->scalar_type() == values_in.scalar_type(), "pysparse: bias dtype differs from the values' dtype");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == M, "pysparse: bias must have shape (", M, "), got ", bias->sizes());
  }
  // As on the CPU. (The kernels would read row 0 of an empty B in place of a bad index.)
  TORCH_CHECK(K > 0 || values_in.numel() == 0, "pysparse: a matrix with 0 columns cannot hold nonzeros");
  c10::cuda::CUDAGuard guard(values_in.device());
  const at::Tensor crow = crow_in.contiguous(), col = col_in.contiguous(), values = values_in.contiguous();
  const int64_t batch = B_in.size(0), n = B_in.size(2);
  checked_numel({batch, M, n}, values.element_size(), "the output");
  // The narrow kernel reads B and writes out through any strides, so the linear layout (B = x^T,
  // out = y^T) costs no transposed copies at decode; the wide one wants unit column strides.
  const bool narrow = n <= kCsrNarrow;
  const at::Tensor B = narrow || B_in.stride(2) == 1 ? B_in : B_in.contiguous();
  const at::Tensor result = transposed ? at::empty({batch, n, M}, values.options())
                                       : at::empty({batch, M, n}, values.options());
  const at::Tensor out_view = transposed ? result.transpose(1, 2) : result;
  at::Tensor out = narrow || out_view.stride(2) == 1 ? out_view : at::empty({batch, M, n}, values.options());
  if (M == 0 || n == 0 || batch == 0) return result;
  // Indices checked before (at their current versions) come with their row order: no sort, no
  // flag, no synchronisation. Otherwise: longest rows first, a stable descending sort of the row
  // lengths on the device, and the kernel's flag read back after the product.
  std::optional<at::Tensor> known = checked().find(crow_in, col_in, K);
  at::Tensor perm, bad;
  if (known) {
    perm = *known;
  } else {
    if (c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None) {
      TORCH_CHECK(!crow_in.is_inference() && !col_in.is_inference(),
                  "pysparse: a CSR matrix made under torch.inference_mode() has no version counter, so its indices "
                  "are checked on every product, which cannot happen during CUDA graph capture: build it outside "
                  "inference mode");
      TORCH_CHECK(false, "pysparse: a CSR matrix's indices are checked on its first product, which cannot happen "
                  "during CUDA graph capture: run the op once before capturing");
    }
    const at::Tensor lengths = (crow.slice(0, 1) - crow.slice(0, 0, M)).to(at::kLong);
    perm = std::get<1>(lengths.sort(/*stable=*/true, /*dim=*/0, /*descending=*/true)).contiguous();
    bad = at::zeros({1}, values.options().dtype(at::kInt));
  }
  const at::Tensor bias_c = bias ? bias->contiguous() : at::Tensor();
  const CsrSpmmArgs args{.crow = crow.data_ptr(), .col = col.data_ptr(), .val = values.data_ptr(),
                         .perm = perm.data_ptr<int64_t>(), .B = B.data_ptr(),
                         .bias = bias ? bias_c.data_ptr() : nullptr, .out = out.data_ptr(),
                         .bad = known ? nullptr : bad.data_ptr<int>(),
                         .M = M, .K = K, .nnz = values.numel(), .n = n, .batch = batch,
                         .ldb = B.stride(1), .ldbc = B.stride(2), .sbb = B.stride(0),
                         .ldo = out.stride(1), .ldoc = out.stride(2), .sbo = out.stride(0),
                         .dtype = dtype, .itype = index_dtype(crow, col)};  // throws the one-sentence error
  const char* refused = csr_spmm_launch(args, StreamLaunch());
  TORCH_INTERNAL_ASSERT(refused == nullptr, "pysparse: CSR launch plan refused: ", refused);
  if (!known) {
    // Synchronises, once per matrix version: a bad index must be an error, not a clamped result.
    TORCH_CHECK(bad.item<int>() == 0, "pysparse: a column index or row pointer is out of range for a matrix with ", K,
                " columns and ", values.numel(), " stored values");
    checked().remember(crow_in, col_in, K, perm);
  }
  if (!out.is_same(out_view)) out_view.copy_(out);
  return result;
}

// dense (K, n) or a batch (..., K, n) -> (..., M, n), as on the CPU.
static at::Tensor csr_spmm_cuda(const at::Tensor& crow, const at::Tensor& col, const at::Tensor& values,
                                c10::SymIntArrayRef shape, const at::Tensor& dense) {
  TORCH_CHECK(dense.dim() >= 2, "pysparse: dense must be (K, n) or a batch (..., K, n), got ", dense.dim(), "-D");
  TORCH_CHECK(shape.size() == 2, "pysparse: shape must have 2 entries, got ", shape.size());
  int64_t batch = 1;
  for (int64_t d = 0; d + 2 < dense.dim(); ++d) batch *= dense.size(d);
  std::vector<int64_t> out_shape = dense.sizes().vec();
  out_shape[out_shape.size() - 2] = shape[0].expect_int();
  return spmm_mn(crow, col, values, shape, dense.reshape({batch, dense.size(-2), dense.size(-1)}), std::nullopt,
                 /*transposed=*/false)
      .reshape(out_shape);
}

static at::Tensor csr_linear_cuda(const at::Tensor& input, const at::Tensor& crow, const at::Tensor& col,
                                  const at::Tensor& values, c10::SymIntArrayRef shape, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(shape.size() == 2, "pysparse: shape must have 2 entries, got ", shape.size());
  const int64_t M = shape[0].expect_int(), K = shape[1].expect_int();
  TORCH_CHECK(input.dim() >= 1 && input.size(-1) == K, "pysparse: input's last dimension must equal the sparse matrix's columns (", K, ")");
  const at::Tensor x = input.reshape({-1, K});
  std::vector<int64_t> out_shape = input.sizes().vec();
  out_shape.back() = M;
  // out^T = A @ x^T, returned contiguous as (T, M), as the CPU kernel and the fake implementation give it
  return spmm_mn(crow, col, values, shape, x.t().unsqueeze(0), bias, /*transposed=*/true)[0].reshape(out_shape);
}

TORCH_LIBRARY_IMPL(pysparse, CUDA, m) {
  m.impl("csr_spmm", &csr_spmm_cuda);
  m.impl("csr_linear", &csr_linear_cuda);
}

}  // namespace cuda
}  // namespace pysparse
