// CPU implementation of pysparse::csr_transpose_values: a CSR matrix's values in its transpose's
// order, which every CSR/N:M input gradient needs once per training step (pysparse/autograd.py).
// values[perm] reads the values in column order: one cache miss per value (27-55 ms for the 5M
// values of a 4096x4096 70% matrix, 40-55% of its training step). The order pysparse.autograd
// hands in visits them in blocks of 2^15 output positions, sorted by source within a block: the
// reads sweep the values in short ascending runs, the writes stay in a 128 KiB block.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>

#include "checks.h"

namespace pysparse {
namespace cpu {

template <typename T>
static void scatter_gather(const T* v, const int32_t* dst, const int32_t* src, T* out, int64_t n, int64_t nv,
                           std::atomic<int>& bad) {
  at::parallel_for(0, n, 1 << 15, [&](int64_t i0, int64_t i1) {
    int flag = 0;
    for (int64_t i = i0; i < i1; ++i) {
      const uint32_t d = uint32_t(dst[i]), s = uint32_t(src[i]);
      if (d >= uint64_t(n) || s >= uint64_t(nv)) {
        flag = 1;
        continue;
      }
      out[d] = v[s];
    }
    if (flag) bad.store(1);
  });
}

static at::Tensor csr_transpose_values(const at::Tensor& values, const at::Tensor& order) {
  check_dim(values, 1, "values");
  const DType dt = value_dtype(values, "values");
  check_dim(order, 2, "order");
  TORCH_CHECK_TYPE(order.scalar_type() == at::kInt, "pysparse: order must be int32, got ", order.scalar_type());
  TORCH_CHECK(order.size(0) == 2, "pysparse: order must have 2 rows (output positions, value positions), got ",
              order.size(0));
  check_same_device(values, order, "order");
  const at::Tensor v = values.contiguous(), o = order.contiguous();
  const int64_t n = o.size(1);
  // Positions no entry of order names stay 0 (a valid order names each one once).
  at::Tensor out = at::zeros({n}, values.options());
  std::atomic<int> bad{0};
  const int32_t* dst = o.data_ptr<int32_t>();
  const int32_t* src = dst + n;
  if (dt == kF32)
    scatter_gather(v.data_ptr<float>(), dst, src, out.data_ptr<float>(), n, v.numel(), bad);
  else  // 16-bit values move as raw 16-bit words
    scatter_gather(reinterpret_cast<const uint16_t*>(v.data_ptr()), dst, src,
                   reinterpret_cast<uint16_t*>(out.data_ptr()), n, v.numel(), bad);
  TORCH_CHECK(bad.load() == 0, "pysparse: order names a position outside [0, ", n, ") of the output or [0, ",
              v.numel(), ") of values");
  return out;
}

TORCH_LIBRARY_IMPL(pysparse, CPU, m) { m.impl("csr_transpose_values", &csr_transpose_values); }

}  // namespace cpu
}  // namespace pysparse
