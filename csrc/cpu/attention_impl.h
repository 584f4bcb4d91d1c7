// Masked attention kernels, written once over the Vec wrapper of simd.h and compiled per ISA
// alongside the SpMM kernels (same namespace rules: kernels.h). Shapes and the meaning of every
// field: AttnArgs in kernels.h.
//
// Design (FlashAttention-2's loop order, on CPU): one task is one (batch, head, query block). Its
// bq x Dk query tile, pre-scaled by scale * log2(e) so the softmax runs on exp2, stays in L1; the
// task walks the key blocks of its row of the block mask and *skips* the inactive ones outright,
// which is where a sparse mask turns into saved time (SDPA evaluates every block). For each
// active block:
//   S = Q K^T         register tiles of 4 query rows x up to 4 vectors of keys (2 on AVX2:
//                     kTileVecs), K pre-packed as
//                     fp32 K^T (once per kv head and task, shared by all its query blocks and
//                     GQA heads; only the key blocks some tile uses), so every FMA is a
//                     broadcast of one q entry times a contiguous key vector;
//   mask              only on partial blocks (element mask, band, key length); the additive
//                     bias on every visited block;
//   online softmax    running max m and sum l per row, the output tile rescaled by 2^(m_old -
//                     m_new) only when the max moved;
//   O += P V          register tiles of 4 rows x up to kTileVecs vectors of the value dim, V read in
//                     place when it is fp32 with whole vectors per row, else packed as fp32.
// One task is one kv head (or a part of its query blocks when there are fewer kv heads than
// threads), and the packs live in thread-local buffers reused across calls: fresh buffers per
// head made a call page-fault bound (35 ms at (1, 32, 2048, 128) with every tile skipped).
// A row that has seen no allowed key keeps m = -inf and contributes nothing, so it ends as zeros
// (as SDPA's does since torch 2.5). NaN and +inf scores at allowed keys make the row NaN, as in
// SDPA: exp2 passes NaN through (inf - inf is NaN), and a NaN weight spreads over the row.

constexpr float kLog2e = 1.4426950408889634f;

#if PYSPARSE_ISA_LEVEL == 2
// In-register transpose of a 16 x 16 fp32 block (rows r[0..16) become columns): pairs interleaved,
// then 64-bit pairs, then 128-bit lanes twice.
static inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]), t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int h = 0; h < 16; h += 8)
    for (int i = 0; i < 4; ++i) {
      t[h + i] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0x88);
      t[h + i + 4] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0xdd);
    }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
  }
}
#endif

// S[r][c W ..] = sum_d Q[r][d] K^T[d][c W ..] for RT rows and NC vectors of keys.
template <int RT, int NC>
static inline void qk_tile(const float* Q, int64_t ldq, const float* Kt, int64_t ldk, float* S,
                           int64_t lds, int64_t D) {
  typename Vec::V acc[RT][NC];
  for (int r = 0; r < RT; ++r)
    for (int c = 0; c < NC; ++c) acc[r][c] = Vec::zero();
  for (int64_t d0 = 0; d0 < D; d0 += 16) {
    typename Vec::V part[RT][NC];
    for (int r = 0; r < RT; ++r)
      for (int c = 0; c < NC; ++c) part[r][c] = Vec::zero();
    for (int64_t d = d0; d < D && d < d0 + 16; ++d) {
      typename Vec::V kv[NC];
      for (int c = 0; c < NC; ++c) kv[c] = Vec::load(Kt + d * ldk + c * Vec::W);
      for (int r = 0; r < RT; ++r) {
        const auto q = Vec::set1(Q[r * ldq + d]);
        for (int c = 0; c < NC; ++c) part[r][c] = Vec::fma(q, kv[c], part[r][c]);
      }
    }
    for (int r = 0; r < RT; ++r)
      for (int c = 0; c < NC; ++c) acc[r][c] = Vec::add(acc[r][c], part[r][c]);
  }
  for (int r = 0; r < RT; ++r)
    for (int c = 0; c < NC; ++c) Vec::store(S + r * lds + c * Vec::W, acc[r][c]);
}

