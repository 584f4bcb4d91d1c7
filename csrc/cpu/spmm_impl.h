// CSR and BSR SpMM kernels, written once over the Vec wrapper of simd.h and compiled once per
// instruction set by isa_scalar.cpp / isa_avx2.cpp / isa_avx512.cpp. Everything here lives in
// that TU's namespace, so each ISA has its own copy.
//
// Shapes: A is (M, K) sparse, the dense operand B is (K, n) and has already been packed into fp32
// panels of nb columns (see kernels.h). Output (M, n) goes through Output's strides, so the same
// kernels serve spmm (out row-major) and linear (out = B^T A^T, stored transposed).
//
// Design (row-axpy): for one output row m and one panel, acc[0..nb) = sum_j val[j] * B[col[j], :].
// The nb-wide accumulator lives in NV vector registers for the whole row, so each nonzero costs
// one broadcast, NV loads from the (L1/L2-resident) panel and NV FMAs; nothing is gathered.
// Rows are finished into a small RT x nb tile which the epilogue adds the bias to, converts and
// writes (transposed for the linear layout, RT contiguous outputs per column).

// The epilogue fuses ReLU only; the launcher applies gelu and silu with torch's vector kernels
// (a scalar erff per output cost more than the product at n = 32).
static inline float activate(float v, int act) { return act == kActRelu ? (v > 0.f ? v : 0.f) : v; }

