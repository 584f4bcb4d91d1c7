#include "spmm_common.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <cstdlib>
#include <mutex>

#include "checks.h"

namespace pysparse {
namespace cpu {

// ---------------------------------------------------------------------------------------------
// ISA selection

static bool cpu_has(const std::string& isa) {
  if (isa == "scalar") return true;
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c") && __builtin_cpu_supports("popcnt") &&
                    __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2");
  if (isa == "avx2") return avx2;
  if (isa == "avx512")
    return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return false;
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> out;
  for (const char* n : {"scalar", "avx2", "avx512"})
    if (cpu_has(n)) out.emplace_back(n);
  return out;
}

static const KernelTable* table_for(const std::string& name) {
  if (name == "scalar") return &scalar_kernels();
  if (name == "avx2") return &avx2_kernels();
  if (name == "avx512") return &avx512_kernels();
  return nullptr;
}

static std::atomic<const KernelTable*> g_table{nullptr};

std::string set_cpu_isa(const std::string& name) {
  std::string pick = name;
  if (pick.empty() || pick == "auto") pick = supported_isas().back();
  TORCH_CHECK(pick == "scalar" || pick == "avx2" || pick == "avx512",
              "pysparse: unknown CPU ISA '", name, "': choose scalar, avx2, avx512 or auto");
  TORCH_CHECK(cpu_has(pick), "pysparse: this CPU does not support the '", pick, "' kernels");
  g_table.store(table_for(pick));
  return pick;
}

const KernelTable& active_kernels() {
  const KernelTable* t = g_table.load();
  if (t) return *t;
  static std::once_flag once;
  std::call_once(once, [] {
    const char* env = std::getenv("PYSPARSE_CPU_ISA");
    set_cpu_isa(env ? env : "auto");
  });
  return *g_table.load();
}

// ---------------------------------------------------------------------------------------------
// Checks

template <typename IT>
static void check_row_pointers(const at::Tensor& crow, int64_t nnz, const char* unit) {
  const IT* p = crow.data_ptr<IT>();
  const int64_t n = crow.numel();
  TORCH_CHECK(p[0] == 0, "pysparse: row pointers must start at 0, got ", int64_t(p[0]));
  TORCH_CHECK(int64_t(p[n - 1]) == nnz, "pysparse: the last row pointer (", int64_t(p[n - 1]),
              ") must equal the number of ", unit, " (", nnz, ")");
  // O(rows): cheap next to the product, and it is what keeps every kernel read in bounds.
  for (int64_t i = 0; i + 1 < n; ++i)
    TORCH_CHECK(p[i] <= p[i + 1], "pysparse: row pointers must be non-decreasing, but entry ",
                i + 1, " (", int64_t(p[i + 1]), ") is below entry ", i, " (", int64_t(p[i]), ")");
}

static void check_common(const at::Tensor& crow, const at::Tensor& col, const at::Tensor& values,
                         c10::SymIntArrayRef shape) {
  check_dim(crow, 1, "crow_indices");
  check_dim(col, 1, "col_indices");
  index_dtype(crow, col);
  value_dtype(values, "values");
  check_same_device(values, crow, "crow_indices");
  check_same_device(values, col, "col_indices");
  TORCH_CHECK(shape.size() == 2, "pysparse: shape must have 2 entries, got ", shape.size());
  TORCH_CHECK(shape[0] >= 0 && shape[1] >= 0, "pysparse: shape must be non-negative, got (",
              shape[0], ", ", shape[1], ")");
  TORCH_CHECK(values.size(0) == col.numel(), "pysparse: values has ", values.size(0),
              " entries but col_indices has ", col.numel());
}

SparseOperand check_csr(const at::Tensor& crow, const at::Tensor& col, const at::Tensor& values,
                        c10::SymIntArrayRef shape) {
  check_dim(values, 1, "CSR values");
  check_common(crow, col, values, shape);
  SparseOperand A;
  A.M = shape[0].expect_int();
  A.K = shape[1].expect_int();
  TORCH_CHECK(crow.numel() == A.M + 1, "pysparse: crow_indices must have rows + 1 = ", A.M + 1,
              " entries, got ", crow.numel());
  A.crow = crow.contiguous();
  A.col = col.contiguous();
  A.values = values.contiguous();
  TORCH_CHECK(col.scalar_type() != at::kShort || A.K <= 32768,
              "pysparse: int16 column indices need at most 32768 columns, the matrix has ", A.K);
  if (A.crow.scalar_type() == at::kInt) check_row_pointers<int32_t>(A.crow, col.numel(), "nonzeros");
  else check_row_pointers<int64_t>(A.crow, col.numel(), "nonzeros");
  return A;
}

SparseOperand check_bsr(const at::Tensor& crow, const at::Tensor& col, const at::Tensor& values,
                        c10::SymIntArrayRef shape) {
  check_dim(values, 3, "BSR values (nnz_blocks, block_rows, block_cols)");
  check_common(crow, col, values, shape);
  SparseOperand A;
  A.M = shape[0].expect_int();
  A.K = shape[1].expect_int();
  A.bh = int(values.size(1));
  A.bw = int(values.size(2));
  A.blocked = true;
  TORCH_CHECK_TYPE(col.scalar_type() != at::kShort,
                   "pysparse: BSR column indices must be int32 or int64, got int16");
  TORCH_CHECK(A.bh > 0 && A.bw > 0, "pysparse: BSR block size must be positive, got (", A.bh,
              ", ", A.bw, ")");
  TORCH_CHECK(A.M % A.bh == 0 && A.K % A.bw == 0, "pysparse: BSR shape (", A.M, ", ", A.K,
              ") is not divisible by the block size (", A.bh, ", ", A.bw, ")");
  TORCH_CHECK(crow.numel() == A.M / A.bh + 1, "pysparse: crow_indices must have block rows + 1 = ",
              A.M / A.bh + 1, " entries, got ", crow.numel());
  A.crow = crow.contiguous();
  A.col = col.contiguous();
  A.values = values.contiguous();
  if (A.crow.scalar_type() == at::kInt) check_row_pointers<int32_t>(A.crow, col.numel(), "blocks");
  else check_row_pointers<int64_t>(A.crow, col.numel(), "blocks");
  return A;
}

SparseOperand check_nm(const at::Tensor& values, const at::Tensor& mask, c10::SymIntArrayRef shape,
                       int64_t n, int64_t m) {
  value_dtype(values, "N:M values");
  SparseOperand A;
  std::tie(A.M, A.K) = check_nm_operand(values, mask, shape, n, m);
  A.n = int(n);
  A.m = int(m);
  A.values = values.contiguous();
  A.mask = mask.contiguous();
  // Every group of m columns must mark exactly n positions, none past column K: the kernels step
  // through the values by the mask, so this keeps their reads in bounds and their sums right.
  const int64_t bad = active_kernels().nm_bad_row(A.mask.data_ptr<uint8_t>(), A.M, A.K, A.n, A.m);
  TORCH_CHECK(bad < 0, "pysparse: N:M mask row ", bad, " has a group of ", m, " columns that does not mark exactly ",
              n, " positions (or marks a column past ", A.K, ")");
  return A;
}

// ---------------------------------------------------------------------------------------------
// Partitioning: split rows (or block rows) into parts of about equal cost, where a row costs its
// nonzeros plus a fixed overhead (loop setup and the epilogue's stores).

template <typename IT>
static std::vector<int64_t> balanced_rows(const at::Tensor& crow, int64_t rows, int64_t parts,
                                          int64_t row_cost, int64_t align) {
  const IT* p = crow.data_ptr<IT>();
  auto cost = [&](int64_t r) { return int64_t(p[r]) + row_cost * r; };
  const int64_t total = cost(rows);
  std::vector<int64_t> b{0};
  for (int64_t i = 1; i < parts; ++i) {
    const int64_t target = total * i / parts;
    int64_t lo = b.back(), hi = rows;
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (cost(mid) < target) lo = mid + 1; else hi = mid;
    }
    lo = std::min(rows, (lo + align - 1) / align * align);
    if (lo > b.back() && lo < rows) b.push_back(lo);
  }
  b.push_back(rows);
  return b;
}

// Below this many multiply-adds a call runs on one thread: an OpenMP fork costs a few us.
static constexpr int64_t kSerialWork = 1 << 15;

at::Tensor launch_spmm(const SparseOperand& A, const at::Tensor& dense, bool linear,
                       const std::optional<at::Tensor>& bias, int act) {
  const DType dt = value_dtype(A.values, "values");
  const IType it = A.nm() ? kI32 : index_dtype(A.crow, A.col);
  check_same_device(A.values, dense, linear ? "input" : "dense");
  TORCH_CHECK_TYPE(dense.scalar_type() == A.values.scalar_type(), "pysparse: ",
                   linear ? "input" : "dense", " dtype ", dense.scalar_type(),
                   " differs from the sparse values' dtype ", A.values.scalar_type());
  const int64_t M = A.M, K = A.K;

  // View the dense operand as B (K, n) with element strides (sk, sn).
  at::Tensor src;
  int64_t n, sk, sn;
  std::vector<int64_t> out_shape;
  if (linear) {
    TORCH_CHECK(dense.dim() >= 1 && dense.size(-1) == K, "pysparse: input's last dimension (",
                dense.dim() ? dense.size(-1) : 0, ") must equal the sparse matrix's columns (", K, ")");
    n = 1;
    for (int64_t d = 0; d + 1 < dense.dim(); ++d) n *= dense.size(d);
    src = dense.dim() == 2 ? dense : dense.reshape({n, K});  // explicit n: K may be 0
    sk = src.stride(1);
    sn = src.stride(0);
    out_shape = dense.sizes().vec();
    out_shape.back() = M;
  } else {
    check_dim(dense, 2, "dense");
    TORCH_CHECK(dense.size(0) == K, "pysparse: dense has ", dense.size(0),
                " rows but the sparse matrix has ", K, " columns");
    src = dense;
    n = dense.size(1);
    sk = dense.stride(0);
    sn = dense.stride(1);
    out_shape = {M, n};
  }
  const at::Tensor* bias_t = nullptr;
  if (bias.has_value()) {
    check_same_device(A.values, *bias, "bias");
    TORCH_CHECK_TYPE(bias->scalar_type() == A.values.scalar_type(), "pysparse: bias dtype ",
                     bias->scalar_type(), " differs from the sparse values' dtype ",
                     A.values.scalar_type());
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == M, "pysparse: bias must have shape (", M,
                "), got ", bias->sizes());
    bias_t = &*bias;
  }
  at::Tensor bias_c = bias_t ? bias_t->contiguous() : at::Tensor();

