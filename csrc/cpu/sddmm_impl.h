// CSR SDDMM (the value gradient of the CSR products): out[j] += <a row r(j), b row col[j]> over
// the tokens, for the stored entries of rows [r0, r1), one token panel at a time (kernels.h:
// SddmmArgs). Part of the per-ISA kernel build: isa_{scalar,avx2,avx512}.cpp include it inside
// that ISA's namespace, after simd.h; no include guard, no torch header (kernels.h says why).
//
// Per row, its panel row of a stays in NV registers; each stored entry costs NV loads of b's
// panel row and NV FMAs into one vector of partial sums. The horizontal sums are done W entries
// at a time: their W partial vectors are transposed in registers (Vec::transpose) and added, so
// one vector add per entry replaces a reduction tree per entry. The operands arrive as packed
// panels because the natural layouts are token-major (x and dy of a linear layer): a strided
// transpose by torch (.t().contiguous()) took as long as the product itself.
template <typename RT, typename CT>
static void csr_sddmm_kernel(const SddmmArgs& s, int64_t r0, int64_t r1) {
  constexpr int W = Vec::W, NV = kSddmmVectors, NB = NV * W;
  using V = typename Vec::V;
  const RT* crow = static_cast<const RT*>(s.crow);
  const CT* col = static_cast<const CT*>(s.col);
  const uint64_t K = uint64_t(s.K);
  int bad = 0;
  // Rows whose indices pass the check (a bad row is skipped on every panel: its entries stay 0).
  std::vector<uint8_t> ok(size_t(r1 - r0), 1);
  for (int64_t i = r0; i < r1; ++i) {
    const int64_t j0 = int64_t(crow[i]), j1 = int64_t(crow[i + 1]);
    for (int64_t j = j0; j < j1; j += 4096) {
      if (max_index(col + j, int(j1 - j < 4096 ? j1 - j : 4096)) >= K) {
        ok[size_t(i - r0)] = 0;
        bad = 1;
        break;
      }
    }
  }
  for (int64_t p = 0; p < s.npanels; ++p) {
    const float* ap = s.a + p * s.M * NB;
    const float* bp = s.b + p * s.K * NB;
    for (int64_t i = r0; i < r1; ++i) {
      if (!ok[size_t(i - r0)]) continue;
      V a[NV];
      for (int q = 0; q < NV; ++q) a[q] = Vec::load(ap + i * NB + q * W);
      const int64_t j1 = int64_t(crow[i + 1]);
      for (int64_t j0 = int64_t(crow[i]); j0 < j1; j0 += W) {
        const int cnt = int(j1 - j0 < W ? j1 - j0 : W);
        V part[W];
        for (int e = 0; e < W; ++e) {
          if (e >= cnt) {
            part[e] = Vec::zero();
            continue;
          }
          const float* b = bp + int64_t(col[j0 + e]) * NB;
          V acc0 = Vec::mul(a[0], Vec::load(b)), acc1 = Vec::mul(a[1], Vec::load(b + W));
          for (int q = 2; q < NV; q += 2) {
            acc0 = Vec::fma(a[q], Vec::load(b + q * W), acc0);
            acc1 = Vec::fma(a[q + 1], Vec::load(b + (q + 1) * W), acc1);
          }
          part[e] = Vec::add(acc0, acc1);
        }
        Vec::transpose(part);  // lane e of the sum below = entry e's dot product
        V sum = part[0];
        for (int e = 1; e < W; ++e) sum = Vec::add(sum, part[e]);
        alignas(64) float tmp[W];
        Vec::store(tmp, sum);
        for (int e = 0; e < cnt; ++e) s.out[j0 + e] += tmp[e];
      }
    }
  }
  if (bad) *s.bad_index = 1;
}

