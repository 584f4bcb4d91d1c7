// The plans of a CSR pattern (layouts: kernels.h), made once per pattern and remembered: the
// slice plan, which the AVX-512 CSR panel kernel follows, and the column bitmap, which the
// AVX-512 gemv reads instead of the column indices (csr_impl.h says why each is faster). A plan
// only depends on the pattern (row pointers and columns), not on the values, so a layer whose
// values train keeps its plans.
#include "spmm_common.h"

#include <algorithm>
#include <atomic>
#include <tuple>
#include <vector>

#include "checked_indices.h"

namespace pysparse {
namespace cpu {

// The plan of (crow, col), or an undefined tensor where the pattern has a row whose columns are
// not sorted, or an index out of [0, K) (the row-axpy kernel then reads it and reports it).
// K <= 65536 (csr_plan checks): columns are kept as uint16.
template <typename RT, typename CT>
static at::Tensor build_plan(const RT* crow, const CT* col, int64_t M, int64_t K) {
  const int64_t nchunks = (M + kPlanRows - 1) / kPlanRows, nslices = (K + kPlanCols - 1) / kPlanCols;
  std::vector<int64_t> cs{0}, glen, gseg{0}, gpos, seg;
  std::vector<uint16_t> pos;
  std::vector<std::tuple<int64_t, int64_t, int64_t>> segs;  // (slice, length, seg entry) of a chunk
  for (int64_t c = 0; c < nchunks; ++c) {
    segs.clear();
    for (int64_t r = c * kPlanRows, re = std::min(M, r + kPlanRows); r < re; ++r) {
      int64_t prev = -1;
      for (int64_t j = crow[r], e = crow[r + 1]; j < e;) {
        const int64_t s = int64_t(col[j]) / kPlanCols, start = j;
        for (; j < e && int64_t(col[j]) < (s + 1) * kPlanCols; ++j) {
          const int64_t k = col[j];
          if (k < prev || k < 0 || k >= K) return at::Tensor();
          prev = k;
        }
        segs.emplace_back(s, j - start, (start << 8) | (r - c * kPlanRows));
      }
    }
    std::sort(segs.begin(), segs.end());
    size_t i = 0;
    for (int64_t s = 0; s < nslices; ++s) {
      while (i < segs.size() && std::get<0>(segs[i]) == s) {
        const int64_t len = std::get<1>(segs[i]);
        gpos.push_back(int64_t(pos.size()));
        for (; i < segs.size() && std::get<0>(segs[i]) == s && std::get<1>(segs[i]) == len; ++i) {
          const int64_t e = std::get<2>(segs[i]);
          seg.push_back(e);
          for (int64_t j = e >> 8; j < (e >> 8) + len; ++j) pos.push_back(uint16_t(col[j]));
        }
        glen.push_back(len);
        gseg.push_back(int64_t(seg.size()));
      }
      cs.push_back(int64_t(glen.size()));
    }
  }
  const int64_t words = 4 + int64_t(cs.size() + glen.size() + gseg.size() + gpos.size() + seg.size());
  at::Tensor plan = at::empty({words + (int64_t(pos.size()) + 3) / 4}, at::kLong);
  int64_t* p = plan.data_ptr<int64_t>();
  *p++ = nchunks, *p++ = nslices, *p++ = int64_t(glen.size()), *p++ = int64_t(seg.size());
  for (const auto* v : {&cs, &glen, &gseg, &gpos, &seg}) p = std::copy(v->begin(), v->end(), p);
  std::copy(pos.begin(), pos.end(), reinterpret_cast<uint16_t*>(p));
  return plan;
}

// The column bitmap of (crow, col) (layout: kernels.h). Undefined where a row's columns are not
// strictly increasing (the bitmap cannot say which of two equal columns a value belongs to) or an
// index is outside [0, K). The row starts are kept as they were: a write to crow behind its
// version counter then gives stale numbers, never a read past the values (whose count is the
// columns', which the memo's key fixes).
template <typename RT, typename CT>
static at::Tensor build_bitmap(const RT* crow, const CT* col, int64_t M, int64_t K) {
  const int64_t words = (K + 15) / 16;
  at::Tensor bitmap = at::zeros({M + 1 + (M * words + 3) / 4}, at::kLong);
  int64_t* start = bitmap.data_ptr<int64_t>();
  uint16_t* bits = reinterpret_cast<uint16_t*>(start + M + 1);
  for (int64_t r = 0; r < M; ++r) {
    int64_t prev = -1;
    start[r] = crow[r];
    for (int64_t j = crow[r], e = crow[r + 1]; j < e; ++j) {
      const int64_t k = col[j];
      if (k <= prev || k >= K) return at::Tensor();
      bits[r * words + k / 16] |= uint16_t(1u << (k % 16));
      prev = k;
    }
  }
  start[M] = crow[M];
  return bitmap;
}

// Remembered per pattern (the index tensors, weakly, and their versions: checked_indices.h), so
// an in-place write to the pattern makes a new plan. Inference tensors carry no version counter:
// their products take the row-axpy kernel rather than a plan made on every call.
static std::atomic<int64_t> g_made{0};
static std::atomic<bool> g_enabled{true};
int64_t csr_plans_made() { return g_made.load(); }
bool set_csr_plan(bool enabled) { return g_enabled.exchange(enabled); }

// What build() makes of A's pattern, from `memo` when the pattern is unchanged since it was
// made (an undefined result is remembered too: a pattern that cannot have one is not re-walked).
template <typename Build>
static at::Tensor remembered(CheckedIndices* memo, const SparseOperand& A, const Build& build) {
  if (!g_enabled.load() || A.crow.is_inference() || A.col.is_inference()) return at::Tensor();
  if (auto seen = memo->find(A.crow, A.col, A.K)) return *seen;
  at::Tensor made = build();
  if (made.defined()) ++g_made;
  memo->remember(A.crow, A.col, A.K, made);
  return made;
}

at::Tensor csr_plan(const SparseOperand& A) {
  static auto* memo = new CheckedIndices(1024);
  if (A.K > 65536) return at::Tensor();
  return remembered(memo, A, [&] {
    if (A.crow.scalar_type() == at::kInt && A.col.scalar_type() == at::kInt)
      return build_plan(A.crow.data_ptr<int32_t>(), A.col.data_ptr<int32_t>(), A.M, A.K);
    if (A.crow.scalar_type() == at::kInt && A.col.scalar_type() == at::kShort)
      return build_plan(A.crow.data_ptr<int32_t>(), A.col.data_ptr<int16_t>(), A.M, A.K);
    return at::Tensor();
  });
}

static std::atomic<bool> g_jit{true};
bool set_csr_jit(bool enabled) { return g_jit.exchange(enabled); }

at::Tensor csr_jit(const SparseOperand& A) {
  static auto* memo = new CheckedIndices(256);
  if (!g_jit.load()) return at::Tensor();
  return remembered(memo, A, [&] { return build_csr_jit(A); });
}

at::Tensor csr_bitmap(const SparseOperand& A) {
  static auto* memo = new CheckedIndices(1024);
  return remembered(memo, A, [&] {
    if (A.crow.scalar_type() == at::kLong)
      return build_bitmap(A.crow.data_ptr<int64_t>(), A.col.data_ptr<int64_t>(), A.M, A.K);
    if (A.col.scalar_type() == at::kInt)
      return build_bitmap(A.crow.data_ptr<int32_t>(), A.col.data_ptr<int32_t>(), A.M, A.K);
    return build_bitmap(A.crow.data_ptr<int32_t>(), A.col.data_ptr<int16_t>(), A.M, A.K);
  });
}

}  // namespace cpu
}  // namespace pysparse
