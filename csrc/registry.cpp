// The one TORCH_LIBRARY block: every pysparse op's schema. Where each op's fake, CPU and CUDA
// kernels, tests and benchmark live: csrc/README.md.
//
// Layout conventions shared by the ops:
//   *_spmm(crow, col, values, shape, dense)          A (shape) @ dense (K, n)     -> (M, n)
//   *_linear(input, crow, col, values, shape, bias)  input (..., K) @ A^T + bias  -> (..., M)
// values and dense/input/bias share a dtype (float32, bfloat16, float16); accumulation is fp32.
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu/roofline.h"
#include "cpu/spmm_common.h"

#ifndef PYSPARSE_TORCH_VERSION
#error "setup.py defines PYSPARSE_TORCH_VERSION"
#endif

TORCH_LIBRARY(pysparse, m) {
  m.def("csr_spmm(Tensor crow_indices, Tensor col_indices, Tensor values, SymInt[] shape, Tensor dense) -> Tensor");
  m.def("csr_linear(Tensor input, Tensor crow_indices, Tensor col_indices, Tensor values, SymInt[] shape, Tensor? bias) -> Tensor");
  // The value gradient of csr_spmm / csr_linear: out[j] = <a[r(j), :], b[col[j], :]> for each stored
  // (r(j), col[j]); a (M, n), b (K, n) share a dtype; out (nnz) in it, accumulated in fp32.
  m.def("csr_sddmm(Tensor crow_indices, Tensor col_indices, SymInt[] shape, Tensor a, Tensor b) -> Tensor");
  // A CSR matrix's values in its transpose's order (the input gradients' operand): out[order[0, i]]
  // = values[order[1, i]]; order (2, nnz) int32 as pysparse.autograd.transpose_order makes it.
  m.def("csr_transpose_values(Tensor values, Tensor order) -> Tensor");
  m.def("bsr_spmm(Tensor crow_indices, Tensor col_indices, Tensor values, SymInt[] shape, Tensor dense) -> Tensor");
  m.def("bsr_linear(Tensor input, Tensor crow_indices, Tensor col_indices, Tensor values, SymInt[] shape, Tensor? bias) -> Tensor");
  // x through the named activation, out of place (any floating dtype): none, relu, gelu (erf),
  // gelu_tanh or silu (activations.h); the same names as nm_linear's and pruned_ffn's.
  m.def("activation(Tensor x, str activation) -> Tensor");
  // N:M semi-structured (2:4 included): values (M, K/m*n), mask (M, ceil(K/8)) uint8 bitmap.
  // activation (nm_linear, pruned_ffn): none, relu, gelu, gelu_tanh or silu (activations.h).
  m.def("nm_compress(Tensor dense, int n, int m) -> (Tensor values, Tensor mask)");
  m.def("nm_decompress(Tensor values, Tensor mask, SymInt[] shape, int n, int m) -> Tensor");
  m.def("nm_spmm(Tensor values, Tensor mask, SymInt[] shape, int n, int m, Tensor dense) -> Tensor");
  m.def("nm_linear(Tensor input, Tensor values, Tensor mask, SymInt[] shape, int n, int m, Tensor? bias, str activation=\"none\") -> Tensor");
  // Attention over the active blocks of a block mask: q (B, H, Lq, D), k/v (B, Hkv, Lk, D);
  // block_kind int8 (B|1, H|1, ceil(Lq/block_q), ceil(Lk/block_k)): 0 skip, 1 partial, 2 full
  // (None: all partial). Partial blocks allow key j for query i iff elem_mask (bool, broadcast to
  // (B, H, Lq, Lk)), band_lo <= j - i <= band_hi and j < kv_len[b]; bias is added on every
  // visited block; head_mask (H,) False heads and rows with no allowed key give zeros.
  m.def("masked_attention(Tensor q, Tensor k, Tensor v, Tensor? block_kind, int block_q, int block_k, "
        "Tensor? elem_mask, Tensor? bias, int band_lo, int band_hi, Tensor? kv_len, float scale, "
        "Tensor? head_mask) -> Tensor");
  // Its gradients (dq, dk, dv) for the output gradient grad, given its output out and inputs.
  m.def("masked_attention_backward(Tensor grad, Tensor out, Tensor q, Tensor k, Tensor v, Tensor? block_kind, "
        "int block_q, int block_k, Tensor? elem_mask, Tensor? bias, int band_lo, int band_hi, Tensor? kv_len, "
        "float scale, Tensor? head_mask) -> (Tensor, Tensor, Tensor)");
  // Fused FFN: out = W2 g(x) + b2, g(x) = act(W1 x + b1) [* (W3 x)] [zeroed where |g| <= threshold].
  // Each weight is a format tag and its tensors: "dense" [W], "dense_t" [W^T] (w2 only: the
  // activation-sparse layout), "csr"/"bsr" [crow, col, values], "nm:N:M" [values, mask]; f3 "none"
  // without a gate. Weights are in nn.Linear layout: w1, w3 (hidden, d), w2 (d, hidden).
  m.def("pruned_ffn(Tensor x, str f1, Tensor[] w1, Tensor? b1, str f2, Tensor[] w2, Tensor? b2, str f3, "
        "Tensor[] w3, int hidden, str activation, float threshold) -> Tensor");
}

// Build facts, ISA control and the roofline probes, for pysparse.info(), pysparse.bench and the
// tests; not ops.
PYBIND11_MODULE(_C, mod) {
  mod.def("torch_version", [] { return std::string(PYSPARSE_TORCH_VERSION); });
  mod.def("cuda_compiled", [] {
#ifdef PYSPARSE_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
  mod.def("cpu_isa_supported", &pysparse::cpu::supported_isas);
  mod.def("cpu_isa", [] { return std::string(pysparse::cpu::active_kernels().name); });
  mod.def("set_cpu_isa", &pysparse::cpu::set_cpu_isa);
  mod.def("csr_plans_made", &pysparse::cpu::csr_plans_made);
  mod.def("set_csr_plan", &pysparse::cpu::set_csr_plan);
  mod.def("set_csr_jit", &pysparse::cpu::set_csr_jit);
  // The roofline probes of pysparse.bench.roofline (invalid_argument -> ValueError).
  mod.def("probe_flops", &pysparse::cpu::probe_flops,
          pybind11::call_guard<pybind11::gil_scoped_release>());
  mod.def("probe_read_bandwidth", &pysparse::cpu::probe_read_bandwidth,
          pybind11::call_guard<pybind11::gil_scoped_release>());
  mod.def("bf16_dot_supported", &pysparse::cpu::bf16_dot_supported);
}
