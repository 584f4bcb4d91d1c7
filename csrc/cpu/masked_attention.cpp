// CPU implementation of pysparse::masked_attention: checks, then one task per kv head (or part of
// one), handed out dynamically because masked heads and query blocks differ in cost. The kernels
// are in attention_impl.h, compiled per ISA.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <optional>
#include <tuple>
#include <vector>

#include "checks.h"
#include "spmm_common.h"

namespace pysparse {
namespace cpu {

// t broadcast to (B, H, Lq, Lk) by expand (so its broadcast dims get stride 0), or an error
// naming what.
static at::Tensor expand_mask(const at::Tensor& t, int64_t B, int64_t H, int64_t Lq, int64_t Lk, const char* what) {
  TORCH_CHECK(t.dim() == 4, "pysparse: ", what, " must be 4-D (B or 1, H or 1, Lq, Lk), got shape ", t.sizes());
  const int64_t want[4] = {B, H, Lq, Lk};
  for (int d = 0; d < 4; ++d)
    TORCH_CHECK(t.size(d) == want[d] || t.size(d) == 1, "pysparse: ", what, " of shape ", t.sizes(),
                " does not broadcast to (", B, ", ", H, ", ", Lq, ", ", Lk, ")");
  return t.expand({B, H, Lq, Lk});
}

// The checked operands of one call (q, k, v with their last dim contiguous, the masks expanded)
// and the kernel arguments pointing into them; out is left to the caller.
struct Prepared {
  AttnArgs a{};
  DType dt;
  at::Tensor q, k, v, kind, em, bs, kvl, hm;
};

static Prepared prepare(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                        const std::optional<at::Tensor>& block_kind, int64_t block_q, int64_t block_k,
                        const std::optional<at::Tensor>& elem_mask, const std::optional<at::Tensor>& bias,
                        int64_t band_lo, int64_t band_hi, const std::optional<at::Tensor>& kv_len, double scale,
                        const std::optional<at::Tensor>& head_mask) {
  Prepared P;
  check_dim(q_in, 4, "q");
  check_dim(k_in, 4, "k");
  check_dim(v_in, 4, "v");
  const DType dt = P.dt = value_dtype(q_in, "q");
  TORCH_CHECK_TYPE(k_in.scalar_type() == q_in.scalar_type() && v_in.scalar_type() == q_in.scalar_type(),
                   "pysparse: q, k and v must share a dtype, got ", q_in.scalar_type(), ", ",
                   k_in.scalar_type(), " and ", v_in.scalar_type());
  const int64_t B = q_in.size(0), H = q_in.size(1), Lq = q_in.size(2), Dk = q_in.size(3);
  const int64_t Hkv = k_in.size(1), Lk = k_in.size(2), Dv = v_in.size(3);
  TORCH_CHECK(k_in.size(0) == B && v_in.size(0) == B, "pysparse: q, k and v must share the batch size, got ",
              B, ", ", k_in.size(0), " and ", v_in.size(0));
  TORCH_CHECK(k_in.size(3) == Dk, "pysparse: q and k must share the head dim, got ", Dk, " and ", k_in.size(3));
  TORCH_CHECK(v_in.size(1) == Hkv && v_in.size(2) == Lk, "pysparse: k and v must have the same heads and length, got ",
              k_in.sizes(), " and ", v_in.sizes());
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, "pysparse: the ", H, " query heads must be a multiple of the ", Hkv, " key/value heads");
  TORCH_CHECK(block_q > 0 && block_k > 0, "pysparse: block sizes must be positive, got ", block_q, " x ", block_k);
  for (const at::Tensor* t : {&k_in, &v_in}) check_same_device(q_in, *t, "k/v");
  // Only the last dim must be contiguous: (B, L, H, D) tensors transposed to (B, H, L, D) run as is.
  auto last_contig = [](const at::Tensor& t, const char* what) {
    return t.stride(3) == 1 ? t : contiguous_checked(t, what);
  };
  const at::Tensor q = P.q = last_contig(q_in, "q"), k = P.k = last_contig(k_in, "k"), v = P.v = last_contig(v_in, "v");

