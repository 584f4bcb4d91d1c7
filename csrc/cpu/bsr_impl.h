// BSR SpMM kernels: the register-tiled panel kernel (n > 1) and the gemv (n == 1).
// Part of the per-ISA kernel build: isa_{scalar,avx2,avx512}.cpp include it inside that ISA's
// namespace, after simd.h and in the order they list; no include guard, no torch header
// (kernels.h says why).

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