template <typename T>
static inline void store_tile(const Output& O, const float* tile, int ld_tile, int64_t m0, int rows,
                              int64_t j0, int cols) {
  T* out = static_cast<T*>(O.out);
  const T* bias = static_cast<const T*>(O.bias);
  float b[64];  // rows <= 64 (RT and BSR tiles are at most that tall; bh > 64 is split by caller)
  for (int i = 0; i < rows; ++i) b[i] = bias ? to_f32(bias[m0 + i]) : 0.f;
  if (O.act != kActNone) {
    for (int j = 0; j < cols; ++j) {
      for (int i = 0; i < rows; ++i)
        from_f32(activate(tile[i * ld_tile + j] + b[i], O.act), out + (m0 + i) * O.sm + (j0 + j) * O.sn);
    }
    return;
  }
  if (O.sn == 1) {
    for (int i = 0; i < rows; ++i) {
      T* o = out + (m0 + i) * O.sm + j0;
      const float* t = tile + i * ld_tile;
      for (int j = 0; j < cols; ++j) from_f32(t[j] + b[i], o + j);
    }
  } else {
    for (int j = 0; j < cols; ++j) {
      T* o = out + (j0 + j) * O.sn + m0 * O.sm;
      for (int i = 0; i < rows; ++i) from_f32(tile[i * ld_tile + j] + b[i], o + i * O.sm);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Packing: B (K, n) in any dtype and strides -> fp32 panels. Converting here, once, means the
// kernels never convert the dense operand (each element is reused nnz/K times per panel).
constexpr int64_t kPrefetchRows = 8;  // how far ahead the row-contiguous pack prefetches
template <typename T>
static void pack_panels(const PackArgs& a, int64_t p0, int64_t p1, int64_t k0, int64_t k1) {
  const T* src = static_cast<const T*>(a.src);
  const int nb = a.nb;
  if (a.sn == 1 || a.sk != 1) {
    // Rows of B are contiguous (or neither stride is 1): row by row, each row across all the
    // panels asked for, so a strided B (an NCHW image: one row per channel) is read in segments
    // of (p1 - p0) * nb columns rather than nb.
    const int64_t jb = p0 * nb, je = p1 * nb < a.n ? p1 * nb : a.n;  // the strip's columns
    for (int64_t k = k0; k < k1; ++k) {
      // Strided rows defeat the hardware prefetchers (the loads below waited on L3 for 2/3 of
      // the time): fetch the strip of the row kPrefetchRows ahead.
      if (a.sn == 1 && k + kPrefetchRows < k1) {
        const char* ahead = reinterpret_cast<const char*>(src + (k + kPrefetchRows) * a.sk + jb);
        for (int64_t off = 0; off < (je - jb) * int64_t(sizeof(T)); off += 64) __builtin_prefetch(ahead + off);
      }
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t j0 = p * nb;
        const int cols = int(a.n - j0 < nb ? a.n - j0 : nb);
        const T* s = src + k * a.sk + j0 * a.sn;
        float* d = a.dst + p * a.K * nb + k * nb;
        int j = 0;
        if (a.sn == 1)
          for (; j + Vec::W <= cols; j += Vec::W) Vec::store(d + j, Vec::load_cvt(s + j));
        for (; j < cols; ++j) d[j] = to_f32(s[j * a.sn]);
        for (; j < nb; ++j) d[j] = 0.f;
      }
    }
    return;
  }
  // Columns of B are contiguous (B = x^T in the linear layout): a cache-blocked transpose.
  // 32 k at a time, the 32 destination rows (32 x nb floats) stay in L1 while each source
  // column is read contiguously; a full-height column pass wrote one cache line per store.
  for (int64_t p = p0; p < p1; ++p) {
    float* dst = a.dst + p * a.K * nb;
    const int64_t j0 = p * nb;
    const int cols = int(a.n - j0 < nb ? a.n - j0 : nb);
    for (int64_t kb = k0; kb < k1; kb += 32) {
      const int64_t ke = kb + 32 < k1 ? kb + 32 : k1;
      for (int j = 0; j < cols; ++j) {
        const T* s = src + (j0 + j) * a.sn;
        for (int64_t k = kb; k < ke; ++k) dst[k * nb + j] = to_f32(s[k]);
      }
      for (int64_t k = kb; k < ke; ++k)
        for (int j = cols; j < nb; ++j) dst[k * nb + j] = 0.f;
    }
  }
}

// Largest index of c[0, len) as unsigned (a negative index becomes huge); auto-vectorised
// (vpmaxuw / vpmaxud) because the loop has no dependence but the max.
template <typename CT>
static inline uint64_t max_index(const CT* c, int len) {
  using U = typename std::conditional<sizeof(CT) == 2, uint16_t,
            typename std::conditional<sizeof(CT) == 4, uint32_t, uint64_t>::type>::type;
  U m = 0;
  for (int t = 0; t < len; ++t) {
    const U u = U(c[t]);
    m = u > m ? u : m;
  }
  // int16 indices are sign-extended elsewhere: a negative one must not pass as < K.
  if (sizeof(CT) == 2 && m >= 0x8000u) return ~uint64_t(0);
  return uint64_t(m);
}

// ---------------------------------------------------------------------------------------------
// Pieces shared by the row-axpy kernels (CSR and N:M).

// The fp32 view of len values: the values themselves, or 16-bit ones widened into buf with
// vector converts (a scalar widen + broadcast per nonzero cost bf16 ~1.5x fp32's time at n = 8).
template <typename Vec, typename T>
static inline const float* widen(const T* src, int len, float* buf) {
  if constexpr (sizeof(T) == 4) {
    return reinterpret_cast<const float*>(src);
  } else {
    int t = 0;
    for (; t + Vec::W <= len; t += Vec::W) Vec::store(buf + t, Vec::load_cvt(src + t));
    for (; t < len; ++t) buf[t] = to_f32(src[t]);
    return buf;
  }
}

// acc += v[t] * (panel row c[t]) for t < len; nonzeros rotate over the SETS accumulator sets.
// ldb == NB, so the row address is a shift, not an imul.
template <typename Vec, int NV, int SETS, typename CT>
static inline void axpy_rows(typename Vec::V (&acc)[SETS][NV], const float* v, const CT* c, int len,
                             const float* bp) {
  constexpr int W = Vec::W, NB = NV * W;
  int t = 0;
  for (; t + SETS <= len; t += SETS) {
    for (int s = 0; s < SETS; ++s) {
      const typename Vec::V vs = Vec::set1(v[t + s]);
      const float* b = bp + int64_t(c[t + s]) * NB;
      for (int q = 0; q < NV; ++q) acc[s][q] = Vec::fma(vs, Vec::load(b + q * W), acc[s][q]);
    }
  }
  for (; t < len; ++t) {
    const typename Vec::V vs = Vec::set1(v[t]);
    const float* b = bp + int64_t(c[t]) * NB;
    for (int q = 0; q < NV; ++q) acc[0][q] = Vec::fma(vs, Vec::load(b + q * W), acc[0][q]);
  }
}

// Sum the accumulator sets into one tile row.
template <typename Vec, int NV, int SETS>
static inline void finish_row(typename Vec::V (&acc)[SETS][NV], float* out) {
  for (int q = 0; q < NV; ++q) {
    typename Vec::V s = acc[0][q];
    for (int t = 1; t < SETS; ++t) s = Vec::add(s, acc[t][q]);
    Vec::store(out + q * Vec::W, s);
  }
}

// out (first: =, else +=) the sum of acc's sets, then acc = 0. A row summed in blocks this way
// has an error that grows with the block length plus the number of blocks, not with the row's
// length: 2:4 rows of 33000 columns, one chain per set, had 5x the error of torch's GEMM.
template <typename Vec, int NV, int SETS>
static inline void flush_row(typename Vec::V (&acc)[SETS][NV], float* out, bool first) {
  for (int q = 0; q < NV; ++q) {
    typename Vec::V s = first ? acc[0][q] : Vec::add(Vec::load(out + q * Vec::W), acc[0][q]);
    acc[0][q] = Vec::zero();
    for (int t = 1; t < SETS; ++t) s = Vec::add(s, acc[t][q]), acc[t][q] = Vec::zero();
    Vec::store(out + q * Vec::W, s);
  }
}

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

// CSR, n == 1 (decode). Memory-bound when cold: stream values and indices once; x stays in
// cache. The ceiling when warm is the loads: one per value, index and x element, about one
// nonzero per cycle per core.
// acc[0..4) += v[t] * x[c[t]] for t < len, four independent chains; indices >= K (or negative)
// set *bad and read x[0] instead.
template <typename CT>
static inline void gemv_row_scalar(const float* v, const CT* c, int64_t len, const float* x,
                                   uint64_t K, int* bad, float* acc) {
  float s0 = acc[0], s1 = acc[1], s2 = acc[2], s3 = acc[3];
  int64_t t = 0;
  for (; t + 4 <= len; t += 4) {
    uint64_t k0 = uint64_t(int64_t(c[t])), k1 = uint64_t(int64_t(c[t + 1]));
    uint64_t k2 = uint64_t(int64_t(c[t + 2])), k3 = uint64_t(int64_t(c[t + 3]));
    if ((k0 | k1 | k2 | k3) >= K) {
      if (k0 >= K) { *bad = 1; k0 = 0; }
      if (k1 >= K) { *bad = 1; k1 = 0; }
      if (k2 >= K) { *bad = 1; k2 = 0; }
      if (k3 >= K) { *bad = 1; k3 = 0; }
    }
    s0 += v[t] * x[k0];
    s1 += v[t + 1] * x[k1];
    s2 += v[t + 2] * x[k2];
    s3 += v[t + 3] * x[k3];
  }
  for (; t < len; ++t) {
    uint64_t k = uint64_t(int64_t(c[t]));
    if (k >= K) { *bad = 1; k = 0; }
    s0 += v[t] * x[k];
  }
  acc[0] = s0; acc[1] = s1; acc[2] = s2; acc[3] = s3;
}

template <typename T, typename RT, typename CT>
static void csr_gemv_kernel(const CsrArgs& a, int64_t r0, int64_t r1, int64_t, int64_t) {
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

// ---------------------------------------------------------------------------------------------
// BSR, n > 1. For each block row and panel, a bh x nb fp32 tile accumulates block @ panel-slice
// with an MR x NV register micro-kernel (MR rows of the block, NV vectors of columns): per k it
// loads NV panel vectors and broadcasts MR block entries for MR * NV FMAs. AVX2 (16 registers):
// MR = 4, NV = 2 is 8 accumulators + 2 panel vectors + 1 broadcast; AVX-512 (32 registers) takes
// MR = 8. 16-bit blocks are widened once into scratch per (block, panel) and reused by all rows.
template <typename Vec, int MR, int NV>
static inline void bsr_micro(const float* A, int bw, const float* bp, int64_t ldb, float* tile, int NB) {
  constexpr int W = Vec::W;
  typename Vec::V acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int q = 0; q < NV; ++q) acc[i][q] = Vec::load(tile + i * NB + q * W);
  for (int k = 0; k < bw; ++k) {
    typename Vec::V b[NV];
    for (int q = 0; q < NV; ++q) b[q] = Vec::load(bp + k * ldb + q * W);
    for (int i = 0; i < MR; ++i) {
      const typename Vec::V av = Vec::set1(A[i * bw + k]);
      for (int q = 0; q < NV; ++q) acc[i][q] = Vec::fma(av, b[q], acc[i][q]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int q = 0; q < NV; ++q) Vec::store(tile + i * NB + q * W, acc[i][q]);
}

template <typename Vec, typename T, typename IT, int NV>
static void bsr_panel_kernel(const BsrArgs& a, int64_t br0, int64_t br1, int64_t p0, int64_t p1) {
  constexpr int W = Vec::W;
  constexpr int NB = NV * W;
  constexpr int MR = W >= 16 ? 8 : 4;
  const IT* crow = static_cast<const IT*>(a.crow);
  const IT* col = static_cast<const IT*>(a.col);
  const T* val = static_cast<const T*>(a.val);
  const int bh = a.bh, bw = a.bw;
  const int64_t Kb = a.K / bw;
  float* tile = a.scratch;              // bh x NB
  float* ablk = a.scratch + bh * NB;    // bh x bw, fp32 copy of a 16-bit block
  int bad = 0;
  for (int64_t br = br0; br < br1; ++br) {
    for (int64_t p = p0; p < p1; ++p) {
      const float* bp = a.B.b + p * a.B.panel_stride;
      for (int i = 0; i < bh * NB; ++i) tile[i] = 0.f;
      for (int64_t j = crow[br]; j < crow[br + 1]; ++j) {
        uint64_t kb = uint64_t(int64_t(col[j]));
        if (kb >= uint64_t(Kb)) { bad = 1; continue; }
        const T* blk = val + j * int64_t(bh) * bw;
        const float* A;
        if constexpr (sizeof(T) == 4) {
          A = reinterpret_cast<const float*>(blk);
        } else {
          for (int e = 0; e < bh * bw; ++e) ablk[e] = to_f32(blk[e]);
          A = ablk;
        }
        const float* bk = bp + int64_t(kb) * bw * a.B.ldb;
        int r = 0;
        for (; r + MR <= bh; r += MR) bsr_micro<Vec, MR, NV>(A + r * bw, bw, bk, a.B.ldb, tile + r * NB, NB);
        for (; r < bh; ++r) bsr_micro<Vec, 1, NV>(A + r * bw, bw, bk, a.B.ldb, tile + r * NB, NB);
      }
      const int64_t j0 = p * NB;
      const int cols = int(a.B.n - j0 < NB ? a.B.n - j0 : NB);
      for (int r = 0; r < bh; r += 64)
        store_tile<T>(a.O, tile + r * NB, NB, br * bh + r, bh - r < 64 ? bh - r : 64, j0, cols);
    }
  }
  if (bad) *a.bad_index = 1;
}

// BSR, n == 1. Vectorised along each block row (contiguous in the block), so every block entry
// is loaded once and used once: a streaming kernel. MR rows of the block row are done at a time
// with one accumulator each held in registers across all the blocks of the block row (16 on
// AVX-512, 8 on AVX2); spilling them to memory per block had made bf16 compute-bound.
template <typename T, typename IT, int MR>
static inline void bsr_gemv_rows(const BsrArgs& a, int64_t br, int r, int* bad, float* out) {
  constexpr int W = Vec::W;
  const IT* crow = static_cast<const IT*>(a.crow);
  const IT* col = static_cast<const IT*>(a.col);
  const T* val = static_cast<const T*>(a.val);
  const int bh = a.bh, bw = a.bw, bwv = bw / W * W;
  const uint64_t Kb = uint64_t(a.K / bw);
  typename Vec::V acc[MR];
  float tail[MR];
  for (int i = 0; i < MR; ++i) { acc[i] = Vec::zero(); tail[i] = 0.f; }
  for (int64_t j = crow[br]; j < crow[br + 1]; ++j) {
    const uint64_t kb = uint64_t(int64_t(col[j]));
    if (kb >= Kb) { *bad = 1; continue; }
    const T* blk = val + j * int64_t(bh) * bw + int64_t(r) * bw;
    const float* xs = a.B.b + int64_t(kb) * bw;
    for (int k = 0; k < bwv; k += W) {
      const typename Vec::V xv = Vec::load(xs + k);
      for (int i = 0; i < MR; ++i) acc[i] = Vec::fma(Vec::load_cvt(blk + i * bw + k), xv, acc[i]);
    }
    for (int k = bwv; k < bw; ++k)
      for (int i = 0; i < MR; ++i) tail[i] += to_f32(blk[i * bw + k]) * xs[k];
  }
  for (int i = 0; i < MR; ++i) out[i] = Vec::hsum(acc[i]) + tail[i];
}

template <typename T, typename IT>
static void bsr_gemv_kernel(const BsrArgs& a, int64_t br0, int64_t br1, int64_t, int64_t) {
  constexpr int MR = Vec::W >= 16 ? 16 : 8;
  const int bh = a.bh;
  float* rows = a.scratch;  // bh outputs of one block row
  int bad = 0;
  for (int64_t br = br0; br < br1; ++br) {
    int r = 0;
    for (; r + MR <= bh; r += MR) bsr_gemv_rows<T, IT, MR>(a, br, r, &bad, rows + r);
    for (; r < bh; ++r) bsr_gemv_rows<T, IT, 1>(a, br, r, &bad, rows + r);
    for (int q = 0; q < bh; q += 64)
      store_tile<T>(a.O, rows + q, 1, br * bh + q, bh - q < 64 ? bh - q : 64, 0, 1);
  }
  if (bad) *a.bad_index = 1;
}

// ---------------------------------------------------------------------------------------------
// N:M bitmap decoding: byte b of a row's mask covers columns 8b..8b+7; kBitPos[v] lists the set
// bits of v in order. Each byte appends 8 candidate positions with one 8-wide add + store and
// advances by its popcount: ~1 instruction per kept entry, where a tzcnt loop with its
// unpredictable exit cost more than the FMAs it fed.
struct BitPosTable {
  uint8_t pos[256][8];
  constexpr BitPosTable() : pos() {
    for (int v = 0; v < 256; ++v) {
      int c = 0;
      for (int b = 0; b < 8; ++b)
        if (v >> b & 1) pos[v][c++] = uint8_t(b);
    }
  }
};
static constexpr BitPosTable kBitPos{};

// Column positions of a row's kept entries into pos (needs 8 slack entries); returns the count.
static inline int64_t decode_row(const uint8_t* mrow, int64_t mbytes, int32_t* pos) {
  int64_t cnt = 0;
  for (int64_t b = 0; b < mbytes; ++b) {
    const uint8_t v = mrow[b];
    const int32_t base = int32_t(b * 8);
    for (int j = 0; j < 8; ++j) pos[cnt + j] = base + kBitPos.pos[v][j];
    cnt += __builtin_popcount(v);
  }
  return cnt;
}

// ---------------------------------------------------------------------------------------------
// N:M, n > 1. The bitmap of a row is decoded into column positions (tzcnt per kept entry, one
// 64-column word at a time), then the same row-axpy as CSR runs over them: no column index is
// read from memory, so a 2:4 fp32 row streams 4.25 bytes per kept value instead of CSR's 6.
template <typename VT, typename T, int NV>
static void nm_panel_kernel(const NmArgs& a, int64_t r0, int64_t r1, int64_t p0, int64_t p1) {
  using Vec = VT;
  constexpr int W = Vec::W;
  constexpr int NB = NV * W;
  constexpr int SETS = NV >= 8 ? 1 : 8 / NV;
  constexpr int RT_ROWS = 16;
  const int64_t K = a.K, kept = K / a.m * a.n, mbytes = (K + 7) / 8;
  const int64_t ld_pos = kept + 8;
  const T* val = static_cast<const T*>(a.val);
  alignas(64) float tile[RT_ROWS * NB];
  constexpr int kVbuf = 256;
  alignas(64) float vbuf[kVbuf];
  // Rows are decoded kNmChunkRows at a time, once for all panels (decoding per panel had made
  // n = 512 slower than CSR on the same matrix). 2:4 and 4:8 skip the decode: every mask byte
  // then holds exactly 4 kept positions, read straight from the byte table inside the FMA loop
  // (4096x4096 fp32: n = 8 3030 -> 2692 us; n = 32 5216 -> 4825 us; ~5-6 instructions per kept
  // value against CSR's 4). On AVX-512, 2:4 with K % 32 == 0 skips this kernel for the faster
  // token-row one (nm_small_kernel); 4:8, other patterns and the other ISAs run it.
  const bool half = 2 * a.n == a.m && a.m <= 8 && K % 16 == 0;
  for (int64_t c0 = r0; c0 < r1; c0 += kNmChunkRows) {
    const int64_t c1 = c0 + kNmChunkRows < r1 ? c0 + kNmChunkRows : r1;
    if (!half)
      for (int64_t r = c0; r < c1; ++r) decode_row(a.mask + r * mbytes, mbytes, a.scratch + (r - c0) * ld_pos);
    for (int64_t p = p0; p < p1; ++p) {
      const float* bp = a.B.b + p * a.B.panel_stride;
      const int64_t j0 = p * NB;
      const int cols = int(a.B.n - j0 < NB ? a.B.n - j0 : NB);
      for (int64_t m0 = c0; m0 < c1; m0 += RT_ROWS) {
        const int rows = int(c1 - m0 < RT_ROWS ? c1 - m0 : RT_ROWS);
        for (int i = 0; i < rows; ++i) {
          const int32_t* pos = a.scratch + (m0 + i - c0) * ld_pos;
          typename Vec::V acc[SETS][NV];
          for (int s = 0; s < SETS; ++s)
            for (int q = 0; q < NV; ++q) acc[s][q] = Vec::zero();
          const T* vrow = val + (m0 + i) * kept;
          for (int64_t j = 0; j < kept;) {
            const int len = int(kept - j < kVbuf ? kept - j : kVbuf);
            const float* v = widen<Vec>(vrow + j, len, vbuf);
            if (half) {
              const uint8_t* mb = a.mask + (m0 + i) * mbytes + j / 4;
              for (int t = 0; t < len; t += 8) {  // len is a multiple of 8 here
                uint32_t pa, pb;
                std::memcpy(&pa, kBitPos.pos[mb[t / 4]], 4);
                std::memcpy(&pb, kBitPos.pos[mb[t / 4 + 1]], 4);
                const int64_t base = 2 * (j + t);  // first column of byte (j + t) / 4
                for (int u = 0; u < 8; ++u) {
                  const uint32_t p = u < 4 ? pa >> (8 * u) : pb >> (8 * (u - 4));
                  const int64_t col = base + (u < 4 ? 0 : 8) + (p & 0xffu);
                  const typename Vec::V vs = Vec::set1(v[t + u]);
                  const float* b = bp + col * NB;
                  for (int q = 0; q < NV; ++q)
                    acc[u % SETS][q] = Vec::fma(vs, Vec::load(b + q * W), acc[u % SETS][q]);
                }
              }
            } else {
              axpy_rows<Vec, NV, SETS>(acc, v, pos + j, len, bp);
            }
            flush_row<Vec, NV, SETS>(acc, tile + i * NB, j == 0);  // a block of kVbuf values
            j += len;
          }
          if (kept == 0) finish_row<Vec, NV, SETS>(acc, tile + i * NB);
        }
        store_tile<T>(a.O, tile, NB, m0, rows, j0, cols);
      }
    }
  }
}

// N:M, n == 1. AVX-512: 2:4 as below; other patterns expand-load a 16-column chunk's kept values
// to their bitmap positions (zeros elsewhere), then one dense FMA with x. AVX2: 2:4 by the same
// idea at half width (below). 16-bit values are widened to fp32 a chunk at a time first. Other
// patterns and ISAs decode positions and run the CSR scalar loop.
#if PYSPARSE_ISA_LEVEL == 1
// 2:4 on AVX2 (what a Zen 3 runs), the AVX-512 kernel's idea at half width: 16 columns hold 8
// kept values; each mask byte (8 columns, 4 kept) indexes a table of its 4 positions, the two
// bytes' entries make one 8-lane index, and two one-source permutes of x's two 8-column halves,
// blended, put x beside the 8 values. It replaced the position decode + scalar loop, which ran
// 3072x768 fp32 warm at 398 us, 0.33x dense (torch restricted to AVX2, 2026-12-05).
struct Index24 {
  alignas(16) int32_t pos[256][4];  // the first four set bits of each byte (0 past the last)
  Index24() {
    for (int b = 0; b < 256; ++b) {
      int n = 0;
      for (int j = 0; j < 8; ++j)
        if (b >> j & 1 && n < 4) pos[b][n++] = j;
      while (n < 4) pos[b][n++] = 0;
    }
  }
  // Lanes 0-3: the positions (0..7) of bytes & 255 in its 8 columns; lanes 4-7: of the next byte.
  __m256i operator()(uint32_t bytes) const {
    const __m128i lo = _mm_load_si128(reinterpret_cast<const __m128i*>(pos[bytes & 255u]));
    const __m128i hi = _mm_load_si128(reinterpret_cast<const __m128i*>(pos[(bytes >> 8) & 255u]));
    return _mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1);
  }
};
static const Index24& index24() {
  static const Index24 table;
  return table;
}

// x entries k .. k + 16 permuted to meet the 8 kept values of those columns.
static inline __m256 gather24(const float* x, int64_t k, __m256i idx) {
  return _mm256_blend_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(x + k), idx),
                         _mm256_permutevar8x32_ps(_mm256_loadu_ps(x + k + 8), idx), 0xF0);
}

#endif

#if PYSPARSE_ISA_LEVEL == 2
// 2:4 on AVX-512. Rather than expanding the values to dense width (vexpandps: ~6 cycles a
// register on Zen 5, 3.4x this loop's time), pick the x entries that meet the kept values: 32
// columns hold 16 kept values, Index24 gives the column of each, and one two-source permute
// gathers x from the 32 columns in registers.
// The column of each of the 16 kept values in 32 columns of a 2:4 row, from the row's 32-bit
// mask word: lanes 2g and 2g + 1 read nibble g (a variable shift), a 32-entry dword table turns
// (nibble, which of the two) into the position inside the group, and the group offset is added.
struct Index24 {
  __m512i ta, tb, shift, second, nib;
  Index24() {
    alignas(64) static const int32_t kPos[32] = {
        // first kept position of each nibble, then the second (0 where fewer than two bits are
        // set; the mask check has already rejected such groups)
        0, 0, 1, 0, 2, 0, 1, 0, 3, 0, 1, 0, 2, 0, 1, 0,
        0, 0, 0, 1, 0, 2, 2, 1, 0, 3, 3, 1, 3, 2, 2, 1};
    ta = _mm512_load_si512(kPos), tb = _mm512_load_si512(kPos + 16);
    shift = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
    second = _mm512_setr_epi32(0, 16, 0, 16, 0, 16, 0, 16, 0, 16, 0, 16, 0, 16, 0, 16);
    nib = _mm512_set1_epi32(15);
  }
  __m512i operator()(uint32_t bits) const {  // shift doubles as the group offset (4 g)
    const __m512i sel = _mm512_or_si512(_mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32(int(bits)), shift), nib), second);
    return _mm512_add_epi32(_mm512_permutex2var_epi32(ta, sel, tb), shift);
  }
};

