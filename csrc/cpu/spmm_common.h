// CPU launch machinery of the CSR, BSR and N:M products (csr_spmm.cpp, bsr_spmm.cpp, nm_spmm.cpp,
// pruned_ffn.cpp): ISA selection, operand checks, packing of the dense operand, nnz-balanced
// partitioning and the parallel loop. The kernels are compiled per ISA by isa_*.cpp
// (csrc/README.md: which header holds which kernel).
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <vector>

#include "activations.h"
#include "kernels.h"

namespace pysparse {
namespace cpu {

// The kernel table in use: PYSPARSE_CPU_ISA (scalar | avx2 | avx512 | auto) at first use, else
// the best the CPU supports.
const KernelTable& active_kernels();
// Switch the ISA (tests compare paths in one process). Throws for an ISA the CPU lacks.
std::string set_cpu_isa(const std::string& name);
std::vector<std::string> supported_isas();

// What a sparse format tells the launcher; shape checks have already been done.
struct SparseOperand {
  at::Tensor crow, col, values;  // contiguous (crow/col undefined for N:M)
  int64_t M, K;                  // dense shape of A
  int bh = 1, bw = 1;            // block size (1 x 1 for CSR)
  bool blocked = false;
  bool stable = false;           // crow/col are the caller's tensors (not contiguous copies)
  at::Tensor mask;               // N:M only: (M, (K + 7) / 8) uint8 bitmap
  int n = 0, m = 0;              // N:M only
  bool nm() const { return m != 0; }
};

// A @ B (layout spmm: B = dense (K, n), out (M, n)) or act(x @ A^T + bias)
// (layout linear: x (..., K), out (..., M)). ReLU runs in the kernels' epilogue, the other
// activations over the finished output (apply_activation).
at::Tensor launch_spmm(const SparseOperand& A, const at::Tensor& dense, bool linear,
                       const std::optional<at::Tensor>& bias, Activation act = kActNone);

// Validates crow/col/values against the shape and returns the operand (contiguous tensors).
SparseOperand check_csr(const at::Tensor& crow, const at::Tensor& col, const at::Tensor& values,
                        c10::SymIntArrayRef shape);
// check_csr without values: the pattern (row pointers, columns, shape) of an operand whose
// dtype and device are like's (csr_sddmm: the values are its output). checked: the caller ran
// the shared checks already (check_csr).
SparseOperand check_csr_pattern(const at::Tensor& crow, const at::Tensor& col, const at::Tensor& like,
                                c10::SymIntArrayRef shape, bool checked = false);
// The slice plan of a CSR operand's pattern (csr_plan.cpp; layout: kernels.h), made on first
// use and remembered; undefined where the pattern cannot have one.
at::Tensor csr_plan(const SparseOperand& A);
// The column bitmap of a CSR operand's pattern (csr_plan.cpp; layout: kernels.h), for the
// AVX-512 gemv; made on first use and remembered; undefined where the pattern cannot have one.
at::Tensor csr_bitmap(const SparseOperand& A);
int64_t csr_plans_made();  // how many plans (either kind) this process made (tests see which kernel ran)
// Plans off: the row-axpy kernel and the gathering gemv everywhere (benchmarks); returns the old state.
bool set_csr_plan(bool enabled);
// Pattern-specific AVX-512 code for a CSR operand's fp32 products at >= 32 tokens (csr_jit.cpp),
// made on first use and remembered like the plans; undefined where the pattern cannot have it
// (or the platform cannot map executable memory).
at::Tensor csr_jit(const SparseOperand& A);
at::Tensor build_csr_jit(const SparseOperand& A);
// out = A @ panels of src through the code; src as PackArgs (K, n) with its strides (fp32).
void run_csr_jit(const at::Tensor& code, const SparseOperand& A, const PackArgs& src, const Output& O,
                 PackFn pack, JitStoreFn store, int64_t n);
// JIT code off (benchmarks compare it with the kernels it replaces); returns the old state.
bool set_csr_jit(bool enabled);
SparseOperand check_nm(const at::Tensor& values, const at::Tensor& mask, c10::SymIntArrayRef shape,
                       int64_t n, int64_t m);
SparseOperand check_bsr(const at::Tensor& crow, const at::Tensor& col, const at::Tensor& values,
                        c10::SymIntArrayRef shape);

}  // namespace cpu
}  // namespace pysparse
