// CPU implementations of pysparse::nm_compress and pysparse::nm_decompress: dense <-> N:M
// (values in column order + kept-position bitmap, the SparseNM layout). One pass over the dense
// matrix, rows in parallel; works on the raw bits, so any 1-, 2- or 4-byte dtype shares the code.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cstring>

#include "checks.h"

namespace pysparse {
namespace cpu {

template <typename U>
static inline bool is_zero(U bits) {  // +0 and -0 are zero for floats, as `W != 0` says
  if constexpr (sizeof(U) == 1) return bits == 0;
  else if constexpr (sizeof(U) == 2) return (bits & 0x7fffu) == 0;
  else return (bits & 0x7fffffffu) == 0;
}

// Returns the first row holding a group with more than n nonzeros, or -1. Groups with fewer
// keep their nonzeros and then their lowest-indexed zero positions.
template <typename U>
static int64_t compress_rows(const U* src, int64_t R, int64_t K, int n, int m, U* vals, uint8_t* mask) {
  const int64_t kept = K / m * n, mbytes = K / 8 + (K % 8 != 0);
  std::atomic<int64_t> first_bad{R};
  at::parallel_for(0, R, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const U* row = src + r * K;
      U* v = vals + r * kept;
      uint8_t* mk = mask + r * mbytes;
      std::memset(mk, 0, size_t(mbytes));
      for (int64_t g = 0; g < K / m; ++g) {
        const U* grp = row + g * m;
        uint32_t nz = 0;
        for (int j = 0; j < m; ++j) nz |= uint32_t(!is_zero(grp[j])) << j;
        int cnt = __builtin_popcount(nz);
        if (cnt > n) {
          int64_t cur = first_bad.load();
          while (r < cur && !first_bad.compare_exchange_weak(cur, r)) {}
          break;
        }
        uint32_t keep = nz;
        for (int j = 0; cnt < n; ++j)
          if (!(keep >> j & 1)) { keep |= 1u << j; ++cnt; }
        for (int j = 0; j < m; ++j) {
          if (keep >> j & 1) {
            *v++ = grp[j];
            const int64_t c = g * m + j;
            mk[c >> 3] |= uint8_t(1u << (c & 7));
          }
        }
      }
    }
  });
  const int64_t bad = first_bad.load();
  return bad < R ? bad : -1;
}

static std::tuple<at::Tensor, at::Tensor> nm_compress(const at::Tensor& dense, int64_t n, int64_t m) {
  check_nm_compress_input(dense, n, m);
  const int64_t R = dense.size(0), K = dense.size(1);
  const at::Tensor src = contiguous_checked(dense, "dense");
  at::Tensor values = at::empty({R, K / m * n}, dense.options());
  at::Tensor mask = at::empty({R, K / 8 + (K % 8 != 0)}, dense.options().dtype(at::kByte));
  int64_t bad;
  switch (dense.element_size()) {
    case 4: bad = compress_rows((const uint32_t*)src.data_ptr(), R, K, n, m, (uint32_t*)values.data_ptr(), mask.data_ptr<uint8_t>()); break;
    case 2: bad = compress_rows((const uint16_t*)src.data_ptr(), R, K, n, m, (uint16_t*)values.data_ptr(), mask.data_ptr<uint8_t>()); break;
    default: bad = compress_rows((const uint8_t*)src.data_ptr(), R, K, n, m, (uint8_t*)values.data_ptr(), mask.data_ptr<uint8_t>()); break;
  }
  if (bad >= 0) throw_nm_too_many(src, bad, n, m);
  return {values, mask};
}

template <typename U>
static void decompress_rows(const U* vals, const uint8_t* mask, int64_t R, int64_t K, int64_t kept, U* out) {
  const int64_t mbytes = K / 8 + (K % 8 != 0);
  at::parallel_for(0, R, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const U* v = vals + r * kept;
      const U* vend = v + kept;
      U* o = out + r * K;
      std::memset(o, 0, size_t(K) * sizeof(U));
      const uint8_t* mk = mask + r * mbytes;
      for (int64_t c = 0; c < K && v < vend; ++c)
        if (mk[c >> 3] >> (c & 7) & 1) o[c] = *v++;
    }
  });
}

static at::Tensor nm_decompress(const at::Tensor& values, const at::Tensor& mask, c10::SymIntArrayRef shape,
                                int64_t n, int64_t m) {
  const auto [R, K] = check_nm_operand(values, mask, shape, n, m);
  const int64_t kept = K / m * n;
  const at::Tensor v = contiguous_checked(values, "values"), mk = contiguous_checked(mask, "mask");
  checked_numel({R, K}, values.element_size(), "the dense matrix");
  at::Tensor out = at::empty({R, K}, values.options());
  switch (values.element_size()) {  // a bad mask can only misplace values: reads stop at `kept`
    case 8: decompress_rows((const uint64_t*)v.data_ptr(), mk.data_ptr<uint8_t>(), R, K, kept, (uint64_t*)out.data_ptr()); break;
    case 4: decompress_rows((const uint32_t*)v.data_ptr(), mk.data_ptr<uint8_t>(), R, K, kept, (uint32_t*)out.data_ptr()); break;
    case 2: decompress_rows((const uint16_t*)v.data_ptr(), mk.data_ptr<uint8_t>(), R, K, kept, (uint16_t*)out.data_ptr()); break;
    default: decompress_rows((const uint8_t*)v.data_ptr(), mk.data_ptr<uint8_t>(), R, K, kept, (uint8_t*)out.data_ptr()); break;
  }
  return out;
}

TORCH_LIBRARY_IMPL(pysparse, CPU, m) {
  m.impl("nm_compress", &nm_compress);
  m.impl("nm_decompress", &nm_decompress);
}

}  // namespace cpu
}  // namespace pysparse