// Built where used: its five vectors then live in registers.
static inline Index24 index24() { return Index24(); }

// x entries k .. k + 32 permuted to meet the 16 kept values of those columns.
static inline __m512 gather24(const float* x, int64_t k, __m512i idx) {
  return _mm512_permutex2var_ps(_mm512_loadu_ps(x + k), idx, _mm512_loadu_ps(x + k + 16));
}

#endif

#if PYSPARSE_ISA_LEVEL >= 1
// Columns per step of the 2:4 kernels: one register of kept values (16 on AVX-512, 8 on AVX2)
// spans twice as many columns, and index24()(the step's mask bits) says which.
constexpr int64_t kStep24 = 2 * Vec::W;

template <typename T>
static inline float gemv_row_24(const uint8_t* mrow, const T* vrow, int64_t K, const float* x, float* vbuf) {
  auto&& index = index24();
  auto term = [&](const float* f, int64_t k, uint32_t bits) {  // bits: the step's mask, low first
    return std::pair<typename Vec::V, typename Vec::V>(Vec::load(f), gather24(x, k, index(bits)));
  };
  constexpr int64_t kChunk = 512;  // columns per widening chunk of 16-bit values
  // Chunks are summed apart and then added (see flush_row): a 2**27-column row of ones once
  // stopped growing at 2**24 per chain.
  typename Vec::V acc0 = Vec::zero(), acc1 = Vec::zero(), total = Vec::zero();
  const T* v = vrow;
  for (int64_t c0 = 0; c0 < K; c0 += kChunk) {
    const int64_t c1 = c0 + kChunk < K ? c0 + kChunk : K;
    const float* f = widen<Vec>(v, int((c1 - c0) / 2), vbuf);
    v += (c1 - c0) / 2;
    int64_t k = c0;
    for (; k + 2 * kStep24 <= c1; k += 2 * kStep24, f += 2 * Vec::W) {  // two independent FMA chains
      uint64_t bits = 0;  // both steps' mask in one load
      std::memcpy(&bits, mrow + k / 8, kStep24 / 4);
      const auto t0 = term(f, k, uint32_t(bits)), t1 = term(f + Vec::W, k + kStep24, uint32_t(bits >> kStep24));
      acc0 = Vec::fma(t0.first, t0.second, acc0);
      acc1 = Vec::fma(t1.first, t1.second, acc1);
    }
    if (k < c1) {  // K % 32 == 0: at most one step left
      uint32_t bits = 0;
      std::memcpy(&bits, mrow + k / 8, kStep24 / 8);
      const auto t0 = term(f, k, bits);
      acc0 = Vec::fma(t0.first, t0.second, acc0);
    }
    total = Vec::add(total, Vec::add(acc0, acc1));
    acc0 = acc1 = Vec::zero();
  }
  return Vec::hsum(total);
}
#endif

