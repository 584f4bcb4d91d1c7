"""N:M semi-structured sparsity (2:4 included): the SparseNM/Sparse24 format, its CUTLASS-layout
interop (bit for bit against torch's own converter), and the nm_spmm / nm_linear ops."""
from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch.sparse._semi_structured_conversions import (
    sparse_semi_structured_from_dense_cutlass as torch_from_dense,
    sparse_semi_structured_to_dense_cutlass as torch_to_dense,
)

import pysparse
from references import reference_linear
from pysparse import Sparse24, SparseNM
from conftest import DTYPES, SUPPORTED_ISAS, assert_close, gen, randn

PATTERNS = [(2, 4), (1, 4), (3, 4), (4, 8), (3, 8), (8, 16), (5, 16)]


def _unpack(mask, K):
    bits = (mask[..., None] >> torch.arange(8, dtype=torch.uint8)) & 1
    return bits.bool().reshape(mask.shape[0], -1)[:, :K].clone()


def _pack(dense):
    R, K = dense.shape
    padded = torch.zeros(R, (K + 7) // 8 * 8, dtype=torch.uint8)
    padded[:, :K] = dense.to(torch.uint8)
    return (padded.view(R, -1, 8) << torch.arange(8, dtype=torch.uint8)).sum(-1).to(torch.uint8)


def _nm_matrix(R, K, n, m, dtype=torch.float32, seed=0, holes=0.0):
    """An n:m matrix; `holes` zeroes a further fraction so some groups hold fewer than n."""
    W = pysparse.prune.nm(randn(R, K, g=gen(seed)), n, m)
    if holes:
        W = W * (torch.rand(R, K, generator=gen(seed + 1)) >= holes)
    return W.to(dtype)


# ---------------------------------------------------------------------------------------------
# Format

@pytest.mark.parametrize("n,m", PATTERNS)
@pytest.mark.parametrize("dtype", DTYPES + (torch.int8,), ids=lambda d: str(d).split(".")[-1])
def test_from_dense_round_trip_is_exact(n, m, dtype):
    R, K = 13, 8 * m
    if dtype == torch.int8:
        W = (_nm_matrix(R, K, n, m, holes=0.3) * 20).to(torch.int8)
    else:
        W = _nm_matrix(R, K, n, m, dtype, holes=0.3)
    A = SparseNM.from_dense(W, n, m)
    assert A.values.shape == (R, K // m * n) and A.mask.shape == (R, K // 8) and A.mask.dtype == torch.uint8
    assert torch.equal(A.to_dense(), W)
    assert bool((A.kept_mask().view(R, -1, m).sum(-1) == n).all())


def test_mask_bytes_when_columns_are_not_a_multiple_of_8():
    W = _nm_matrix(5, 12, 2, 4)
    A = Sparse24.from_dense(W)
    assert A.mask.shape == (5, 2) and torch.equal(A.to_dense(), W)
    assert int((A.mask[:, -1] >> 4).sum()) == 0


def test_from_dense_names_the_first_offending_group():
    W = _nm_matrix(6, 16, 2, 4)
    W[3, 9] = 1.0 if W[3, 9] == 0 else W[3, 9]
    W[3, 8:12] = torch.tensor([1.0, 2.0, 3.0, 0.0])
    with pytest.raises(ValueError, match=r"row 3, group 2 \(columns 8..11\) has 3 nonzeros, more than 2:4 allows; pass prune=True"):
        Sparse24.from_dense(W)
    P = Sparse24.from_dense(W, prune=True)
    assert torch.equal(P.to_dense()[3, 8:12], torch.tensor([0.0, 2.0, 3.0, 0.0]))


@pytest.mark.parametrize("kwargs,msg", [
    (dict(shape=(4, 10)), r"10 columns are not a multiple of m = 4"),
    (dict(n=4, m=4), r"need m in \(4, 8, 16\) and 0 < n < m, got 4:4"),
    (dict(values=torch.zeros(4, 7)), r"values must have shape \(4, 8\)"),
    (dict(mask=torch.zeros(4, 2, dtype=torch.int16)), r"mask must be uint8 of shape \(4, 2\)"),
    (dict(mask=torch.zeros(4, 2, dtype=torch.uint8)), r"mask row 0, group 0 \(columns 0..3\) marks 0 positions, expected 2"),
    (dict(values=torch.zeros(4, 8, dtype=torch.float64)), r"values must be float32, bfloat16, float16 or int8"),
])
def test_construction_errors(kwargs, msg):
    good = Sparse24.from_dense(_nm_matrix(4, 16, 2, 4))
    args = dict(values=good.values, mask=good.mask, shape=good.shape, n=2, m=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=msg):
        SparseNM(args["values"], args["mask"], args["shape"], args["n"], args["m"])


def test_sparse24_is_2_4_only():
    with pytest.raises(ValueError, match=r"Sparse24 is 2:4, got 4:8: use SparseNM"):
        Sparse24.from_dense(torch.zeros(4, 8), 4, 8)


def test_state_dict_round_trip():
    A = SparseNM.from_dense(_nm_matrix(8, 32, 3, 8, torch.bfloat16), 3, 8)
    buf = io.BytesIO()
    torch.save(A.state_dict("w."), buf)
    buf.seek(0)
    B = SparseNM.from_state_dict(torch.load(buf, weights_only=True), "w.")
    assert (B.n, B.m, B.shape) == (3, 8, A.shape) and torch.equal(B.to_dense(), A.to_dense())


# ---------------------------------------------------------------------------------------------
# CUTLASS layout: bit for bit against torch's converter (it runs on CPU)

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int8, torch.float32],
                         ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("holes", [0.0, 0.4, 1.0])
def test_to_cutlass_matches_torch_bit_for_bit(dtype, holes):
    R, K = 64, 128
    if dtype == torch.float32:  # the fp32 CUTLASS layout is 1:2
        W = pysparse.prune.nm(randn(R, K, g=gen(3)).view(R, K // 2, 2).flatten(1), 2, 4)
        pairs = W.view(R, K // 2, 2)
        pairs[..., 1] = torch.where(pairs[..., 0] != 0, torch.zeros_like(pairs[..., 1]), pairs[..., 1])
        W = pairs.reshape(R, K) * (torch.rand(R, K, generator=gen(4)) >= holes)
    elif dtype == torch.int8:
        W = (_nm_matrix(R, K, 2, 4, holes=holes) * 20).to(torch.int8)
    else:
        W = _nm_matrix(R, K, 2, 4, dtype, holes=holes)
    values, meta = Sparse24.from_dense(W).to_cutlass()
    ref_values, ref_meta = torch_from_dense(W)
    assert values.dtype == ref_values.dtype and meta.dtype == ref_meta.dtype
    assert torch.equal(values, ref_values)
    assert torch.equal(meta, ref_meta)
    back = Sparse24.from_cutlass(ref_values, ref_meta)
    assert torch.equal(back.to_dense(), W)
    if dtype != torch.float32:  # torch's own fp32 inverse is lossy; ours is exact (checked above)
        assert torch.equal(torch_to_dense(ref_values, ref_meta), back.to_dense())


def test_to_cutlass_errors():
    with pytest.raises(ValueError, match=r"needs rows divisible by 32 and columns by 16, got 16x64"):
        Sparse24.from_dense(_nm_matrix(16, 64, 2, 4, torch.float16)).to_cutlass()
    W = _nm_matrix(32, 64, 2, 4)  # 2:4 but not 1:2
    with pytest.raises(ValueError, match=r"float32 CUTLASS layout is 1:2"):
        Sparse24.from_dense(W).to_cutlass()
    with pytest.raises(ValueError, match=r"the CUTLASS layout is 2:4, this matrix is 4:8"):
        SparseNM.from_dense(_nm_matrix(32, 64, 4, 8), 4, 8).to_cutlass()


# ---------------------------------------------------------------------------------------------
# Ops

WIDTHS = (1, 2, 8, 9, 16, 33, 64, 65, 130)


@pytest.mark.parametrize("isa", SUPPORTED_ISAS)
@pytest.mark.parametrize("n,m", PATTERNS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_spmm_matches_fp64_reference(isa, n, m, dtype):
    pysparse.set_cpu_isa(isa)
    try:
        # 1056 columns: two 512-column widening chunks and a 32-column tail in the 2:4 n = 1 kernel
        for R, K in ((37, 16 * m), (20, 8 * m + m), (9, 1056)):
            W = _nm_matrix(R, K, n, m, dtype, holes=0.2)
            A = SparseNM.from_dense(W, n, m)
            for width in WIDTHS:
                X = randn(K, width, g=gen(width)).to(dtype)
                ref = W.double() @ X.double()
                absref = W.double().abs() @ X.double().abs()
                assert_close(pysparse.spmm(A, X), ref, absref, dtype, what=f"{isa} {n}:{m} {R}x{K} n={width}")
    finally:
        pysparse.set_cpu_isa("auto")


@pytest.mark.parametrize("isa", SUPPORTED_ISAS)
@pytest.mark.parametrize("activation", pysparse.activations.NAMES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_linear_fused_bias_and_activation(isa, activation, dtype):
    pysparse.set_cpu_isa(isa)
    try:
        W = _nm_matrix(48, 64, 2, 4, dtype)
        A = Sparse24.from_dense(W)
        b = randn(48, g=gen(7)).to(dtype)
        for shape in ((1, 64), (5, 64), (2, 33, 64), (64,)):
            x = randn(*shape, g=gen(8)).to(dtype)
            y = pysparse.linear(x, A, b, activation=activation)
            ref = reference_linear(x, W, b, activation)
            tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype]
            torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol * (ref.abs().max().item() + 1))
            assert y.dtype == dtype and y.shape == (*shape[:-1], 48)
    finally:
        pysparse.set_cpu_isa("auto")


@pytest.mark.parametrize("isa", SUPPORTED_ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_raw_linear_gelu_tanh(isa, dtype):
    """nm_linear's "gelu_tanh" is torch's gelu(approximate="tanh") of the dense product plus bias,
    on every kernel path: n = 1, the 2:4 token-row kernel (2 <= n <= 8), the panel kernel (4:8,
    and 2:4 at 33 tokens on AVX2)."""
    pysparse.set_cpu_isa(isa)
    try:
        for n, m in ((2, 4), (4, 8)):
            W = _nm_matrix(48, 64, n, m, dtype)
            A = SparseNM.from_dense(W, n, m)
            b = randn(48, g=gen(7)).to(dtype)
            for tokens in (1, 2, 5, 8, 33):
                x = randn(tokens, 64, g=gen(tokens)).to(dtype)
                y = torch.ops.pysparse.nm_linear(x, A.values, A.mask, [48, 64], n, m, b, "gelu_tanh")
                ref = reference_linear(x, W, b, "gelu_tanh")
                tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype]
                torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol * (ref.abs().max().item() + 1),
                                           msg=lambda s: f"{isa} {n}:{m} tokens={tokens}: {s}")
                assert y.dtype == dtype and y.shape == (tokens, 48)
    finally:
        pysparse.set_cpu_isa("auto")


def test_raw_linear_names_every_activation_on_a_bad_one():
    A = Sparse24.from_dense(_nm_matrix(8, 32, 2, 4))
    with pytest.raises(RuntimeError, match=r"activation must be none, relu, gelu, gelu_tanh or silu, got 'tanh'"):
        torch.ops.pysparse.nm_linear(randn(2, 32, g=gen(1)), A.values, A.mask, [8, 32], 2, 4, None, "tanh")


def test_non_contiguous_operands_and_empty():
    W = _nm_matrix(24, 32, 2, 4)
    A = Sparse24.from_dense(W)
    X = randn(40, 64, g=gen(2))[::1, ::2][:32]  # strided columns
    torch.testing.assert_close(pysparse.spmm(A, X), W @ X, rtol=1e-5, atol=1e-5)
    x = randn(64, 32, g=gen(3)).t().contiguous().t()  # transposed input for linear
    torch.testing.assert_close(pysparse.linear(x, A), x @ W.T, rtol=1e-5, atol=1e-5)
    Z = Sparse24.from_dense(torch.zeros(0, 32))
    assert pysparse.spmm(Z, X).shape == (0, 32)


def test_opcheck_and_compile():
    A = Sparse24.from_dense(_nm_matrix(32, 64, 2, 4))
    X = randn(64, 9, g=gen(1))
    x = randn(3, 64, g=gen(2))
    b = randn(32, g=gen(3))
    torch.library.opcheck(torch.ops.pysparse.nm_spmm.default, (A.values, A.mask, [32, 64], 2, 4, X))
    torch.library.opcheck(torch.ops.pysparse.nm_linear.default, (x, A.values, A.mask, [32, 64], 2, 4, b, "gelu"))
    f = torch.compile(lambda A, x, b: pysparse.linear(x, A, b, activation="silu") + 1, fullgraph=True)
    torch.testing.assert_close(f(A, x, b), F.silu(x @ A.to_dense().T + b) + 1, rtol=1e-5, atol=1e-5)


def test_raw_op_rejects_a_bad_mask_without_reading_out_of_bounds():
    A = Sparse24.from_dense(_nm_matrix(8, 32, 2, 4))
    X = randn(32, 4, g=gen(1))
    mask = A.mask.clone()
    mask[5, 1] = 0xFF  # 8 kept positions in a byte that must hold 4
    with pytest.raises(RuntimeError, match=r"pysparse: N:M mask row 5 has a group of 4 columns that does not mark exactly 2"):
        torch.ops.pysparse.nm_spmm(A.values, mask, [8, 32], 2, 4, X)
    A12 = Sparse24.from_dense(_nm_matrix(8, 12, 2, 4))
    mask = A12.mask.clone()
    mask[0, 1] |= 0x80  # a position past column 12, count fixed up below
    mask[0, 0] &= mask[0, 0] - 1  # ... and one inside cleared, so only the position is wrong
    with pytest.raises(RuntimeError, match=r"N:M mask row 0 has a group .* \(or marks a column past 12\)"):
        torch.ops.pysparse.nm_spmm(A12.values, mask, [8, 12], 2, 4, randn(12, 1, g=gen(2)))


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 4), (4, 8), (2, 8), (8, 16), (5, 16)])
@pytest.mark.parametrize("col", [0, 100, 255, 300, 519])
def test_uneven_groups_with_the_right_row_count_are_rejected(n, m, col):
    # One position moved from its group to the neighbouring one: every row still marks K n / m
    # positions, but the kernels step through the values per group, so this must not pass.
    K = 528  # 66 mask bytes: two 32-byte vector chunks and a scalar tail
    A = SparseNM.from_dense(_nm_matrix(4, K, n, m), n, m)
    dense = _unpack(A.mask, K)
    g = col // m
    src = next(c for c in range(g * m, g * m + m) if dense[2, c])
    dst_g = g + 1 if g + 1 < K // m else g - 1
    dst = next(c for c in range(dst_g * m, dst_g * m + m) if not dense[2, c])
    dense[2, src], dense[2, dst] = False, True
    mask = _pack(dense)
    with pytest.raises(RuntimeError, match=r"N:M mask row 2 has a group"):
        torch.ops.pysparse.nm_spmm(A.values, mask, [4, K], n, m, randn(K, 3, g=gen(1)))
    torch.ops.pysparse.nm_spmm(A.values, A.mask, [4, K], n, m, randn(K, 3, g=gen(1)))  # the original passes


