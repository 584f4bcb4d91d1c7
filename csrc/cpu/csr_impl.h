// CSR SpMM kernels: the row-axpy panel kernel (n > 1) and the gemv (n == 1).
// Part of the per-ISA kernel build: isa_{scalar,avx2,avx512}.cpp include it inside that ISA's
// namespace, after simd.h and in the order they list; no include guard, no torch header
// (kernels.h says why).

// ---------------------------------------------------------------------------------------------
// CSR, n > 1.
// NV vectors of type VT per row accumulator. FMA latency is 4 cycles at 2 per cycle, so 8
// independent chains keep the FMA units busy: the nonzeros of a row rotate over SETS = 8 / NV
// accumulator sets (summed at the end of the row). With one set, NV = 1 ran at a quarter speed.
template <typename VT, typename T, typename RT, typename CT, int NV>
static void csr_panel_kernel(const CsrArgs& a, int64_t r0, int64_t r1, int64_t p0, int64_t p1) {
  using Vec = VT;
  constexpr int W = Vec::W;
  constexpr int NB = NV * W;
  constexpr int SETS = NV >= 8 ? 1 : 8 / NV;
  // RT rows per output tile: the transposed (linear) store writes RT consecutive outputs per
  // column, 16 fp32 = one full cache line (8 left the linear layout ~10% behind spmm).
  constexpr int RT_ROWS = 16;
  // Rows per chunk: the chunk's nonzeros (values + indices) are re-read once per panel, so keep
  // them within ~256 KiB of L2 (measured L2: 1 MiB per core here, the panel takes the rest).
  constexpr int64_t kChunkBytes = 256 * 1024;
  const RT* crow = static_cast<const RT*>(a.crow);
  const CT* col = static_cast<const CT*>(a.col);
  const T* val = static_cast<const T*>(a.val);
  const uint64_t K = uint64_t(a.K);
  alignas(64) float tile[RT_ROWS * NB];
  constexpr int kVbuf = 256;
  alignas(64) float vbuf[kVbuf];
  int bad = 0;

  for (int64_t c0 = r0; c0 < r1;) {
    int64_t c1 = c0;
    const int64_t budget = kChunkBytes / int64_t(sizeof(T) + sizeof(CT));
    while (c1 < r1 && (c1 - c0 < RT_ROWS || int64_t(crow[c1] - crow[c0]) < budget)) c1 += RT_ROWS;
    if (c1 > r1) c1 = r1;
    for (int64_t p = p0; p < p1; ++p) {
      const float* bp = a.B.b + p * a.B.panel_stride;
      const int64_t j0 = p * NB;
      const int cols = int(a.B.n - j0 < NB ? a.B.n - j0 : NB);
      for (int64_t m0 = c0; m0 < c1; m0 += RT_ROWS) {
        const int rows = int(c1 - m0 < RT_ROWS ? c1 - m0 : RT_ROWS);
        for (int i = 0; i < rows; ++i) {
          typename Vec::V acc[SETS][NV];
          for (int s = 0; s < SETS; ++s)
            for (int q = 0; q < NV; ++q) acc[s][q] = Vec::zero();
          for (int64_t j = crow[m0 + i], end = crow[m0 + i + 1]; j < end;) {
            const int len = int(end - j < kVbuf ? end - j : kVbuf);
            const CT* c = col + j;
            // One vectorised max over the chunk's indices replaces a compare per nonzero in
            // the FMA loop; a chunk holding a bad index is skipped and reported.
            if (max_index(c, len) >= K) { bad = 1; j += len; continue; }
            axpy_rows<Vec, NV, SETS>(acc, widen<Vec>(val + j, len, vbuf), c, len, bp);
            j += len;
          }
          finish_row<Vec, NV, SETS>(acc, tile + i * NB);
        }
        store_tile<T>(a.O, tile, NB, m0, rows, j0, cols);
      }
    }
    c0 = c1;
  }
  if (bad) *a.bad_index = 1;
}

