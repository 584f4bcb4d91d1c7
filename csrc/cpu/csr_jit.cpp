// Pattern-specific AVX-512 code for CSR products at 16 tokens a panel (fp32). The row-axpy and
// slice-plan kernels spend an index load and a broadcast per nonzero and re-read a panel line per
// nonzero; here the pattern is compiled into the instructions once (csr_jit, remembered like the
// slice plan): per chunk of 28 rows the columns any of its rows holds, in order, each loaded once
// (16 tokens, one zmm) and multiplied into the accumulators (one zmm per row) of the rows holding
// it, the value broadcast straight from the CSR values array (its offset is in the instruction).
// A panel line then feeds 2.8 FMAs at 90% sparsity instead of one, and no index is read. What
// bounds it is the load ports: one broadcast per FMA plus the panel loads. Columns are taken in
// slices (kJitSlice), so a slice of the panel stays near L1 across a chunk's rows; the
// accumulators of a later slice start from the earlier slices' sums.
//
// The code reads the values in place (a layer whose values train keeps its code) and nothing but
// the panels, the values and its scratch: offsets are validated when the code is made (columns in
// [0, K), values below nnz), and the launcher checks the values' count at every call.
#include "spmm_common.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && defined(__linux__)
#include <sys/mman.h>
#define PYSPARSE_HAVE_JIT 1
#else
#define PYSPARSE_HAVE_JIT 0
#endif

#include "jit_x86.h"