  at::Tensor out = at::empty({linear ? n : M, linear ? M : n}, A.values.options());
  if (M == 0 || n == 0) return out.reshape(out_shape);
  if (A.values.numel() == 0 || K == 0) {
    TORCH_CHECK(A.values.numel() == 0, "pysparse: a matrix with 0 columns cannot hold nonzeros");
    if (bias_t) out.copy_(linear ? bias_c.unsqueeze(0).expand({n, M}) : bias_c.unsqueeze(1).expand({M, n}));
    else out.zero_();
    if (act == kActRelu) out.clamp_min_(0);
    else if (act == kActGelu) out = at::gelu(out);
    else if (act == kActSilu) out = at::silu(out);
    return out.reshape(out_shape);
  }

  const KernelTable& kt = active_kernels();
  const bool gemv = n == 1;
  // 2:4 where the ISA has the token-row kernel: B^T's rows (fp32, contiguous along K), no panels.
  // In the linear layout these are the input rows as they are; spmm's B (K, n) is transposed.
  const bool small = A.nm() && A.n == 2 && A.m == 4 && n > 1 && K % 32 == 0 && kt.nm_small[dt] != nullptr;
  const int nb = gemv ? 1 : small ? int(n) : (A.blocked ? kt.bsr_panel_width(n, K) : kt.csr_panel_width(n, K));
  const int64_t npanels = (n + nb - 1) / nb;