#if PYSPARSE_ISA_LEVEL == 2
// The CSR JIT code's sums (csr_jit.cpp: panel, M, 16 fp32 in scratch) into O, 16 x 16 tiles at a
// time through the shared epilogue (bias, ReLU, the linear layout's register transpose).
static void jit_store(const Output& O, const float* scratch, int64_t M, int64_t p0, int64_t p1, int64_t n) {
  for (int64_t p = p0; p < p1; ++p) {
    const int cols = int(n - p * 16 < 16 ? n - p * 16 : 16);
    for (int64_t m0 = 0; m0 < M; m0 += 16)
      store_tile<float>(O, scratch + ((p - p0) * M + m0) * 16, 16, m0, int(M - m0 < 16 ? M - m0 : 16), p * 16, cols);
  }
}
#endif

#if PYSPARSE_ISA_LEVEL == 2
// ---------------------------------------------------------------------------------------------
// CSR, n > 1, following a slice plan (kernels.h), AVX-512 at 64 tokens per panel. The row-axpy
// kernel above reads 4 panel lines per nonzero, and a BERT-sized panel (K x 64 fp32) lives in L2,
// which delivers under one line per cycle: 20-40% of the FMA peak. Here the rows of a chunk walk
// the panel a 128-column slice at a time, so the slice (32 KiB) stays in L1 and only the
// accumulators (4 lines per segment, not per nonzero) come from L2. Segments of one length run
// back to back with the loop fully unrolled for that length: segment loops of varying length,
// one misprediction per segment, made an earlier K-blocked kernel lose to the row-axpy.

// acc rows += the segments seg[0, nseg) of L nonzeros each (L = 0: the length is len), their
// columns pos[0, nseg * L), their values in place.
template <typename T, int L>
static void plan_segments(const int64_t* seg, int64_t nseg, int len, const uint16_t* pos, const T* val,
                          const float* bp, float* acc) {
  constexpr int W = Vec::W, NV = 4, NB = NV * W;
  const int n = L > 0 ? L : len;
  for (int64_t g = 0; g < nseg; ++g, pos += n) {
    float* o = acc + (seg[g] & 0xff) * NB;
    const T* v = val + (seg[g] >> 8);
    typename Vec::V a[2][NV];
    for (int q = 0; q < NV; ++q) a[0][q] = Vec::load(o + q * W), a[1][q] = Vec::zero();
#pragma GCC unroll 64
    for (int t = 0; t < n; ++t) {
      const typename Vec::V w = Vec::set1(to_f32(v[t]));
      const float* b = bp + int64_t(pos[t]) * NB;
      for (int q = 0; q < NV; ++q) a[t & 1][q] = Vec::fma(w, Vec::load(b + q * W), a[t & 1][q]);
    }
    for (int q = 0; q < NV; ++q) Vec::store(o + q * W, Vec::add(a[0][q], a[1][q]));
  }
}

template <typename T>
using PlanSegmentsFn = void (*)(const int64_t*, int64_t, int, const uint16_t*, const T*, const float*, float*);
// Segments up to this length run unrolled; longer ones loop. 64 covers a 128-column slice at
// 60-70% sparsity (38-51 nonzeros on average): with 32 the plan lost its lead there.
constexpr int kPlanUnrolled = 64;
template <typename T, int... Ls>
static const PlanSegmentsFn<T>* plan_table(std::integer_sequence<int, Ls...>) {
  static const PlanSegmentsFn<T> table[] = {plan_segments<T, Ls>...};
  return table;
}

