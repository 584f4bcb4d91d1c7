"""GPU timings for benchmarks/gpu_check.sh: each GPU path of pysparse against its peers, bf16,
medians of triton.testing.do_bench (CUDA events), correctness checked first. Prints five tables
(2:4 linear, block-sparse attention, the fused FFN, then BSR x dense and CSR x dense, those two in
fp16 and bf16).
Without CUDA it exits, unless given --dry-run: then every table's code runs once on the CPU, the
Triton kernels under TRITON_INTERPRET=1, in fp32 (the interpreter's bf16 tl.dot is wrong), at
small shapes, untimed (every time printed is 1.0) and without the CUDA-only peers: CI runs that
(tests/test_gpu_bench.py) so that the one GPU run is not lost to a broken script."""
from __future__ import annotations

import importlib
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

DRY = "--dry-run" in sys.argv
if DRY:
    # Triton picks its interpreter when a kernel is decorated, i.e. when pysparse's Triton kernels
    # are imported: so triton and pysparse are imported only now, by name.
    os.environ.setdefault("TRITON_INTERPRET", "1")
elif not torch.cuda.is_available():
    sys.exit("gpu_bench.py needs a CUDA GPU (or --dry-run)")
triton = importlib.import_module("triton")
pysparse = importlib.import_module("pysparse")
_triton = importlib.import_module("pysparse._triton")

torch.manual_seed(0)
dev = "cpu" if DRY else "cuda"
BF16 = torch.float32 if DRY else torch.bfloat16
HALVES = (torch.float32,) if DRY else (torch.float16, torch.bfloat16)
rows = []
if DRY:
    print("gpu_bench.py --dry-run: fp32 on the CPU, small shapes, untimed (every time is 1.0)")


