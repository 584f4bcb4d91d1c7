// N:M SpMM kernels: the row-axpy panel kernel (n > 1), the token-row 2:4 kernel (n > 1, AVX2 and
// AVX-512) and the gemv (n == 1). Mask decoding and the 2:4 index tables: nm_mask.h.
// Part of the per-ISA kernel build: isa_{scalar,avx2,avx512}.cpp include it inside that ISA's
// namespace, after simd.h and in the order they list; no include guard, no torch header
// (kernels.h says why).

// ---------------------------------------------------------------------------------------------
// N:M, n > 1. The bitmap of a row is decoded into column positions (decode_row), then the same
// row-axpy as CSR runs over them: no column index is read from memory, so a 2:4 fp32 row streams
// 4.25 bytes per kept value instead of CSR's 6.
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
  // (7-11% faster than decoding at 4096x4096 fp32, n = 8 and 32). 2:4 takes the token-row kernel
  // (K % 32 == 0) or the slice kernel (K % 8 == 0) instead where the ISA has them (AVX-512: every
  // n > 1; AVX2: n <= 8); 4:8, other patterns, wider AVX2 products and the scalar build run this one.
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

#if PYSPARSE_ISA_LEVEL >= 1
// 2:4, one row times x (n == 1): per step, one register of kept values times x permuted to meet
// them (index24 and gather24, nm_mask.h); two FMA chains.
template <typename T>
static inline float gemv_row_24(const uint8_t* mrow, const T* vrow, int64_t K, const float* x, float* vbuf) {
  auto&& index = index24();
  auto term = [&](const float* f, int64_t k, uint32_t bits) {  // bits: the step's mask, low first
    return std::pair<typename Vec::V, typename Vec::V>(Vec::load(f), gather24(x, k, index(bits)));
  };
  constexpr int64_t kChunk = 512;  // columns per widening chunk of 16-bit values
  // Chunks are summed apart and then added (see flush_row): one fp32 chain over a 2**27-column
  // row of ones stops growing at 2**24.
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
constexpr int64_t kNmTokenRowMaxN = PYSPARSE_ISA_LEVEL == 2 ? INT64_MAX : PYSPARSE_ISA_LEVEL == 1 ? 8 : 0;
// From this many tokens 2:4 on AVX-512 takes the slice kernel below instead: 1.5-2x the
// token-row kernel at 48-1024 tokens, equal at 32, half its speed at 16 (its 64-token panel is
// then mostly padding).
constexpr int64_t kNmSliceMinN = 33;
constexpr int64_t kNmSliceCols = 128;  // columns of a slice of the slice kernel's panel (32 KiB)

#if PYSPARSE_ISA_LEVEL >= 1
// The token-row kernel. 2:4, n >= 2 columns of B taken as rows of B^T (the linear layout's input
// rows), AVX-512 (and, up to kNmTokenRowMaxN tokens, AVX2 at half width: 16 columns a step): the
// n = 1 loop with one accumulator per token. The index vector of 32 columns is built once and
// serves every token, so 16 kept values cost 5 index ops plus, per token, 2 loads, a permute and
// a full-width FMA: ~2.3 instructions per kept value at n = 8 against ~6 for the row-axpy
// (position extract, broadcast, load, half-width FMA), 2x faster at 3072x768. Tokens go in groups
// of NT = 2, 4 or 8 (a group of 16 runs out of general registers for the token pointers and was
// slower than two of 8; n = 2 computed as 4 cost 2x); tokens past n re-read token n - 1's row and
// are dropped. It beats the row-axpy panel kernel at every n measured (up to 512), so 2:4 on
// AVX-512 uses it for 1 < n < kNmSliceMinN (the slice kernel below from there on), 64 tokens per
// output tile: this call computes tokens t0 .. min(t0 + NT, n) into the tile of the slice
// starting at s0.
template <typename T, int NT>
static void nm_token_row_group_24(const NmArgs& a, int64_t m0, int rows, int64_t s0, int64_t t0, int64_t n,
                                  float* tile, float* vbuf, typename Vec::V* part) {
  const int64_t K = a.K, kept = K / 2, mbytes = K / 8, ldx = a.B.ldb;
  auto&& index = index24();
  const float* xt[NT];
  for (int t = 0; t < NT; ++t) xt[t] = a.B.b + (t0 + t < n ? t0 + t : n - 1) * ldx;
  // Column chunks outside, rows inside: a chunk of the tokens (8 x 512 x 4 B = 16 KB) stays in L1
  // for all the block's rows; whole rows at K = 3072 streamed 96 KB of x from L2 per row and ran
  // at half the speed. Partial sums wait in `part` between chunks.
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
        // too few loads in flight to stream W from DRAM (4096x4096 at n = 2 took twice n = 1's
        // time); a prefetch 1 KB ahead keeps the misses going.
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
static void nm_token_row_kernel(const NmArgs& a, int64_t r0, int64_t r1, int64_t, int64_t) {
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
      if (s1 - s0 == 2) nm_token_row_group_24<T, 2>(a, m0, rows, s0, s0, s1, tile, vbuf, part);
      else if (s1 - s0 <= 4) nm_token_row_group_24<T, 4>(a, m0, rows, s0, s0, s1, tile, vbuf, part);
      else
        for (int64_t t0 = s0; t0 < s1; t0 += 8) nm_token_row_group_24<T, 8>(a, m0, rows, s0, t0, s1, tile, vbuf, part);
      store_tile<T>(a.O, tile, int(kNmTokenSlice), m0, rows, s0, int(s1 - s0));
    }
  }
}
#endif

