// Panel widths, the dispatch from a panel width to a kernel instantiation, and make_table, which
// fills one ISA's KernelTable (kernels.h) with the kernels of every *_impl.h.
// Part of the per-ISA kernel build: isa_{scalar,avx2,avx512}.cpp include it inside that ISA's
// namespace, after simd.h and in the order they list; no include guard, no torch header
// (kernels.h says why).

// ---------------------------------------------------------------------------------------------
// The panel kernel instantiation for the panel width the launcher chose (N:M takes CSR's widths).
template <typename T>
static void nm_dispatch_nv(const NmArgs& a, int64_t r0, int64_t r1, int64_t p0, int64_t p1) {
#if PYSPARSE_ISA_LEVEL == 2
  if (a.n == 2 && a.m == 4 && a.B.nb == 4 * Vec::W && a.K % 8 == 0) return nm_slice_kernel_24<T>(a, r0, r1, p0, p1);
#endif
  if (a.B.nb == VecNarrow::W) return nm_panel_kernel<VecNarrow, T, 1>(a, r0, r1, p0, p1);
  switch (a.B.nb / Vec::W) {
    case 1: return nm_panel_kernel<Vec, T, 1>(a, r0, r1, p0, p1);
    case 2: return nm_panel_kernel<Vec, T, 2>(a, r0, r1, p0, p1);
    default: return nm_panel_kernel<Vec, T, 4>(a, r0, r1, p0, p1);
  }
}

// ---------------------------------------------------------------------------------------------
// Panel widths. CSR: the narrowest accumulator that n fills (one 8-lane vector, or NV = 1, 2, 4
// full vectors); at NV = 4 a nonzero costs 1 broadcast + 4 loads + 4 FMAs, which the load ports
// sustain, and wider panels would not fit the register file with their SETS. The 4-vector panel
// is used only while it (K x nb fp32) fits in half of the 1 MiB L2: for 768x3072 at n = 128,
// a 768 KiB panel ran 1.35x slower than two 384 KiB ones. BSR: NV = 2.
static int csr_panel_width(int64_t n, int64_t K) {
  if (n <= VecNarrow::W) return VecNarrow::W;
  if (n <= Vec::W) return Vec::W;
  constexpr int64_t kPanelBytes = 512 * 1024;
  const int64_t max_nb = kPanelBytes / 4 / (K > 0 ? K : 1);  // not / (4 K): K is a declared size, 4 K can wrap
  if (n <= 2 * Vec::W || max_nb < 4 * Vec::W) return 2 * Vec::W;
  return 4 * Vec::W;
}
static int bsr_panel_width(int64_t n, int64_t) {
  if (n <= VecNarrow::W) return VecNarrow::W;
  return n <= Vec::W ? Vec::W : 2 * Vec::W;
}

template <typename T, typename RT, typename CT>
static void csr_dispatch_nv(const CsrArgs& a, int64_t r0, int64_t r1, int64_t p0, int64_t p1) {
#if PYSPARSE_ISA_LEVEL == 2
  if constexpr (sizeof(CT) <= 4)
    if (a.plan && a.B.nb == 4 * Vec::W) return csr_plan_kernel<T, RT, CT>(a, r0, r1, p0, p1);
#endif
  if (a.B.nb == VecNarrow::W) return csr_panel_kernel<VecNarrow, T, RT, CT, 1>(a, r0, r1, p0, p1);
  switch (a.B.nb / Vec::W) {
    case 1: return csr_panel_kernel<Vec, T, RT, CT, 1>(a, r0, r1, p0, p1);
    case 2: return csr_panel_kernel<Vec, T, RT, CT, 2>(a, r0, r1, p0, p1);
    default: return csr_panel_kernel<Vec, T, RT, CT, 4>(a, r0, r1, p0, p1);
  }
}
template <typename T, typename IT>
static void bsr_dispatch_nv(const BsrArgs& a, int64_t r0, int64_t r1, int64_t p0, int64_t p1) {
  if (a.B.nb == VecNarrow::W) return bsr_panel_kernel<VecNarrow, T, IT, 1>(a, r0, r1, p0, p1);
  if (a.B.nb == Vec::W) return bsr_panel_kernel<Vec, T, IT, 1>(a, r0, r1, p0, p1);
  return bsr_panel_kernel<Vec, T, IT, 2>(a, r0, r1, p0, p1);
}