// The most tokens the token-row 2:4 kernel below takes: every n on AVX-512; on AVX2 a token pays
// 2 loads, 2 permutes and a blend per 8 kept values, and from a few tokens on the row-axpy (a
// broadcast and one FMA per value for 8 tokens) needs fewer instructions.
constexpr int64_t kNmSmallMaxN = PYSPARSE_ISA_LEVEL == 2 ? INT64_MAX : PYSPARSE_ISA_LEVEL == 1 ? 8 : 0;

#if PYSPARSE_ISA_LEVEL >= 1
// 2:4, n >= 2 columns of B taken as rows of B^T (the linear layout's input rows), AVX-512 (and,
// up to nm_small_max_n tokens, AVX2 at half width: 16 columns a step): the n = 1 loop with one
// accumulator per token. The index vector of 32 columns is built once and serves every token,
// so 16 kept values cost 5 index ops plus, per token, 2 loads, a permute and a full-width FMA:
// ~2.3 instructions per kept value at n = 8 against ~6 for the row-axpy (position extract,
// broadcast, load, half-width FMA); 3072x768 n = 8: 280 -> 141 us. Tokens go in groups of NT = 2,
// 4 or 8 (one group of 16 ran out of general registers for the token pointers and was slower than
// two of 8; n = 2 computed as 4 cost 2x); tokens past n re-read token n - 1's row and are dropped.
// It beats the row-axpy panel kernel at every n measured (4096x4096 n = 128: 17.4 -> 15.0 ms,
// n = 512: 66 -> 58 ms), so 2:4 on AVX-512 uses it for all n > 1, 64 tokens per output tile:
// this call computes tokens t0 .. min(t0 + NT, n) into the tile of the slice starting at s0.
template <typename T, int NT>
static void nm_small_group_24(const NmArgs& a, int64_t m0, int rows, int64_t s0, int64_t t0, int64_t n,
                              float* tile, float* vbuf, typename Vec::V* part) {
  const int64_t K = a.K, kept = K / 2, mbytes = K / 8, ldx = a.B.ldb;
  auto&& index = index24();
  const float* xt[NT];
  for (int t = 0; t < NT; ++t) xt[t] = a.B.b + (t0 + t < n ? t0 + t : n - 1) * ldx;
  // Column chunks outside, rows inside: a chunk of the tokens (8 x 512 x 4 B = 16 KB) stays in L1
  // for all the block's rows; whole rows at K = 3072 streamed 96 KB of x from L2 per row and ran
  // at half the speed (768x3072, n = 8: 242 us). Partial sums wait in `part` between chunks.
  constexpr int64_t kChunk = 512;
  for (int64_t c0 = 0; c0 < K; c0 += kChunk) {
    const int64_t c1 = c0 + kChunk < K ? c0 + kChunk : K;
    for (int i = 0; i < rows; ++i) {
      const uint8_t* mrow = a.mask + (m0 + i) * mbytes;
      const float* f = widen<Vec>(static_cast<const T*>(a.val) + (m0 + i) * kept + c0 / 2, int((c1 - c0) / 2), vbuf);
      typename Vec::V acc[NT];
      for (int t = 0; t < NT; ++t) acc[t] = c0 ? part[i * NT + t] : Vec::zero();
      for (int64_t k = c0; k < c1; k += kStep24, f += Vec::W) {
        // One FMA chain per token paces the loop at its 4-cycle latency per 64 bytes of values,
        // too few loads in flight to stream W from DRAM (4096x4096, n = 2: 1145 us against
        // 569 us at n = 1); a prefetch 1 KB ahead keeps the misses going.
        _mm_prefetch(reinterpret_cast<const char*>(f + 256), _MM_HINT_T0);
        uint32_t bits = 0;
        std::memcpy(&bits, mrow + k / 8, kStep24 / 8);
        const auto idx = index(bits);
        const auto vals = Vec::load(f);
        for (int t = 0; t < NT; ++t) acc[t] = Vec::fma(vals, gather24(xt[t], k, idx), acc[t]);
      }
      for (int t = 0; t < NT; ++t) part[i * NT + t] = acc[t];
    }
  }
  for (int i = 0; i < rows; ++i)
    for (int t = 0; t < NT && t0 + t < n; ++t) tile[i * kNmTokenSlice + t0 - s0 + t] = Vec::hsum(part[i * NT + t]);
}