#if PYSPARSE_ISA_LEVEL == 2
// ---------------------------------------------------------------------------------------------
// 2:4, n >= kNmSliceMinN, AVX-512, 64-token panels: the rows of a chunk walk the panel a
// 128-column slice (32 KiB) at a time, so the 4 panel lines each kept value multiplies come from
// L1, not L2 (where the row-axpy's and the token-row kernel's operands live at BERT sizes). A
// 2:4 row holds exactly 64 values per slice, so its loop count is the same everywhere (no
// misprediction per segment, the loss of CSR's K-blocking) and the accumulators' reload is paid
// once per 256 FMAs. Positions come from the mask byte through a table of the 4 kept columns'
// byte offsets into the panel (no decode pass, no index stream: 4.25 bytes per fp32 value).

// Byte offsets of a mask byte's 4 kept columns' lines in a 64-token panel (16 bits: <= 7 x 256).
struct Nm24Offsets {
  uint16_t off[256][4];
  constexpr Nm24Offsets() : off() {
    for (int v = 0; v < 256; ++v)
      for (int b = 0, c = 0; b < 8 && c < 4; ++b)
        if (v >> b & 1) off[v][c++] = uint16_t(b * 64 * 4);
  }
};
static constexpr Nm24Offsets kNm24Offsets{};

// acc (64 floats) += the row's kept values of `bytes` mask bytes (8 columns, 4 values each) times
// the panel lines from bp on. BYTES > 0: that count, unrolled. Forced inline: with 128-row
// chunks gcc made it a call per 64 values (7% of the product at 768x768, n = 512).
template <typename T, int BYTES>
__attribute__((always_inline)) static inline void nm24_segment(const uint8_t* mb, const T* v, int bytes, const char* bp, float* acc) {
  constexpr int W = Vec::W, NV = 4;
  const int nbytes = BYTES > 0 ? BYTES : bytes;
  typename Vec::V s[2][NV];  // two sets: a set's FMA chain waits 4 cycles per value
  for (int q = 0; q < NV; ++q) s[0][q] = s[1][q] = Vec::zero();
#pragma GCC unroll 16
  for (int b = 0; b < nbytes; ++b, bp += 8 * 64 * 4, v += 4) {
    const uint16_t* off = kNm24Offsets.off[mb[b]];
    for (int u = 0; u < 4; ++u) {
      const typename Vec::V w = Vec::set1(to_f32(v[u]));
      const float* line = reinterpret_cast<const float*>(bp + off[u]);
      for (int q = 0; q < NV; ++q) s[u & 1][q] = Vec::fma(w, Vec::load(line + q * W), s[u & 1][q]);
    }
  }
  for (int q = 0; q < NV; ++q) Vec::store(acc + q * W, Vec::add(Vec::load(acc + q * W), Vec::add(s[0][q], s[1][q])));
}

