// The activation op: x through a named activation (activations.h), out of place; what
// pysparse.activations.apply and the ops' activation epilogues run. gelu_tanh on float32,
// bfloat16 and float16 runs the vector kernel of act_impl.h; everything else torch's kernels,
// which are near the memory rate already (relu, silu, erf gelu: RESULTS.md "GELU").
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "activations.h"
#include "checks.h"
#include "spmm_common.h"

namespace pysparse {
namespace cpu {

// Elements per parallel task: ~2 us of work, so two threads split a (128, 3072) output.
constexpr int64_t kActGrain = 1 << 14;

static bool vector_dtype(const at::Tensor& t) {
  const auto s = t.scalar_type();
  return s == at::kFloat || s == at::kBFloat16 || s == at::kHalf;
}

// dst = gelu_tanh(src), both contiguous, same dtype and size (dst may be src).
static void gelu_tanh_into(const at::Tensor& src, at::Tensor& dst) {
  const ActFn fn = active_kernels().gelu_tanh[value_dtype(src, "x")];
  const int64_t es = src.element_size();
  const char* s = static_cast<const char*>(src.data_ptr());
  char* d = static_cast<char*>(dst.data_ptr());
  at::parallel_for(0, src.numel(), kActGrain, [&](int64_t b, int64_t e) { fn(s + b * es, d + b * es, e - b); });
}

void gelu_tanh_(at::Tensor& t) {
  if (t.device().is_cpu() && vector_dtype(t) && t.is_contiguous())
    gelu_tanh_into(t, t);
  else
    at::gelu_(t, "tanh");
}

static at::Tensor activation(const at::Tensor& x, c10::string_view name) {
  const Activation act = parse_activation(name);
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), "pysparse: activation input must be a floating-point tensor, got ",
                   x.scalar_type());
  if (act == kActGeluTanh && vector_dtype(x)) {
    const at::Tensor src = x.contiguous();
    at::Tensor out = at::empty_like(src);
    gelu_tanh_into(src, out);
    return out;
  }
  at::Tensor out = x.clone(at::MemoryFormat::Contiguous);
  apply_activation(out, act);
  return out;
}

TORCH_LIBRARY_IMPL(pysparse, CPU, m) { m.impl("activation", &activation); }

}  // namespace cpu
}  // namespace pysparse