template <typename T>
static void nm_small_kernel(const NmArgs& a, int64_t r0, int64_t r1, int64_t, int64_t) {
  constexpr int RT = 16;
  alignas(64) float tile[RT * kNmTokenSlice];
  alignas(64) float vbuf[256];
  typename Vec::V part[RT * 8];
  const int64_t n = a.B.n;
  for (int64_t m0 = r0; m0 < r1; m0 += RT) {
    const int rows = int(r1 - m0 < RT ? r1 - m0 : RT);
    // The block's rows of W (16 x K/2 values, <= 128 KB at K = 4096) stay in L2 across all the
    // token groups; each group's tokens stay in L1 per column chunk.
    for (int64_t s0 = 0; s0 < n; s0 += kNmTokenSlice) {
      const int64_t s1 = s0 + kNmTokenSlice < n ? s0 + kNmTokenSlice : n;
      if (s1 - s0 == 2) nm_small_group_24<T, 2>(a, m0, rows, s0, s0, s1, tile, vbuf, part);
      else if (s1 - s0 <= 4) nm_small_group_24<T, 4>(a, m0, rows, s0, s0, s1, tile, vbuf, part);
      else
        for (int64_t t0 = s0; t0 < s1; t0 += 8) nm_small_group_24<T, 8>(a, m0, rows, s0, t0, s1, tile, vbuf, part);
      store_tile<T>(a.O, tile, int(kNmTokenSlice), m0, rows, s0, int(s1 - s0));
    }
  }
}
#endif

