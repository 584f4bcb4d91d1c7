// CUDA launchers of pysparse::nm_compress and pysparse::nm_decompress (kernels in
// nm_compress_kernel.cuh). Launched on the current stream under a device guard.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "checks.h"
#include "nm_compress_kernel.cuh"

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
  const int64_t units = nm_units(R, K, m);
  auto stream = at::cuda::getCurrentCUDAStream();
  auto* badp = reinterpret_cast<unsigned long long*>(bad.data_ptr<int64_t>());
  if (units > 0) {
    switch (dense.element_size()) {
      case 4: nm_compress_kernel<uint32_t><<<nm_grid(units), kNmThreads, 0, stream>>>((const uint32_t*)src.data_ptr(), R, K, int(n), int(m), (uint32_t*)values.data_ptr(), mask.data_ptr<uint8_t>(), badp); break;
      case 2: nm_compress_kernel<uint16_t><<<nm_grid(units), kNmThreads, 0, stream>>>((const uint16_t*)src.data_ptr(), R, K, int(n), int(m), (uint16_t*)values.data_ptr(), mask.data_ptr<uint8_t>(), badp); break;
      default: nm_compress_kernel<uint8_t><<<nm_grid(units), kNmThreads, 0, stream>>>((const uint8_t*)src.data_ptr(), R, K, int(n), int(m), (uint8_t*)values.data_ptr(), mask.data_ptr<uint8_t>(), badp); break;
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
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
  const int64_t units = nm_units(R, K, m);
  auto stream = at::cuda::getCurrentCUDAStream();
  if (units > 0) {
    switch (values.element_size()) {
      case 4: nm_decompress_kernel<uint32_t><<<nm_grid(units), kNmThreads, 0, stream>>>((const uint32_t*)v.data_ptr(), mk.data_ptr<uint8_t>(), R, K, int(n), int(m), (uint32_t*)out.data_ptr()); break;
      case 2: nm_decompress_kernel<uint16_t><<<nm_grid(units), kNmThreads, 0, stream>>>((const uint16_t*)v.data_ptr(), mk.data_ptr<uint8_t>(), R, K, int(n), int(m), (uint16_t*)out.data_ptr()); break;
      default: nm_decompress_kernel<uint8_t><<<nm_grid(units), kNmThreads, 0, stream>>>((const uint8_t*)v.data_ptr(), mk.data_ptr<uint8_t>(), R, K, int(n), int(m), (uint8_t*)out.data_ptr()); break;
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

TORCH_LIBRARY_IMPL(pysparse, CUDA, m) {
  m.impl("nm_compress", &nm_compress_cuda);
  m.impl("nm_decompress", &nm_decompress_cuda);
}

}  // namespace cuda
}  // namespace pysparse
