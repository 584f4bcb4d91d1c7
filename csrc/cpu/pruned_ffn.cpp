// CPU implementation of pysparse::pruned_ffn: out = W2 g(x) + b2 with
// g(x) = act(W1 x + b1) [* (W3 x)] [zeroed where |g| <= threshold], every weight dense, CSR, BSR
// or N:M.
//
// Fusion: tokens go through in tiles; a tile's intermediate (tile x hidden, at most kTileBytes)
// is produced and consumed before the next tile starts, so it stays in L3 instead of making a
// round trip through DRAM, and each product
// runs on the kernels of its format (SpMM / N:M for sparse weights, torch's GEMM for dense
// ones), parallel inside. The activation, the gate and the threshold are applied to the tile in
// cache (an N:M product takes a ReLU in its epilogue). Decode-sized tiles with W2 given
// transposed take the activation-sparse path: only the rows of W2^T at nonzero intermediate
// entries are read (ffn_impl.h).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <vector>

#include "checks.h"
#include "spmm_common.h"

namespace pysparse {
namespace cpu {

// A token tile's intermediate is at most kTileBytes (a quarter of this machine's 32 MB L3), in
// multiples of 64 tokens: 64-token tiles for every size re-read the sparse weights and re-packed
// the dense operand per tile, and cost 10-20% at n >= 128 against one pass (MiniLM, BERT CSR).
static constexpr int64_t kTileBytes = 8 << 20;
static constexpr int64_t kSkipMaxTokens = 8;  // beyond this, one GEMM beats per-token row skipping

// One weight in nn.Linear layout (rows = output features) in its format, or W2 transposed.
struct Weight {
  enum Kind { kDense, kDenseT, kSparse } kind = kDense;
  at::Tensor w;        // dense: (rows, cols); dense_t: (cols, rows) contiguous
  SparseOperand sp;
};

static Weight parse_weight(c10::string_view fmt_in, const std::vector<at::Tensor>& ts, int64_t rows,
                           int64_t cols, const char* what, const at::Tensor& x) {
  const std::string fmt(fmt_in);
  Weight w;
  auto want = [&](size_t n) {
    TORCH_CHECK(ts.size() == n, "pysparse: ", what, " in format '", fmt, "' takes ", n, " tensors, got ", ts.size());
    for (const auto& t : ts) check_same_device(x, t, what);
  };
  const std::vector<c10::SymInt> shape{c10::SymInt(rows), c10::SymInt(cols)};
  if (fmt == "dense" || fmt == "dense_t") {
    want(1);
    const bool t = fmt == "dense_t";
    TORCH_CHECK(ts[0].dim() == 2 && ts[0].size(0) == (t ? cols : rows) && ts[0].size(1) == (t ? rows : cols),
                "pysparse: ", what, " must have shape (", t ? cols : rows, ", ", t ? rows : cols, "), got ", ts[0].sizes());
    TORCH_CHECK_TYPE(ts[0].scalar_type() == x.scalar_type(), "pysparse: ", what, " dtype ", ts[0].scalar_type(),
                     " differs from x's dtype ", x.scalar_type());
    w.kind = t ? Weight::kDenseT : Weight::kDense;
    w.w = t ? ts[0].contiguous() : ts[0];
  } else if (fmt == "csr" || fmt == "bsr") {
    want(3);
    w.kind = Weight::kSparse;
    w.sp = fmt == "csr" ? check_csr(ts[0], ts[1], ts[2], shape) : check_bsr(ts[0], ts[1], ts[2], shape);
  } else if (fmt.rfind("nm:", 0) == 0) {
    want(2);
    int n = 0, m = 0, used = 0;  // %n: the whole tag must be read ("nm:2:4:junk" is not 2:4)
    TORCH_CHECK_VALUE(std::sscanf(fmt.c_str(), "nm:%d:%d%n", &n, &m, &used) == 2 && size_t(used) == fmt.size(),
                      "pysparse: ", what, " format '", fmt, "' must read nm:N:M");
    w.kind = Weight::kSparse;
    w.sp = check_nm(ts[0], ts[1], shape, n, m);
  } else {
    TORCH_CHECK(false, "pysparse: ", what, " format must be dense, csr, bsr or nm:N:M, got '", fmt, "'");
  }
  return w;
}

// act(x (tokens, cols) @ W^T + bias). An N:M product takes the activation itself (a ReLU in the
// kernels' epilogue, the others right after, as nm_linear); CSR, BSR and dense get it here.
static at::Tensor apply(const Weight& w, const at::Tensor& x, const std::optional<at::Tensor>& bias,
                        Activation act) {
  if (w.kind == Weight::kSparse) {
    const bool fuse = w.sp.nm();
    at::Tensor y = launch_spmm(w.sp, x, /*linear=*/true, bias, fuse ? act : kActNone);
    if (!fuse) apply_activation(y, act);
    return y;
  }
  at::Tensor y = at::linear(x, w.kind == Weight::kDenseT ? w.w.t() : w.w, bias);
  apply_activation(y, act);
  return y;
}

// out_rows (t, d) = b2 + W2 h for a few tokens, reading only W2^T's rows at nonzero h.
static void skip_second_product(const Weight& w2, const at::Tensor& h, const std::optional<at::Tensor>& b2,
                                at::Tensor out_rows) {
  const int64_t d = w2.w.size(1), hidden = h.size(1);
  const DType dt = value_dtype(h, "x");
  const at::Tensor hf = h.to(at::kFloat).contiguous();
  const at::Tensor b2f = b2 ? b2->to(at::kFloat) : at::Tensor();  // once, not per token
  std::vector<int32_t> nz(static_cast<size_t>(hidden));
  std::vector<float> hv(static_cast<size_t>(hidden)), acc(static_cast<size_t>(d));
  const int64_t chunks = (d + kFfnChunkCols - 1) / kFfnChunkCols;
  const FfnSkipFn fn = active_kernels().ffn_skip[dt];
  for (int64_t t = 0; t < h.size(0); ++t) {
    const float* row = hf.data_ptr<float>() + t * hidden;
    int64_t cnt = 0;
    for (int64_t j = 0; j < hidden; ++j)
      if (row[j] != 0.f) nz[size_t(cnt)] = int32_t(j), hv[size_t(cnt++)] = row[j];
    FfnSkipArgs a{w2.w.data_ptr(), d, nz.data(), hv.data(), cnt, acc.data()};
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) { fn(a, c0, c1); });
    at::Tensor y = at::from_blob(acc.data(), {d}, at::TensorOptions().dtype(at::kFloat));
    if (b2) y = y + b2f;
    out_rows[t].copy_(y);
  }
}