template <typename T>
static void nm_gemv_kernel(const NmArgs& a, int64_t r0, int64_t r1, int64_t, int64_t) {
  const int64_t K = a.K, kept = K / a.m * a.n, mbytes = (K + 7) / 8;
  const T* val = static_cast<const T*>(a.val);
  const float* x = a.B.b;
  int32_t* pos = a.scratch;
  alignas(64) float tile[64];
  constexpr int64_t kChunk = 512;  // columns per widening chunk (<= 480 kept values)
  alignas(64) float vbuf[kChunk];
  int bad = 0;
  for (int64_t m0 = r0; m0 < r1; m0 += 64) {
    const int rows = int(r1 - m0 < 64 ? r1 - m0 : 64);
    for (int i = 0; i < rows; ++i) {
      const uint8_t* mrow = a.mask + (m0 + i) * mbytes;
      const T* vrow = val + (m0 + i) * kept;
      float s = 0.f;
#if PYSPARSE_ISA_LEVEL >= 1
      if (a.n == 2 && a.m == 4 && K % 32 == 0) {
        tile[i] = gemv_row_24(mrow, vrow, K, x, vbuf);
        continue;
      }
#endif
#if PYSPARSE_ISA_LEVEL == 2
      if (K % 32 == 0) {
        __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps(), total = _mm512_setzero_ps();
        const T* v = vrow;
        for (int64_t c0 = 0; c0 < K; c0 += kChunk) {
          const int64_t c1 = c0 + kChunk < K ? c0 + kChunk : K;
          const int64_t len = (c1 - c0) / a.m * a.n;
          const float* f = widen<Vec>(v, int(len), vbuf);
          // Every 16 columns hold exactly 16 n / m kept values (m divides 16), so the value
          // pointer advances by a constant (no popcount chain) and a masked load of that many
          // values feeds a register-form expand.
          const int per16 = 16 / a.m * a.n;
          const __mmask16 take = __mmask16((1u << per16) - 1u);
          for (int64_t k = c0; k < c1; k += 32) {
            uint32_t bits;
            std::memcpy(&bits, mrow + k / 8, 4);
            // 2:4 and 4:8 hold 8 values per 16 columns: a plain 256-bit load, which streams from
            // DRAM at twice the rate of the masked load (3072x768 cold, n = 1: 310 -> 138 us).
            const __m512 vlo = per16 == 8 ? _mm512_castps256_ps512(_mm256_loadu_ps(f)) : _mm512_maskz_loadu_ps(take, f);
            const __m512 vhi = per16 == 8 ? _mm512_castps256_ps512(_mm256_loadu_ps(f + 8)) : _mm512_maskz_loadu_ps(take, f + per16);
            acc0 = _mm512_fmadd_ps(_mm512_maskz_expand_ps(__mmask16(bits), vlo), _mm512_loadu_ps(x + k), acc0);
            acc1 = _mm512_fmadd_ps(_mm512_maskz_expand_ps(__mmask16(bits >> 16), vhi), _mm512_loadu_ps(x + k + 16), acc1);
            f += 2 * per16;
          }
          v += len;
          total = _mm512_add_ps(total, _mm512_add_ps(acc0, acc1));  // chunks summed apart
          acc0 = acc1 = _mm512_setzero_ps();
        }
        tile[i] = _mm512_reduce_add_ps(total);
        continue;
      }
#endif
      const int64_t cnt = decode_row(mrow, mbytes, pos);
      for (int64_t j = 0; j < cnt; j += kChunk) {  // chunks summed apart
        const int64_t len = cnt - j < kChunk ? cnt - j : kChunk;
        float acc4[4] = {0.f, 0.f, 0.f, 0.f};
        gemv_row_scalar(widen<Vec>(vrow + j, int(len), vbuf), pos + j, len, x, uint64_t(K), &bad, acc4);
        s += (acc4[0] + acc4[1]) + (acc4[2] + acc4[3]);
      }
      tile[i] = s;
    }
    store_tile<T>(a.O, tile, 1, m0, rows, 0, 1);
  }
}