@pytest.mark.parametrize("args,msg,exc", [
    (dict(shape=[8, 30]), r"columns divisible by m = 4", RuntimeError),
    (dict(n=4), r"N:M needs 0 < n < m, got 4:4", RuntimeError),
    (dict(values_dtype=torch.float64), r"N:M values must be float32, bfloat16 or float16", TypeError),
    (dict(dense_rows=31), r"dense has 31 rows but the sparse matrix has 32 columns", RuntimeError),
])
def test_raw_op_shape_and_type_errors(args, msg, exc):
    A = Sparse24.from_dense(_nm_matrix(8, 32, 2, 4))
    values = A.values.to(args.get("values_dtype", torch.float32))
    X = randn(args.get("dense_rows", 32), 3, g=gen(1)).to(values.dtype)
    with pytest.raises(exc, match=msg):
        torch.ops.pysparse.nm_spmm(values, A.mask, args.get("shape", [8, 32]), args.get("n", 2), 4, X)


def test_api_errors():
    A = Sparse24.from_dense(_nm_matrix(8, 32, 2, 4))
    with pytest.raises(ValueError, match=r"activation must be one of"):
        pysparse.linear(randn(2, 32, g=gen(1)), A, activation="tanh")
    # every format takes every activation (CSR/BSR apply it after the product)
    C, x = pysparse.CSR.from_dense(A.to_dense()), randn(2, 32, g=gen(1))
    for act in pysparse.activations.NAMES:
        torch.testing.assert_close(pysparse.linear(x, C, activation=act),
                                   pysparse.activations.apply(act, x @ A.to_dense().T), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Compression ops

@pytest.mark.parametrize("dtype", DTYPES + (torch.int8,), ids=lambda d: str(d).split(".")[-1])
def test_compress_op_matches_the_python_definition(dtype):
    W = _nm_matrix(33, 64, 3, 8, torch.float32, holes=0.3)
    W = (W * 20).to(dtype)
    values, mask = torch.ops.pysparse.nm_compress(W, 3, 8)
    kept = SparseNM(values, mask, (33, 64), 3, 8).kept_mask()
    assert bool((kept | (W == 0)).all()), "every nonzero must be kept"
    assert torch.equal(values, W[kept].view(33, 24))
    assert torch.equal(torch.ops.pysparse.nm_decompress(values, mask, [33, 64], 3, 8), W)
    torch.library.opcheck(torch.ops.pysparse.nm_compress.default, (W, 3, 8))
    torch.library.opcheck(torch.ops.pysparse.nm_decompress.default, (values, mask, [33, 64], 3, 8))


def test_compress_pads_groups_with_their_lowest_zero_positions():
    W = torch.tensor([[0.0, 5.0, 0.0, 0.0, 0.0, 0.0, 0.0, 7.0, 0.0, 0.0, 0.0, 0.0]])
    assert Sparse24.from_dense(W).kept_mask().tolist() == [[True, True, False, False,
                                                            True, False, False, True,
                                                            True, True, False, False]]


def test_compress_zero_and_nan_semantics():
    W = torch.tensor([[-0.0, 1.0, 0.0, float("nan")]])
    A = Sparse24.from_dense(W)
    assert A.kept_mask().tolist() == [[False, True, False, True]]
    assert torch.equal(A.to_dense().isnan(), W.isnan())


def test_compress_op_errors():
    W = torch.ones(3, 8)
    with pytest.raises(ValueError, match=r"pysparse: row 0, group 0 \(columns 0..3\) has 4 nonzeros, more than 2:4 allows"):
        torch.ops.pysparse.nm_compress(W, 2, 4)
    with pytest.raises(RuntimeError, match=r"N:M needs m in \(4, 8, 16\), got 6"):
        torch.ops.pysparse.nm_compress(W, 2, 6)
    with pytest.raises(RuntimeError, match=r"10 columns are not a multiple of m = 4"):
        torch.ops.pysparse.nm_compress(torch.zeros(2, 10), 2, 4)
    with pytest.raises(TypeError, match=r"nm_compress takes float32, bfloat16, float16 or int8"):
        torch.ops.pysparse.nm_compress(torch.zeros(2, 8, dtype=torch.float64), 2, 4)


@pytest.mark.skipif(not (torch.cuda.is_available() and pysparse._C.cuda_compiled()),
                    reason="needs a GPU and the CUDA build")
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (8, 16), (3, 8)])
@pytest.mark.parametrize("dtype", DTYPES + (torch.int8,), ids=lambda d: str(d).split(".")[-1])
def test_cuda_compress_matches_cpu(n, m, dtype):
    W = _nm_matrix(67, 12 * m, n, m, holes=0.3)
    W = (W * 20).to(dtype)
    v_cpu, m_cpu = torch.ops.pysparse.nm_compress(W, n, m)
    v_gpu, m_gpu = torch.ops.pysparse.nm_compress(W.cuda(), n, m)
    assert torch.equal(v_gpu.cpu(), v_cpu) and torch.equal(m_gpu.cpu(), m_cpu)
    back = torch.ops.pysparse.nm_decompress(v_gpu, m_gpu, list(W.shape), n, m)
    assert torch.equal(back.cpu(), W)
    with pytest.raises(ValueError, match=r"row 0, group 0 .* more than"):
        torch.ops.pysparse.nm_compress(torch.ones(3, 2 * m, device="cuda"), n, m)