  // A block longer than its sequence is the whole sequence: the grid is the same, and the tile
  // buffers are sized by the sequence, not by a declared block size (which may be 2**62).
  const int64_t QB = Lq / block_q + (Lq % block_q != 0), KB = Lk / block_k + (Lk % block_k != 0);
  block_q = std::min(block_q, std::max<int64_t>(Lq, 1));
  block_k = std::min(block_k, std::max<int64_t>(Lk, 1));
  AttnArgs& a = P.a;
  at::Tensor &kind = P.kind, &em = P.em, &bs = P.bs, &kvl = P.kvl, &hm = P.hm;
  if (block_kind) {
    kind = *block_kind;
    TORCH_CHECK_TYPE(kind.scalar_type() == at::kChar, "pysparse: block_kind must be int8, got ", kind.scalar_type());
    check_dim(kind, 4, "block_kind");
    TORCH_CHECK((kind.size(0) == B || kind.size(0) == 1) && (kind.size(1) == H || kind.size(1) == 1) &&
                    kind.size(2) == QB && kind.size(3) == KB,
                "pysparse: block_kind must have shape (", B, " or 1, ", H, " or 1, ", QB, ", ", KB, ") for ", Lq, "x", Lk,
                " in ", block_q, "x", block_k, " blocks, got ", kind.sizes());
    check_same_device(q_in, kind, "block_kind");
    kind = kind.contiguous();
    // A kind outside {skip, partial, full} would be read as full: BlockMask.to_dense would say one
    // thing and the kernel do another.
    const int8_t* kp = kind.data_ptr<int8_t>();
    for (int64_t i = 0; i < kind.numel(); ++i)
      TORCH_CHECK_VALUE(kp[i] >= 0 && kp[i] <= 2, "pysparse: block_kind must hold 0 (skip), 1 (partial) or 2 (full), "
                        "got ", int(kp[i]), " at flat index ", i);
    a.kind = kind.data_ptr<int8_t>();
    a.kind_sb = kind.size(0) == 1 ? 0 : kind.stride(0);
    a.kind_sh = kind.size(1) == 1 ? 0 : kind.stride(1);
  }
  if (elem_mask) {
    TORCH_CHECK_TYPE(elem_mask->scalar_type() == at::kBool, "pysparse: elem_mask must be bool, got ", elem_mask->scalar_type());
    check_same_device(q_in, *elem_mask, "elem_mask");
    em = expand_mask(*elem_mask, B, H, Lq, Lk, "elem_mask");
    a.emask = reinterpret_cast<const uint8_t*>(em.data_ptr<bool>());
    for (int d = 0; d < 4; ++d) a.sm[d] = em.stride(d);
  }
  if (bias) {
    TORCH_CHECK_TYPE(at::isFloatingType(bias->scalar_type()), "pysparse: bias must be a float tensor, got ", bias->scalar_type());
    check_same_device(q_in, *bias, "bias");
    if (bias->scalar_type() != at::kFloat) checked_numel({bias->numel()}, 4, "bias as float32");
    bs = expand_mask(bias->to(at::kFloat), B, H, Lq, Lk, "bias");
    a.bias = bs.data_ptr<float>();
    for (int d = 0; d < 4; ++d) a.sbias[d] = bs.stride(d);
  }
  if (kv_len) {
    TORCH_CHECK(kv_len->dim() == 1 && kv_len->size(0) == B, "pysparse: kv_len must have shape (", B, "), got ", kv_len->sizes());
    check_same_device(q_in, *kv_len, "kv_len");
    kvl = kv_len->to(at::kLong).clamp(0, Lk).contiguous();  // any length means the same clamped
    a.kv_len = kvl.data_ptr<int64_t>();
  }
  if (head_mask) {
    TORCH_CHECK(head_mask->dim() == 1 && head_mask->size(0) == H && head_mask->scalar_type() == at::kBool,
                "pysparse: head_mask must be bool of shape (", H, "), got ", head_mask->scalar_type(), " ", head_mask->sizes());
    check_same_device(q_in, *head_mask, "head_mask");
    hm = head_mask->contiguous();
    a.head_mask = reinterpret_cast<const uint8_t*>(hm.data_ptr<bool>());
  }

