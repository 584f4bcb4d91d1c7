"""The child process of the fuzz suite (tests/test_fuzz.py).

It reads one case per line on stdin ({"case": name, "args": {...}}, JSON) and answers one JSON
line: {"status": "ok"}, {"status": "wrong", "msg"} (an answer that disagrees with the reference,
or a valid input refused) or {"status": "error", "type", "msg"} (the case raised). A case that
kills the process (a signal, an abort) ends the pipe instead, and the test that sent it fails
with its arguments, while the suite goes on in a fresh worker.

Every case builds its tensors from its arguments (sizes, a seed), runs pysparse, and checks the
answer against a reference computed independently (dense fp64 math, index gathers for declared
shapes too large to densify). What counts as an acceptable error is judged by the parent.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import sys
import tempfile

import torch
import torch.nn.functional as F

import pysparse
from conftest import TOL, check_close
from references import reference_masked_attention

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


class Refused(AssertionError):
    """A valid input raised: reported as a wrong answer, not as an acceptable error."""


@contextlib.contextmanager
def must_work(what: str):
    try:
        yield
    except Exception as e:  # noqa: BLE001
        raise Refused(f"{what}: valid input refused with {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")


@contextlib.contextmanager
def machine(isa: str, threads: int):
    before = torch.get_num_threads()
    pysparse.set_cpu_isa(isa if isa in pysparse._C.cpu_isa_supported() else "auto")
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
        pysparse.set_cpu_isa("auto")


def close(out, ref, absref, dtype, what):
    msg = check_close(out, ref, absref, dtype)
    if msg:
        raise AssertionError(f"{what}: {msg}")


def operand(shape, dtype, view: str, gen) -> torch.Tensor:
    """A random tensor of `shape` in one of several memory layouts."""
    if view == "expanded" and len(shape) >= 2:  # stride 0 along the first dim
        return torch.randn((1, *shape[1:]), generator=gen).to(dtype).expand(*shape)
    if view == "sliced":
        big = torch.randn((*shape[:-1], 2 * shape[-1] + 1), generator=gen).to(dtype)
        return big[..., 1::2]
    if view == "transposed" and len(shape) >= 2:
        return torch.randn((*shape[:-2], shape[-1], shape[-2]), generator=gen).to(dtype).transpose(-1, -2)
    return torch.randn(shape, generator=gen).to(dtype)


# ---------------------------------------------------------------------------------------------
# Sparse products on valid inputs: every format, dtype, layout, ISA and thread count


def sparse_matrix(fmt, M, K, dt, density, bh, bw, nm, index_dtype, gen):
    """(W dense with its zeros, A in format fmt holding W): random, about `density` kept (blocks
    for BSR), or n:m."""
    W = torch.randn(M, K, generator=gen).to(dt)
    if fmt == "nm":
        W = pysparse.prune.nm(W, *nm)
        return W, pysparse.SparseNM.from_dense(W, *nm)
    keep = torch.rand(M // bh, K // bw, generator=gen) < density
    W = W * keep.repeat_interleave(bh, 0).repeat_interleave(bw, 1).to(dt) if fmt == "bsr" else \
        W * (torch.rand(M, K, generator=gen) < density).to(dt)
    A = pysparse.CSR.from_dense(W, index_dtype=getattr(torch, index_dtype) if index_dtype else None) \
        if fmt == "csr" else pysparse.BSR.from_dense(W, (bh, bw))
    return W, A


def spmm(fmt, M, K, n, batch, dtype, layout, view, bias, act, isa, threads, density, bh, bw, nm, seed, index_dtype):
    gen = torch.Generator().manual_seed(seed)
    dt = DTYPES[dtype]
    W, A = sparse_matrix(fmt, M, K, dt, density, bh, bw, nm, index_dtype, gen)
    shape = (*batch, n, K) if layout == "linear" else (*batch, K, n)
    x = operand(shape, dt, view, gen)
    b = torch.randn(M, generator=gen).to(dt) if bias and layout == "linear" else None
    act = act if fmt == "nm" and layout == "linear" else "none"
    with machine(isa, threads), must_work(f"{fmt} {layout}"):
        out = pysparse.linear(x, A, b, activation=act) if layout == "linear" else pysparse.spmm(A, x)
    Wd, xd = W.double(), x.double()
    if layout == "linear":
        ref, absref = xd @ Wd.T, xd.abs() @ Wd.abs().T
        if b is not None:
            ref, absref = ref + b.double(), absref + b.double().abs()
        if act != "none":
            # gelu and silu run on the output rounded to its dtype; their slope is at most 1.13,
            # so the pre-activation's error (accumulation + one rounding of |pre|) carries over
            t = TOL[dt]
            pre, ref = ref, getattr(F, act)(ref)
            absref = 1.13 * absref + (2 * 1.13 * t.out / t.acc) * pre.abs()
    else:
        ref, absref = Wd @ xd, Wd.abs() @ xd.abs()
    close(out, ref, absref, dt, f"{fmt} {layout} {dtype}")


def grad(fmt, M, K, n, batch, dtype, layout, view, bias, act, isa, threads, density, bh, bw, nm, seed, index_dtype):
    """The backward of the same products (spmm's arguments): gradients w.r.t. the dense operand,
    the stored values and the bias against fp64 dense math on the same pattern."""
    gen = torch.Generator().manual_seed(seed)
    dt = DTYPES[dtype]
    W, A = sparse_matrix(fmt, M, K, dt, density, bh, bw, nm, index_dtype, gen)
    shape = (*batch, n, K) if layout == "linear" else (*batch, K, n)
    x = operand(shape, dt, view, gen).requires_grad_()
    b = torch.randn(M, generator=gen).to(dt).requires_grad_() if bias and layout == "linear" else None
    act = act if fmt == "nm" and layout == "linear" else "none"
    A.values.requires_grad_()
    with machine(isa, threads), must_work(f"{fmt} {layout} backward"):
        out = pysparse.linear(x, A, b, activation=act) if layout == "linear" else pysparse.spmm(A, x)
        g = torch.randn(out.shape, generator=gen).to(dt)
        out.backward(g)
    Wd = W.double().requires_grad_()
    xd = x.detach().double().requires_grad_()
    bd = None if b is None else b.detach().double().requires_grad_()
    ref = F.linear(xd, Wd, bd) if layout == "linear" else Wd @ xd
    pysparse.activations.apply(act, ref).backward(g.double())
    gs, rounding = g.double().abs(), 1.0
    if act not in ("none", "relu"):  # z and act'(z) g rounded to the dtype (see test_backward_bsr_nm)
        gs = gs * (1 + F.linear(xd.detach().abs(), Wd.detach().abs(), None if bd is None else bd.detach().abs()))
        rounding = max(1.0, 2 * TOL[dt].out / TOL[dt].acc)
    Wa, xa = W.double().abs(), x.detach().double().abs()
    T = math.prod(x.shape[:-1]) if layout == "linear" else math.prod(x.shape[:-2])
    if layout == "linear":
        adx, adW = (gs.reshape(T, M) @ Wa).reshape(x.shape), gs.reshape(T, M).t() @ xa.reshape(T, K)
    else:
        adx, adW = Wa.t() @ gs, (gs @ xa.transpose(-1, -2)).reshape(T, M, K).sum(0)
    close(x.grad, xd.grad, adx * rounding, dt, f"{fmt} {layout} {dtype} dx")
    if fmt == "nm":
        pick = A.kept_mask()
        got = A.values.grad.reshape(-1)
    elif fmt == "bsr":
        # the dense gradient at each stored block, in the blocks' order
        rows = torch.repeat_interleave(torch.arange(M // bh), A.crow_indices.diff().long())

        def pick_blocks(t):
            return t.reshape(M // bh, bh, K // bw, bw).transpose(1, 2)[rows, A.col_indices.long()].reshape(-1)
        got = A.values.grad.reshape(-1)
        close(got, pick_blocks(Wd.grad), pick_blocks(adW) * rounding, dt, f"{fmt} {layout} {dtype} dvalues")
        pick = None
    else:
        rows = torch.repeat_interleave(torch.arange(M), A.crow_indices.diff().long())
        got = A.values.grad
        pick = (rows, A.col_indices.long())
    if pick is not None:
        close(got, Wd.grad[pick], adW[pick] * rounding, dt, f"{fmt} {layout} {dtype} dvalues")
    if b is not None:
        close(b.grad, bd.grad, gs.reshape(T, M).sum(0) * rounding, dt, f"{fmt} {dtype} dbias")


def sddmm_raw(M, K, crow, col, col16, ta, tb, n, transposed, isa, threads, seed):
    """csr_sddmm on raw indices and operands of any shape: refused, or <a row, b row> at each
    stored (row, col)."""
    gen = torch.Generator().manual_seed(seed)
    if col16:
        crow = [max(-2 ** 31, min(2 ** 31 - 1, c)) for c in crow]
    crow_t = torch.tensor(crow, dtype=torch.int32 if col16 else torch.int64)
    col_t = torch.tensor(col, dtype=torch.int64)
    if col16:
        col_t = col_t.clamp(-2 ** 15, 2 ** 15 - 1).to(torch.int16)
    a = torch.randn((n, ta) if transposed else (ta, n), generator=gen)
    b = torch.randn((n, tb) if transposed else (tb, n), generator=gen)
    if transposed:
        a, b = a.t(), b.t()
    valid = (len(crow) == M + 1 and crow[0] == 0 and crow[-1] == len(col)
             and all(p <= q for p, q in zip(crow, crow[1:])) and all(0 <= c < K for c in col_t.tolist())
             and ta == M and tb == K)
    with machine(isa, threads):
        if valid:
            with must_work("csr_sddmm"):
                out = torch.ops.pysparse.csr_sddmm(crow_t, col_t, [M, K], a, b)
        else:
            torch.ops.pysparse.csr_sddmm(crow_t, col_t, [M, K], a, b)
            raise AssertionError(f"csr_sddmm: invalid input accepted (crow {crow}, col {col}, a {ta}, b {tb})")
    rows = torch.repeat_interleave(torch.arange(M), torch.diff(torch.tensor(crow, dtype=torch.int64)))
    ad, bd = a.double(), b.double()
    ref = (ad[rows] * bd[col_t.long()]).sum(1)
    absref = (ad[rows].abs() * bd[col_t.long()].abs()).sum(1)
    close(out, ref, absref, torch.float32, "csr_sddmm")


def transpose_values_raw(nv, dst, src, dtype, seed):
    """csr_transpose_values on a raw order: refused, or out[dst[i]] = values[src[i]] in order (the
    positions no dst names 0)."""
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(nv, generator=gen).to(getattr(torch, dtype))
    order = torch.tensor([dst, src], dtype=torch.int32).reshape(2, len(dst))
    if all(0 <= d < len(dst) for d in dst) and all(0 <= s < nv for s in src):
        with must_work("csr_transpose_values"):
            out = torch.ops.pysparse.csr_transpose_values(values, order)
        ref = torch.zeros(len(dst), dtype=values.dtype)
        for d, s in zip(dst, src):
            ref[d] = values[s]
        assert torch.equal(out, ref), f"csr_transpose_values: {out} != {ref}"
    else:
        torch.ops.pysparse.csr_transpose_values(values, order)
        raise AssertionError(f"csr_transpose_values: invalid order accepted (dst {dst}, src {src}, {nv} values)")


# ---------------------------------------------------------------------------------------------
# Declared shapes far larger than memory over stride-0 operands: a clear error or the right answer


def huge(fmt, M_exp, K_exp, K_add, tokens, layout, nnz, seed):
    """M = 2**M_exp rows (past 2**16 an empty matrix over an expanded row-pointer tensor), K =
    2**K_exp + K_add columns, x[t, k] = t + 1 as a stride-0 view: y[t, i] = (t + 1) sum_k A[i, k]."""
    gen = torch.Generator().manual_seed(seed)
    M, K = 2 ** M_exp, max(1, 2 ** K_exp + K_add)
    if fmt == "nm":
        K = min(K, 2 ** 62 // M)  # values (M, K / 2) must be a representable (expanded) tensor
        K = max(8, K - K % 8)  # a constant mask byte 0x33 marks 2 of every 4 columns, none past K
        A = pysparse.SparseNM(torch.ones(1, 1).expand(M, K // 2),
                              torch.full((1, 1), 0x33, dtype=torch.uint8).expand(M, K // 8 + (K % 8 > 0)),
                              (M, K), 2, 4, check=False)
        row_sums = torch.full((min(M, 8),), float(K // 2), dtype=torch.float64)
    else:
        if M > 2 ** 16:
            crow, cols, vals = torch.zeros(1, dtype=torch.int64).expand(M + 1), torch.zeros(0, dtype=torch.int64), \
                torch.zeros(0)
        else:
            entries = sorted({(int(torch.randint(0, min(M, 8), (1,), generator=gen)),
                               int(torch.randint(0, K, (1,), generator=gen))) for _ in range(nnz)})
            counts = torch.bincount(torch.tensor([r for r, _ in entries], dtype=torch.int64), minlength=M)
            crow = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
            cols = torch.tensor([c for _, c in entries], dtype=torch.int64)
            vals = torch.randn(len(entries), generator=gen)
        A = pysparse.CSR(crow, cols, vals, (M, K), check=False) if fmt == "csr" else \
            pysparse.BSR(crow, cols, vals.view(-1, 1, 1), (M, K), check=False)
        rows = torch.repeat_interleave(torch.arange(M), crow[1:] - crow[:-1]) if M <= 2 ** 16 else cols
        row_sums = torch.zeros(min(M, 8), dtype=torch.float64).index_add_(0, rows[rows < 8], vals.double()[rows < 8])
    t = torch.arange(1.0, tokens + 1)
    x = t.view(tokens, 1).expand(tokens, K) if layout == "linear" else t.view(1, tokens).expand(K, tokens)
    out = pysparse.linear(x, A) if layout == "linear" else pysparse.spmm(A, x)
    # Only reached when it fits.
    got = (out[:, : min(M, 8)] if layout == "linear" else out[: min(M, 8)].T).double()
    ref = t.double()[:, None] * row_sums[None, :]
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-4), f"huge {fmt}: {got} vs {ref}"


# ---------------------------------------------------------------------------------------------
# Raw indices, valid or not, through the ops with check=False: refused, or right


def raw_compressed(fmt, M, K, n, crow, col, bh, bw, layout, col16, isa, threads, seed):
    gen = torch.Generator().manual_seed(seed)
    rows, cols = M // bh, K // bw
    nnz = len(col)
    if col16:  # int32 row pointers: extremes become int32's
        crow = [max(-2 ** 31, min(2 ** 31 - 1, c)) for c in crow]
    crow_t = torch.tensor(crow, dtype=torch.int32 if col16 else torch.int64)
    col_t = torch.tensor(col, dtype=torch.int64)
    if col16:
        col_t = col_t.clamp(-2 ** 15, 2 ** 15 - 1).to(torch.int16)
    vals = torch.randn((nnz, bh, bw) if fmt == "bsr" else (nnz,), generator=gen)
    valid = (len(crow) == rows + 1 and crow[0] == 0 and crow[-1] == nnz
             and all(a <= b for a, b in zip(crow, crow[1:])) and all(0 <= c < cols for c in col_t.tolist()))
    cls = pysparse.CSR if fmt == "csr" else pysparse.BSR
    A = cls(crow_t, col_t, vals, (M, K), check=False)
    x = torch.randn((n, K) if layout == "linear" else (K, n), generator=gen)
    with machine(isa, threads):
        if valid:
            with must_work(f"raw {fmt}"):
                out = pysparse.linear(x, A) if layout == "linear" else pysparse.spmm(A, x)
        else:
            out = pysparse.linear(x, A) if layout == "linear" else pysparse.spmm(A, x)
            raise AssertionError(f"raw {fmt}: invalid indices accepted (crow {crow}, col {col})")
    # COO reference: duplicates and unsorted columns sum, as the kernels do
    r_of = torch.repeat_interleave(torch.arange(rows), torch.diff(torch.tensor(crow, dtype=torch.int64)))
    Wd = torch.zeros(rows, bh, cols, bw, dtype=torch.float64)
    Wa = torch.zeros_like(Wd)  # sum of |entries|: a repeated column is accumulated term by term
    blocks = vals.double().view(nnz, bh, bw)
    for p in range(nnz):
        Wd[r_of[p], :, col_t[p].long(), :] += blocks[p]
        Wa[r_of[p], :, col_t[p].long(), :] += blocks[p].abs()
    Wd, Wa = Wd.view(M, K), Wa.view(M, K)
    xd = x.double()
    ref, absref = (xd @ Wd.T, xd.abs() @ Wa.T) if layout == "linear" else (Wd @ xd, Wa @ xd.abs())
    close(out, ref, absref, torch.float32, f"raw {fmt}")


def raw_nm(R, K, n, m, mask_bytes, tokens, isa, threads, seed):
    gen = torch.Generator().manual_seed(seed)
    mb = K // 8 + (K % 8 > 0)
    mask = torch.tensor(mask_bytes, dtype=torch.uint8).view(R, mb)
    vals = torch.randn(R, K // m * n, generator=gen)
    bits = ((mask[..., None] >> torch.arange(8, dtype=torch.uint8)) & 1).bool().reshape(R, mb * 8)
    valid = bool((bits[:, :K].reshape(R, K // m, m).sum(-1) == n).all()) and not bool(bits[:, K:].any())
    A = pysparse.SparseNM(vals, mask, (R, K), n, m, check=False)
    x = torch.randn(tokens, K, generator=gen)
    with machine(isa, threads):
        if valid:
            with must_work("raw nm"):
                out = pysparse.linear(x, A)
        else:
            pysparse.linear(x, A)
            raise AssertionError(f"raw nm: an invalid mask was accepted: {mask_bytes}")
    W = torch.zeros(R, K, dtype=torch.float64)
    W[bits[:, :K]] = vals.double().reshape(-1)
    close(out, x.double() @ W.T, x.double().abs() @ W.abs().T, torch.float32, "raw nm")


# ---------------------------------------------------------------------------------------------
# Masked attention: extreme masks, block sizes and special values against an fp64 reference


def attention(B, H, Hkv, Lq, Lk, D, Dv, dtype, block, mask, lo, hi, window, lengths, special, head_mask,
              scale, isa, threads, seed):
    gen = torch.Generator().manual_seed(seed)
    dt = DTYPES[dtype]
    q = torch.randn(B, H, Lq, D, generator=gen).to(dt)
    k = torch.randn(B, Hkv, Lk, D, generator=gen).to(dt)
    v = torch.randn(B, Hkv, Lk, Dv, generator=gen).to(dt)
    kw, bias = {}, None
    if mask == "band":
        kw["block_mask"] = pysparse.BlockMask.band_of(Lq, Lk, lo, hi, block_size=block)
    elif mask == "causal":
        kw["is_causal"] = True
    elif mask == "sliding":
        kw["block_mask"] = pysparse.BlockMask.sliding_window(Lq, window, Lk=Lk, causal=lo % 2 == 0, block_size=block)
    elif mask == "padding":
        kw["block_mask"] = pysparse.BlockMask.key_padding(torch.tensor(lengths[:B] + [0] * (B - len(lengths))), Lq, Lk,
                                                          block_size=block)
    elif mask == "band&padding":
        kw["block_mask"] = (pysparse.BlockMask.band_of(Lq, Lk, lo, hi, block_size=block)
                            & pysparse.BlockMask.key_padding(torch.tensor((lengths + [Lk] * B)[:B]), Lq, Lk,
                                                             block_size=block))
    elif mask == "dense":
        kw["block_mask"] = pysparse.BlockMask.from_dense_mask(torch.rand(B, 1, Lq, Lk, generator=gen) < 0.5, block)
    elif mask == "float":
        bias = torch.randn(1, H, Lq, Lk, generator=gen).masked_fill(torch.rand(1, H, Lq, Lk, generator=gen) < 0.3,
                                                                     -math.inf)
        kw["attn_mask"] = bias
    # Special values at random places: NaN or +-inf in q, k, or the float mask.
    if special != "none" and Lq and Lk and D:
        where, val = special.split(":")
        val = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}[val]
        i, j = seed % Lq, (seed // 7) % Lk
        if where == "q":
            q[0, 0, i, seed % D] = val
        elif where == "k":
            k[0, 0, j, seed % D] = val
        elif where == "mask" and bias is not None:
            bias[0, 0, i, j] = val
    hm = None
    if head_mask:
        hm = torch.rand(H, generator=gen) < 0.5
        kw["head_mask"] = hm
    with machine(isa, threads):
        out = pysparse.masked_attention(q, k, v, scale=scale, **kw)
    # The reference's allowed set comes from the BlockMask's own dense form (checked separately
    # against the index rule in blockmask()), the causal rule, or the bool/float mask.
    if "block_mask" in kw:
        allowed = kw["block_mask"].to_dense().expand(B, H, Lq, Lk)
    elif mask == "causal":
        allowed = (torch.arange(Lk)[None, :] <= torch.arange(Lq)[:, None]).expand(B, H, Lq, Lk)
    else:
        allowed = torch.ones(B, H, Lq, Lk, dtype=torch.bool)
    sc = scale if scale is not None else (1 / math.sqrt(D) if D else 1.0)
    ref = reference_masked_attention(q, k, v, allowed, sc, bias)
    if hm is not None:
        ref[:, ~hm] = 0.0
    # NaN rows must match exactly (SDPA's rule); elsewhere an error budget per dtype
    nan_out, nan_ref = out.isnan().any(-1), ref.isnan().any(-1)
    assert torch.equal(nan_out, nan_ref), f"attention: NaN rows differ: ours {nan_out.nonzero().tolist()[:4]}, " \
                                          f"reference {nan_ref.nonzero().tolist()[:4]}"
    fin = ~nan_ref
    tol = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}[dt]
    err = (out.double() - ref).abs()[fin]
    if err.numel():
        assert float(err.max()) <= tol * (1 + float(ref[fin].abs().max())), \
            f"attention {dtype} {mask}: max error {float(err.max()):.3g}"


def blockmask(ctor, Lq, Lk, block, lo, hi, window, lengths, causal):
    """A constructor with extreme arguments: an error, or a mask whose dense form is the index rule."""
    i, j = torch.arange(Lq)[:, None], torch.arange(Lk)[None, :]
    lo, hi = (max(-Lq - 1, min(Lk + 1, b)) for b in (lo, hi))  # the same rule, in int64
    if ctor == "band":
        bm = pysparse.BlockMask.band_of(Lq, Lk, lo, hi, block_size=block)
        rule = ((j - i) >= lo) & ((j - i) <= hi)
    elif ctor == "sliding":
        bm = pysparse.BlockMask.sliding_window(Lq, window, Lk=Lk, causal=causal, block_size=block)
        w = min(window, Lq + Lk + 2)
        rule = ((j - i) > -w) & (((j - i) <= 0) if causal else ((j - i) < w))
    elif ctor == "causal":
        bm = pysparse.BlockMask.causal(Lq, Lk, block_size=block)
        rule = j <= i
    else:
        bm = pysparse.BlockMask.key_padding(torch.tensor(lengths), Lq, Lk, block_size=block)
        rule = j[None] < torch.tensor(lengths)[:, None, None]
        rule = rule[:, None]
    dense = bm.to_dense()
    assert torch.equal(dense, rule.expand_as(dense)), f"{ctor}: to_dense disagrees with the index rule"
    # the kernel agrees with the dense form
    B = dense.shape[0]
    q = torch.randn(B, 1, Lq, 8)
    out = pysparse.masked_attention(q, q, q, block_mask=bm)
    ref = reference_masked_attention(q, q, q, dense.expand(B, 1, Lq, Lk), 1 / math.sqrt(8))
    assert torch.allclose(out.double(), ref, atol=2e-5), f"{ctor}: kernel disagrees with to_dense"


def attention_raw(Lq, Lk, block_q, block_k, kinds, band_lo, band_hi, kv_len):
    """The raw op with any int8 kinds, bounds and lengths: refused, or equal to the rule."""
    QB, KB = -(-Lq // block_q), -(-Lk // block_k)
    kind = torch.tensor(kinds, dtype=torch.int8).view(1, 1, QB, KB) if kinds is not None else None
    q, k, v = torch.randn(1, 1, Lq, 8), torch.randn(1, 1, Lk, 8), torch.randn(1, 1, Lk, 8)
    kvl = torch.tensor([kv_len]) if kv_len is not None else None
    out = torch.ops.pysparse.masked_attention(q, k, v, kind, block_q, block_k, None, None, band_lo, band_hi, kvl,
                                              0.35, None)
    if kind is not None:
        assert bool(((kind >= 0) & (kind <= 2)).all()), f"kinds {kinds} accepted"
    i, j = torch.arange(Lq)[:, None], torch.arange(Lk)[None, :]
    rule = ((j - i) >= band_lo) & ((j - i) <= band_hi)
    if kvl is not None:
        rule = rule & (j < kv_len)
    if kind is not None:
        tile = kind[0, 0, i // block_q, j // block_k]
        rule = (tile == 2) | ((tile == 1) & rule)
    ref = reference_masked_attention(q, k, v, rule[None, None], 0.35)
    assert torch.allclose(out.double(), ref, atol=2e-5), "raw masked_attention disagrees with the rule"


# ---------------------------------------------------------------------------------------------
# pruned_ffn, nm_compress, format constructors, safetensors headers


def _weight(fmt, W, gen):
    if fmt == "dense":
        return W
    if fmt == "csr":
        return pysparse.CSR.from_dense(W * (torch.rand(W.shape, generator=gen) < 0.3).to(W.dtype))
    if fmt == "bsr":
        return pysparse.BSR.from_dense(W, (max(W.shape[0], 1), 1))
    return pysparse.Sparse24.from_dense(W, prune=True)


def ffn(tokens, d, hidden, f1, f2, f3, act, threshold, bias, transposed, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    dt = DTYPES[dtype]
    x = torch.randn(tokens, d, generator=gen).to(dt)
    w1 = _weight(f1, torch.randn(hidden, d, generator=gen).to(dt), gen)
    w2 = _weight(f2, torch.randn(d, hidden, generator=gen).to(dt), gen)
    w3 = None if f3 == "none" else _weight(f3, torch.randn(hidden, d, generator=gen).to(dt), gen)
    if transposed and f2 == "dense":
        w2 = pysparse.transposed_w2(w2)
    b1 = torch.randn(hidden, generator=gen).to(dt) if bias else None
    b2 = torch.randn(d, generator=gen).to(dt) if bias else None
    with must_work("pruned_ffn"):
        out = pysparse.pruned_ffn(x, w1, b1, w2, b2, activation=act, w3=w3, threshold=threshold)
    dense = lambda w: w if isinstance(w, torch.Tensor) else w.to_dense()  # noqa: E731
    fn = {"none": lambda t: t, "relu": torch.relu, "gelu": F.gelu, "silu": F.silu,
          "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}[act]
    h = fn(F.linear(x.double(), dense(w1).double(), None if b1 is None else b1.double()))
    if w3 is not None:
        h = h * F.linear(x.double(), dense(w3).double())
    if threshold:
        h = h.masked_fill(h.abs() <= threshold, 0)
    ref = F.linear(h, dense(w2).double(), None if b2 is None else b2.double())
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    tol = {torch.float32: 1e-4, torch.bfloat16: 0.1, torch.float16: 2e-2}[dt]
    # the intermediate is rounded to x's dtype (and a threshold may flip on that rounding)
    if not threshold and out.numel():
        assert float((out.double() - ref).abs().max()) <= tol * (1 + scale), \
            f"pruned_ffn {f1}/{f2}/{f3} {act}: error {float((out.double() - ref).abs().max()):.3g}"


def ffn_raw(tag, ntensors, hidden):
    x = torch.randn(3, 8)
    w = torch.randn(16, 8)
    A = pysparse.Sparse24.from_dense(pysparse.prune.nm(w, 2, 4))
    ts = [A.values, A.mask, A.values][:ntensors]
    torch.ops.pysparse.pruned_ffn(x, tag, ts, None, "dense", [torch.randn(8, 16)], None, "none", [], hidden, "relu", 0.0)
    assert tag == "nm:2:4" and ntensors == 2 and hidden == 16, f"pruned_ffn accepted tag {tag!r} with {ntensors} " \
                                                               f"tensors, hidden {hidden}"


def nm_compress(R, K, n, m, density, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    W = (torch.randn(R, K, generator=gen) * (torch.rand(R, K, generator=gen) < density)).to(DTYPES[dtype])
    over = bool(((W != 0).reshape(R, K // m, m).sum(-1) > n).any()) if R and K else False
    if over:
        try:
            pysparse.SparseNM.from_dense(W, n, m)
        except ValueError as e:
            assert "nonzeros, more than" in str(e), f"nm_compress: unclear error {e}"
            return
        raise AssertionError("nm_compress: a group with too many nonzeros was accepted")
    with must_work("nm_compress"):
        A = pysparse.SparseNM.from_dense(W, n, m)
    assert torch.equal(A.to_dense(), W), "nm_compress: round trip differs"


def activation(shape, dtype, view, name, scale, special, isa, threads, seed):
    """The activation op against fp64: gelu_tanh (pysparse's kernel) within 2 eps |x| of the exact
    function before the output's rounding, and its 16-bit result the fp32 one rounded; the other
    names torch's own. Non-finite inputs give torch's non-finite outputs."""
    gen = torch.Generator().manual_seed(seed)
    dt = DTYPES[dtype]
    x = operand(shape, torch.float32, view, gen) * scale
    if special and x.numel():
        flat = x.reshape(-1) if x.is_contiguous() else None
        if flat is not None:
            for v in (float("inf"), float("-inf"), float("nan"), -0.0, -1e30):
                flat[int(torch.randint(flat.numel(), (1,), generator=gen))] = v
    x = x.to(dt)
    with machine(isa, threads), must_work(f"activation {name}"):
        y = pysparse.activations.apply(name, x)
        # torch's own kernels round some elements differently at other thread counts: same machine
        torch_y = pysparse.activations.ACTIVATIONS[name](x.contiguous())
    assert y.dtype == dt and y.shape == x.shape and y.is_contiguous(), f"activation {name}: dtype/shape/layout"
    if name != "gelu_tanh":
        assert torch.equal(y, torch_y) or (y.isnan() == torch_y.isnan()).all() and \
            torch.equal(y.nan_to_num(), torch_y.nan_to_num()), f"activation {name}: not torch's"
        return
    if dt != torch.float32:
        with machine(isa, threads):
            y32 = pysparse.activations.apply(name, x.float())
        r = y32.to(dt)
        assert bool(((y == r) | (y.isnan() & r.isnan())).all()), "activation: 16-bit not the fp32 result rounded"
        y = y32
    xd = x.double()
    fin = torch.isfinite(xd)
    err = (y.double() - F.gelu(xd, approximate="tanh")).abs()[fin]
    bound = 2 * torch.finfo(torch.float32).eps * xd.abs()[fin]
    assert bool((err <= bound).all()), f"activation gelu_tanh: error {err.max().item():.3g} over 2 eps |x|"
    odd = ~fin
    assert torch.equal(y[odd].isnan(), torch_y.float()[odd].isnan()) and \
        torch.equal(y[odd].nan_to_num(), torch_y.float()[odd].nan_to_num()), "activation: inf/nan differ from torch"


def construct(fmt, shape, crow_dtype, col_dtype, values_dtype, nnz, check):
    """A format constructor with odd arguments: ValueError/TypeError, or a consistent object."""
    vals = torch.zeros((nnz, 2, 2) if fmt == "bsr" else (nnz,), dtype=getattr(torch, values_dtype))
    crow = torch.zeros(3, dtype=getattr(torch, crow_dtype))
    col = torch.zeros(nnz, dtype=getattr(torch, col_dtype))
    if fmt == "nm":
        A = pysparse.SparseNM(torch.zeros(2, 2, dtype=getattr(torch, values_dtype)),
                              torch.full((2, 1), 0x33, dtype=getattr(torch, col_dtype)), shape, 2, 4, check=check)
    else:
        A = (pysparse.CSR if fmt == "csr" else pysparse.BSR)(crow, col, vals, shape, check=check)
    assert isinstance(A.shape[0], int) and isinstance(A.shape[1], int) and min(A.shape) >= 0, f"shape {A.shape}"
    assert all(isinstance(s, int) for s in A.shape) and list(A.shape) == [int(s) for s in shape], \
        f"{fmt}: shape {shape!r} stored as {A.shape}"


def safetensors_file(blob_hex, reference):
    """load_file on arbitrary bytes: a ValueError naming the file, or tensors the reference
    implementation (the safetensors package) reads alike."""
    from pysparse import _safetensors
    fd, path = tempfile.mkstemp(suffix=".safetensors")
    with os.fdopen(fd, "wb") as f:
        f.write(bytes.fromhex(blob_hex))
    try:
        try:
            tensors, meta = _safetensors.load_file(path)
        except ValueError as e:
            assert path in str(e), f"safetensors: the error does not name the file: {e}"
            return
        if reference:
            try:
                import safetensors.torch
            except ImportError:
                return
            try:
                theirs = safetensors.torch.load_file(path)
            except Exception as e:  # noqa: BLE001
                raise AssertionError(f"safetensors: we loaded a file the reference refuses ({e})")
            assert set(theirs) == set(tensors), "safetensors: names differ from the reference"
            for name, t in tensors.items():
                raw = lambda u: u.reshape(-1).view(torch.uint8)  # noqa: E731  (bitwise: NaNs compare too)
                assert t.dtype == theirs[name].dtype and t.shape == theirs[name].shape and \
                    torch.equal(raw(t), raw(theirs[name])), f"safetensors: {name} differs from the reference"
    finally:
        os.unlink(path)


CASES = {f.__name__: f for f in (spmm, grad, huge, raw_compressed, sddmm_raw, transpose_values_raw, raw_nm, attention, blockmask,
                                 attention_raw, ffn, ffn_raw, nm_compress, activation, construct,
                                 safetensors_file)}


def _limit_memory(extra_gib: float) -> None:
    """Cap the address space a little above what is mapped now, so a case that asks for a huge
    but representable allocation fails fast instead of swapping the machine (the C++ size checks
    read this limit too)."""
    with open("/proc/self/statm") as f:
        vm = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    cap = vm + int(extra_gib * 2 ** 30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))


def main() -> None:
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything a case prints goes to stderr, never into the protocol
    # OpenMP threads (up to the 3 the cases use) and the ISA tables come up before the address
    # space is capped: a thread created after it can fail to get a stack, and libgomp then exits.
    A = pysparse.CSR.from_dense(torch.ones(512, 512))
    for t in (3, 2):
        torch.set_num_threads(t)
        pysparse.spmm(A, torch.ones(512, 64))
        torch.ones(1 << 20).sum()
    _limit_memory(float(os.environ.get("PYSPARSE_FUZZ_GIB", "4")))
    for line in sys.stdin:
        req = json.loads(line)
        try:
            CASES[req["case"]](**req["args"])
            res = {"status": "ok"}
        except AssertionError as e:
            res = {"status": "wrong", "msg": str(e)}
        except Exception as e:  # noqa: BLE001  (the parent judges the error)
            text = str(e).strip()
            res = {"status": "error", "type": type(e).__name__, "msg": text.splitlines()[0] if text else ""}
        proto.write(json.dumps(res) + "\n")
        proto.flush()


if __name__ == "__main__":
    main()
