// Thin fp32 vector wrapper, one definition per instruction set. Included by the ISA translation
// units (csrc/cpu/isa_*.cpp) *inside* their own namespace after they set
//   PYSPARSE_ISA_LEVEL 0 = portable scalar, 1 = AVX2 + FMA + F16C, 2 = AVX-512 F/BW/VL,
// so every inline function here exists once per ISA and never collides at link time.
// The ISA TUs enable their target with `#pragma GCC target` rather than per-file flags.
//
// Vec::W              lanes per vector
// zero/set1/load/store  fp32
// load_cvt(const T*)  W elements of T (float, bf16_t, f16_t) widened to fp32
// fma(a, b, c)        a * b + c
// add/sub/mul/div/max/min  lane-wise (min/max return the second operand where either is NaN)
// hsum(V), hmax(V)    sum / max of the lanes
// exp2(V)             2^x, ~2 ulp; exactly 0 for x <= -127 (so -inf, a masked score, gives 0);
//                     NaN for NaN (max(c, x) returns x when x is NaN: attention must not drop it)

struct bf16_t { uint16_t x; };
struct f16_t { uint16_t x; };

static inline float bits_to_f32(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
static inline uint32_t f32_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

static inline float to_f32(float v) { return v; }
static inline float to_f32(bf16_t v) { return bits_to_f32(uint32_t(v.x) << 16); }
static inline float to_f32(f16_t v) { _Float16 h; std::memcpy(&h, &v.x, 2); return float(h); }

static inline void from_f32(float f, float* dst) { *dst = f; }
static inline void from_f32(float f, bf16_t* dst) {
  uint32_t u = f32_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) { dst->x = uint16_t((u >> 16) | 0x40); return; }  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
  dst->x = uint16_t(u >> 16);
}
static inline void from_f32(float f, f16_t* dst) { _Float16 h = (_Float16)f; std::memcpy(&dst->x, &h, 2); }

// 2^f for f in [-0.5, 0.5]: Taylor coefficients of exp(f ln 2) to degree 7 (truncation error
// (ln 2)^8 / 8! * 0.5^8 ~ 5e-9, below fp32's half ulp).
#define PYSPARSE_EXP2_POLY(F, P)                                                        \
  P = fma(F, set1(1.5252734e-5f), set1(1.5403530e-4f));                                 \
  P = fma(F, P, set1(1.3333558e-3f));                                                    \
  P = fma(F, P, set1(9.6181291e-3f));                                                    \
  P = fma(F, P, set1(5.5504109e-2f));                                                    \
  P = fma(F, P, set1(2.4022651e-1f));                                                    \
  P = fma(F, P, set1(6.9314718e-1f));                                                    \
  P = fma(F, P, set1(1.0f));

#if PYSPARSE_ISA_LEVEL == 2
struct Vec512 {
  using V = __m512;
  static constexpr int W = 16;
  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float a) { return _mm512_set1_ps(a); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V max(V a, V b) { return _mm512_max_ps(a, b); }
  static V min(V a, V b) { return _mm512_min_ps(a, b); }
  static V div(V a, V b) { return _mm512_div_ps(a, b); }
  static float hsum(V v) { return _mm512_reduce_add_ps(v); }
  static float hmax(V v) { return _mm512_reduce_max_ps(v); }
  // r[i][j] -> r[j][i] for a 16 x 16 block held in 16 registers (unpack, then 128-bit lane
  // shuffles): what the linear layout's transposed store runs on (spmm_shared.h store_tile).
  static void transpose(V (&r)[16]) {
    V t[16];
    for (int i = 0; i < 8; ++i) {
      t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
      t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; ++i) {
      const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
      const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
      r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
      r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
      r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
      r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
    }
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 4; ++j) {
        t[8 * i + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], 0x88);
        t[8 * i + 4 + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], 0xdd);
      }
    for (int j = 0; j < 8; ++j) {
      r[j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88);
      r[8 + j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0xdd);
    }
  }
  static V exp2(V x) {
    x = _mm512_max_ps(set1(-127.f), x);
    const V n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const V f = _mm512_sub_ps(x, n);
    V p;
    PYSPARSE_EXP2_POLY(f, p)
    // 2^n built in the exponent field: n = -127 gives the bit pattern of 0.0
    const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
  }
  static V load_cvt(const float* p) { return load(p); }
  static V load_cvt(const bf16_t* p) {
    __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  }
  static V load_cvt(const f16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
  // Gather x[idx[0..W)] with indices clamped to [0, K); lanes whose index was out of range are
  // reported through *bad. Unsigned compare also catches negative indices.
  static V gather_checked(const float* x, const int32_t* idx, uint32_t K, int* bad) {
    __m512i i = _mm512_loadu_si512((const void*)idx);
    __mmask16 oob = _mm512_cmpge_epu32_mask(i, _mm512_set1_epi32(int(K)));
    if (oob) { *bad = 1; i = _mm512_mask_mov_epi32(i, oob, _mm512_setzero_si512()); }
    return _mm512_i32gather_ps(i, x, 4);
  }
  // The first len < W lanes; the others are zero (masked loads never touch memory past len).
  static __mmask16 first(int len) { return __mmask16((1u << len) - 1u); }
  static V load_cvt_partial(const float* p, int len) { return _mm512_maskz_loadu_ps(first(len), p); }
  static V load_cvt_partial(const bf16_t* p, int len) {
    __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(first(len), p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  }
  static V load_cvt_partial(const f16_t* p, int len) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(first(len), p));
  }
  static V gather_partial(const float* x, __m512i i, __mmask16 m, uint32_t K, int* bad) {
    const __mmask16 oob = _mm512_mask_cmpge_epu32_mask(m, i, _mm512_set1_epi32(int(K)));
    if (oob) *bad = 1;
    return _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m & ~oob, i, x, 4);
  }
  static V gather_checked_partial(const float* x, const int32_t* idx, int len, uint32_t K, int* bad) {
    const __mmask16 m = first(len);
    return gather_partial(x, _mm512_maskz_loadu_epi32(m, idx), m, K, bad);
  }
  static V gather_checked_partial(const float* x, const int16_t* idx, int len, uint32_t K, int* bad) {
    const __mmask16 m = first(len);
    return gather_partial(x, _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, idx)), m, K, bad);
  }
  // int16 indices: widened as unsigned, so a negative index becomes >= 32768 >= K and is caught.
  static V gather_checked(const float* x, const int16_t* idx, uint32_t K, int* bad) {
    __m512i i = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)idx));
    __mmask16 oob = _mm512_cmpge_epu32_mask(i, _mm512_set1_epi32(int(K)));
    if (oob) { *bad = 1; i = _mm512_mask_mov_epi32(i, oob, _mm512_setzero_si512()); }
    return _mm512_i32gather_ps(i, x, 4);
  }
};
#endif