template <typename T, typename RT, typename CT>
static void csr_plan_kernel(const CsrArgs& a, int64_t r0, int64_t r1, int64_t p0, int64_t p1) {
  constexpr int NB = 4 * Vec::W;
  // Chunks whose rows walk a slice together. Where the task multiplies many panels, the values
  // stay in L2 across panels and 4 chunks (256 rows) per slice visit keep the slice in L1
  // longest (768x3072 90% at n = 1024: 1.24x the row-axpy, against 0.97x with one chunk). With one
  // or two panels the values stream from memory once per call and the first chunk, which has no
  // chunk before it to fetch it ahead, counts: one chunk (768x3072 80% at n = 128, cold: 1.24x
  // against 1.01x).
  const int64_t kSuper = p1 - p0 <= 2 ? 1 : 4;
  const PlanView pv(a.plan);
  const int64_t nchunks = pv.nchunks, nslices = pv.nslices;
  const int64_t *cs = pv.cs, *glen = pv.glen, *gseg = pv.gseg, *gpos = pv.gpos, *seg = pv.seg;
  // Whole chunks inside [r0, r1) follow the plan; rows of a chunk cut by a task bound (the
  // launcher aligns bounds to chunks, so only where it could not) take the row-axpy kernel.
  const int64_t c0 = (r0 + kPlanRows - 1) / kPlanRows;
  const int64_t c1 = r1 >= a.M ? nchunks : r1 / kPlanRows;
  if (c0 >= c1) return csr_panel_kernel<Vec, T, RT, CT, 4>(a, r0, r1, p0, p1);
  if (r0 < c0 * kPlanRows) csr_panel_kernel<Vec, T, RT, CT, 4>(a, r0, c0 * kPlanRows, p0, p1);
  if (c1 < nchunks && c1 * kPlanRows < r1) csr_panel_kernel<Vec, T, RT, CT, 4>(a, c1 * kPlanRows, r1, p0, p1);

  static const PlanSegmentsFn<T>* unrolled = plan_table<T>(std::make_integer_sequence<int, kPlanUnrolled + 1>{});
  const uint16_t* pos = pv.pos;
  const T* val = static_cast<const T*>(a.val);
  std::vector<float> acc_buf(size_t(kSuper * kPlanRows * NB));
  float* acc = acc_buf.data();
  const RT* crow = static_cast<const RT*>(a.crow);
  auto first_row = [&](int64_t c) { return c * kPlanRows < a.M ? c * kPlanRows : a.M; };  // of chunk c
  for (int64_t sc = c0; sc < c1; sc += kSuper) {
    const int64_t se = sc + kSuper < c1 ? sc + kSuper : c1;
    const int64_t m0 = sc * kPlanRows;
    const int64_t rows = first_row(se) - m0;
    // The segments read the values in plan order, which no hardware prefetcher follows: cold
    // weights (a model's layers, each read once or twice per call) were demand misses, and the
    // plan lost to the row-axpy (0.8-0.95x). So the next chunks' values are fetched ahead, a few
    // lines per group, as fast as this chunk's values are used.
    const int64_t se_next = se + kSuper < c1 ? se + kSuper : c1;
    const char* ahead = reinterpret_cast<const char*>(val + crow[first_row(se)]);
    const char* ahead_end = reinterpret_cast<const char*>(val + crow[first_row(se_next)]);
    for (int64_t p = p0; p < p1; ++p) {
      const float* bp = a.B.b + p * a.B.panel_stride;
      const int64_t j0 = p * NB;
      const int cols = int(a.B.n - j0 < NB ? a.B.n - j0 : NB);
      std::memset(acc, 0, size_t(rows * NB) * sizeof(float));
      for (int64_t s = 0; s < nslices; ++s) {
        for (int64_t c = sc; c < se; ++c) {
          float* acc_c = acc + (c - sc) * kPlanRows * NB;
          for (int64_t g = cs[c * nslices + s], ge = cs[c * nslices + s + 1]; g < ge; ++g) {
            const int64_t L = glen[g];
            for (int64_t b = 0, lines = ((gseg[g + 1] - gseg[g]) * L * int64_t(sizeof(T)) + 63) / 64;
                 b < lines && ahead < ahead_end; ++b, ahead += 64)
              __builtin_prefetch(ahead);
            const PlanSegmentsFn<T> fn = L <= kPlanUnrolled ? unrolled[L] : plan_segments<T, 0>;
            fn(seg + gseg[g], gseg[g + 1] - gseg[g], int(L), pos + gpos[g], val, bp, acc_c);
          }
        }
      }
      for (int64_t i = 0; i < rows; i += 16)
        store_tile<T>(a.O, acc + i * NB, NB, m0 + i, int(rows - i < 16 ? rows - i : 16), j0, cols);
    }
  }
}
#endif