  a.q = q.data_ptr(), a.k = k.data_ptr(), a.v = v.data_ptr();
  a.B = B, a.H = H, a.Hkv = Hkv, a.Lq = Lq, a.Lk = Lk, a.Dk = Dk, a.Dv = Dv;
  for (int d = 0; d < 3; ++d) a.sq[d] = q.stride(d), a.sk[d] = k.stride(d), a.sv[d] = v.stride(d), a.so[d] = 0;
  a.QB = QB, a.KB = KB, a.bq = block_q, a.bk = block_k;
  // j - i lies in [-(Lq - 1), Lk - 1]: bounds clamped to [-Lq, Lk] allow the same keys, and
  // i + band - j0 + 1 in the kernel cannot wrap (a bound near 2**63 would return wrong rows).
  a.band_lo = std::clamp<int64_t>(band_lo, -Lq, Lk), a.band_hi = std::clamp<int64_t>(band_hi, -Lq, Lk);
  a.scale = float(scale);
  // One task per kv head; a head's query blocks are split into parts when there are too few
  // heads to give every thread a few tasks (each part packs its own copy of the key blocks).
  const int64_t threads = at::get_num_threads(), heads = B * Hkv;
  a.parts = std::max<int64_t>(1, std::min<int64_t>((4 * threads + heads - 1) / heads, (H / Hkv) * QB));
  return P;
}

// Per thread: the packed K^T of one head (key blocks rounded up to 16 floats, the widest vector),
// an fp32 copy of V and a query tile's workspace. Checked before they are allocated: expanded
// q/k/v can declare sizes no memory backs. (Lk, Dv > 0 here, Dk bounded by the first.)
static void check_workspace(const AttnArgs& a) {
  auto round16 = [](int64_t x) { return x > INT64_MAX - 15 ? INT64_MAX : (x + 15) / 16 * 16; };
  checked_numel({a.KB, std::max<int64_t>(a.Dk, 1), round16(a.bk)}, 4, "the packed keys of one head");
  checked_numel({a.Lk, round16(a.Dv)}, 4, "the fp32 values of one head");
  checked_numel({a.bq, a.Dk + round16(a.bk) + round16(a.Dv) + 2}, 4, "one query tile's workspace");
}

// fn(task) for tasks [0, ntasks), handed out dynamically (masked heads and blocks differ in cost).
template <typename Fn>
static void run_tasks(int64_t ntasks, const Fn& fn) {
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), ntasks);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t t; (t = next.fetch_add(1)) < ntasks;) fn(t);
  });
}

static at::Tensor masked_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const std::optional<at::Tensor>& block_kind, int64_t block_q, int64_t block_k,
                                   const std::optional<at::Tensor>& elem_mask, const std::optional<at::Tensor>& bias,
                                   int64_t band_lo, int64_t band_hi, const std::optional<at::Tensor>& kv_len,
                                   double scale, const std::optional<at::Tensor>& head_mask) {
  Prepared P = prepare(q, k, v, block_kind, block_q, block_k, elem_mask, bias, band_lo, band_hi, kv_len, scale, head_mask);
  AttnArgs& a = P.a;
  checked_numel({a.B, a.H, a.Lq, a.Dv}, P.q.element_size(), "the output");
  at::Tensor out = at::empty({a.B, a.H, a.Lq, a.Dv}, P.q.options());
  if (out.numel() == 0) return out;
  if (a.Lk == 0) return out.zero_();
  check_workspace(a);
  a.out = out.data_ptr();
  for (int d = 0; d < 3; ++d) a.so[d] = out.stride(d);
  const AttnFn fn = active_kernels().attn[P.dt];
  run_tasks(a.B * a.Hkv * a.parts, [&](int64_t t) { fn(a, t); });
  return out;
}

