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
