// Masked attention kernels, written once over the Vec wrapper of simd.h and compiled per ISA
// alongside spmm_impl.h (same namespace rules). Shapes and the meaning of every field: AttnArgs
// in kernels.h.
//
// Design (FlashAttention-2's loop order, on CPU): one task is one (batch, head, query block). Its
// bq x Dk query tile, pre-scaled by scale * log2(e) so the softmax runs on exp2, stays in L1; the
// task walks the key blocks of its row of the block mask and *skips* the inactive ones outright,
// which is where a sparse mask turns into saved time (SDPA evaluates every block). For each
// active block:
//   S = Q K^T         register tiles of 4 query rows x up to 4 vectors of keys, K pre-packed as
//                     fp32 K^T (one pass per kv head, shared by all query blocks and GQA heads),
//                     so every FMA is a broadcast of one q entry times a contiguous key vector;
//   mask              only on partial blocks (element mask, band, key length); the additive
//                     bias on every visited block;
//   online softmax    running max m and sum l per row, the output tile rescaled by 2^(m_old -
//                     m_new) only when the max moved;
//   O += P V          register tiles of 4 rows x up to 4 vectors of the value dim, V pre-packed
//                     as fp32 rows.
// A row that has seen no allowed key keeps m = -inf and contributes nothing, so it ends as zeros
// (SDPA gives NaN there).

constexpr float kLog2e = 1.4426950408889634f;

template <typename T>
static void attn_pack(const AttnArgs& a, int64_t bh) {
  const int64_t b = bh / a.Hkv, hk = bh % a.Hkv, bkp = attn_pad(a.bk), dvp = attn_pad(a.Dv);
  if (a.head_mask) {  // nothing to pack when every query head of this kv head is pruned
    const int64_t g = a.H / a.Hkv;
    bool any = false;
    for (int64_t h = hk * g; h < hk * g + g; ++h) any |= a.head_mask[h] != 0;
    if (!any) return;
  }
  const T* k = static_cast<const T*>(a.k) + b * a.sk[0] + hk * a.sk[1];
  const T* v = static_cast<const T*>(a.v) + b * a.sv[0] + hk * a.sv[1];
  float* kt = a.kt + bh * a.KB * a.Dk * bkp;
  for (int64_t kb = 0; kb < a.KB; ++kb) {
    float* dst = kt + kb * a.Dk * bkp;
    const int64_t j0 = kb * a.bk, cols = a.Lk - j0 < a.bk ? a.Lk - j0 : a.bk;
    for (int64_t j = 0; j < bkp; ++j) {
      const T* row = k + (j0 + j) * a.sk[2];
      for (int64_t d = 0; d < a.Dk; ++d) dst[d * bkp + j] = j < cols ? to_f32(row[d]) : 0.f;
    }
  }
  float* vp = a.vp + bh * a.Lk * dvp;
  for (int64_t j = 0; j < a.Lk; ++j) {
    const T* row = v + j * a.sv[2];
    for (int64_t d = 0; d < dvp; ++d) vp[j * dvp + d] = d < a.Dv ? to_f32(row[d]) : 0.f;
  }
}

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

