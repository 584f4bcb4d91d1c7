// CUDA launchers of pysparse::nm_compress and pysparse::nm_decompress (kernels in
// nm_compress_kernel.cuh, their launches in nm_compress_launch.cuh). Launched on the current
// stream under a device guard.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "checks.h"
#include "nm_compress_launch.cuh"
#include "stream_launch.cuh"

namespace pysparse {
namespace cuda {

static std::tuple<at::Tensor, at::Tensor> nm_compress_cuda(const at::Tensor& dense, int64_t n, int64_t m) {
  check_nm_compress_input(dense, n, m);
  const int64_t R = dense.size(0), K = dense.size(1);
  c10::cuda::CUDAGuard guard(dense.device());
  const at::Tensor src = dense.contiguous();
  at::Tensor values = at::empty({R, K / m * n}, dense.options());
  at::Tensor mask = at::empty({R, K / 8 + (K % 8 != 0)}, dense.options().dtype(at::kByte));
  at::Tensor bad = at::full({1}, R, dense.options().dtype(at::kLong));
  const char* refused = nm_compress_launch(
      {.dense = src.data_ptr(), .values = values.data_ptr(), .mask = mask.data_ptr<uint8_t>(),
       .first_bad = reinterpret_cast<unsigned long long*>(bad.data_ptr<int64_t>()), .R = R, .K = K,
       .n = int32_t(n), .m = int32_t(m), .elem_size = int32_t(dense.element_size())},
      StreamLaunch());
  TORCH_INTERNAL_ASSERT(refused == nullptr, "pysparse: N:M launch plan refused: ", refused);
  const int64_t first = bad.item<int64_t>();  // synchronises: the error must name the group
  if (first < R) throw_nm_too_many(src, first, n, m);
  return {values, mask};
}

static at::Tensor nm_decompress_cuda(const at::Tensor& values, const at::Tensor& mask, c10::SymIntArrayRef shape,
                                     int64_t n, int64_t m) {
  const auto [R, K] = check_nm_operand(values, mask, shape, n, m);
  c10::cuda::CUDAGuard guard(values.device());
  const at::Tensor v = values.contiguous(), mk = mask.contiguous();
  checked_numel({R, K}, values.element_size(), "the dense matrix");
  at::Tensor out = at::empty({R, K}, values.options());
  const char* refused = nm_decompress_launch(
      {.values = v.data_ptr(), .mask = mk.data_ptr<uint8_t>(), .dense = out.data_ptr(), .R = R, .K = K,
       .n = int32_t(n), .m = int32_t(m), .elem_size = int32_t(values.element_size())},
      StreamLaunch());
  // Reachable: check_nm_operand leaves the values' dtype open, and the CPU op also takes 8-byte ones.
  TORCH_CHECK_TYPE(refused == nullptr, "pysparse: nm_decompress on CUDA: ", refused, ", got ", values.scalar_type());
  return out;
}

TORCH_LIBRARY_IMPL(pysparse, CUDA, m) {
  m.impl("nm_compress", &nm_compress_cuda);
  m.impl("nm_decompress", &nm_decompress_cuda);
}

}  // namespace cuda
}  // namespace pysparse