// Every mask byte of a checked 2:4 bitmap marks exactly 4 columns (check_nm tests each group),
// so the values advance by 4 per byte and no offset is read past its table row.
template <typename T>
static void nm_slice_kernel_24(const NmArgs& a, int64_t r0, int64_t r1, int64_t p0, int64_t p1) {
  constexpr int NB = 4 * Vec::W;
  // Rows per chunk: a panel slice is read into L1 once per chunk and per panel, and with many
  // panels (n >= 512) those reads come from L3. 128 rows ran 1.1-1.3x 32 rows there and the
  // same at n = 64 (bench: alternating 16/32/64/128, 3072x768, 768x3072, 4096x4096); their
  // accumulators (32 KiB) are touched once per 256 FMAs and may sit in L2.
  constexpr int64_t kRows = 128, kSliceBytes = kNmSliceCols / 8;
  const int64_t K = a.K, kept = K / 2, mbytes = K / 8;
  const T* val = static_cast<const T*>(a.val);
  std::vector<float> acc_buf(kRows * NB);
  float* acc = acc_buf.data();
  for (int64_t m0 = r0; m0 < r1; m0 += kRows) {
    const int rows = int(r1 - m0 < kRows ? r1 - m0 : kRows);
    for (int64_t p = p0; p < p1; ++p) {
      const char* panel = reinterpret_cast<const char*>(a.B.b + p * a.B.panel_stride);
      const int64_t j0 = p * NB;
      const int cols = int(a.B.n - j0 < NB ? a.B.n - j0 : NB);
      std::memset(acc, 0, sizeof(float) * size_t(rows) * NB);
      for (int64_t b0 = 0; b0 < mbytes; b0 += kSliceBytes) {
        const int bytes = int(mbytes - b0 < kSliceBytes ? mbytes - b0 : kSliceBytes);
        const char* bp = panel + b0 * 8 * NB * 4;
        for (int i = 0; i < rows; ++i) {
          const uint8_t* mb = a.mask + (m0 + i) * mbytes + b0;
          const T* v = val + (m0 + i) * kept + b0 * 4;
          // The next chunk's values, fetched while this one runs (in a model every layer's
          // weights are cold): its row i's segment of this slice, on the first panel.
          if (p == p0 && m0 + kRows + i < r1)
            for (int64_t off = 0; off < bytes * 4 * int64_t(sizeof(T)); off += 64)
              __builtin_prefetch(reinterpret_cast<const char*>(v + kRows * kept) + off);
          if (bytes == kSliceBytes) nm24_segment<T, kSliceBytes>(mb, v, bytes, bp, acc + i * NB);
          else nm24_segment<T, 0>(mb, v, bytes, bp, acc + i * NB);
        }
      }
      for (int i = 0; i < rows; i += 16)
        store_tile<T>(a.O, acc + i * NB, NB, m0 + i, rows - i < 16 ? rows - i : 16, j0, cols);
    }
  }
}
#endif

// N:M, n == 1. 2:4 with K % 32 == 0 on AVX2 and AVX-512: gemv_row_24. Other patterns on AVX-512
// (K % 32 == 0) expand-load a 16-column chunk's kept values to their bitmap positions (zeros
// elsewhere), then one dense FMA with x. 16-bit values are widened to fp32 a chunk at a time
// first. The rest decodes positions and runs the scalar gather loop (gemv_row_scalar).
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
            // DRAM at twice the rate of the masked load.
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