// O[r][c W ..] += sum_j P[r][j] V[j][c W ..] for RT rows and NC vectors of the value dim.
template <int RT, int NC>
static inline void pv_tile(const float* P, int64_t ldp, const float* V, int64_t ldv, float* O,
                           int64_t ldo, int64_t cols) {
  typename Vec::V acc[RT][NC];
  for (int r = 0; r < RT; ++r)
    for (int c = 0; c < NC; ++c) acc[r][c] = Vec::load(O + r * ldo + c * Vec::W);
  for (int64_t j = 0; j < cols; ++j) {
    typename Vec::V vv[NC];
    for (int c = 0; c < NC; ++c) vv[c] = Vec::load(V + j * ldv + c * Vec::W);
    for (int r = 0; r < RT; ++r) {
      const auto p = Vec::set1(P[r * ldp + j]);
      for (int c = 0; c < NC; ++c) acc[r][c] = Vec::fma(p, vv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < RT; ++r)
    for (int c = 0; c < NC; ++c) Vec::store(O + r * ldo + c * Vec::W, acc[r][c]);
}

// Vectors per register tile: 4 where there are 32 vector registers (AVX-512); with AVX2's 16, a
// 4 x 4 tile's 16 accumulators (qk_tile's partial sums) plus 4 key vectors and a broadcast spill.
constexpr int kTileVecs = PYSPARSE_ISA_LEVEL == 2 ? 4 : 2;

// Runs tile<RT, NC> over rows x nvec vectors: 4-row tiles then single rows, up to kTileVecs
// vectors each.
template <template <int, int> class Tile, typename... Args>
static inline void over_tiles(int64_t rows, int64_t nvec, int64_t ld_row_a, int64_t ld_row_out,
                              const float* A, const float* Bm, float* Out, Args... args) {
  for (int64_t r = 0; r < rows;) {
    // One vector of keys (16-key blocks on AVX-512) gets 8-row tiles: 4 rows would issue more
    // broadcasts than FMAs.
    if (nvec == 1 && rows - r >= 8) {
      Tile<8, 1>::run(A + r * ld_row_a, Bm, Out + r * ld_row_out, args...);
      r += 8;
      continue;
    }
    const int rt = rows - r >= 4 ? 4 : 1;
    for (int64_t c = 0; c < nvec; c += kTileVecs) {
      const int nc = int(nvec - c < kTileVecs ? nvec - c : kTileVecs);
      const float* a = A + r * ld_row_a;
      const float* bm = Bm + c * Vec::W;
      float* o = Out + r * ld_row_out + c * Vec::W;
#define PYSPARSE_TILE(RT_, NC_) Tile<RT_, NC_>::run(a, bm, o, args...)
      if (rt == 4) {
        switch (nc) {
          case 1: PYSPARSE_TILE(4, 1); break;
          case 2: PYSPARSE_TILE(4, 2); break;
          case 3: PYSPARSE_TILE(4, 3); break;
          default: PYSPARSE_TILE(4, 4);
        }
      } else {
        switch (nc) {
          case 1: PYSPARSE_TILE(1, 1); break;
          case 2: PYSPARSE_TILE(1, 2); break;
          case 3: PYSPARSE_TILE(1, 3); break;
          default: PYSPARSE_TILE(1, 4);
        }
      }
#undef PYSPARSE_TILE
    }
    r += rt;
  }
}

template <int RT, int NC>
struct QK {
  static void run(const float* Q, const float* Kt, float* S, int64_t ldq, int64_t ldk, int64_t lds, int64_t D) {
    qk_tile<RT, NC>(Q, ldq, Kt, ldk, S, lds, D);
  }
};
template <int RT, int NC>
struct PV {
  static void run(const float* P, const float* V, float* O, int64_t ldp, int64_t ldv, int64_t ldo, int64_t cols) {
    pv_tile<RT, NC>(P, ldp, V, ldv, O, ldo, cols);
  }
};

static inline int64_t round_vec(int64_t x) { return (x + Vec::W - 1) / Vec::W * Vec::W; }

// A thread's buffer of at least n floats (slots 0-2: the forward, 3-13: the backward), kept across calls (see the header: fresh buffers per
// call were page-fault bound).
static inline float* thread_buffer(int slot, size_t n) {
  static thread_local std::vector<float> bufs[14];
  if (bufs[slot].size() < n) bufs[slot].resize(n);
  return bufs[slot].data();
}

// The packed operands of one kv head: K^T blocks kt[kb][Dk][bkp], V rows at v + j * ldv.
struct KvPack {
  const float* kt;
  const float* v;
  int64_t bkp, ldv;
};

// The scores (in log2 units: Q arrives pre-scaled by scale * log2(e)) of query rows [i0, i0 + rows)
// of (b, h) against key block kb of kind `kind` (1 partial, 2 full), into S (ld bkp, a whole
// number of vectors wide): S = Q K^T (Q rows a.Dk apart, kt the block's packed K^T), + bias on
// every visited block, the band, key length and element mask on a partial block, -inf past the
// block's keys. The forward and the backward score a block here, so they mask alike.
static inline void score_block(const AttnArgs& a, int64_t b, int64_t h, int64_t i0, int64_t rows, int64_t kb,
                               int kind, const float* Q, const float* kt, int64_t bkp, float* S) {
  const int64_t j0 = kb * a.bk, cols = a.Lk - j0 < a.bk ? a.Lk - j0 : a.bk;
  const int64_t nk = (cols + Vec::W - 1) / Vec::W, width = nk * Vec::W;
  over_tiles<QK>(rows, nk, a.Dk, bkp, Q, kt, S, a.Dk, bkp, bkp, a.Dk);
  const uint8_t* em = a.emask ? a.emask + b * a.sm[0] + h * a.sm[1] + i0 * a.sm[2] : nullptr;
  const float* bias = a.bias ? a.bias + b * a.sbias[0] + h * a.sbias[1] + i0 * a.sbias[2] : nullptr;
  const int64_t kvlen = a.kv_len ? a.kv_len[b] : a.Lk;
  for (int64_t r = 0; r < rows; ++r) {
    float* s = S + r * bkp;
    const int64_t i = i0 + r;
    if (bias) {
      const float* br = bias + r * a.sbias[2] + j0 * a.sbias[3];
      // -inf excludes the key whatever its score: a +inf score plus -inf would be NaN.
      for (int64_t j = 0; j < cols; ++j) {
        const float bj = br[j * a.sbias[3]];
        s[j] = bj == -INFINITY ? -INFINITY : s[j] + bj * kLog2e;
      }
    }
    if (kind == 1) {
      // Partial block: the band and key length as index ranges, the element mask per entry.
      int64_t lo = i + a.band_lo - j0, hi = i + a.band_hi - j0 + 1;  // allowed j in [lo, hi)
      if (kvlen - j0 < hi) hi = kvlen - j0;
      lo = lo < 0 ? 0 : lo > cols ? cols : lo;
      hi = hi < lo ? lo : hi > cols ? cols : hi;
      for (int64_t j = 0; j < lo; ++j) s[j] = -INFINITY;
      for (int64_t j = hi; j < cols; ++j) s[j] = -INFINITY;
      if (em) {  // branch-free select: a random mask mispredicts a branch half the time
        const uint8_t* mr = em + r * a.sm[2] + j0 * a.sm[3];
        if (a.sm[3] == 1)
          for (int64_t j = lo; j < hi; ++j) s[j] = mr[j] ? s[j] : -INFINITY;
        else
          for (int64_t j = lo; j < hi; ++j) s[j] = mr[j * a.sm[3]] ? s[j] : -INFINITY;
      }
    }
    for (int64_t j = cols; j < width; ++j) s[j] = -INFINITY;
  }
}

// One row's online-softmax step over its scores s in a block (width entries, the first cols of
// them keys): s becomes exp2(s - m_new), all 0 while the row has no allowed key; m and l move to
// the new running max and sum. Returns the factor by which what earlier blocks added must be
// rescaled (1 when the max did not move or nothing was added yet).
static inline float softmax_step(float* s, int64_t cols, int64_t width, float& m, float& l) {
  auto mx = Vec::load(s);
  for (int64_t c = Vec::W; c < width; c += Vec::W) mx = Vec::max(mx, Vec::load(s + c));
  const float rmax = Vec::hmax(mx);
  float mnew = m > rmax ? m : rmax;
  if (mnew == -INFINITY) {
    // Nothing allowed in this row yet (P = 0), unless the max skipped a NaN (vector max drops
    // one operand's NaN): then the row must become NaN, as in SDPA.
    bool nan = false;
    for (int64_t j = 0; j < cols; ++j) nan |= s[j] != s[j];
    if (!nan) {
      for (int64_t j = 0; j < width; ++j) s[j] = 0.f;
      return 1.f;
    }
    mnew = NAN;
  }
  const auto vm = Vec::set1(mnew);
  auto sum = Vec::zero();
  for (int64_t c = 0; c < width; c += Vec::W) {
    const auto p = Vec::exp2(Vec::sub(Vec::load(s + c), vm));
    Vec::store(s + c, p);
    sum = Vec::add(sum, p);
  }
  float alpha = 1.f;
  if (mnew != m) {
    if (l > 0.f) alpha = exp2f(m - mnew), l *= alpha;
    m = mnew;
  }
  l += Vec::hsum(sum);
  return alpha;
}

// dst[d * bkp + j] = src[(j0 + j) * ld + d] (as fp32) for d < D, j < bkp: rows [j0, j0 + cols)
// of one head's K (or V) transposed, zero past the block's rows.
template <typename T>
static void pack_transposed_block(const T* src, int64_t ld, int64_t j0, int64_t cols, int64_t D, int64_t bkp,
                                  float* dst) {
  int64_t j = 0;
#if PYSPARSE_ISA_LEVEL == 2
  // 16 keys x 16 dims at a time through registers: the scalar transpose was as costly as the
  // FMAs on 16-key tiles (L = 128, random 16x16 mask).
  for (; j + 16 <= cols; j += 16) {
    int64_t d = 0;
    for (; d + 16 <= D; d += 16) {
      __m512 r[16];
      for (int i = 0; i < 16; ++i) r[i] = Vec::load_cvt(src + (j0 + j + i) * ld + d);
      transpose16(r);
      for (int i = 0; i < 16; ++i) Vec::store(dst + (d + i) * bkp + j, r[i]);
    }
    for (; d < D; ++d)
      for (int i = 0; i < 16; ++i) dst[d * bkp + j + i] = to_f32(src[(j0 + j + i) * ld + d]);
  }
#endif
  for (; j < bkp; ++j)
    for (int64_t d = 0; d < D; ++d) dst[d * bkp + j] = j < cols ? to_f32(src[(j0 + j) * ld + d]) : 0.f;
}

// One (b, h, query block): its query tile against the active key blocks.
template <typename T>
static void attn_tile(const AttnArgs& a, int64_t b, int64_t h, int64_t qb, const KvPack& kv, float* scratch) {
  const int64_t i0 = qb * a.bq, rows = a.Lq - i0 < a.bq ? a.Lq - i0 : a.bq;
  const int64_t bkp = kv.bkp, dvp = round_vec(a.Dv), nv = dvp / Vec::W;
  float* Q = scratch;                 // rows x Dk
  float* S = Q + a.bq * a.Dk;         // rows x bkp
  float* O = S + a.bq * bkp;          // rows x dvp
  float* mrow = O + a.bq * dvp;
  float* lrow = mrow + a.bq;
  T* out = static_cast<T*>(a.out) + b * a.so[0] + h * a.so[1] + i0 * a.so[2];
  if (a.head_mask && !a.head_mask[h]) {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t d = 0; d < a.Dv; ++d) from_f32(0.f, out + r * a.so[2] + d);
    return;
  }
  const T* q = static_cast<const T*>(a.q) + b * a.sq[0] + h * a.sq[1] + i0 * a.sq[2];
  const float qscale = a.scale * kLog2e;
  const auto vscale = Vec::set1(qscale);
  for (int64_t r = 0; r < rows; ++r) {
    const T* src = q + r * a.sq[2];
    float* dst = Q + r * a.Dk;
    int64_t d = 0;
    for (; d + Vec::W <= a.Dk; d += Vec::W) Vec::store(dst + d, Vec::mul(Vec::load_cvt(src + d), vscale));
    for (; d < a.Dk; ++d) dst[d] = to_f32(src[d]) * qscale;
  }
  for (int64_t i = 0; i < rows * dvp; ++i) O[i] = 0.f;
  for (int64_t r = 0; r < rows; ++r) mrow[r] = -INFINITY, lrow[r] = 0.f;

  const int8_t* kinds = a.kind ? a.kind + b * a.kind_sb + h * a.kind_sh + qb * a.KB : nullptr;
  for (int64_t kb = 0; kb < a.KB; ++kb) {
    const int kind = kinds ? kinds[kb] : 1;
    if (kind == 0) continue;
    const int64_t j0 = kb * a.bk, cols = a.Lk - j0 < a.bk ? a.Lk - j0 : a.bk;
    const int64_t width = (cols + Vec::W - 1) / Vec::W * Vec::W;
    score_block(a, b, h, i0, rows, kb, kind, Q, kv.kt + kb * a.Dk * bkp, bkp, S);
    for (int64_t r = 0; r < rows; ++r) {
      float* s = S + r * bkp;
      const float alpha = softmax_step(s, cols, width, mrow[r], lrow[r]);
      if (alpha != 1.f) {  // rescale what earlier blocks added
        const auto va = Vec::set1(alpha);
        for (int64_t c = 0; c < nv * Vec::W; c += Vec::W) Vec::store(O + r * dvp + c, Vec::mul(Vec::load(O + r * dvp + c), va));
      }
    }
    over_tiles<PV>(rows, nv, bkp, dvp, S, kv.v + j0 * kv.ldv, O, bkp, kv.ldv, dvp, cols);
  }
  for (int64_t r = 0; r < rows; ++r) {
    const float inv = lrow[r] > 0.f ? 1.f / lrow[r] : 0.f;
    int64_t d = 0;
    if constexpr (std::is_same<T, float>::value) {
      const auto vinv = Vec::set1(inv);
      for (; d + Vec::W <= a.Dv; d += Vec::W) Vec::store(out + r * a.so[2] + d, Vec::mul(Vec::load(O + r * dvp + d), vinv));
    }
    for (; d < a.Dv; ++d) from_f32(O[r * dvp + d] * inv, out + r * a.so[2] + d);
  }
}

// Task: kv head (b, hk) = task / parts, part task % parts of its (query head, query block) pairs.
template <typename T>
static void attn_kv_head(const AttnArgs& a, int64_t task) {
  const int64_t bh = task / a.parts, part = task % a.parts, b = bh / a.Hkv, hk = bh % a.Hkv;
  const int64_t group = a.H / a.Hkv, npairs = group * a.QB;
  const int64_t p0 = npairs * part / a.parts, p1 = npairs * (part + 1) / a.parts;
  // Pairs run longest-first within a head (the last query blocks of a causal mask), so the
  // dynamic schedule across tasks ends on short work.
  auto pair_head = [&](int64_t p) { return hk * group + p / a.QB; };
  auto pair_qblock = [&](int64_t p) { return a.QB - 1 - p % a.QB; };

  // Key blocks some pair of this task visits: only those are packed.
  std::vector<uint8_t> used(size_t(a.KB), a.kind ? 0 : 1);
  if (a.kind) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t h = pair_head(p);
      if (a.head_mask && !a.head_mask[h]) continue;
      const int8_t* row = a.kind + b * a.kind_sb + h * a.kind_sh + pair_qblock(p) * a.KB;
      for (int64_t kb = 0; kb < a.KB; ++kb) used[size_t(kb)] |= row[kb] != 0;
    }
  }
  KvPack kv;
  kv.bkp = round_vec(a.bk);
  const int64_t dvp = round_vec(a.Dv);
  float* kt = thread_buffer(0, size_t(a.KB * a.Dk * kv.bkp));
  const T* k = static_cast<const T*>(a.k) + b * a.sk[0] + hk * a.sk[1];
  const T* v = static_cast<const T*>(a.v) + b * a.sv[0] + hk * a.sv[1];
  const bool v_in_place = std::is_same<T, float>::value && a.Dv % Vec::W == 0;
  float* vp = v_in_place ? nullptr : thread_buffer(1, size_t(a.Lk * dvp));
  for (int64_t kb = 0; kb < a.KB; ++kb) {
    if (!used[size_t(kb)]) continue;
    const int64_t j0 = kb * a.bk, cols = a.Lk - j0 < a.bk ? a.Lk - j0 : a.bk;
    pack_transposed_block(k, a.sk[2], j0, cols, a.Dk, kv.bkp, kt + kb * a.Dk * kv.bkp);
    if (vp)
      for (int64_t j = j0; j < j0 + cols; ++j)
        for (int64_t d = 0; d < dvp; ++d) vp[j * dvp + d] = d < a.Dv ? to_f32(v[j * a.sv[2] + d]) : 0.f;
  }
  kv.kt = kt;
  if (v_in_place) kv.v = reinterpret_cast<const float*>(v), kv.ldv = a.sv[2];
  else kv.v = vp, kv.ldv = dvp;

  float* scratch = thread_buffer(2, size_t(a.bq * (a.Dk + kv.bkp + dvp + 2)));
  for (int64_t p = p0; p < p1; ++p) attn_tile<T>(a, b, pair_head(p), pair_qblock(p), kv, scratch);
}