static KernelTable make_table(const char* name) {
  KernelTable t{};
  t.name = name;
  t.csr_panel_width = csr_panel_width;
  t.bsr_panel_width = bsr_panel_width;
  t.csr_plan = PYSPARSE_ISA_LEVEL == 2;
#if PYSPARSE_ISA_LEVEL == 2
  t.csr_jit_store = jit_store;
#endif
  t.nm_bad_row = nm_bad_row;
  t.pack[kF32] = pack_panels<float>;
  t.pack[kBF16] = pack_panels<bf16_t>;
  t.pack[kF16] = pack_panels<f16_t>;
#if PYSPARSE_ISA_LEVEL >= 1
#define PYSPARSE_NM_TOKEN_ROW(T) nm_token_row_kernel<T>
#else
#define PYSPARSE_NM_TOKEN_ROW(T) nullptr
#endif
  t.nm_token_row_max_n = kNmTokenRowMaxN;
  t.nm_slice_min_n = PYSPARSE_ISA_LEVEL == 2 ? kNmSliceMinN : INT64_MAX;
#define PYSPARSE_FILL(DT, T)                                     \
  t.csr[DT][kI32] = csr_dispatch_nv<T, int32_t, int32_t>;        \
  t.csr[DT][kI64] = csr_dispatch_nv<T, int64_t, int64_t>;        \
  t.csr[DT][kI32C16] = csr_dispatch_nv<T, int32_t, int16_t>;     \
  t.csr_gemv[DT][kI32] = csr_gemv_kernel<T, int32_t, int32_t>;   \
  t.csr_gemv[DT][kI64] = csr_gemv_kernel<T, int64_t, int64_t>;   \
  t.csr_gemv[DT][kI32C16] = csr_gemv_kernel<T, int32_t, int16_t>; \
  t.bsr[DT][kI32] = bsr_dispatch_nv<T, int32_t>;                 \
  t.bsr[DT][kI64] = bsr_dispatch_nv<T, int64_t>;                 \
  t.bsr_gemv[DT][kI32] = bsr_gemv_kernel<T, int32_t>;            \
  t.bsr_gemv[DT][kI64] = bsr_gemv_kernel<T, int64_t>;           \
  t.nm[DT] = nm_dispatch_nv<T>;                                   \
  t.nm_gemv[DT] = nm_gemv_kernel<T>;                              \
  t.nm_token_row[DT] = PYSPARSE_NM_TOKEN_ROW(T);                  \
  t.attn[DT] = attn_kv_head<T>;                                   \
  t.ffn_skip[DT] = ffn_skip<T>;                                   \
  t.gelu_tanh[DT] = gelu_tanh_kernel<T>;
  t.csr_sddmm[kI32] = csr_sddmm_kernel<int32_t, int32_t>;
  t.csr_sddmm[kI64] = csr_sddmm_kernel<int64_t, int64_t>;
  t.csr_sddmm[kI32C16] = csr_sddmm_kernel<int32_t, int16_t>;
  t.sddmm_panel_width = kSddmmVectors * Vec::W;
#if PYSPARSE_ISA_LEVEL == 2
  t.csr_sddmm_plan = csr_sddmm_plan_kernel;
#endif
  t.attn_bwd_stats = attn_bwd_stats;
  t.attn_bwd = attn_bwd_grads;
  PYSPARSE_FILL(kF32, float)
  PYSPARSE_FILL(kBF16, bf16_t)
  PYSPARSE_FILL(kF16, f16_t)
#undef PYSPARSE_FILL
#undef PYSPARSE_NM_TOKEN_ROW
  return t;
}
