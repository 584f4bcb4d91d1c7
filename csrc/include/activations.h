// The activations the ops take by name (activation, nm_linear, pruned_ffn), parsed and applied
// on the torch side. The enum is Activation in kernels.h, where the kernels' epilogue reads it; its names
// are pysparse/activations.py's and its codes those of the Triton kernels
// (pysparse/_triton/kernels/_tiles.py).
#pragma once
#include <ATen/ATen.h>

#include <string>

#include "kernels.h"

namespace pysparse {
namespace cpu {

// none, relu, gelu (erf), gelu_tanh (torch's approximate="tanh") or silu; anything else is an
// error that lists the five.
inline Activation parse_activation(c10::string_view name) {
  if (name == "none") return kActNone;
  if (name == "relu") return kActRelu;
  if (name == "gelu") return kActGelu;
  if (name == "gelu_tanh") return kActGeluTanh;
  if (name == "silu") return kActSilu;
  TORCH_CHECK(false, "pysparse: activation must be none, relu, gelu, gelu_tanh or silu, got '", std::string(name),
              "'");
}

// t = gelu_tanh(t) in place: the vector kernel of act_impl.h where t is a contiguous CPU float32,
// bfloat16 or float16 tensor, torch's otherwise (activation.cpp).
void gelu_tanh_(at::Tensor& t);

// t = act(t) in place: gelu_tanh by gelu_tanh_, the others by torch's vector kernels.
inline void apply_activation(at::Tensor& t, Activation act) {
  switch (act) {
    case kActNone: break;
    case kActRelu: t.clamp_min_(0); break;
    case kActGelu: at::gelu_(t); break;
    case kActGeluTanh: gelu_tanh_(t); break;
    case kActSilu: at::silu_(t); break;
  }
}

}  // namespace cpu
}  // namespace pysparse