// ---------------------------------------------------------------------------------------------
// The backward (FlashAttention-2's, on CPU), fp32. Pass 1 recomputes each row's softmax
// statistics over its active blocks (the forward does not keep them) and delta = rowsum(dO * O).
// Pass 2 walks key blocks: for each, every (head of the group, query block) tile the mask keeps
// is scored again (score_block: the forward's masking), P = exp2(S - lse), and
//   dV += P^T dO,  dP = dO V^T,  dS = P (dP - delta) scale,  dK += dS^T Q,  dQ += dS K,
// P^T and dS^T through a register transpose, every product on the forward's register tiles. A
// task owns its key blocks' dK and dV (kept in L1/L2 across the tiles) and its part's dQ.

// dst[j * ldd + r] = src[r * lds + j] for r < rows, j < width (a multiple of the vector width).
// AVX-512 reads whole 16-row blocks: src must hold round16(rows) rows, dst round16(rows) columns
// (the extra ones are never read back).
static inline void transpose_rows(const float* src, int64_t rows, int64_t width, int64_t lds, float* dst, int64_t ldd) {
#if PYSPARSE_ISA_LEVEL == 2
  for (int64_t r0 = 0; r0 < rows; r0 += 16)
    for (int64_t j0 = 0; j0 < width; j0 += 16) {
      __m512 t[16];
      for (int i = 0; i < 16; ++i) t[i] = _mm512_loadu_ps(src + (r0 + i) * lds + j0);
      transpose16(t);
      for (int i = 0; i < 16; ++i) _mm512_storeu_ps(dst + (j0 + i) * ldd + r0, t[i]);
    }
#else
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < width; ++j) dst[j * ldd + r] = src[r * lds + j];
#endif
}

