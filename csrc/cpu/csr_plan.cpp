// The slice plan of a CSR pattern (layout: kernels.h), made once per pattern and remembered.
// The AVX-512 CSR panel kernel follows it (csr_impl.h says why it is faster). The plan only
// depends on the pattern (row pointers and columns), not on the values, so a layer whose values
// train keeps its plan.
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

// Remembered per pattern (the index tensors, weakly, and their versions: checked_indices.h), so
// an in-place write to the pattern makes a new plan. Inference tensors carry no version counter:
// their products take the row-axpy kernel rather than a plan made on every call.
static std::atomic<int64_t> g_made{0};
static std::atomic<bool> g_enabled{true};
int64_t csr_plans_made() { return g_made.load(); }
bool set_csr_plan(bool enabled) { return g_enabled.exchange(enabled); }

at::Tensor csr_plan(const SparseOperand& A) {
  static auto* memo = new CheckedIndices(1024);
  if (!g_enabled.load() || A.K > 65536 || A.crow.is_inference() || A.col.is_inference()) return at::Tensor();
  if (auto seen = memo->find(A.crow, A.col, A.K)) return *seen;
  at::Tensor plan;
  if (A.crow.scalar_type() == at::kInt && A.col.scalar_type() == at::kInt)
    plan = build_plan(A.crow.data_ptr<int32_t>(), A.col.data_ptr<int32_t>(), A.M, A.K);
  else if (A.crow.scalar_type() == at::kInt && A.col.scalar_type() == at::kShort)
    plan = build_plan(A.crow.data_ptr<int32_t>(), A.col.data_ptr<int16_t>(), A.M, A.K);
  if (plan.defined()) ++g_made;
  memo->remember(A.crow, A.col, A.K, plan);
  return plan;
}

}  // namespace cpu
}  // namespace pysparse