#if PYSPARSE_ISA_LEVEL >= 1
struct Vec256 {
  using V = __m256;
  static constexpr int W = 8;
  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float a) { return _mm256_set1_ps(a); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V max(V a, V b) { return _mm256_max_ps(a, b); }
  static V min(V a, V b) { return _mm256_min_ps(a, b); }
  static V div(V a, V b) { return _mm256_div_ps(a, b); }
  // r[i][j] -> r[j][i] for an 8 x 8 block (as Vec512::transpose).
  static void transpose(V (&r)[8]) {
    V t[8];
    for (int i = 0; i < 4; ++i) {
      t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
      t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 2; ++i) {
      const __m256d a = _mm256_castps_pd(t[4 * i]), b = _mm256_castps_pd(t[4 * i + 1]);
      const __m256d c = _mm256_castps_pd(t[4 * i + 2]), d = _mm256_castps_pd(t[4 * i + 3]);
      r[4 * i] = _mm256_castpd_ps(_mm256_unpacklo_pd(a, c));
      r[4 * i + 1] = _mm256_castpd_ps(_mm256_unpackhi_pd(a, c));
      r[4 * i + 2] = _mm256_castpd_ps(_mm256_unpacklo_pd(b, d));
      r[4 * i + 3] = _mm256_castpd_ps(_mm256_unpackhi_pd(b, d));
    }
    for (int j = 0; j < 4; ++j) {
      t[j] = _mm256_permute2f128_ps(r[j], r[4 + j], 0x20);
      t[4 + j] = _mm256_permute2f128_ps(r[j], r[4 + j], 0x31);
    }
    for (int j = 0; j < 8; ++j) r[j] = t[j];
  }
  static float hmax(V v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static V exp2(V x) {
    x = _mm256_max_ps(set1(-127.f), x);
    const V n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const V f = _mm256_sub_ps(x, n);
    V p;
    PYSPARSE_EXP2_POLY(f, p)
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  }
  static float hsum(V v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static V load_cvt(const float* p) { return load(p); }
  static V load_cvt(const bf16_t* p) {
    __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
  static V load_cvt(const f16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
};
#endif

#if PYSPARSE_ISA_LEVEL == 0
struct Vec {
  using V = float;
  static constexpr int W = 1;
  static V zero() { return 0.f; }
  static V set1(float a) { return a; }
  static V load(const float* p) { return *p; }
  static void store(float* p, V v) { *p = v; }
  static V fma(V a, V b, V c) { return a * b + c; }
  static V add(V a, V b) { return a + b; }
  static V sub(V a, V b) { return a - b; }
  static V mul(V a, V b) { return a * b; }
  static V max(V a, V b) { return a > b ? a : b; }
  static V min(V a, V b) { return a < b ? a : b; }
  static V div(V a, V b) { return a / b; }
  static float hsum(V v) { return v; }
  static float hmax(V v) { return v; }
  static void transpose(V (&)[1]) {}
  static V exp2(V x) { return x <= -127.f ? 0.f : exp2f(x); }
  template <typename T>
  static V load_cvt(const T* p) { return to_f32(*p); }
};
#endif

// Vec: the widest vector of the ISA. VecNarrow: the vector used for panels of <= 8 columns
// (n = 2..8), where a 16-lane vector would spend half its FMAs on padding.
#if PYSPARSE_ISA_LEVEL == 2
using Vec = Vec512;
using VecNarrow = Vec256;
#elif PYSPARSE_ISA_LEVEL == 1
using Vec = Vec256;
using VecNarrow = Vec256;
#else
using VecNarrow = Vec;
#endif