#if PYSPARSE_ISA_LEVEL == 2
// The horizontal sums of 16 vectors in one: lane e = the sum of v[(e % 4) * 4 + e / 4] (the order
// four rounds of 128-bit and in-lane shuffles leave; the caller places its entries to match).
// 30 shuffles and 15 adds, against the 64 shuffles of a full transpose.
static inline __m512 hsum16(const __m512 (&v)[16]) {
  __m512 u[8], w[4], x[2];
  for (int i = 0; i < 8; ++i)  // [v 8 lanes, v' 8 lanes]
    u[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xee));
  for (int i = 0; i < 4; ++i)  // four vectors' 4 lanes, one per 128-bit lane
    w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0xdd));
  for (int i = 0; i < 2; ++i)
    x[i] = _mm512_add_ps(_mm512_shuffle_ps(w[2 * i], w[2 * i + 1], 0x44),
                         _mm512_shuffle_ps(w[2 * i], w[2 * i + 1], 0xee));
  return _mm512_add_ps(_mm512_shuffle_ps(x[0], x[1], 0x88), _mm512_shuffle_ps(x[0], x[1], 0xdd));
}

// The same sums following the pattern's slice plan (kernels.h; csr_plan.cpp), rows [r0, r1) whole
// plan chunks (the launcher's bounds). The kernel above reads b's panel rows across all K: a
// BERT-sized panel (K x 64 fp32) lives in L2, one line per FMA. Here a chunk walks b a 128-column
// slice (32 KiB, L1) at a time, and a segment's entries (one row, one slice, contiguous in the
// output) are summed 16 at a time by hsum16 into one masked vector add. Chunks outermost, so that
// their part of out stays in L2 across the panels.
static void csr_sddmm_plan_kernel(const SddmmArgs& s, int64_t r0, int64_t r1) {
  constexpr int NB = kSddmmVectors * 16;
  static_assert(NB == 64, "the plan's slice is sized for 64-token panels");
  const PlanView pv(s.plan);
  const int64_t nslices = pv.nslices;
  const int64_t *cs = pv.cs, *glen = pv.glen, *gseg = pv.gseg, *gpos = pv.gpos, *seg = pv.seg;
  const uint16_t* pos = pv.pos;
  for (int64_t c = r0 / kPlanRows, c1 = (r1 + kPlanRows - 1) / kPlanRows; c < c1; ++c) {
    for (int64_t p = 0; p < s.npanels; ++p) {
      const float* ap = s.a + (p * s.M + c * kPlanRows) * NB;
      const char* bp = reinterpret_cast<const char*>(s.b + p * s.K * NB);
      for (int64_t g = cs[c * nslices], ge = cs[(c + 1) * nslices]; g < ge; ++g) {
        const int L = int(glen[g]);
        const uint16_t* pp = pos + gpos[g];
        for (int64_t i = gseg[g]; i < gseg[g + 1]; ++i, pp += L) {
          const float* ar = ap + (seg[i] & 0xff) * NB;
          const __m512 a0 = _mm512_loadu_ps(ar), a1 = _mm512_loadu_ps(ar + 16);
          const __m512 a2 = _mm512_loadu_ps(ar + 32), a3 = _mm512_loadu_ps(ar + 48);
          float* o = s.out + (seg[i] >> 8);
          for (int t0 = 0; t0 < L; t0 += 16) {
            const int cnt = L - t0 < 16 ? L - t0 : 16;
            const uint16_t* q = pp + t0;
            __m512 part[16];
#pragma GCC unroll 16
            for (int e = 0; e < 16; ++e) {
              __m512 acc = _mm512_setzero_ps();
              if (e < cnt) {  // one trip count per group: predicted
                const float* b = reinterpret_cast<const float*>(bp + (size_t(q[e]) << 8));  // 64 floats a row
                acc = _mm512_mul_ps(a0, _mm512_loadu_ps(b));
                acc = _mm512_fmadd_ps(a1, _mm512_loadu_ps(b + 16), acc);
                acc = _mm512_fmadd_ps(a2, _mm512_loadu_ps(b + 32), acc);
                acc = _mm512_fmadd_ps(a3, _mm512_loadu_ps(b + 48), acc);
              }
              part[(e % 4) * 4 + e / 4] = acc;
            }
            const __mmask16 m = __mmask16((1u << cnt) - 1);
            _mm512_mask_storeu_ps(o + t0, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, o + t0), hsum16(part)));
          }
        }
      }
    }
  }
}
#endif