#if PYSPARSE_ISA_LEVEL == 2
// CSR, n == 1, following the pattern's column bitmap (kernels.h; made where the launcher says).
// The gathering gemv below reads 2-4 index bytes per nonzero and gathers x 16 lanes at a time
// (one vgatherdps: ~16 cycles here, about a cycle per nonzero). Here 16 columns a step
// expand-load the row's next values into their columns' lanes and multiply x's 16 entries,
// loaded under the same mask so that a pruned column's x (inf and nan included) never enters the
// sum, as in the gather: no index reads and no gathers, 2 bytes per 16 columns of bitmap instead.
// A step costs the same at any density, so it pays from a few nonzeros per 16 columns on.
// NT tokens (1 <= NT <= kBitmapMaxTokens; a.B.ldb apart when NT > 1): each step's values are
// expanded once and multiply every token's 16 entries, so a small batch (batched decoding)
// streams the matrix once, as one token does. U accumulator sets (consecutive steps) cover the
// FMA latency: 4 for one token, 2 for more.
template <typename T, int NT>
static void csr_bitmap_rows(const CsrArgs& a, int64_t r0, int64_t r1) {
  constexpr int U = NT == 1 ? 4 : 2;
  const int64_t words = (a.K + 15) / 16, ldx = a.B.ldb;
  const int64_t* start = a.bitmap;
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(start + a.M + 1);
  const T* val = static_cast<const T*>(a.val);
  const float* x = a.B.b;
  const int64_t nnz = start[a.M];
  alignas(64) float tile[64 * NT];
  for (int64_t m0 = r0; m0 < r1; m0 += 64) {
    const int rows = int(r1 - m0 < 64 ? r1 - m0 : 64);
    for (int i = 0; i < rows; ++i) {
      const int64_t r = m0 + i;
      const uint16_t* b = bits + r * words;
      const T* v = val + start[r];
      __m512 acc[U][NT];
      for (int u = 0; u < U; ++u)
        for (int t = 0; t < NT; ++t) acc[u][t] = _mm512_setzero_ps();
      // Whole 16-value loads (widened) then a register expand. The masked expand-load from
      // memory ran at ~5 cycles a step here; a register expand is one shuffle. A load may read up
      // to 15 values past the row: only where the values go on that far.
      const int64_t fast_words = start[r + 1] + 16 > nnz ? 0 : words;
      int64_t w = 0;
      for (; w + U <= fast_words; w += U) {
        // The values stream in an order the hardware prefetcher follows late: with weights cold,
        // fetching 2 KiB ahead made 70% sparsity 1.2-1.3x faster (it was 0.7-0.9x the gather).
        _mm_prefetch(reinterpret_cast<const char*>(v + 2048 / sizeof(T)), _MM_HINT_T0);
#pragma GCC unroll 4
        for (int u = 0; u < U; ++u) {
          const uint32_t m = b[w + u];
          const __mmask16 k = _cvtu32_mask16(m);
          __m512 vals = Vec::load_cvt(v);
          if constexpr (sizeof(T) == 4) asm("" : "+v"(vals));  // else gcc folds the load into the expand
          const __m512 e = _mm512_maskz_expand_ps(k, vals);
#pragma GCC unroll 8
          for (int t = 0; t < NT; ++t)
            acc[u][t] = _mm512_fmadd_ps(e, _mm512_maskz_loadu_ps(k, x + t * ldx + 16 * (w + u)), acc[u][t]);
          v += _mm_popcnt_u32(m);
        }
      }
      for (; w < words; ++w) {  // the columns past K have no bit set: x is not read there
        const uint32_t m = b[w];
        const int cnt = _mm_popcnt_u32(m);
        const __mmask16 k = _cvtu32_mask16(m);
        const __m512 e = _mm512_maskz_expand_ps(k, Vec::load_cvt_partial(v, cnt));
        for (int t = 0; t < NT; ++t)
          acc[0][t] = _mm512_fmadd_ps(e, _mm512_maskz_loadu_ps(k, x + t * ldx + 16 * w), acc[0][t]);
        v += cnt;
      }
      for (int t = 0; t < NT; ++t) {
        __m512 sum = acc[0][t];
        for (int u = 1; u < U; ++u) sum = _mm512_add_ps(sum, acc[u][t]);
        tile[i * NT + t] = _mm512_reduce_add_ps(sum);
      }
    }
    store_tile<T>(a.O, tile, NT, m0, rows, 0, NT);
  }
}
#endif