// Runs tile<RT, NC> over rows x nvec vectors: 4-row tiles then single rows, up to 4 vectors each.
template <template <int, int> class Tile, typename... Args>
static inline void over_tiles(int64_t rows, int64_t nvec, int64_t ld_row_a, int64_t ld_row_out,
                              const float* A, const float* Bm, float* Out, Args... args) {
  for (int64_t r = 0; r < rows;) {
    const int rt = rows - r >= 4 ? 4 : 1;
    for (int64_t c = 0; c < nvec; c += 4) {
      const int nc = int(nvec - c < 4 ? nvec - c : 4);
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

template <typename T>
static void attn_task(const AttnArgs& a, int64_t task, float* scratch) {
  const int64_t qb = a.QB - 1 - task % a.QB;  // longest (causal) query blocks first
  const int64_t bh = task / a.QB, b = bh / a.H, h = bh % a.H, hk = h / (a.H / a.Hkv);
  const int64_t i0 = qb * a.bq, rows = a.Lq - i0 < a.bq ? a.Lq - i0 : a.bq;
  const int64_t bkp = attn_pad(a.bk), dvp = attn_pad(a.Dv), nv = (a.Dv + Vec::W - 1) / Vec::W;
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
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t d = 0; d < a.Dk; ++d) Q[r * a.Dk + d] = to_f32(q[r * a.sq[2] + d]) * qscale;
  for (int64_t i = 0; i < rows * dvp; ++i) O[i] = 0.f;
  for (int64_t r = 0; r < rows; ++r) mrow[r] = -INFINITY, lrow[r] = 0.f;

  const int8_t* kinds = a.kind ? a.kind + b * a.kind_sb + h * a.kind_sh + qb * a.KB : nullptr;
  const float* kt = a.kt + (b * a.Hkv + hk) * a.KB * a.Dk * bkp;
  const float* vp = a.vp + (b * a.Hkv + hk) * a.Lk * dvp;
  const uint8_t* em = a.emask ? a.emask + b * a.sm[0] + h * a.sm[1] + i0 * a.sm[2] : nullptr;
  const float* bias = a.bias ? a.bias + b * a.sbias[0] + h * a.sbias[1] + i0 * a.sbias[2] : nullptr;
  const int64_t kvlen = a.kv_len ? a.kv_len[b] : a.Lk;
  for (int64_t kb = 0; kb < a.KB; ++kb) {
    const int kind = kinds ? kinds[kb] : 1;
    if (kind == 0) continue;
    const int64_t j0 = kb * a.bk, cols = a.Lk - j0 < a.bk ? a.Lk - j0 : a.bk;
    const int64_t nk = (cols + Vec::W - 1) / Vec::W, width = nk * Vec::W;
    over_tiles<QK>(rows, nk, a.Dk, bkp, Q, kt + kb * a.Dk * bkp, S, a.Dk, bkp, bkp, a.Dk);
    for (int64_t r = 0; r < rows; ++r) {
      float* s = S + r * bkp;
      const int64_t i = i0 + r;
      if (bias) {
        const float* br = bias + r * a.sbias[2] + j0 * a.sbias[3];
        for (int64_t j = 0; j < cols; ++j) s[j] += br[j * a.sbias[3]] * kLog2e;
      }
      if (kind == 1) {
        // Partial block: the band and key length as index ranges, the element mask per entry.
        int64_t lo = i + a.band_lo - j0, hi = i + a.band_hi - j0 + 1;  // allowed j in [lo, hi)
        if (kvlen - j0 < hi) hi = kvlen - j0;
        lo = lo < 0 ? 0 : lo > cols ? cols : lo;
        hi = hi < lo ? lo : hi > cols ? cols : hi;
        for (int64_t j = 0; j < lo; ++j) s[j] = -INFINITY;
        for (int64_t j = hi; j < cols; ++j) s[j] = -INFINITY;
        if (em) {
          const uint8_t* mr = em + r * a.sm[2] + j0 * a.sm[3];
          for (int64_t j = lo; j < hi; ++j)
            if (!mr[j * a.sm[3]]) s[j] = -INFINITY;
        }
      }
      for (int64_t j = cols; j < width; ++j) s[j] = -INFINITY;
      auto mx = Vec::load(s);
      for (int64_t c = Vec::W; c < width; c += Vec::W) mx = Vec::max(mx, Vec::load(s + c));
      const float rmax = Vec::hmax(mx), mnew = mrow[r] > rmax ? mrow[r] : rmax;
      if (mnew == -INFINITY) {  // nothing allowed in this row yet: P = 0
        for (int64_t j = 0; j < width; ++j) s[j] = 0.f;
        continue;
      }
      const auto vm = Vec::set1(mnew);
      auto sum = Vec::zero();
      for (int64_t c = 0; c < width; c += Vec::W) {
        const auto p = Vec::exp2(Vec::sub(Vec::load(s + c), vm));
        Vec::store(s + c, p);
        sum = Vec::add(sum, p);
      }
      if (mnew != mrow[r]) {
        const float alpha = exp2f(mrow[r] - mnew);  // 0 when the old max was -inf
        const auto va = Vec::set1(alpha);
        for (int64_t c = 0; c < nv * Vec::W; c += Vec::W) Vec::store(O + r * dvp + c, Vec::mul(Vec::load(O + r * dvp + c), va));
        lrow[r] *= alpha;
        mrow[r] = mnew;
      }
      lrow[r] += Vec::hsum(sum);
    }
    over_tiles<PV>(rows, nv, bkp, dvp, S, vp + j0 * dvp, O, bkp, dvp, dvp, cols);
  }
  for (int64_t r = 0; r < rows; ++r) {
    const float inv = lrow[r] > 0.f ? 1.f / lrow[r] : 0.f;
    for (int64_t d = 0; d < a.Dv; ++d) from_f32(O[r * dvp + d] * inv, out + r * a.so[2] + d);
  }
}
