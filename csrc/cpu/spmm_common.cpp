#include "spmm_common.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <cstdlib>
#include <functional>
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
  TORCH_CHECK_VALUE(pick == "scalar" || pick == "avx2" || pick == "avx512",
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
    try {
      set_cpu_isa(env ? env : "auto");
    } catch (const c10::Error& e) {  // say where the bad name came from; call_once retries next time
      std::string why = e.msg();
      if (why.rfind("pysparse: ", 0) == 0) why.erase(0, 10);
      TORCH_CHECK_VALUE(false, "pysparse: the environment variable PYSPARSE_CPU_ISA=", env, " is not usable (", why,
                        "); unset it to use the best ISA this CPU has");
    }
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

// values may stand for the operand's dtype and device only (with_entries false: csr_sddmm, whose
// values are its output); otherwise it holds one entry per column index.
static void check_common(const at::Tensor& crow, const at::Tensor& col, const at::Tensor& values,
                         c10::SymIntArrayRef shape, bool with_entries = true) {
  check_dim(crow, 1, "crow_indices");
  check_dim(col, 1, "col_indices");
  index_dtype(crow, col);
  value_dtype(values, "values");
  check_same_device(values, crow, "crow_indices");
  check_same_device(values, col, "col_indices");
  TORCH_CHECK(shape.size() == 2, "pysparse: shape must have 2 entries, got ", shape.size());
  TORCH_CHECK(shape[0] >= 0 && shape[1] >= 0, "pysparse: shape must be non-negative, got (",
              shape[0], ", ", shape[1], ")");
  TORCH_CHECK(!with_entries || values.size(0) == col.numel(), "pysparse: values has ", values.size(0),
              " entries but col_indices has ", col.numel());
}

SparseOperand check_csr(const at::Tensor& crow, const at::Tensor& col, const at::Tensor& values,
                        c10::SymIntArrayRef shape) {
  check_dim(values, 1, "CSR values");
  check_common(crow, col, values, shape);
  SparseOperand A = check_csr_pattern(crow, col, values, shape, /*checked=*/true);
  A.values = contiguous_checked(values, "values");
  return A;
}

SparseOperand check_csr_pattern(const at::Tensor& crow, const at::Tensor& col, const at::Tensor& like,
                                c10::SymIntArrayRef shape, bool checked) {
  if (!checked) check_common(crow, col, like, shape, /*with_entries=*/false);
  SparseOperand A;
  A.M = shape[0].expect_int();
  A.K = shape[1].expect_int();
  // Not A.M + 1 in int64: a declared row count can be INT64_MAX.
  TORCH_CHECK(crow.numel() - 1 == A.M, "pysparse: crow_indices must have rows + 1 = ", uint64_t(A.M) + 1,
              " entries, got ", crow.numel());
  A.crow = contiguous_checked(crow, "crow_indices");
  A.col = contiguous_checked(col, "col_indices");
  A.stable = crow.is_contiguous() && col.is_contiguous();
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
  A.crow = contiguous_checked(crow, "crow_indices");
  A.col = contiguous_checked(col, "col_indices");
  A.values = contiguous_checked(values, "values");
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
  A.values = contiguous_checked(values, "values");
  A.mask = contiguous_checked(mask, "the N:M mask");
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
                       const std::optional<at::Tensor>& bias, Activation act) {
  const DType dt = value_dtype(A.values, "values");
  const IType it = A.nm() ? kI32 : index_dtype(A.crow, A.col);
  check_same_device(A.values, dense, linear ? "input" : "dense");
  TORCH_CHECK_TYPE(dense.scalar_type() == A.values.scalar_type(), "pysparse: ",
                   linear ? "input" : "dense", " dtype ", dense.scalar_type(),
                   " differs from the sparse values' dtype ", A.values.scalar_type());
  const int64_t M = A.M, K = A.K;

  // The dense operand is a batch of nbatch (K, n) operands. Only the spmm layout batches: a 1x1
  // convolution's NCHW input is a batch of (Cin, H*W) images whose products are the NCHW output,
  // written in place. The counts saturate: a batch of empty operands can have any size.
  int64_t n, nbatch = 1;
  std::vector<int64_t> out_shape = dense.sizes().vec();
  if (linear) {
    TORCH_CHECK(dense.dim() >= 1 && dense.size(-1) == K, "pysparse: input's last dimension (",
                dense.dim() ? dense.size(-1) : 0, ") must equal the sparse matrix's columns (", K, ")");
    n = 1;
    for (int64_t d = 0; d + 1 < dense.dim(); ++d) n = saturating_mul(n, dense.size(d));
    out_shape.back() = M;
    checked_numel({n, M}, A.values.element_size(), "the output");
  } else {
    TORCH_CHECK(dense.dim() >= 2, "pysparse: dense must be (K, n) or a batch (..., K, n), got ",
                dense.dim(), "-D");
    TORCH_CHECK(dense.size(-2) == K, "pysparse: dense has ", dense.size(-2),
                " rows but the sparse matrix has ", K, " columns");
    n = dense.size(-1);
    for (int64_t d = 0; d + 2 < dense.dim(); ++d) nbatch = saturating_mul(nbatch, dense.size(d));
    out_shape[out_shape.size() - 2] = M;
    checked_numel({nbatch, M, n}, A.values.element_size(), "the output");
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

  // Returned as allocated (not a reshaped view of it: autograd's fallback for an op without a
  // derivative treats a view output as aliasing, and a later in-place bias add would fail).
  at::Tensor out = at::empty(out_shape, A.values.options());
  if (M == 0 || n == 0 || nbatch == 0) return out;
  if (A.values.numel() == 0 || K == 0) {
    TORCH_CHECK(A.values.numel() == 0, "pysparse: a matrix with 0 columns cannot hold nonzeros");
    if (!bias_t) out.zero_();
    else if (linear) out.view({n, M}).copy_(bias_c.unsqueeze(0).expand({n, M}));
    else out.view({nbatch, M, n}).copy_(bias_c.view({1, M, 1}).expand({nbatch, M, n}));
    apply_activation(out, act);
    return out;
  }
  // B as (nbatch, K, n) with element strides (sb, sk, sn): image b at element offset b * sb.
  const at::Tensor src = linear ? (dense.dim() == 2 ? dense : reshape_checked(dense, {n, K}, "the input"))
                                : (dense.dim() == 3 ? dense : reshape_checked(dense, {nbatch, K, n}, "dense"));
  const int64_t sb = linear ? 0 : src.stride(0), sk = src.stride(1), sn = src.stride(linear ? 0 : 2);

  const KernelTable& kt = active_kernels();
  const int64_t nnz_elems = A.values.numel();
  const int64_t MK = saturating_mul(M, K);
  // CSR fp32 at >= 1024 tokens and 87.5-93.75% sparsity through code compiled for the pattern
  // (csr_jit.cpp). Measured (bench_csr_plan.py --jit-only, two runs, alternating with the JIT off,
  // weights warm and cold): 90% at 1024 tokens 1.05-1.7x warm, 0.84-1.4x cold; at 512 tokens a
  // wash cold (0.87-1.07x), at 128 it lost cold (0.6-0.8x: its code is ~2.7x CSR's bytes); 95%
  // no gain (0.9-1.7x warm, 0.74-1.13x cold); 80%, where the slice plan serves, 0.92-1.02x.
  if (kt.csr_jit_store && !A.nm() && !A.blocked && dt == kF32 && A.stable && n >= 1024 && nbatch == 1 &&
      nnz_elems <= MK / 8 && nnz_elems >= MK / 16 && K <= kJitSlice * 11) {
    const at::Tensor code = csr_jit(A);
    // The code's value offsets were made for nnz values: a shorter values array (a pattern
    // written behind its version counter) must not be read past.
    if (code.defined() && reinterpret_cast<const int64_t*>(code.data_ptr())[2] <= nnz_elems) {
      const Output O{out.data_ptr(), linear ? 1 : n, linear ? M : 1, bias_t ? bias_c.data_ptr() : nullptr,
                     act == kActRelu ? act : kActNone};
      run_csr_jit(code, A, PackArgs{src.data_ptr(), K, n, sk, sn, nullptr, 16}, O, kt.pack[kF32], kt.csr_jit_store, n);
      if (act != kActRelu) apply_activation(out, act);
      return out;
    }
  }
  const bool gemv = n == 1;
  // 2:4 where the ISA has the slice kernel (nm_impl.h), else the token-row kernel.
  const bool nm_slice = A.nm() && A.n == 2 && A.m == 4 && n >= kt.nm_slice_min_n && K % 8 == 0;
  const bool nm_token_row = A.nm() && A.n == 2 && A.m == 4 && n > 1 && n <= kt.nm_token_row_max_n && K % 32 == 0 &&
                            kt.nm_token_row[dt] != nullptr && !nm_slice;
  // CSR at 64-token panels through its slice plan (csr_impl.h: csr_plan_kernel) where a panel
  // outgrows L1 (K > 2 slices) but stays in L2 (K <= 8192), at densities of 12.5% to 5/12 (60%
  // sparsity, with room for rounding), or from 6.25% where K >= 2048 (the row-axpy's panel,
  // >= 512 KiB, then spills furthest). Measured (bench_csr_plan.py): 80% sparsity 1.13-1.62x the
  // row-axpy; 90% 1.10-1.76x at K >= 3072 but 0.95-1.04x at K = 768; 95% 0.87-1.0x (too few
  // nonzeros per slice to pay for reloading the accumulators); 60-70% 1.13-1.67x since segments up
  // to 64 run unrolled (0.94-1.0x with 32).
  const bool plannable = kt.csr_plan && !A.nm() && !A.blocked && it != kI64 && A.stable && !gemv && n > 32 &&
                         K >= 2 * kPlanCols && K <= 8192 && nnz_elems <= MK / 12 * 5 &&
                         (nnz_elems >= MK / 8 || (K >= 2048 && nnz_elems >= MK / 16));
  const at::Tensor plan = plannable ? csr_plan(A) : at::Tensor();
  // CSR at up to kBitmapMaxTokens tokens through the pattern's column bitmap (csr_impl.h:
  // csr_bitmap_rows) from a density of 2/9 on. Measured (bench_csr_plan.py,
  // decode rows), one token against the gathering gemv: 60% sparsity 1.6x, 70% 1.2-1.3x with the
  // weights cold, ~1.05x warm; 80% 1.0x cold, 0.9x warm; 90% 0.5x.
  // More than one token only while their rows fit in L1 (n K <= 8192 floats: every matrix row
  // reads them all; 8 tokens of K = 2048 ran 8x one token's time, 2 tokens 1.0x).
  const bool bitmap_tokens = n == 1 || (n <= kBitmapMaxTokens && n * K <= 8192);
  const at::Tensor bitmap = kt.csr_plan && !A.nm() && !A.blocked && A.stable && bitmap_tokens && K <= 65536 &&
                            nnz_elems >= MK / 9 * 2 ? csr_bitmap(A) : at::Tensor();
  // B^T's rows (fp32, contiguous along K), no panels: 2:4's token-row kernel, and the bitmap's
  // tokens. In the linear layout these are the input rows as they are; spmm's B (K, n) is transposed.
  const bool token_row = nm_token_row || (bitmap.defined() && !gemv);
  const int nb = gemv ? 1 : token_row ? int(n) : plan.defined() || nm_slice ? 64
               : (A.blocked ? kt.bsr_panel_width(n, K) : kt.csr_panel_width(n, K));
  const int64_t npanels = (n + nb - 1) / nb;
  const int64_t esize = A.values.element_size();
  const int64_t rows = A.blocked ? M / A.bh : M;
  const int64_t nthreads = at::get_num_threads();
  // B used as it is: one contiguous fp32 panel of the right width (a row stride other than nb
  // would make panel rows alias in L1 for n a multiple of 512 B), or the vector of a gemv.
  const bool direct = dt == kF32 && (gemv ? sk == 1 : (sn == 1 && n == nb && sk == nb));
  const bool keep_rows = token_row && dt == kF32 && sk == 1;  // B^T's rows as they are
  const bool paneled = !A.nm() && !gemv && !direct && !token_row;  // B packed into panels (CSR, BSR)
  // Floats of one image's whole packed operand (what panels_of fills). Checked: K and n are
  // declared sizes that an operand expanded with stride 0 need not back with memory.
  const int64_t image_floats = token_row ? (keep_rows ? 0 : checked_numel({n, K}, 4, "the transposed input"))
                               : direct ? 0 : checked_numel({npanels, K, nb}, 4, "the packed dense operand");
  // A dense operand that dwarfs the matrix (a 1x1 convolution: 25k columns against a few thousand
  // nonzeros): panels are packed a strip at a time just before all rows multiply them, so they
  // are in L2 when read, and the small matrix is re-read from cache per strip. Otherwise the
  // matrix is the bigger stream: the panels a task multiplies are packed first, and the kernel
  // walks row chunks x panels. (K * n <= image_floats when paneled: no product below wraps.)
  const bool wide = paneled && K * n * 4 > 8 * nnz_elems * (esize + 4);
  // Panels packed at once in the wide case: a strip that stays in L2. Floats of what a thread
  // taking whole images packs at once: a strip when wide.
  const int64_t strip = paneled ? std::max<int64_t>(1, std::min<int64_t>(npanels, (256 << 10) / (K * nb * 4))) : 1;
  const int64_t task_floats = wide ? strip * K * nb : image_floats;

  // ReLU is fused into the kernels' epilogue; the other activations run right after on the output
  // (still in cache) with vector kernels (apply_activation): the epilogue's scalar erff made a
  // fused gelu cost 2.4x the product itself.
  const Output O0{out.data_ptr(), linear ? 1 : n, linear ? M : 1, bias_t ? bias_c.data_ptr() : nullptr,
                  act == kActRelu ? act : kActNone};
  auto output_of = [&](int64_t b, int64_t j0) {  // image b's output from column j0 on
    Output O = O0;
    O.out = static_cast<char*>(O0.out) + (b * M * n + j0 * O0.sn) * esize;
    return O;
  };
  const char* src_base = static_cast<const char*>(src.data_ptr());
  auto image = [&](int64_t b) { return src_base + b * sb * esize; };
  const PackFn pack = kt.pack[dt];

  // Rows [r0, r1) x panels [p0, p1) of B (panels P) into O.
  auto multiply = [&](const Panels& P, const Output& O, int64_t r0, int64_t r1, int64_t p0, int64_t p1, int* bad) {
    if (A.nm()) {
      // Decoded positions (decode_row writes 8 ahead) of a chunk of rows for the panel kernel, of
      // one row for the gemv: a task of one row of 2**26 columns needs no 32 rows of positions.
      std::vector<int32_t> scratch;
      if (!token_row)
        scratch.resize(size_t(checked_numel({gemv ? 1 : std::min(kNmChunkRows, r1 - r0), A.values.size(1) + 8}, 4,
                                            "the decoded N:M positions")));
      NmArgs a{A.values.data_ptr(), A.mask.data_ptr<uint8_t>(), M, K, A.n, A.m, P, O, scratch.data()};
      (gemv ? kt.nm_gemv[dt] : token_row ? kt.nm_token_row[dt] : kt.nm[dt])(a, r0, r1, p0, p1);
    } else if (A.blocked) {
      std::vector<float> scratch(size_t(A.bh) * (P.nb + A.bw + 17));
      BsrArgs a{A.crow.data_ptr(), A.col.data_ptr(), A.values.data_ptr(), M, K, A.bh, A.bw,
                P, O, bad, scratch.data()};
      (gemv ? kt.bsr_gemv[dt][it] : kt.bsr[dt][it])(a, r0, r1, p0, p1);
    } else {
      CsrArgs a{A.crow.data_ptr(), A.col.data_ptr(), A.values.data_ptr(), M, K, P, O, bad,
                plan.defined() ? plan.data_ptr<int64_t>() : nullptr,
                bitmap.defined() ? bitmap.data_ptr<int64_t>() : nullptr};
      (gemv || token_row ? kt.csr_gemv[dt][it] : kt.csr[dt][it])(a, r0, r1, p0, p1);
    }
  };
  // Panels [p0, p1) of image b packed into buf, then all rows times each. The strip is packed
  // row by row across its panels (longer reads of a strided image; see pack_panels) and sized to
  // stay in L2. A narrower last panel gets the narrowest width that holds it (4 columns left of
  // 196 cost 64 otherwise).
  auto strip_product = [&](int64_t b, int64_t p0, int64_t p1, float* buf, int* bad) {
    const int64_t full = std::min(p1, n / nb);  // panels [p0, full) are nb wide
    if (full > p0) {  // as an operand of its own: columns [p0 nb, n) of the image
      const int64_t j0 = p0 * nb;
      pack(PackArgs{image(b) + j0 * sn * esize, K, n - j0, sk, sn, buf, nb}, 0, full - p0, 0, K);
      multiply(Panels{buf, nb, K * nb, n - j0, nb}, output_of(b, j0), 0, rows, 0, full - p0, bad);
    }
    if (full < p1) {
      const int64_t j0 = full * nb, w = n - j0;
      const int wb = A.blocked ? kt.bsr_panel_width(w, K) : kt.csr_panel_width(w, K);
      float* tail = buf + (full - p0) * K * nb;
      pack(PackArgs{image(b) + j0 * sn * esize, K, w, sk, sn, tail, wb}, 0, 1, 0, K);
      multiply(Panels{tail, wb, 0, w, wb}, output_of(b, j0), 0, rows, 0, 1, bad);
    }
  };
  // Image b's B as panels (packed into buf unless used as it is), packing split between threads.
  auto panels_of = [&](int64_t b, float* buf, bool parallel) {
    Panels P{};
    P.n = n;
    P.nb = nb;
    P.b = buf;
    if (token_row) {
      if (keep_rows) {
        P.b = reinterpret_cast<const float*>(image(b));
        P.ldb = sn;
      } else {  // B^T as (n, K) fp32 by ATen's blocked transposing copy (serial in a worker)
        at::from_blob(buf, {n, K}, A.values.options().dtype(at::kFloat)).copy_(linear ? src : src.select(0, b).t());
        P.ldb = K;
      }
    } else if (direct) {
      P.b = reinterpret_cast<const float*>(image(b));
      P.ldb = gemv ? 1 : sk;
    } else {
      const PackArgs pa{image(b), K, n, sk, sn, buf, nb};
      constexpr int64_t kChunk = 256;
      const int64_t kchunks = (K + kChunk - 1) / kChunk;
      auto body = [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t p = t / kchunks, k0 = (t % kchunks) * kChunk;
          pack(pa, p, p + 1, k0, std::min(K, k0 + kChunk));
        }
      };
      if (!parallel || K * n < kSerialWork * 4) pack(pa, 0, npanels, 0, K);  // whole rows at a time
      else at::parallel_for(0, npanels * kchunks, 1, body);
      P.ldb = nb;
      P.panel_stride = K * nb;
    }
    return P;
  };
  // fn(w) for workers w in [0, workers), one per thread; the worker index picks its buffer.
  auto run_workers = [&](int64_t workers, const std::function<void(int64_t)>& fn) {
    if (workers == 1) return fn(0);
    at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
      for (int64_t w = w0; w < w1; ++w) fn(w);
    });
  };
  auto buffer = [&](int64_t count, int64_t floats) {
    const int64_t total = checked_numel({count, floats}, 4, "the packed dense operand (all threads)");
    return at::empty({std::max<int64_t>(1, total)}, A.values.options().dtype(at::kFloat));
  };
  std::vector<int> bad(std::max<int64_t>(nthreads, 1), 0);

  // Whole images, one at a time per thread, while at least one is left per thread: no thread
  // then reads what another packed (on vCPUs that do not share a cache, reading each other's
  // panels made 2 threads slower than 1; this way they ran 2.0x faster). Threads pack into
  // buffers of their own only while these total at most 64 MiB: a batch of big operands on many
  // threads must not multiply the memory.
  const bool serial = saturating_mul(saturating_mul(nnz_elems, n), nbatch) < kSerialWork || nthreads == 1;
  const bool own_buffers = nthreads * task_floats * 4 <= (64 << 20);
  const int64_t whole = serial ? nbatch : own_buffers ? nbatch / nthreads * nthreads : 0;
  if (whole > 0) {
    const int64_t workers = serial ? 1 : nthreads;
    at::Tensor buf = buffer(workers, task_floats);
    run_workers(workers, [&](int64_t w) {
      float* mine = buf.data_ptr<float>() + w * task_floats;
      // a contiguous run of images per thread, as torch splits the batch of the layers around
      for (int64_t b = whole * w / workers, be = whole * (w + 1) / workers; b < be; ++b) {
        if (paneled) {  // a strip at a time if wide, else all panels (narrowed last one)
          const int64_t chunk = wide ? strip : npanels;
          for (int64_t p = 0; p < npanels; p += chunk) strip_product(b, p, std::min(npanels, p + chunk), mine, &bad[w]);
        } else {
          multiply(panels_of(b, mine, false), output_of(b, 0), 0, rows, 0, npanels, &bad[w]);
        }
      }
    });
  }

  // The images left (fewer than the threads: one at batch 1) are each shared by all threads:
  // by panels where there are enough of them and re-reading the matrix per thread is cheap (the
  // wide case, or a matrix that stays in L3), each thread packing and multiplying its own;
  // otherwise by rows. A thread never reads panels another packed unless memory is short: on
  // vCPUs that do not share a cache that made 2 threads slower than 1, and split by panels ran
  // 1.0-1.2x faster than by rows with shared panels even where the cache was shared.
  const bool serial_image = saturating_mul(nnz_elems, n) < kSerialWork;
  const bool matrix_in_cache = nnz_elems * (esize + 4) <= (8 << 20);
  const int64_t per_worker = (npanels + nthreads - 1) / nthreads;  // panels of one worker
  const bool by_panels = paneled && (wide || matrix_in_cache) &&
                         (serial_image ? wide : npanels >= nthreads) &&
                         (wide || nthreads * per_worker * K * nb * 4 <= (64 << 20));
  // The plan and the buffers are the same for every image left: made once.
  if (whole < nbatch && by_panels) {
    // A wide operand goes a strip at a time; otherwise a worker packs its panels at once and the
    // kernel walks its row chunks over them.
    const int64_t workers = serial_image ? 1 : std::min(nthreads, npanels);
    const int64_t chunk = wide ? strip : per_worker;
    const int64_t floats = chunk * K * nb;
    at::Tensor buf = buffer(workers, floats);
    for (int64_t b = whole; b < nbatch; ++b)
      run_workers(workers, [&](int64_t w) {
        for (int64_t p = npanels * w / workers, pe = npanels * (w + 1) / workers; p < pe; p += chunk)
          strip_product(b, p, std::min(pe, p + chunk), buf.data_ptr<float>() + w * floats, &bad[w]);
      });
  } else if (whole < nbatch) {
    // By rows (nnz-balanced parts) x panel groups.
    const int64_t want_parts = serial_image ? 1 : std::min<int64_t>(nthreads, std::max<int64_t>(1, rows / 8));
    std::vector<int64_t> bounds;
    if (A.nm()) {  // every row holds the same number of values: equal row counts balance
      for (int64_t i = 0; i < want_parts; ++i) bounds.push_back(std::min(rows, (rows * i / want_parts + 15) / 16 * 16));
      bounds.push_back(rows);
      bounds.erase(std::unique(bounds.begin(), bounds.end()), bounds.end());
    } else {
      const int64_t row_cost = A.blocked ? 8 : 2, align = A.blocked ? 1 : plan.defined() ? kPlanRows : 8;
      bounds = it != kI64 ? balanced_rows<int32_t>(A.crow, rows, want_parts, row_cost, align)
                          : balanced_rows<int64_t>(A.crow, rows, want_parts, row_cost, align);
    }
    const int64_t parts = int64_t(bounds.size()) - 1;
    if (parts > 1 && image_floats * 4 <= (1 << 20)) {
      // Small panels (at most 1 MiB): each part packs them all itself, up to 1.65x faster than
      // sharing one packing where the cache is not shared and equal where it is; bigger panels
      // packed twice cost up to 1.35x.
      at::Tensor buf = buffer(parts, image_floats);
      for (int64_t b = whole; b < nbatch; ++b)
        run_workers(parts, [&](int64_t w) {
          const Panels P = panels_of(b, buf.data_ptr<float>() + w * image_floats, false);
          multiply(P, output_of(b, 0), bounds[w], bounds[w + 1], 0, npanels, &bad[w]);
        });
    } else {
      // All parts share panels packed first.
      const int64_t groups = serial_image ? 1 : std::min<int64_t>(npanels, (nthreads + parts - 1) / parts);
      const int64_t ntasks = parts * groups;
      at::Tensor buf = buffer(1, image_floats);
      if (int64_t(bad.size()) < ntasks) bad.resize(ntasks, 0);
      for (int64_t b = whole; b < nbatch; ++b) {
        const Panels P = panels_of(b, buf.data_ptr<float>(), !serial_image);
        const Output O = output_of(b, 0);
        run_workers(ntasks, [&](int64_t t) {
          const int64_t part = t / groups, g = t % groups;
          multiply(P, O, bounds[part], bounds[part + 1], npanels * g / groups, npanels * (g + 1) / groups, &bad[t]);
        });
      }
    }
  }
  for (int b : bad)
    TORCH_CHECK(b == 0, "pysparse: a column index is out of range for a matrix with ",
                A.blocked ? K / A.bw : K, A.blocked ? " block columns" : " columns");
  if (act != kActRelu) apply_activation(out, act);
  return out;
}

}  // namespace cpu
}  // namespace pysparse