static void attn_bwd_stats(const AttnBwdArgs& g, int64_t task) {
  const AttnArgs& a = g.f;
  const int64_t bh = task / a.parts, part = task % a.parts, b = bh / a.Hkv, hk = bh % a.Hkv;
  const int64_t group = a.H / a.Hkv, npairs = group * a.QB;
  const int64_t p0 = npairs * part / a.parts, p1 = npairs * (part + 1) / a.parts;
  const int64_t bkp = round_vec(a.bk);
  const float* k = static_cast<const float*>(a.k) + b * a.sk[0] + hk * a.sk[1];
  float* kt = thread_buffer(3, size_t(a.KB * a.Dk * bkp));
  for (int64_t kb = 0; kb < a.KB; ++kb) {
    const int64_t j0 = kb * a.bk, cols = a.Lk - j0 < a.bk ? a.Lk - j0 : a.bk;
    pack_transposed_block(k, a.sk[2], j0, cols, a.Dk, bkp, kt + kb * a.Dk * bkp);
  }
  float* Q = thread_buffer(4, size_t(a.bq * a.Dk));
  float* S = thread_buffer(5, size_t(a.bq * bkp));
  float* m = thread_buffer(6, size_t(2 * a.bq));
  float* l = m + a.bq;
  const float qscale = a.scale * kLog2e;
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t h = hk * group + p / a.QB, qb = p % a.QB;
    if (a.head_mask && !a.head_mask[h]) continue;
    const int64_t i0 = qb * a.bq, rows = a.Lq - i0 < a.bq ? a.Lq - i0 : a.bq;
    const float* q = static_cast<const float*>(a.q) + b * a.sq[0] + h * a.sq[1] + i0 * a.sq[2];
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t d = 0; d < a.Dk; ++d) Q[r * a.Dk + d] = q[r * a.sq[2] + d] * qscale;
      m[r] = -INFINITY, l[r] = 0.f;
    }
    const int8_t* kinds = a.kind ? a.kind + b * a.kind_sb + h * a.kind_sh + qb * a.KB : nullptr;
    for (int64_t kb = 0; kb < a.KB; ++kb) {
      const int kind = kinds ? kinds[kb] : 1;
      if (kind == 0) continue;
      const int64_t cols = a.Lk - kb * a.bk < a.bk ? a.Lk - kb * a.bk : a.bk;
      const int64_t width = (cols + Vec::W - 1) / Vec::W * Vec::W;
      score_block(a, b, h, i0, rows, kb, kind, Q, kt + kb * a.Dk * bkp, bkp, S);
      for (int64_t r = 0; r < rows; ++r) softmax_step(S + r * bkp, cols, width, m[r], l[r]);
    }
    float* lse = g.lse + (b * a.H + h) * a.Lq + i0;
    float* delta = g.delta + (b * a.H + h) * a.Lq + i0;
    const float* dout = g.dout + b * g.sdo[0] + h * g.sdo[1] + i0 * g.sdo[2];
    const float* out = g.out + b * g.sout[0] + h * g.sout[1] + i0 * g.sout[2];
    for (int64_t r = 0; r < rows; ++r) {
      // No allowed key: P = 0 (exp2(s - inf)); a NaN row stays NaN.
      lse[r] = l[r] > 0.f || l[r] != l[r] ? m[r] + log2f(l[r]) : INFINITY;
      float dl = 0.f;
      for (int64_t d = 0; d < a.Dv; ++d) dl += dout[r * g.sdo[2] + d] * out[r * g.sout[2] + d];
      delta[r] = dl;
    }
  }
}