// Whether every group of m columns in these whole mask bytes marks exactly n positions.
static inline bool nm_bytes_ok(const uint8_t* p, int64_t len, int n, int m) {
  for (int64_t b = 0; b < len; ++b) {
    const int lo = __builtin_popcount(p[b] & 15u), hi = __builtin_popcount(p[b] >> 4);
    if (m == 4 ? (lo != n || hi != n) : m == 8 ? lo + hi != n
                                               : (b + 1 >= len || lo + hi + __builtin_popcount(p[++b]) != n))
      return false;
  }
  return true;
}

// First row of an N:M bitmap with a group that does not mark exactly n positions (or a bit past
// column K), or -1. Checked per group, not per row: the fast kernels step through the values a
// fixed count per 16 or 32 columns, so an uneven row would be read out of step (in bounds, but
// wrong). 32 bytes at a time with a nibble popcount table; ~0.02 ms for a 4096x4096 2:4 mask.
static int64_t nm_bad_row(const uint8_t* mask, int64_t rows, int64_t K, int n, int m) {
  const int64_t mbytes = (K + 7) / 8, full = K / 8;  // K % 8 is 0 or 4 (m divides K)
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* row = mask + r * mbytes;
    int64_t b = 0;
#if PYSPARSE_ISA_LEVEL >= 1
    const __m256i popc = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                          0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
    const __m256i lo4 = _mm256_set1_epi8(15), want8 = _mm256_set1_epi8(char(n));
    for (; b + 32 <= full; b += 32) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + b));
      const __m256i cl = _mm256_shuffle_epi8(popc, _mm256_and_si256(v, lo4));
      const __m256i ch = _mm256_shuffle_epi8(popc, _mm256_and_si256(_mm256_srli_epi16(v, 4), lo4));
      __m256i ok;
      if (m == 4) ok = _mm256_and_si256(_mm256_cmpeq_epi8(cl, want8), _mm256_cmpeq_epi8(ch, want8));
      else if (m == 8) ok = _mm256_cmpeq_epi8(_mm256_add_epi8(cl, ch), want8);
      else ok = _mm256_cmpeq_epi16(_mm256_maddubs_epi16(_mm256_add_epi8(cl, ch), _mm256_set1_epi8(1)),
                                   _mm256_set1_epi16(short(n)));
      if (_mm256_movemask_epi8(ok) != -1) return r;
    }