// The gradients of masked_attention's output `out` for its gradient `grad` (attention_impl.h:
// attn_bwd_stats, attn_bwd_grads), in fp32 whatever the inputs' dtype (16-bit operands are
// widened first), returned in q's, k's and v's dtypes.
static std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_attention_backward(
    const at::Tensor& grad, const at::Tensor& out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& block_kind, int64_t block_q, int64_t block_k,
    const std::optional<at::Tensor>& elem_mask, const std::optional<at::Tensor>& bias, int64_t band_lo,
    int64_t band_hi, const std::optional<at::Tensor>& kv_len, double scale, const std::optional<at::Tensor>& head_mask) {
  auto f32 = [](const at::Tensor& t) { return t.scalar_type() == at::kFloat ? t : t.to(at::kFloat); };
  Prepared P = prepare(f32(q), f32(k), f32(v), block_kind, block_q, block_k, elem_mask, bias, band_lo, band_hi,
                       kv_len, scale, head_mask);
  const AttnArgs& a = P.a;
  TORCH_CHECK(grad.sizes() == out.sizes() && out.dim() == 4 && out.size(0) == a.B && out.size(1) == a.H &&
                  out.size(2) == a.Lq && out.size(3) == a.Dv,
              "pysparse: masked_attention_backward: grad and out must have the output's shape (", a.B, ", ", a.H,
              ", ", a.Lq, ", ", a.Dv, "), got ", grad.sizes(), " and ", out.sizes());
  check_same_device(q, grad, "grad");
  check_same_device(q, out, "out");
  at::Tensor dk = at::zeros({a.B, a.Hkv, a.Lk, a.Dk}, P.q.options());
  at::Tensor dv = at::zeros({a.B, a.Hkv, a.Lk, a.Dv}, P.q.options());
  if (a.Lq == 0 || a.Lk == 0 || a.B * a.H == 0)
    return {at::zeros_like(q), dk.to(k.scalar_type()), dv.to(v.scalar_type())};
  check_workspace(a);
  // (A gradient expanded from a scalar, as .sum()'s is, has stride 0 everywhere.)
  auto rows_of = [&](const at::Tensor& t) { return t.stride(3) == 1 ? f32(t) : f32(t).contiguous(); };
  const at::Tensor go = rows_of(grad), o = rows_of(out);
  const int64_t dkp = (a.Dk + 15) / 16 * 16;  // dQ rows: whole vectors of any ISA
  // Key-block parts per kv head: enough tasks for every thread, each part summing its own dQ.
  const int64_t threads = at::get_num_threads(), heads = a.B * a.Hkv;
  const int64_t kv_parts = std::max<int64_t>(1, std::min<int64_t>((2 * threads + heads - 1) / heads, a.KB));
  at::Tensor lse = at::empty({a.B, a.H, a.Lq}, P.q.options());
  at::Tensor delta = at::empty({a.B, a.H, a.Lq}, P.q.options());
  at::Tensor dq = at::zeros({kv_parts, a.B, a.H, a.Lq, dkp}, P.q.options());
  AttnBwdArgs g{a, go.data_ptr<float>(), o.data_ptr<float>(), {}, {}, lse.data_ptr<float>(), delta.data_ptr<float>(),
                dq.data_ptr<float>(), dkp, dk.data_ptr<float>(), dv.data_ptr<float>(), kv_parts};
  for (int d = 0; d < 3; ++d) g.sdo[d] = go.stride(d), g.sout[d] = o.stride(d);
  const KernelTable& kt = active_kernels();
  run_tasks(heads * a.parts, [&](int64_t t) { kt.attn_bwd_stats(g, t); });
  run_tasks(heads * kv_parts, [&](int64_t t) { kt.attn_bwd(g, t); });
  at::Tensor dqs = (kv_parts == 1 ? dq[0] : dq.sum(0)).narrow(3, 0, a.Dk);
  return {dqs.to(q.scalar_type()).contiguous(), dk.to(k.scalar_type()), dv.to(v.scalar_type())};
}

TORCH_LIBRARY_IMPL(pysparse, CPU, m) {
  m.impl("masked_attention", &masked_attention);
  m.impl("masked_attention_backward", &masked_attention_backward);
}

}  // namespace cpu
}  // namespace pysparse