namespace pysparse {
namespace cpu {

namespace {

// The code tensor: a header of int64 words, then the code, in one mapping (read + execute).
// header[0] = nslices, [1] = slice width, [2] = nnz the offsets were made for, [3] = M, [4] = K,
// [5 + s] = byte offset of slice s's entry.
constexpr int64_t kHeaderBytes = 256;
// Rows per chunk: zmm0-27 accumulate, zmm28-31 hold panel lines. More rows, fewer panel loads per
// FMA: at 90% sparsity 28 rows ran 1.06-1.18x 16 rows (768x768, 3072x768, 768x3072 at 1024 tokens).
constexpr int kAccs = 28;

using SliceFn = void (*)(const float* panels, const float* values, float* scratch, int64_t npanels);

// Slice s of the code: for each chunk of kAccs rows, for each of npanels panels (rdi, K x 16 fp32
// each, 64 K bytes apart), the accumulators of the chunk's rows (from scratch, or zero for the
// first slice), plus the products of the slice's columns, back to scratch (rdx, M x 16 fp32 per
// panel). rsi: the values.
template <typename RT>
void emit_slice(jit::X86& a, const RT* crow, int64_t M, int64_t K, int64_t s0, int64_t s1,
                bool first, std::vector<std::vector<int64_t>>& chunk_entries) {
  using namespace jit;
  for (int64_t c0 = 0; c0 < M; c0 += kAccs) {
    const int rows = int(std::min<int64_t>(kAccs, M - c0));
    // The chunk's entries (column << 37 | row in chunk << 32 | value index from the chunk's
    // first), sorted by column; those of this slice.
    const std::vector<int64_t>& ent = chunk_entries[size_t(c0 / kAccs)];
    auto lo = std::lower_bound(ent.begin(), ent.end(), s0, [](int64_t e, int64_t k) { return (e >> 37) < k; });
    auto hi = std::lower_bound(lo, ent.end(), s1, [](int64_t e, int64_t k) { return (e >> 37) < k; });
    if (lo == hi && !first) continue;
    const int64_t j0 = int64_t(crow[c0]);
    a.mov(rax, rdi);
    a.mov(r10, rdx);
    a.xor_(r11, r11);
    const size_t loop = a.size();
    a.mov(r8, rax);
    a.lea(r9, rsi, int32_t(j0 * 4));
    for (int i = 0; i < rows; ++i) {
      if (first) a.vzero(i);
      else a.vload(i, r10, int32_t((c0 + i) * 64));
    }
    int64_t kbase = 0;  // r8 = panel + kbase * 64
    int xreg = 0;
    for (auto e = lo; e != hi;) {
      const int64_t k = *e >> 37;
      if ((k - kbase) > 127) a.add(r8, int32_t((k - kbase) * 64)), kbase = k;
      const int x = kAccs + (xreg++ % (32 - kAccs));
      a.vload(x, r8, int32_t((k - kbase) * 64));
      for (; e != hi && (*e >> 37) == k; ++e) {
        const int row = int((*e >> 32) & 31);
        a.vfmadd_bcast(row, x, r9, int32_t((*e & 0xFFFFFFFF) * 4));
      }
    }
    for (int i = 0; i < rows; ++i) a.vstore(r10, int32_t((c0 + i) * 64), i);
    a.add(rax, int32_t(K * 64));
    a.add(r10, int32_t(M * 64));
    a.add(r11, 1);
    a.cmp(r11, rcx);
    a.jb_back(loop);
  }
  a.vzeroupper();
  a.ret();
}

template <typename RT, typename CT>
at::Tensor build(const RT* crow, const CT* col, int64_t M, int64_t K) {
#if PYSPARSE_HAVE_JIT
  const int64_t nnz = int64_t(crow[M]);
  // Offsets in the code are 32-bit: values (4 nnz bytes from one chunk's first), panel and
  // scratch strides (64 K, 64 M); entries pack a column in 27 bits, a row in 5 and a value index
  // in 32.
  // The code takes ~12 bytes per nonzero: kJitMaxNnz bounds it to ~50 MB a matrix.
  if (nnz <= 0 || nnz > kJitMaxNnz || K > (int64_t(1) << 24) || M > (int64_t(1) << 24)) return at::Tensor();
  std::vector<std::vector<int64_t>> chunks(size_t((M + kAccs - 1) / kAccs));
  for (int64_t r = 0; r < M; ++r) {
    auto& ent = chunks[size_t(r / kAccs)];
    for (int64_t j = int64_t(crow[r]), e = int64_t(crow[r + 1]); j < e; ++j) {
      const int64_t k = int64_t(col[j]);
      if (k < 0 || k >= K || j < 0 || j >= nnz) return at::Tensor();
      ent.push_back(k << 37 | (r % kAccs) << 32 | (j - int64_t(crow[r / kAccs * kAccs])));
    }
  }
  for (auto& ent : chunks) std::sort(ent.begin(), ent.end());
  const int64_t nslices = (K + kJitSlice - 1) / kJitSlice;
  const int64_t S = (K + nslices - 1) / nslices;
  jit::X86 a;
  std::vector<int64_t> entry;
  for (int64_t s = 0; s < nslices; ++s) {
    while (a.size() % 64) a.code.push_back(0xCC);
    entry.push_back(int64_t(a.size()));
    emit_slice(a, crow, M, K, s * S, std::min(K, (s + 1) * S), s == 0, chunks);
  }
  const size_t bytes = size_t(kHeaderBytes) + a.size();
  void* mem = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mem == MAP_FAILED) return at::Tensor();
  int64_t* h = static_cast<int64_t*>(mem);
  h[0] = nslices, h[1] = S, h[2] = nnz, h[3] = M, h[4] = K;
  for (int64_t s = 0; s < nslices && 5 + s < kHeaderBytes / 8; ++s) h[5 + s] = kHeaderBytes + entry[size_t(s)];
  std::memcpy(static_cast<char*>(mem) + kHeaderBytes, a.code.data(), a.size());
  if (mprotect(mem, bytes, PROT_READ | PROT_EXEC) != 0) {
    munmap(mem, bytes);
    return at::Tensor();
  }
  return at::from_blob(mem, {int64_t(bytes)}, [bytes](void* p) { munmap(p, bytes); }, at::TensorOptions().dtype(at::kByte));
#else
  (void)crow, (void)col, (void)M, (void)K;
  return at::Tensor();
#endif
}

}  // namespace

at::Tensor build_csr_jit(const SparseOperand& A) {
  // Slices: at most (kHeaderBytes / 8 - 5) of them.
  if ((A.K + kJitSlice - 1) / kJitSlice > kHeaderBytes / 8 - 5) return at::Tensor();
  if (A.crow.scalar_type() == at::kLong) return build(A.crow.data_ptr<int64_t>(), A.col.data_ptr<int64_t>(), A.M, A.K);
  if (A.col.scalar_type() == at::kInt) return build(A.crow.data_ptr<int32_t>(), A.col.data_ptr<int32_t>(), A.M, A.K);
  return build(A.crow.data_ptr<int32_t>(), A.col.data_ptr<int16_t>(), A.M, A.K);
}

void run_csr_jit(const at::Tensor& code, const SparseOperand& A, const PackArgs& src, const Output& O, PackFn pack,
                 JitStoreFn store, int64_t n) {
  const char* base = static_cast<const char*>(code.data_ptr());
  const int64_t* h = reinterpret_cast<const int64_t*>(base);
  const int64_t nslices = h[0], M = A.M, K = A.K;
  const int64_t npanels = (n + 15) / 16;
  const int64_t nthreads = at::get_num_threads();
  const int64_t workers = std::max<int64_t>(1, std::min(nthreads, npanels));
  const int64_t pb = kJitPanels;
  const int64_t floats = pb * (K + M) * 16;
  at::Tensor buf = at::empty({workers * floats}, A.values.options().dtype(at::kFloat));
  const float* values = A.values.data_ptr<float>();
  auto work = [&](int64_t w) {
    float* panels = buf.data_ptr<float>() + w * floats;
    float* scratch = panels + pb * K * 16;
    for (int64_t p = npanels * w / workers, pe = npanels * (w + 1) / workers; p < pe; p += pb) {
      const int64_t cnt = std::min(pb, pe - p);
      PackArgs pa = src;
      pa.src = static_cast<const char*>(src.src) + p * 16 * src.sn * 4;
      pa.n = n - p * 16;
      pa.dst = panels;
      pa.nb = 16;
      pack(pa, 0, cnt, 0, K);
      for (int64_t s = 0; s < nslices; ++s)
        reinterpret_cast<SliceFn>(base + h[5 + s])(panels + 0, values, scratch, cnt);
      store(O, scratch, M, p, p + cnt, n);
    }
  };
  if (workers == 1) return work(0);
  at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) work(w);
  });
}

}  // namespace cpu
}  // namespace pysparse