  // Pack B into fp32 panels unless it already is one contiguous fp32 panel of the right width
  // (a row stride other than nb would make panel rows alias in L1 for n a multiple of 512 B).
  Panels P{};
  P.n = n;
  P.nb = nb;
  at::Tensor packed;
  const bool direct = dt == kF32 && (gemv ? sk == 1 : (sn == 1 && n == nb && sk == nb));
  if (small) {
    const at::Tensor rows = linear ? src : src.t();
    packed = dt == kF32 && rows.stride(1) == 1 ? rows : rows.to(at::kFloat).contiguous();
    P.b = packed.data_ptr<float>();
    P.ldb = packed.stride(0);
    P.panel_stride = 0;
  } else if (direct) {
    P.b = src.data_ptr<float>();
    P.ldb = gemv ? 1 : sk;
    P.panel_stride = 0;
  } else {
    packed = at::empty({npanels * K * nb}, A.values.options().dtype(at::kFloat));
    PackArgs pa{src.data_ptr(), K, n, sk, sn, packed.data_ptr<float>(), nb};
    const PackFn pack = kt.pack[dt];
    constexpr int64_t kChunk = 256;
    const int64_t kchunks = (K + kChunk - 1) / kChunk;
    auto body = [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t p = t / kchunks, k0 = (t % kchunks) * kChunk;
        pack(pa, p, p + 1, k0, std::min(K, k0 + kChunk));
      }
    };
    if (K * n < kSerialWork * 4) body(0, npanels * kchunks);
    else at::parallel_for(0, npanels * kchunks, 1, body);
    P.b = packed.data_ptr<float>();
    P.ldb = nb;
    P.panel_stride = K * nb;
  }

  // ReLU is fused into the kernels' epilogue; gelu and silu run right after on the output (still
  // in cache) with torch's vector kernels: the epilogue's scalar erff made a fused gelu cost 2.4x
  // the product itself (1536x384 2:4, n = 32: 418 against 173 us unfused).
  Output O{out.data_ptr(), linear ? 1 : n, linear ? M : 1, bias_t ? bias_c.data_ptr() : nullptr,
           act == kActRelu ? act : kActNone};

  // Tasks: row parts (nnz-balanced) x panel groups, so a short, wide product still fills threads.
  const int64_t rows = A.blocked ? M / A.bh : M;
  const int64_t nthreads = at::get_num_threads();
  const int64_t nnz_elems = A.values.numel();
  const bool serial = nnz_elems * n < kSerialWork || nthreads == 1;
  // A wide dense operand that dwarfs the sparse matrix (a 1x1 convolution: 25k columns against a
  // few thousand nonzeros) is split by panel groups instead: each thread then reads its own half
  // of the packed operand (the half it packed) rather than every panel, and the small matrix
  // twice. Split by rows otherwise, where the matrix is the bigger stream.
  const int64_t b_bytes = K * n * 4, a_bytes = nnz_elems * int64_t(A.values.element_size() + 4);
  const bool by_panels = !serial && !A.nm() && npanels >= 2 * nthreads && b_bytes > 8 * a_bytes;
  const int64_t want_parts = serial || by_panels ? 1 : std::min<int64_t>(nthreads, std::max<int64_t>(1, rows / 8));
  const int64_t row_cost = A.blocked ? 8 : 2;
  std::vector<int64_t> bounds;
  if (A.nm()) {  // every row holds the same number of values: equal row counts balance
    for (int64_t i = 0; i < want_parts; ++i) bounds.push_back(std::min(rows, (rows * i / want_parts + 15) / 16 * 16));
    bounds.push_back(rows);
    bounds.erase(std::unique(bounds.begin(), bounds.end()), bounds.end());
  } else {
    bounds = it != kI64 ? balanced_rows<int32_t>(A.crow, rows, want_parts, row_cost, A.blocked ? 1 : 8)
                        : balanced_rows<int64_t>(A.crow, rows, want_parts, row_cost, A.blocked ? 1 : 8);
  }
  const int64_t parts = int64_t(bounds.size()) - 1;
  const int64_t groups = serial ? 1 : std::min<int64_t>(npanels, (nthreads + parts - 1) / parts);
  const int64_t ntasks = parts * groups;
  std::vector<int> bad(ntasks, 0);

  auto run_task = [&](int64_t t) {
    const int64_t part = t / groups, g = t % groups;
    const int64_t p0 = npanels * g / groups, p1 = npanels * (g + 1) / groups;
    const int64_t r0 = bounds[part], r1 = bounds[part + 1];
    if (A.nm()) {
      std::vector<int32_t> scratch(size_t(kNmChunkRows) * (K / A.m * A.n + 8));  // decode_row writes 8 ahead
      NmArgs a{A.values.data_ptr(), A.mask.data_ptr<uint8_t>(), M, K, A.n, A.m, P, O, scratch.data()};
      (gemv ? kt.nm_gemv[dt] : small ? kt.nm_small[dt] : kt.nm[dt])(a, r0, r1, p0, p1);
    } else if (A.blocked) {
      std::vector<float> scratch(size_t(A.bh) * (nb + A.bw + 17));
      BsrArgs a{A.crow.data_ptr(), A.col.data_ptr(), A.values.data_ptr(), M, K, A.bh, A.bw,
                P, O, &bad[t], scratch.data()};
      (gemv ? kt.bsr_gemv[dt][it] : kt.bsr[dt][it])(a, r0, r1, p0, p1);
    } else {
      CsrArgs a{A.crow.data_ptr(), A.col.data_ptr(), A.values.data_ptr(), M, K, P, O, &bad[t]};
      (gemv ? kt.csr_gemv[dt][it] : kt.csr[dt][it])(a, r0, r1, p0, p1);
    }
  };
  if (ntasks == 1) run_task(0);
  else at::parallel_for(0, ntasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) run_task(t);
  });
  for (int b : bad)
    TORCH_CHECK(b == 0, "pysparse: a column index is out of range for a matrix with ",
                A.blocked ? K / A.bw : K, A.blocked ? " block columns" : " columns");
  if (act == kActGelu) at::gelu_(out);
  else if (act == kActSilu) at::silu_(out);
  return out.reshape(out_shape);
}

}  // namespace cpu
}  // namespace pysparse
