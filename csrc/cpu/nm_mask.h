// N:M bitmaps: decoding a row into column positions, the 2:4 index tables that turn mask bits into
// a permute index (AVX2, AVX-512), and the check that every group marks exactly n positions.
// Part of the per-ISA kernel build: isa_{scalar,avx2,avx512}.cpp include it inside that ISA's
// namespace, after simd.h and in the order they list; no include guard, no torch header
// (kernels.h says why).

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
// 2:4 index tables: index24()(a step's mask bits) is the permute index that puts, beside each kept
// value of the step, the x entry of its column; gather24 applies it (the 2:4 kernels in nm_impl.h).
#if PYSPARSE_ISA_LEVEL == 1
// 2:4 on AVX2 (what a Zen 3 runs), the AVX-512 idea at half width: 16 columns hold 8 kept values;
// each mask byte (8 columns, 4 kept) indexes a table of its 4 positions, the two bytes' entries
// make one 8-lane index, and two one-source permutes of x's two 8-column halves, blended, put x
// beside the 8 values. The position decode + scalar loop it replaced ran at 0.33x dense.
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
// register on Zen 5, 3.4x gemv_row_24's loop time), pick the x entries that meet the kept
// values: 32 columns hold 16 kept values, Index24 gives the column of each, and one two-source
// permute gathers x from the 32 columns in registers.
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
#endif

// ---------------------------------------------------------------------------------------------
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