// CSR, n == 1 (decode). Memory-bound when cold: stream values and indices once; x stays in
// cache. The ceiling when warm is the loads: one per value, index and x element, about one
// nonzero per cycle per core.
template <typename T, typename RT, typename CT>
static void csr_gemv_kernel(const CsrArgs& a, int64_t r0, int64_t r1, int64_t, int64_t) {
#if PYSPARSE_ISA_LEVEL == 2
  if (a.bitmap) {
    switch (a.B.n) {
      case 1: return csr_bitmap_rows<T, 1>(a, r0, r1);
      case 2: return csr_bitmap_rows<T, 2>(a, r0, r1);
      case 3: return csr_bitmap_rows<T, 3>(a, r0, r1);
      case 4: return csr_bitmap_rows<T, 4>(a, r0, r1);
      case 5: return csr_bitmap_rows<T, 5>(a, r0, r1);
      case 6: return csr_bitmap_rows<T, 6>(a, r0, r1);
      case 7: return csr_bitmap_rows<T, 7>(a, r0, r1);
      default: return csr_bitmap_rows<T, 8>(a, r0, r1);
    }
  }
#endif
  [[maybe_unused]] constexpr int W = Vec::W;  // used by the AVX-512 block
  const RT* crow = static_cast<const RT*>(a.crow);
  const CT* col = static_cast<const CT*>(a.col);
  const T* val = static_cast<const T*>(a.val);
  const float* x = a.B.b;
  const uint64_t K = uint64_t(a.K);
  int bad = 0;
  alignas(64) float tile[64];
  constexpr int kVbuf = 256;
  alignas(64) float vbuf[kVbuf];
  for (int64_t m0 = r0; m0 < r1; m0 += 64) {
    const int rows = int(r1 - m0 < 64 ? r1 - m0 : 64);
    for (int i = 0; i < rows; ++i) {
      int64_t j = crow[m0 + i];
      const int64_t end = crow[m0 + i + 1];
      float s = 0.f;
      // Measured on Zen 5 (3072x768, 90%): AVX-512 gathers beat scalar loads (fp32 equal, bf16
      // 1.4x); AVX2 gathers lose to the scalar loop below by 1.35x, so AVX2 takes the scalar loop.
#if PYSPARSE_ISA_LEVEL == 2
      if constexpr (sizeof(CT) <= 4) {
        // The remainder after the 2W-wide loop is one full and one masked vector step.
        typename Vec::V acc0 = Vec::zero(), acc1 = Vec::zero();
        for (; j + 2 * W <= end; j += 2 * W) {
          acc0 = Vec::fma(Vec::load_cvt(val + j), Vec::gather_checked(x, col + j, uint32_t(K), &bad), acc0);
          acc1 = Vec::fma(Vec::load_cvt(val + j + W), Vec::gather_checked(x, col + j + W, uint32_t(K), &bad), acc1);
        }
        if (j + W <= end) {
          acc0 = Vec::fma(Vec::load_cvt(val + j), Vec::gather_checked(x, col + j, uint32_t(K), &bad), acc0);
          j += W;
        }
        if (j < end) {
          const int len = int(end - j);
          acc1 = Vec::fma(Vec::load_cvt_partial(val + j, len),
                          Vec::gather_checked_partial(x, col + j, len, uint32_t(K), &bad), acc1);
          j = end;
        }
        s = Vec::hsum(Vec::add(acc0, acc1));
      }
#endif
      // Scalar path (portable and AVX2 builds, int64 indices): four chains cover FMA latency.
      // 16-bit values are first widened a chunk at a time with vector converts (a scalar
      // widen per nonzero made bf16 1.4x slower than fp32 on the AVX2 build).
      float acc4[4] = {0.f, 0.f, 0.f, 0.f};
      if constexpr (sizeof(T) == 4) {
        gemv_row_scalar(reinterpret_cast<const float*>(val) + j, col + j, end - j, x, K, &bad, acc4);
      } else {
        for (; j < end; j += kVbuf) {
          const int len = int(end - j < kVbuf ? end - j : kVbuf);
          gemv_row_scalar(widen<Vec>(val + j, len, vbuf), col + j, len, x, K, &bad, acc4);
        }
      }
      const float s0 = acc4[0], s1 = acc4[1], s2 = acc4[2], s3 = acc4[3];
      tile[i] = s + (s0 + s1) + (s2 + s3);
    }
    store_tile<T>(a.O, tile, 1, m0, rows, 0, 1);
  }
  if (bad) *a.bad_index = 1;
}
