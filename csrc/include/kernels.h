// Raw-pointer interface between the dispatching code (csrc/cpu/*.cpp, built with the default
// target) and the ISA-specific kernels (csrc/cpu/isa_*.cpp, each built for one instruction set).
// No torch header is included here or in the ISA translation units: an inline torch function
// compiled for AVX-512 in one TU could otherwise be the copy the linker keeps for every caller.
#pragma once
#include <cstdint>

namespace pysparse {
namespace cpu {

// Storage dtypes of values and dense operands. Accumulation is always fp32.
enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2, kNumDTypes = 3 };
// Index dtypes of (row pointers, column indices): both int32, both int64, or int32 row pointers
// with int16 column indices (CSR only, K <= 32768): 6 instead of 8 bytes per fp32 nonzero, which
// is what a memory-bound product (n <= 8, or weights streamed from DRAM) runs at.
enum IType : int { kI32 = 0, kI64 = 1, kI32C16 = 2, kNumITypes = 3 };

// The dense operand after packing: fp32, split into panels of `nb` columns. Element (k, j) of
// panel p sits at b[p * panel_stride + k * ldb + j]; columns past n are zero. The CSR panel
// kernel relies on ldb == nb (the launcher packs whenever that does not already hold).
struct Panels {
  const float* b;
  int64_t ldb;
  int64_t panel_stride;
  int64_t n;   // true number of dense columns
  int nb;      // panel width
};

// Output element (m, j) goes to out[m * out_sm + j * out_sn], in the values' dtype, plus
// bias[m] (same dtype) when bias is not null. spmm: (sm, sn) = (n, 1); linear: (1, M).
// Activation after the bias, the one list of them (names and parsing: activations.h): the
// kernels' epilogue applies ReLU; the CPU launcher runs the others over the finished output
// (vectorised by torch) and passes kActNone down.
enum Activation : int { kActNone = 0, kActRelu = 1, kActGelu = 2, kActSilu = 3, kActGeluTanh = 4 };

struct Output {
  void* out;
  int64_t sm, sn;
  const void* bias;
  int act = kActNone;
};

// The slice plan of a CSR pattern (csrc/cpu/csr_plan.cpp builds it once per pattern): rows in
// chunks of kPlanRows, columns in slices of kPlanCols. A row's nonzeros in one slice are a
// segment (contiguous in the CSR arrays: columns sorted). The segments of chunk c in slice s are
// grouped by length, so a kernel runs each group with one fixed trip count. One int64 array:
//   [0] nchunks, [1] nslices, [2] ngroups, [3] nsegs, then
//   cs    nchunks * nslices + 1  group offsets, chunk-major ((c, s) -> groups [cs[i], cs[i + 1]))
//   glen  ngroups                segment length of each group
//   gseg  ngroups + 1            segment offsets of each group
//   gpos  ngroups                offset of each group's first column in pos
//   seg   nsegs                  (first nonzero << 8) | row within its chunk
//   pos   nnz uint16             the columns, segment after segment in group order (validated
//                                when the plan is made: the kernel reads them unchecked, and
//                                reads the values in place, so a plan outlives value updates)
constexpr int64_t kPlanRows = 64;
constexpr int64_t kPlanCols = 128;  // x 64 tokens x 4 B = 32 KiB: a slice of the panel stays in L1
// The plan's arrays, read where they lie.
struct PlanView {
  int64_t nchunks, nslices;
  const int64_t *cs, *glen, *gseg, *gpos, *seg;
  const uint16_t* pos;
  explicit PlanView(const int64_t* h)
      : nchunks(h[0]), nslices(h[1]), cs(h + 4), glen(cs + h[0] * h[1] + 1), gseg(glen + h[2]),
        gpos(gseg + h[2] + 1), seg(gpos + h[2]), pos(reinterpret_cast<const uint16_t*>(seg + h[3])) {}
};
constexpr int64_t kBitmapMaxTokens = 8;  // tokens the bitmap kernel takes at once (rows of B^T)

struct CsrArgs {
  const void* crow;   // (M + 1)
  const void* col;    // (nnz)
  const void* val;    // (nnz)
  int64_t M, K;
  Panels B;
  Output O;
  // Set to nonzero when an out-of-range column index was seen. The kernel never reads
  // outside B for such an index (it is clamped); the caller turns the flag into an error.
  int* bad_index;
  // The slice plan (layout above) or null. Only where the table's csr_plan is true, for panels
  // of 64 columns.
  const int64_t* plan = nullptr;
  // The column bitmap or null (only where csr_plan is true), for the gemv and for up to
  // kBitmapMaxTokens tokens given as rows (B.b the first token's K floats, B.ldb apart, B.n of
  // them; the launcher's token-row operand): M + 1 int64 row starts (the
  // row pointers when it was made), then M x (K + 15) / 16 uint16 words, row r's bit k (word
  // k / 16, bit k % 16) set where the row holds column k. Validated when made (columns strictly
  // increasing and in range), so the kernel follows it unchecked.
  const int64_t* bitmap = nullptr;
};

struct BsrArgs {
  const void* crow;   // (M / bh + 1)
  const void* col;    // (nnzb), in block units
  const void* val;    // (nnzb, bh, bw), row-major blocks
  int64_t M, K;
  int bh, bw;
  Panels B;
  Output O;
  int* bad_index;
  float* scratch;     // per-task: bh * nb + bh * bw floats (n > 1) or bh floats (n == 1)
};

// N:M semi-structured: in every group of m columns n are kept. Row r's kept values are
// val[r * K/m*n ...] in column order; mask is a bitmap of kept positions, (K + 7) / 8 bytes per row,
// bit j of byte b = column 8 b + j.
constexpr int64_t kNmChunkRows = 32;  // rows whose positions the N:M panel kernel decodes at once
constexpr int64_t kNmTokenSlice = 64;  // tokens per output tile of the token-row kernels
struct NmArgs {
  const void* val;
  const uint8_t* mask;
  int64_t M, K;
  int n, m;
  Panels B;
  Output O;
  int32_t* scratch;   // per task: kNmChunkRows * (K * n / m + 8) decoded column positions
};

struct PackArgs {
  const void* src;     // (K, n) with element strides (sk, sn)
  int64_t K, n, sk, sn;
  float* dst;          // npanels * K * nb floats
  int nb;
};

// Masked attention. q (B, H, Lq, Dk), k (B, Hkv, Lk, Dk), v (B, Hkv, Lk, Dv), out (B, H, Lq, Dv)
// in T, last dim contiguous, the others through the strides (b, h, l). Grouped-query: head h
// reads kv head h / (H / Hkv).
// kind (int8, may be null = every block partial): 0 skip, 1 partial, 2 full for block (qb, kb)
// of bq x bk elements, at kind[b * kind_sb + h * kind_sh + qb * KB + kb].
// On partial blocks key j is allowed for query i iff emask (if any) is nonzero, band_lo <= j - i
// <= band_hi and j < kv_len[b] (if any). bias (fp32, may be null) is added on every visited
// block. Scores are scale * q.k. head_mask (may be null): heads with 0 write zeros. A row with no
// allowed key writes zeros.
// Task t covers kv head (b, hk) = t / parts and part t % parts of its (query head, query block)
// pairs; it packs the key blocks those pairs use into thread-local buffers first.
struct AttnArgs {
  const void *q, *k, *v;
  void* out;
  int64_t B, H, Hkv, Lq, Lk, Dk, Dv;
  int64_t sq[3], sk[3], sv[3], so[3];
  const int8_t* kind;
  int64_t kind_sb, kind_sh, QB, KB, bq, bk;
  const uint8_t* emask;
  int64_t sm[4];
  const float* bias;
  int64_t sbias[4];
  int64_t band_lo, band_hi;
  const int64_t* kv_len;
  float scale;
  const uint8_t* head_mask;
  int64_t parts;
};
using AttnFn = void (*)(const AttnArgs&, int64_t task);
// masked_attention's backward (attention_impl.h), on fp32 q, k, v (f.q/k/v; f.out unused).
// Pass 1, task (b, kv head, part of its (head, query block) pairs) as the forward's: each row's
// lse (log2 units: max + log2 of the sum of exp2; +inf for a row with no allowed key) and delta =
// rowsum(dO * O). Pass 2, task (b, kv head, part kv_parts of its key blocks): dK and dV of those
// blocks (written, each block by one task), dQ summed into the part's own slice of dq.
struct AttnBwdArgs {
  AttnArgs f;
  const float *dout, *out;  // (B, H, Lq, Dv) fp32, strides sdo / sout for dims 0-2
  int64_t sdo[3], sout[3];
  float *lse, *delta;       // (B, H, Lq)
  float* dq;                // (kv_parts, B, H, Lq, ldq), zeroed; ldq >= Dk rounded up to 16
  int64_t ldq;
  float *dk, *dv;           // (B, Hkv, Lk, Dk | Dv), zeroed
  int64_t kv_parts;
};
using AttnBwdFn = void (*)(const AttnBwdArgs&, int64_t task);

// Activation-sparse second product of the fused FFN for one token: acc[c] = sum_i hv[i] *
// w2t[nz[i] * d + c] for the columns c of vector chunks [chunk0, chunk1) (chunks of
// kFfnChunkCols; the last may be partial). w2t (hidden, d) in T, row-major: row j is neuron j's
// output weights, so skipping a zero intermediate entry skips a whole contiguous row.
constexpr int64_t kFfnChunkCols = 64;
struct FfnSkipArgs {
  const void* w2t;
  int64_t d;
  const int32_t* nz;
  const float* hv;
  int64_t nnz;
  float* acc;
};
using FfnSkipFn = void (*)(const FfnSkipArgs&, int64_t chunk0, int64_t chunk1);

// CSR SDDMM (sddmm_impl.h): out[j] += <a row r(j), b row col[j]> for the stored entries of
// rows [row0, row1). a (M, n) and b (K, n) arrive packed as fp32 panels of nb = kSddmmVectors
// vectors of tokens (PackArgs' layout: panel p = rows x nb, token columns past n zero); out
// (nnz) fp32, zeroed by the caller. *bad_index is set for a column index outside [0, K).
constexpr int kSddmmVectors = 4;
struct SddmmArgs {
  const void* crow;
  const void* col;
  const float* a;      // npanels panels of M x nb
  const float* b;      // npanels panels of K x nb
  float* out;
  int64_t M, K, npanels;
  int* bad_index;
  // The pattern's slice plan (layout above), for csr_sddmm_plan, whose row bounds are whole chunks.
  const int64_t* plan = nullptr;
};
using SddmmFn = void (*)(const SddmmArgs&, int64_t row0, int64_t row1);

// dst[0..n) = activation(src[0..n)) in one storage dtype (act_impl.h; src == dst allowed).
using ActFn = void (*)(const void* src, void* dst, int64_t n);

using CsrFn = void (*)(const CsrArgs&, int64_t row0, int64_t row1, int64_t panel0, int64_t panel1);
using BsrFn = void (*)(const BsrArgs&, int64_t brow0, int64_t brow1, int64_t panel0, int64_t panel1);
using NmFn = void (*)(const NmArgs&, int64_t row0, int64_t row1, int64_t panel0, int64_t panel1);
using PackFn = void (*)(const PackArgs&, int64_t panel0, int64_t panel1, int64_t k0, int64_t k1);
// The CSR JIT code (csr_jit.cpp) writes panels [p0, p1) of fp32 sums as (panel, M, 16) in
// scratch; this stores them into O (bias, ReLU, the linear layout's transpose).
using JitStoreFn = void (*)(const Output&, const float* scratch, int64_t M, int64_t p0, int64_t p1, int64_t n);
constexpr int64_t kJitSlice = 768;          // columns of a slice: 16 tokens x 768 x 4 B = 48 KiB of panel
constexpr int64_t kJitPanels = 4;           // panels (of 16 tokens) a thread packs and multiplies at once
constexpr int64_t kJitMaxNnz = 1 << 22;     // larger matrices keep the kernels (code size)

// One table per instruction set. csr/bsr take the panel kernels; the *_gemv entries take the
// n == 1 kernels (B.b is then a contiguous fp32 vector, panels ignored).
struct KernelTable {
  const char* name;
  int (*csr_panel_width)(int64_t n, int64_t K);
  int (*bsr_panel_width)(int64_t n, int64_t K);
  bool csr_plan;  // the CSR panel kernel follows a slice plan (CsrArgs::plan) at nb = 64
  PackFn pack[kNumDTypes];
  CsrFn csr[kNumDTypes][kNumITypes];
  CsrFn csr_gemv[kNumDTypes][kNumITypes];
  BsrFn bsr[kNumDTypes][kNumITypes];
  BsrFn bsr_gemv[kNumDTypes][kNumITypes];
  NmFn nm[kNumDTypes];
  NmFn nm_gemv[kNumDTypes];
  // The token-row kernels: 2:4 with 2 <= n <= nm_token_row_max_n columns of B: B.b = the fp32
  // rows of B^T (B.ldb apart), B.n of them, no panels. Null where the ISA has no such kernel.
  NmFn nm_token_row[kNumDTypes];
  int64_t nm_token_row_max_n;
  // 2:4 from this many columns of B on (INT64_MAX where the ISA has no such kernel): the slice
  // kernel, through nm[] at nb = 64 (4 vectors) with K % 8 == 0.
  int64_t nm_slice_min_n;
  // First row of an N:M bitmap with a group of m columns that does not mark exactly n positions
  // (or with a bit set past column K), or -1.
  int64_t (*nm_bad_row)(const uint8_t* mask, int64_t rows, int64_t K, int n, int m);
  AttnFn attn[kNumDTypes];
  AttnBwdFn attn_bwd_stats, attn_bwd;  // fp32 (the launcher widens 16-bit operands)
  FfnSkipFn ffn_skip[kNumDTypes];
  SddmmFn csr_sddmm[kNumITypes];
  SddmmFn csr_sddmm_plan;  // following SddmmArgs::plan (any index type); null below AVX-512
  int sddmm_panel_width;  // nb of the SDDMM panels: kSddmmVectors vectors of the ISA
  JitStoreFn csr_jit_store;  // null where the ISA cannot run the CSR JIT code (below AVX-512)
  ActFn gelu_tanh[kNumDTypes];
};

const KernelTable& scalar_kernels();
const KernelTable& avx2_kernels();    // only call when the CPU has AVX2 + FMA + F16C
const KernelTable& avx512_kernels();  // only call when the CPU has AVX-512 F/BW/VL + F16C + FMA

}  // namespace cpu
}  // namespace pysparse