static at::Tensor pruned_ffn(const at::Tensor& x, c10::string_view f1, const std::vector<at::Tensor>& w1s,
                             const std::optional<at::Tensor>& b1, c10::string_view f2,
                             const std::vector<at::Tensor>& w2s, const std::optional<at::Tensor>& b2,
                             c10::string_view f3, const std::vector<at::Tensor>& w3s, int64_t hidden,
                             c10::string_view activation, double threshold) {
  value_dtype(x, "x");
  TORCH_CHECK(x.dim() >= 1, "pysparse: x must have at least 1 dimension");
  const int64_t d = x.size(-1);
  TORCH_CHECK(hidden >= 0, "pysparse: hidden size must be non-negative, got ", hidden);
  const Activation act = parse_activation(activation);
  const Weight w1 = parse_weight(f1, w1s, hidden, d, "w1", x);
  const Weight w2 = parse_weight(f2, w2s, d, hidden, "w2", x);
  TORCH_CHECK(w1.kind != Weight::kDenseT, "pysparse: only w2 may be given transposed (dense_t)");
  const bool gated = f3 != "none";
  Weight w3;
  if (gated) {
    w3 = parse_weight(f3, w3s, hidden, d, "w3", x);
    TORCH_CHECK(w3.kind != Weight::kDenseT, "pysparse: only w2 may be given transposed (dense_t)");
  } else {
    TORCH_CHECK(w3s.empty(), "pysparse: w3 format 'none' takes no tensors, got ", w3s.size());
  }
  for (const auto* b : {&b1, &b2}) {
    if (!*b) continue;
    check_same_device(x, **b, "bias");
    TORCH_CHECK_TYPE((*b)->scalar_type() == x.scalar_type(), "pysparse: bias dtype ", (*b)->scalar_type(),
                     " differs from x's dtype ", x.scalar_type());
  }
  TORCH_CHECK(!b1 || (b1->dim() == 1 && b1->size(0) == hidden), "pysparse: b1 must have shape (", hidden, ")");
  TORCH_CHECK(!b2 || (b2->dim() == 1 && b2->size(0) == d), "pysparse: b2 must have shape (", d, ")");

  int64_t tokens = 1;  // explicit, not -1: d may be 0
  for (int64_t i = 0; i + 1 < x.dim(); ++i) tokens = saturating_mul(tokens, x.size(i));
  checked_numel({tokens, d}, x.element_size(), "the output");
  const at::Tensor x2 = reshape_checked(x, {tokens, d}, "x");
  // All-dense weights run as one tile: torch's GEMM on all tokens beat 64-token tiles here (the
  // intermediate of these sizes stays in L3 either way, and bigger GEMMs block better).
  const bool all_dense = w1.kind == Weight::kDense && w2.kind == Weight::kDense && (!gated || w3.kind == Weight::kDense);
  // (not kTileBytes / (4 hidden): hidden is a declared size, 4 hidden can wrap)
  const int64_t fit = std::max<int64_t>(1, kTileBytes / 4 / std::max<int64_t>(1, hidden) / 64) * 64;
  const int64_t tile = all_dense ? std::max<int64_t>(tokens, 1) : fit;
  checked_numel({std::min(tokens, tile), hidden}, 4, "the intermediate of one token tile");
  auto run_tile = [&](const at::Tensor& xt, std::optional<at::Tensor> out_rows) {
    at::Tensor h = apply(w1, xt, b1, act);
    if (gated) h.mul_(apply(w3, xt, std::nullopt, kActNone));
    if (threshold > 0) h.masked_fill_(h.abs() <= threshold, 0);
    if (w2.kind == Weight::kDenseT && xt.size(0) <= kSkipMaxTokens && hidden > 0) {
      if (!out_rows) out_rows = at::empty({xt.size(0), d}, x.options());
      skip_second_product(w2, h, b2, *out_rows);
      return *out_rows;
    }
    at::Tensor y = apply(w2, h, b2, kActNone);
    if (out_rows) out_rows->copy_(y);
    return y;
  };
  if (tokens <= tile) return run_tile(x2, std::nullopt).reshape(x.sizes());
  at::Tensor out = at::empty({tokens, d}, x.options());
  for (int64_t t0 = 0; t0 < tokens; t0 += tile)
    run_tile(x2.slice(0, t0, std::min(tokens, t0 + tile)), out.slice(0, t0, std::min(tokens, t0 + tile)));
  return out.reshape(x.sizes());
}

TORCH_LIBRARY_IMPL(pysparse, CPU, m) { m.impl("pruned_ffn", &pruned_ffn); }

}  // namespace cpu
}  // namespace pysparse
