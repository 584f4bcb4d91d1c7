// The pieces of the SpMM kernels that more than one format uses: the output epilogue, packing of
// the dense operand, the index check, the row-axpy accumulators and the scalar gather loop.
// Part of the per-ISA kernel build: isa_{scalar,avx2,avx512}.cpp include it inside that ISA's
// namespace, after simd.h and in the order they list; no include guard, no torch header
// (kernels.h says why).
//
// Shapes: A is (M, K) sparse, the dense operand B is (K, n) and has already been packed into fp32
// panels of nb columns (see kernels.h). Output (M, n) goes through Output's strides, so the same
// kernels serve spmm (out row-major) and linear (out = B^T A^T, stored transposed).
//
// Design (row-axpy, CSR and N:M): for one output row m and one panel, acc[0..nb) = sum_j val[j] *
// B[col[j], :]. The nb-wide accumulator lives in NV vector registers for the whole row, so each
// nonzero costs one broadcast, NV loads from the (L1/L2-resident) panel and NV FMAs; nothing is
// gathered. Rows are finished into a small RT x nb tile which the epilogue (store_tile) adds the
// bias to, converts and writes (transposed for the linear layout, RT contiguous outputs per
// column).

// The epilogue fuses ReLU only; the launcher applies gelu, gelu_tanh and silu over the finished
// output (apply_activation: a scalar erff per output cost more than the product at n = 32).
static inline float activate(float v, int act) { return act == kActRelu ? (v > 0.f ? v : 0.f) : v; }

// The linear layout (out (n, M): sm == 1) stores the tile transposed. Blocks of W x W go through
// registers (Vec::transpose); a strided element loop there, which the compiler turned into
// emulated gathers, took 25% of a 3072x768 90% CSR product at n = 128 (perf annotate).
template <typename T>
static inline int store_tile_transposed(const Output& O, const float* tile, int ld_tile, int64_t m0, int rows,
                                        int64_t j0, int cols, const float* b) {
#if PYSPARSE_ISA_LEVEL >= 1
  constexpr int W = Vec::W;
  if (O.sm != 1 || ld_tile % W != 0 || (O.act != kActNone && O.act != kActRelu)) return 0;
  T* out = static_cast<T*>(O.out);
  int i0 = 0;
  for (; i0 + W <= rows; i0 += W) {
    const typename Vec::V bv = Vec::load(b + i0);
    for (int c0 = 0; c0 < cols; c0 += W) {
      typename Vec::V r[W];
      for (int i = 0; i < W; ++i) r[i] = Vec::load(tile + (i0 + i) * ld_tile + c0);
      Vec::transpose(r);
      const int cn = cols - c0 < W ? cols - c0 : W;
      for (int j = 0; j < cn; ++j) {
        typename Vec::V y = Vec::add(r[j], bv);
        // max(y, 0) is activate()'s ReLU: NaN and -0 give +0 (maxps returns its second operand).
        if (O.act == kActRelu) y = Vec::max(y, Vec::zero());
        T* o = out + (j0 + c0 + j) * O.sn + m0 + i0;
        if constexpr (sizeof(T) == 4) {
          Vec::store(reinterpret_cast<float*>(o), y);
        } else {
          alignas(64) float tmp[W];
          Vec::store(tmp, y);
          for (int k = 0; k < W; ++k) from_f32(tmp[k], o + k);
        }
      }
    }
  }
  return i0;  // rows [0, i0) are stored
#else
  (void)O, (void)tile, (void)ld_tile, (void)m0, (void)rows, (void)j0, (void)cols, (void)b;
  return 0;
#endif
}

template <typename T>
static inline void store_tile(const Output& O, const float* tile, int ld_tile, int64_t m0, int rows,
                              int64_t j0, int cols) {
  T* out = static_cast<T*>(O.out);
  const T* bias = static_cast<const T*>(O.bias);
  alignas(64) float b[64];  // rows <= 64 (RT and BSR tiles are at most that tall; bh > 64 is split by caller)
  for (int i = 0; i < rows; ++i) b[i] = bias ? to_f32(bias[m0 + i]) : 0.f;
  if (O.sn != 1) {
    const int done = store_tile_transposed<T>(O, tile, ld_tile, m0, rows, j0, cols, b);
    if (done) {
      tile += done * ld_tile, m0 += done, rows -= done;
      for (int i = 0; i < rows; ++i) b[i] = b[i + done];
      if (rows == 0) return;
    }
  }
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
  // Columns of B are contiguous (B = x^T in the linear layout): a transpose.
#if PYSPARSE_ISA_LEVEL >= 1
  // W x W blocks through registers (Vec::transpose): the element loop below cost 0.4 ns per
  // element, 44% of a 768x768 90% product's time at 16-token panels (perf).
  constexpr int W = Vec::W;
  if (nb % W == 0) {
    const int64_t kv = k0 + (k1 - k0) / W * W;  // [k0, kv) in whole blocks
    for (int64_t p = p0; p < p1; ++p) {
      float* dst = a.dst + p * a.K * nb;
      for (int jb = 0; jb < nb; jb += W) {
        const int64_t j0 = p * nb + jb;
        const int cn = int(a.n - j0 <= 0 ? 0 : a.n - j0 < W ? a.n - j0 : W);
        for (int64_t k = k0; k < kv; k += W) {
          typename Vec::V r[W];
          for (int i = 0; i < W; ++i) r[i] = i < cn ? Vec::load_cvt(src + (j0 + i) * a.sn + k) : Vec::zero();
          Vec::transpose(r);
          for (int t = 0; t < W; ++t) Vec::store(dst + (k + t) * nb + jb, r[t]);
        }
        for (int64_t k = kv; k < k1; ++k)
          for (int i = 0; i < W; ++i) dst[k * nb + jb + i] = i < cn ? to_f32(src[(j0 + i) * a.sn + k]) : 0.f;
      }
    }
    return;
  }
#endif
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
// The n == 1 scalar loop of CSR (over its column indices) and N:M (over decoded positions).
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