static void attn_bwd_grads(const AttnBwdArgs& g, int64_t task) {
  const AttnArgs& a = g.f;
  const int64_t bh = task / g.kv_parts, part = task % g.kv_parts, b = bh / a.Hkv, hk = bh % a.Hkv;
  const int64_t group = a.H / a.Hkv;
  const int64_t kb0 = a.KB * part / g.kv_parts, kb1 = a.KB * (part + 1) / g.kv_parts;
  const int64_t bkp = round_vec(a.bk), bqp = round_vec(a.bq), dkp = round_vec(a.Dk), dvp = round_vec(a.Dv);
  const int64_t nkd = dkp / Vec::W, nv = dvp / Vec::W;
  auto head_on = [&](int64_t h) { return !a.head_mask || a.head_mask[h]; };
  auto kind_of = [&](int64_t h, int64_t qb, int64_t kb) {
    return a.kind ? int(a.kind[b * a.kind_sb + h * a.kind_sh + qb * a.KB + kb]) : 1;
  };
  auto visited = [&](int64_t kb) {  // some (head of the group, query block) tile keeps key block kb
    for (int64_t hh = 0; hh < group; ++hh)
      for (int64_t qb = 0; qb < a.QB; ++qb)
        if (head_on(hk * group + hh) && kind_of(hk * group + hh, qb, kb)) return true;
    return false;
  };
  bool any = false;
  for (int64_t kb = kb0; kb < kb1 && !any; ++kb) any = visited(kb);
  if (!any) return;

  // The group's queries (scaled for the scores; as they are, padded, for dK) and output
  // gradients (padded), fp32, packed once per task.
  const float qscale = a.scale * kLog2e;
  float* Qs = thread_buffer(3, size_t(group * a.Lq * a.Dk));
  float* Qu = thread_buffer(4, size_t(group * a.Lq * dkp));
  float* dO = thread_buffer(5, size_t(group * a.Lq * dvp));
  for (int64_t hh = 0; hh < group; ++hh) {
    const int64_t h = hk * group + hh;
    if (!head_on(h)) continue;
    const float* q = static_cast<const float*>(a.q) + b * a.sq[0] + h * a.sq[1];
    const float* dout = g.dout + b * g.sdo[0] + h * g.sdo[1];
    for (int64_t i = 0; i < a.Lq; ++i) {
      float* qs = Qs + (hh * a.Lq + i) * a.Dk;
      float* qu = Qu + (hh * a.Lq + i) * dkp;
      float* o = dO + (hh * a.Lq + i) * dvp;
      for (int64_t d = 0; d < dkp; ++d) qu[d] = d < a.Dk ? q[i * a.sq[2] + d] : 0.f;
      for (int64_t d = 0; d < a.Dk; ++d) qs[d] = qu[d] * qscale;
      for (int64_t d = 0; d < dvp; ++d) o[d] = d < a.Dv ? dout[i * g.sdo[2] + d] : 0.f;
    }
  }
  const float* k = static_cast<const float*>(a.k) + b * a.sk[0] + hk * a.sk[1];
  const float* v = static_cast<const float*>(a.v) + b * a.sv[0] + hk * a.sv[1];
  float* Kt = thread_buffer(6, size_t(a.Dk * bkp));
  float* Vt = thread_buffer(7, size_t(a.Dv * bkp));
  float* Kr = thread_buffer(8, size_t(bkp * dkp));
  float* S = thread_buffer(9, size_t(bqp * bkp));
  float* dS = thread_buffer(10, size_t(bqp * bkp));
  float* Tr = thread_buffer(11, size_t(bkp * bqp));
  float* dKa = thread_buffer(12, size_t(bkp * dkp));
  float* dVa = thread_buffer(13, size_t(bkp * dvp));
  float* dq = g.dq + part * (a.B * a.H * a.Lq * g.ldq);
  const auto vscale = Vec::set1(a.scale);
  for (int64_t kb = kb0; kb < kb1; ++kb) {
    if (!visited(kb)) continue;
    const int64_t j0 = kb * a.bk, cols = a.Lk - j0 < a.bk ? a.Lk - j0 : a.bk;
    const int64_t nk = (cols + Vec::W - 1) / Vec::W, width = nk * Vec::W;
    pack_transposed_block(k, a.sk[2], j0, cols, a.Dk, bkp, Kt);
    pack_transposed_block(v, a.sv[2], j0, cols, a.Dv, bkp, Vt);
    for (int64_t j = 0; j < bkp; ++j)
      for (int64_t d = 0; d < dkp; ++d) Kr[j * dkp + d] = j < cols && d < a.Dk ? k[(j0 + j) * a.sk[2] + d] : 0.f;
    for (int64_t i = 0; i < bkp * dkp; ++i) dKa[i] = 0.f;
    for (int64_t i = 0; i < bkp * dvp; ++i) dVa[i] = 0.f;
    for (int64_t hh = 0; hh < group; ++hh) {
      const int64_t h = hk * group + hh;
      if (!head_on(h)) continue;
      for (int64_t qb = 0; qb < a.QB; ++qb) {
        const int kind = kind_of(h, qb, kb);
        if (kind == 0) continue;
        const int64_t i0 = qb * a.bq, rows = a.Lq - i0 < a.bq ? a.Lq - i0 : a.bq;
        const float* lse = g.lse + (b * a.H + h) * a.Lq + i0;
        const float* delta = g.delta + (b * a.H + h) * a.Lq + i0;
        const float* dOt = dO + (hh * a.Lq + i0) * dvp;
        score_block(a, b, h, i0, rows, kb, kind, Qs + (hh * a.Lq + i0) * a.Dk, Kt, bkp, S);
        over_tiles<QK>(rows, nk, dvp, bkp, dOt, Vt, dS, dvp, bkp, bkp, a.Dv);  // dP = dO V^T
        for (int64_t r = 0; r < rows; ++r) {
          const auto vl = Vec::set1(lse[r]), vd = Vec::set1(delta[r]);
          for (int64_t c = 0; c < width; c += Vec::W) {
            const auto p = Vec::exp2(Vec::sub(Vec::load(S + r * bkp + c), vl));
            Vec::store(S + r * bkp + c, p);
            Vec::store(dS + r * bkp + c, Vec::mul(Vec::mul(p, Vec::sub(Vec::load(dS + r * bkp + c), vd)), vscale));
          }
        }
        transpose_rows(S, rows, width, bkp, Tr, bqp);
        over_tiles<PV>(cols, nv, bqp, dvp, Tr, dOt, dVa, bqp, dvp, dvp, rows);  // dV += P^T dO
        transpose_rows(dS, rows, width, bkp, Tr, bqp);
        over_tiles<PV>(cols, nkd, bqp, dkp, Tr, Qu + (hh * a.Lq + i0) * dkp, dKa, bqp, dkp, dkp, rows);  // dK += dS^T Q
        over_tiles<PV>(rows, nkd, bkp, g.ldq, dS, Kr, dq + ((b * a.H + h) * a.Lq + i0) * g.ldq, bkp, dkp, g.ldq, cols);  // dQ += dS K
      }
    }
    float* dk = g.dk + ((b * a.Hkv + hk) * a.Lk + j0) * a.Dk;
    float* dv = g.dv + ((b * a.Hkv + hk) * a.Lk + j0) * a.Dv;
    for (int64_t j = 0; j < cols; ++j) {
      for (int64_t d = 0; d < a.Dk; ++d) dk[j * a.Dk + d] = dKa[j * dkp + d];
      for (int64_t d = 0; d < a.Dv; ++d) dv[j * a.Dv + d] = dVa[j * dvp + d];
    }
  }
}
