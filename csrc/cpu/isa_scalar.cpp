// The scalar instantiation of the SpMM, attention and FFN kernels (csrc/README.md: which header
// holds which kernel).
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>
#include <math.h>
#include "kernels.h"

namespace pysparse {
namespace cpu {
namespace isa_scalar {
#define PYSPARSE_ISA_LEVEL 0
#include "simd.h"
#include "attention_impl.h"
#include "ffn_impl.h"
#include "act_impl.h"
#include "spmm_shared.h"
#include "csr_impl.h"
#include "bsr_impl.h"
#include "nm_mask.h"
#include "nm_impl.h"
#include "sddmm_impl.h"
#include "kernel_table.h"
}  // namespace isa_scalar

const KernelTable& scalar_kernels() {
  static const KernelTable table = isa_scalar::make_table("scalar");
  return table;
}
}  // namespace cpu
}  // namespace pysparse
