// The avx512 instantiation of the SpMM, attention and FFN kernels (csrc/README.md: which header
// holds which kernel).
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>
#include <math.h>
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,popcnt,bmi,bmi2")
#include <immintrin.h>
#include "kernels.h"

namespace pysparse {
namespace cpu {
namespace isa_avx512 {
#define PYSPARSE_ISA_LEVEL 2
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
}  // namespace isa_avx512

const KernelTable& avx512_kernels() {
  static const KernelTable table = isa_avx512::make_table("avx512");
  return table;
}
}  // namespace cpu
}  // namespace pysparse