@pytest.mark.parametrize("isa", SUPPORTED_ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_linear_at_a_few_tokens(isa, dtype):
    # 2:4 on AVX-512 runs a token-row kernel (groups of 2, 4 or 8 tokens, padding tokens dropped,
    # 64-token output slices); 1056 columns = two 512-column chunks and a 32-column tail.
    pysparse.set_cpu_isa(isa)
    try:
        W = _nm_matrix(37, 1056, 2, 4, dtype, holes=0.1)
        A = Sparse24.from_dense(W)
        b = randn(37, g=gen(20)).to(dtype)
        for T in (2, 3, 4, 5, 8, 9, 16, 17, 66):
            x = randn(T, 1056, g=gen(T)).to(dtype)
            for xv in (x, x.t().contiguous().t()):  # token rows contiguous, and not
                y = pysparse.linear(xv, A, b, activation="relu")
                ref = reference_linear(xv, W, b, "relu")
                absref = xv.double().abs() @ W.double().abs().T + b.double().abs()
                assert_close(y, ref, absref, dtype, what=f"{isa} T={T} contiguous={xv.is_contiguous()}")
    finally:
        pysparse.set_cpu_isa("auto")


@pytest.mark.parametrize("isa", SUPPORTED_ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_linear_and_spmm_past_32_tokens(isa, dtype):
    # 2:4 on AVX-512 from 33 tokens on runs the slice kernel: 64-token panels (33, 65 and 200
    # leave a padded last one), 128-column slices (1056 = 8 of them + a 32-column tail; 72 is one
    # partial slice), 128-row chunks (300 rows: two threads' parts, one cut mid-chunk, and the next
    # chunk's values fetched ahead); 260 columns (K % 8 == 4) take the panel kernel instead.
    pysparse.set_cpu_isa(isa)
    try:
        for R, K in ((300, 1056), (37, 72), (20, 260)):
            W = _nm_matrix(R, K, 2, 4, dtype, holes=0.1)
            A = Sparse24.from_dense(W)
            b = randn(R, g=gen(R)).to(dtype)
            for T in (33, 64, 65, 200):
                x = randn(T, K, g=gen(T + K)).to(dtype)
                y = pysparse.linear(x, A, b, activation="relu")
                ref = reference_linear(x, W, b, "relu")
                absref = x.double().abs() @ W.double().abs().T + b.double().abs()
                assert_close(y, ref, absref, dtype, what=f"{isa} linear {R}x{K} T={T}")
                xt = x.t().contiguous()
                assert_close(pysparse.spmm(A, xt), W.double() @ xt.double(), W.double().abs() @ xt.double().abs(), dtype,
                             what=f"{isa} spmm {R}x{K} n={T}")
    finally:
        pysparse.set_cpu_isa("auto")