def size(n: int) -> int:
    """A dimension of the GPU run, or a 16th of it (at least 64) in the dry run."""
    return max(64, n // 16) if DRY else n


def bench(fn):
    fn()
    if DRY:
        return 1.0
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3  # us


def cusparselt(W):
    """torch's 2:4 path (cuSPARSELt on sm90) or None where torch refuses."""
    try:
        from torch.sparse import to_sparse_semi_structured, SparseSemiStructuredTensor
        SparseSemiStructuredTensor._FORCE_CUTLASS = False
        return to_sparse_semi_structured(W)
    except Exception as e:  # noqa: BLE001 - report, do not fail the table
        print("cuSPARSELt unavailable:", type(e).__name__, str(e).splitlines()[0])
        return None


# 2:4 linear: y = x @ W^T, bf16, decode to prefill token counts.
for R, K in ((size(4096), size(4096)), (size(11008), size(4096))):
    W = pysparse.prune.nm(torch.randn(R, K, device=dev), 2, 4).to(BF16)
    A = pysparse.Sparse24.from_dense(W.cpu()).to(dev)
    Ws = cusparselt(W)
    for T in (1, 8, 64) if DRY else (1, 2, 4, 8, 16, 32, 64, 128, 1024, 4096):
        x = torch.randn(T, K, device=dev, dtype=BF16)
        ref = x.float() @ W.float().T
        y = pysparse.linear(x, A)
        err = ((y.float() - ref).norm() / ref.norm()).item()
        assert err < 1e-2, f"pysparse 2:4 linear off: {err} at {R}x{K} T={T}"
        t_dense = bench(lambda: F.linear(x, W))
        t_ours = bench(lambda: pysparse.linear(x, A))
        t_cslt = None
        if Ws is not None:
            try:
                t_cslt = bench(lambda: F.linear(x, Ws))
            except Exception as e:  # noqa: BLE001
                print(f"cuSPARSELt F.linear failed at T={T}: {type(e).__name__}")
        bytes_moved = A.values.numel() * 2 + A.mask.numel() + x.numel() * 2 + R * T * 2
        path = "cuSPARSELt" if pysparse.ops.uses_cusparselt(x, A) else "Triton"
        rows.append((f"{R}x{K}", T, path, t_ours, t_dense, t_cslt, bytes_moved / t_ours / 1e3))

print("\n| W (bf16, 2:4) | tokens | pysparse.linear path | pysparse us | cuBLAS dense us | torch cuSPARSELt us | x vs dense | x vs cuSPARSELt | GB/s |")
print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
for shape, T, path, t_ours, t_dense, t_cslt, gbs in rows:
    c = f"{t_cslt:.1f}" if t_cslt else "n/a"
    xc = f"{t_cslt / t_ours:.2f}" if t_cslt else "n/a"
    print(f"| {shape} | {T} | {path} | {t_ours:.1f} | {t_dense:.1f} | {c} | {t_dense / t_ours:.2f} | {xc} | {gbs:.0f} |")


# Block-sparse attention: pysparse's Triton kernel (mask blocks = its tiles, skipped blocks never
# visited) against dense SDPA and FlexAttention on the same mask, bf16. The CUDA op runs
# _triton.masked_attention, which is timed as called (block kinds -> active lists included);
# FlexAttention's block mask is built once outside the timing, as its users would.
B, H, L, D = (1, 2, 256, 64) if DRY else (1, 32, 4096, 128)
BQ, BK = 128, 64  # FA2's Hopper tile in Triton; FlexAttention keeps its own 128 x 128 blocks
WINDOW, GLOBAL = (64, 32) if DRY else (256, 128)
NO_BAND = 2**62
flex = torch.compile(flex_attention, dynamic=False)
q, k, v = (torch.randn(B, H, L, D, device=dev, dtype=BF16) for _ in range(3))
scale = D ** -0.5
attn_rows = []


def block_kinds(allowed):
    """(1, 1, L/BQ, L/BK) int8: 2 where the block is all allowed, 0 where none is, 1 otherwise."""
    a = allowed.view(L // BQ, BQ, L // BK, BK)
    every, some = a.all(3).all(1), a.any(3).any(1)
    return torch.where(every, 2, torch.where(some, 1, 0)).to(torch.int8)[None, None]


def attention_row(name, mask_mod, band_lo, band_hi, needs_elem_mask):
    i = torch.arange(L, device=dev)
    allowed = mask_mod(None, None, i[:, None], i[None, :])
    kind = block_kinds(allowed)
    elem = allowed[None, None] if needs_elem_mask else None

    def ours():
        return _triton.masked_attention(q, k, v, kind, BQ, BK, elem, None, band_lo, band_hi, None,
                                        scale, None)

    if name == "causal":
        def sdpa():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        sdpa_kind = "flash, is_causal"
    else:
        def sdpa():
            return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        sdpa_kind = "dense bool mask"
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=allowed)
    rel = lambda x: ((x.float() - ref).norm() / ref.norm()).item()  # noqa: E731
    for what, fn in (("pysparse", ours), ("SDPA", sdpa)):
        err = rel(fn())
        assert err < 1e-2, f"{what} attention off: {err} ({name})"
    t_flex = None
    try:
        if DRY:
            raise RuntimeError("not compiled in the dry run")
        bm = create_block_mask(mask_mod, B=None, H=None, Q_LEN=L, KV_LEN=L, device=dev)

        def flex_fn():
            return flex(q, k, v, block_mask=bm, scale=scale)
        err = rel(flex_fn())
        assert err < 1e-2, f"FlexAttention off: {err} ({name})"
        t_flex = bench(flex_fn)
    except Exception as e:  # noqa: BLE001 - report, do not fail the table
        print(f"FlexAttention failed ({name}):", type(e).__name__, str(e).splitlines()[0])
    t_ours, t_sdpa = bench(ours), bench(sdpa)
    visited = (kind != 0).float().mean().item()
    tflops = 4 * B * H * D * allowed.sum().item() / t_ours / 1e6  # on the allowed pairs only
    attn_rows.append((name, visited, t_ours, t_sdpa, sdpa_kind, t_flex, tflops))


attention_row("causal", lambda b, h, i, j: i >= j, -NO_BAND, 0, False)
attention_row(f"sliding window {WINDOW}", lambda b, h, i, j: (i >= j) & (i - j < WINDOW),
              -(WINDOW - 1), 0, False)
attention_row(f"causal local {WINDOW} + global {GLOBAL}",
              lambda b, h, i, j: (i >= j) & ((i - j < WINDOW) | (j < GLOBAL)), -NO_BAND, 0, True)
t_full = bench(lambda: F.scaled_dot_product_attention(q, k, v))

print(f"\nDense unmasked SDPA (flash) at the same shape: {t_full:.1f} us")
print(f"\n| mask (B={B}, H={H}, L={L}, D={D}, bf16; pysparse tiles {BQ}x{BK}) | blocks visited | pysparse us "
      "| SDPA us | SDPA path | FlexAttention us | x vs SDPA | x vs Flex | pysparse TFLOP/s |")
print("|---|---:|---:|---:|---|---:|---:|---:|---:|")
for name, visited, t_ours, t_sdpa, sdpa_kind, t_flex, tflops in attn_rows:
    fl = f"{t_flex:.1f}" if t_flex else "n/a"
    xf = f"{t_flex / t_ours:.2f}" if t_flex else "n/a"
    print(f"| {name} | {visited:.1%} | {t_ours:.1f} | {t_sdpa:.1f} | {sdpa_kind} | {fl} | "
          f"{t_sdpa / t_ours:.2f} | {xf} | {tflops:.0f} |")


# Fused FFN at decode: pysparse::pruned_ffn's CUDA kernel (the launcher, as the op calls it:
# fp32 accumulator filled with b2, the fused kernel, the cast) against the unfused torch sequence
# on the same (pruned) weights, cuBLAS F.linear -> act [* F.linear] -> F.linear, bf16. Both are
# timed by do_bench, which flushes L2 between calls: the weights come from HBM, as at decode.
# Up to _triton.FFN_MAX_FUSED_TOKENS tokens the launcher runs the fused kernel; this table is
# where that cutoff is read off.
ffn_rows = []
FFN_BLOCKS = (
    ("BERT-base 768->3072 gelu", size(768), size(3072), "gelu", False, "dense"),
    ("LLaMA 2048->5632 silu, gated", size(2048), size(5632), "silu", True, "dense"),
    ("LLaMA 2048->5632 silu, gated", size(2048), size(5632), "silu", True, "2:4"),
)
for name, d, hidden, act, gated, kind in FFN_BLOCKS:
    def weight(R, K):
        W = torch.randn(R, K, device=dev) / K ** 0.5
        return (pysparse.prune.nm(W, 2, 4) if kind == "2:4" else W).to(BF16)

    W1, W2 = weight(hidden, d), weight(d, hidden)
    W3 = weight(hidden, d) if gated else None
    b1 = None if gated else torch.randn(hidden, device=dev, dtype=BF16) * 0.1
    b2 = None if gated else torch.randn(d, device=dev, dtype=BF16) * 0.1

    def packed(W):
        if kind == "dense":
            return "dense", [W]
        A = pysparse.SparseNM.from_dense(W.cpu(), 2, 4).to(dev)
        return "nm:2:4", [A.values, A.mask]

    (f1, w1), (f2, w2) = packed(W1), packed(W2)
    f3, w3 = packed(W3) if gated else ("none", [])
    act_fn = getattr(F, act)
    weight_bytes = sum(t.numel() * t.element_size() for t in w1 + w2 + w3)
    for T in (1, 4, 16, 64):
        x = torch.randn(T, d, device=dev, dtype=BF16)

        def fused():
            return _triton.pruned_ffn(x, f1, w1, b1, f2, w2, b2, f3, w3, hidden, act, 0.0)

        def unfused():
            h = act_fn(F.linear(x, W1, b1))
            if gated:
                h = h * F.linear(x, W3)
            return F.linear(h, W2, b2)

        hf = act_fn(F.linear(x.float(), W1.float(), b1.float() if b1 is not None else None))
        if gated:
            hf = hf * F.linear(x.float(), W3.float())
        ref = F.linear(hf, W2.float(), b2.float() if b2 is not None else None)
        for what, fn in (("pysparse fused FFN", fused), ("unfused torch FFN", unfused)):
            err = ((fn().float() - ref).norm() / ref.norm()).item()
            assert err < 1e-2, f"{what} off: {err} ({name}, {kind}, T={T})"
        path = "fused" if T <= _triton.FFN_MAX_FUSED_TOKENS else "unfused"
        t_ours, t_torch = bench(fused), bench(unfused)
        ffn_rows.append((name, kind, T, path, t_ours, t_torch, weight_bytes / t_ours / 1e3))

print("\n| FFN block (bf16) | weights | tokens | pysparse path | pysparse us | unfused torch (cuBLAS) us "
      "| x vs unfused | weight GB/s |")
print("|---|---|---:|---|---:|---:|---:|---:|")
for name, kind, T, path, t_ours, t_torch, gbs in ffn_rows:
    print(f"| {name} | {kind} | {T} | {path} | {t_ours:.1f} | {t_torch:.1f} | {t_torch / t_ours:.2f} | {gbs:.0f} |")


# BSR x dense: pysparse.spmm on CUDA BSR tensors (pysparse::bsr_spmm's CUDA kernel, the Triton
# kernel of triton_kernels/bsr_spmm.py, timed as the op calls it) against torch's own Triton
# BSR kernel (torch.sparse._triton_ops.bsr_dense_mm, on a torch sparse_bsr tensor of the same
# matrix) and dense cuBLAS on the zero-filled matrix; fp16 and bf16, 90% of the 32x32 blocks zero.
bsr_rows = []
BSR_M, BSR_K, BSR_BLOCK, BSR_SPARSITY = size(4096), size(4096), (32, 32), 0.9
W32 = pysparse.prune.blocks(torch.randn(BSR_M, BSR_K, device=dev), BSR_SPARSITY, blocksize=BSR_BLOCK)
try:
    from torch.sparse._triton_ops import bsr_dense_mm
except Exception as e:  # noqa: BLE001 - report, do not fail the table
    print("torch bsr_dense_mm unavailable:", type(e).__name__, str(e).splitlines()[0])
    bsr_dense_mm = None
for dtype in HALVES:
    Wd = W32.to(dtype)
    A = pysparse.BSR.from_dense(Wd, blocksize=BSR_BLOCK)
    A_torch = None
    if bsr_dense_mm is not None:
        try:
            A_torch = Wd.to_sparse_bsr(BSR_BLOCK)
        except Exception as e:  # noqa: BLE001 - report, do not fail the table
            print(f"torch sparse_bsr tensor failed ({dtype}):", type(e).__name__, str(e).splitlines()[0])
    nnzb = A.values.shape[0]
    for n in (32,) if DRY else (128, 512, 2048):
        X = torch.randn(BSR_K, n, device=dev, dtype=dtype)
        ref = Wd.float() @ X.float()
        rel = lambda y: ((y.float() - ref).norm() / ref.norm()).item()  # noqa: E731
        err = rel(pysparse.spmm(A, X))
        assert err < 1e-2, f"pysparse BSR spmm off: {err} ({dtype}, n={n})"
        t_torch = None
        if A_torch is not None:
            try:
                err = rel(bsr_dense_mm(A_torch, X))
                assert err < 1e-2, f"torch bsr_dense_mm off: {err} ({dtype}, n={n})"
                t_torch = bench(lambda: bsr_dense_mm(A_torch, X))
            except Exception as e:  # noqa: BLE001 - report, do not fail the table
                print(f"torch bsr_dense_mm failed ({dtype}, n={n}):", type(e).__name__, str(e).splitlines()[0])
        t_ours = bench(lambda: pysparse.spmm(A, X))
        t_dense = bench(lambda: Wd @ X)
        tflops = 2 * nnzb * BSR_BLOCK[0] * BSR_BLOCK[1] * n / t_ours / 1e6  # on the stored blocks only
        bsr_rows.append((str(dtype).replace("torch.", ""), n, nnzb, t_ours, t_torch, t_dense, tflops))

print(f"\n| dtype (A {BSR_M}x{BSR_K}, {BSR_BLOCK[0]}x{BSR_BLOCK[1]} blocks, {BSR_SPARSITY:.0%} zero) | n | blocks "
      "| pysparse us | torch bsr_dense_mm us | cuBLAS dense us | x vs torch | x vs dense | pysparse TFLOP/s |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
for dt, n, nnzb, t_ours, t_torch, t_dense, tflops in bsr_rows:
    tt = f"{t_torch:.1f}" if t_torch else "n/a"
    xt = f"{t_torch / t_ours:.2f}" if t_torch else "n/a"
    print(f"| {dt} | {n} | {nnzb} | {t_ours:.1f} | {tt} | {t_dense:.1f} | {xt} | {t_dense / t_ours:.2f} "
          f"| {tflops:.1f} |")

# CSR x dense: pysparse.spmm on CUDA CSR tensors (pysparse::csr_spmm's CUDA kernel,
# csrc/cuda/csr_spmm.cu) against torch.sparse CSR (cuSPARSE) and dense cuBLAS on the same
# matrix; fp16 and bf16, 90% unstructured, 4096x4096. n = 1 and 8 run the narrow kernel (lanes
# split a row's nonzeros), n = 128 a warp per row and 128 columns (4 per lane), n >= 256 256
# columns (8 fp16/bf16 per lane, one 16-byte load).
csr_rows = []
CSR_N = size(4096)
Wu = pysparse.prune.magnitude(torch.randn(CSR_N, CSR_N, device=dev), 0.9)
for dtype in HALVES:
    Wd = Wu.to(dtype)
    A = pysparse.CSR.from_dense(Wd.cpu(), index_dtype=torch.int32).to(dev)
    try:
        A_torch = Wd.to_sparse_csr()
    except Exception as e:  # noqa: BLE001 - report, do not fail the table
        print(f"torch sparse_csr failed ({dtype}):", type(e).__name__, str(e).splitlines()[0])
        A_torch = None
    for n in (1, 8, 128) if DRY else (1, 8, 128, 512, 2048):
        X = torch.randn(CSR_N, n, device=dev, dtype=dtype)
        ref = Wd.float() @ X.float()
        rel = lambda y: ((y.float() - ref).norm() / ref.norm()).item()  # noqa: E731
        err = rel(pysparse.spmm(A, X))
        assert err < 1e-2, f"pysparse CSR spmm off: {err} ({dtype}, n={n})"
        t_torch = None
        if A_torch is not None:
            try:
                assert rel(A_torch @ X) < 1e-2
                t_torch = bench(lambda: A_torch @ X)
            except Exception as e:  # noqa: BLE001 - report, do not fail the table
                print(f"torch.sparse CSR matmul failed ({dtype}, n={n}):", type(e).__name__, str(e).splitlines()[0])
        t_ours = bench(lambda: pysparse.spmm(A, X))
        t_dense = bench(lambda: Wd @ X)
        csr_rows.append((str(dtype).replace("torch.", ""), n, t_ours, t_torch, t_dense))

print(f"\n| dtype (A {CSR_N}x{CSR_N} CSR, 90% zero) | n | pysparse us | torch.sparse (cuSPARSE) us | cuBLAS dense us "
      "| x vs cuSPARSE | x vs dense |")
print("|---|---:|---:|---:|---:|---:|---:|")
for dt, n, t_ours, t_torch, t_dense in csr_rows:
    tt = f"{t_torch:.1f}" if t_torch else "n/a"
    xt = f"{t_torch / t_ours:.2f}" if t_torch else "n/a"
    print(f"| {dt} | {n} | {t_ours:.1f} | {tt} | {t_dense:.1f} | {xt} | {t_dense / t_ours:.2f} |")