#endif
    if (!nm_bytes_ok(row + b, full - b, n, m)) return r;
    if (full < mbytes && (__builtin_popcount(row[full] & 15u) != n || (row[full] >> 4) != 0)) return r;
  }
  return -1;
}

template <typename T>
static void nm_dispatch_nv(const NmArgs& a, int64_t r0, int64_t r1, int64_t p0, int64_t p1) {
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
  t.nm_bad_row = nm_bad_row;
  t.pack[kF32] = pack_panels<float>;
  t.pack[kBF16] = pack_panels<bf16_t>;
  t.pack[kF16] = pack_panels<f16_t>;
#if PYSPARSE_ISA_LEVEL >= 1
#define PYSPARSE_NM_SMALL(T) nm_small_kernel<T>
#else
#define PYSPARSE_NM_SMALL(T) nullptr
#endif
  t.nm_small_max_n = kNmSmallMaxN;
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
  t.nm_small[DT] = PYSPARSE_NM_SMALL(T);                          \
  t.attn[DT] = attn_kv_head<T>;                                   \
  t.ffn_skip[DT] = ffn_skip<T>;
  PYSPARSE_FILL(kF32, float)
  PYSPARSE_FILL(kBF16, bf16_t)
  PYSPARSE_FILL(kF16, f16_t)
#undef PYSPARSE_FILL
#undef PYSPARSE_NM_SMALL
  return t;
}
