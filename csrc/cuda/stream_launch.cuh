// The launch callback that the launchers (csrc/cuda/<op>.cu) hand to the torch-free launch plans
// (<op>_launch.cuh): each launch goes on the current CUDA stream and is checked at once. The
// emulation test (tests/cuda_emu/) hands the same plans its own callback instead.
#pragma once
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

namespace pysparse {
namespace cuda {

struct StreamLaunch {
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  template <typename... P, typename... A>
  void operator()(dim3 grid, dim3 block, void (*kernel)(P...), A... args) const {
    kernel<<<grid, block, 0, stream>>>(args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace cuda
}  // namespace pysparse
