"""Hostile inputs a fuzz pass once found to crash the process or answer silently wrong, each pinned
to its fix: the error type and sentence, or the right answer. (tests/test_fuzz.py generates many
more of each kind.) Crashing cases run in a child process, so a regression fails one test."""
from __future__ import annotations

import math
import subprocess
import sys
import os

import pytest
import torch
import torch.nn.functional as F

import pysparse
from pysparse import BlockMask, masked_attention
from references import reference_masked_attention

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOO_BIG = r"would need .* elements of \d+ bytes, more than this process can allocate"


def _child(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "import torch, pysparse\n" + code], capture_output=True, text=True,
                          cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), timeout=300)


# ---- size arithmetic on declared shapes -----------------------------------------------------

@pytest.mark.parametrize("K,tokens,what", [
    (2 ** 62, 1, "the packed dense operand"),        # once SIGFPE: a panel size divided by a wrapped 0
    (2 ** 57 + 1, 63, "the packed dense operand"),   # once a 1-float pack buffer, written past
    (2 ** 61, 3, "the packed dense operand"),
])
def test_huge_declared_columns_over_a_stride0_input(K, tokens, what):
    r = _child(f"A = pysparse.CSR(torch.tensor([0, 1]), torch.tensor([5]), torch.ones(1), (1, {K}), check=False)\n"
               f"x = torch.arange(1., {tokens} + 1).view({tokens}, 1).expand({tokens}, {K})\n"
               "try:\n    pysparse.linear(x, A)\nexcept ValueError as e:\n    print('ValueError:', e)")
    assert r.returncode == 0, f"crashed ({r.returncode}): {r.stderr[-500:]}"
    assert "ValueError: pysparse: " + what in r.stdout and "more than this process can allocate" in r.stdout, r.stdout


def test_huge_declared_rows_and_output():
    M = 2 ** 40  # an empty matrix of 2**40 rows over an expanded row-pointer tensor
    crow = torch.zeros(1, dtype=torch.int64).expand(M + 1)
    with pytest.raises(ValueError, match="pysparse: crow_indices " + TOO_BIG):  # not materialised to be checked
        torch.ops.pysparse.csr_linear(torch.ones(2, 4), crow, torch.zeros(0, dtype=torch.int64), torch.zeros(0),
                                      [M, 4], None)
    A = pysparse.CSR.from_dense(torch.eye(4))
    with pytest.raises(ValueError, match="pysparse: the output " + TOO_BIG):  # 2**40 tokens of one stride-0 row
        pysparse.linear(torch.ones(1, 4).expand(M, 4), A)


def test_int64_max_rows_do_not_wrap():
    with pytest.raises(RuntimeError, match=r"crow_indices must have rows \+ 1 = 9223372036854775808 entries"):
        torch.ops.pysparse.csr_linear(torch.ones(1, 4), torch.zeros(1, dtype=torch.int64),
                                      torch.zeros(0, dtype=torch.int64), torch.zeros(0), [2 ** 63 - 1, 4], None)


def test_a_single_nm_row_of_many_columns_needs_one_row_of_scratch():
    K = 2 ** 22
    A = pysparse.SparseNM(torch.ones(1, 1).expand(1, K // 2), torch.full((1, 1), 0x33, dtype=torch.uint8)
                          .expand(1, K // 8), (1, K), 2, 4, check=False)
    assert pysparse.linear(torch.ones(1, K), A).item() == K // 2


# ---- masked attention ----------------------------------------------------------------------

def test_huge_block_size():
    r = _child("bm = pysparse.BlockMask.causal(8, block_size=(64, 2**62))\n"
               "q = torch.randn(1, 1, 8, 16)\n"
               "out = pysparse.masked_attention(q, q, q, block_mask=bm)\n"
               "ref = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)\n"
               "print(float((out - ref).abs().max()))")
    assert r.returncode == 0 and float(r.stdout) < 1e-5, r.stderr[-500:]


@pytest.mark.parametrize("build", [
    lambda L: BlockMask.band_of(L, L, 0, 2 ** 63 - 1),
    lambda L: BlockMask.band_of(L, L, -2 ** 70, 2 ** 70),
    lambda L: BlockMask.sliding_window(L, sys.maxsize, causal=False),
    lambda L: BlockMask.band_of(L, L, -math.inf, 3),
])
def test_extreme_band_bounds_with_key_padding(build):
    L = 100  # partial tiles (64-blocks) where i + band_hi - j0 + 1 once wrapped
    bm = build(L) & BlockMask.key_padding(torch.tensor([70]), L)
    q, k, v = torch.randn(3, 1, 1, L, 16).unbind(0)
    torch.testing.assert_close(masked_attention(q, k, v, block_mask=bm).double(),
                               reference_masked_attention(q, k, v, bm.to_dense()), rtol=1e-5, atol=1e-5)


def test_band_bounds_are_clamped_and_checked():
    assert BlockMask.band_of(10, 12, -2 ** 80, 2 ** 80).band == (-10, 12)
    with pytest.raises(ValueError, match=r"band upper bound must be an integer or \+-inf, got 2.5"):
        BlockMask.band_of(10, 10, 0, 2.5)


def test_block_kinds_outside_skip_partial_full_are_refused():
    with pytest.raises(ValueError, match=r"kind must hold 0 \(skip\), 1 \(partial\) or 2 \(full\), got 5"):
        BlockMask(torch.full((1, 1, 1, 1), 5, dtype=torch.int8), (64, 64), (64, 64))
    q = torch.randn(1, 1, 64, 8)
    with pytest.raises(ValueError, match=r"block_kind must hold 0 \(skip\), 1 \(partial\) or 2 \(full\), got -1"):
        torch.ops.pysparse.masked_attention(q, q, q, torch.full((1, 1, 1, 1), -1, dtype=torch.int8), 64, 64,
                                            None, None, -64, 64, None, 1.0, None)


def test_nan_and_inf_follow_sdpa_at_allowed_keys():
    L = 16
    q, k, v = torch.randn(3, 1, 1, L, 8).unbind(0)
    m = torch.zeros(L, L)
    m[0, 0] = math.nan
    out, ref = masked_attention(q, k, v, attn_mask=m), F.scaled_dot_product_attention(q, k, v, attn_mask=m)
    assert out[0, 0, 0].isnan().all() and ref[0, 0, 0].isnan().all() and not out[0, 0, 1:].isnan().any()
    k2 = k.clone()
    k2[0, 0, 3, 0] = math.inf
    out, ref = masked_attention(q, k2, v), F.scaled_dot_product_attention(q, k2, v)
    assert torch.equal(out.isnan(), ref.isnan())
    torch.testing.assert_close(out[~out.isnan()], ref[~ref.isnan()], rtol=1e-5, atol=1e-5)
    # a NaN score where all else is masked: the vector max once dropped it and returned zeros
    for isa in pysparse._C.cpu_isa_supported():
        pysparse.set_cpu_isa(isa)
        try:
            bm = BlockMask.band_of(1, 2, 0, 0)
            qn = torch.randn(1, 1, 1, 4)
            qn[..., 0] = math.nan
            assert masked_attention(qn, torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4), block_mask=bm).isnan().all()
        finally:
            pysparse.set_cpu_isa("auto")


def test_excluded_keys_never_reach_the_output():
    L = 16
    q, k, v = torch.randn(3, 1, 1, L, 8).unbind(0)
    k[0, 0, 5] = math.inf  # +inf score, and -inf from the float mask: excluded, not NaN
    m = torch.zeros(L, L)
    m[:, 5] = -math.inf
    allowed = torch.ones(L, L, dtype=torch.bool)
    allowed[:, 5] = False
    torch.testing.assert_close(masked_attention(q, k, v, attn_mask=m).double(),
                               reference_masked_attention(q, k, v, allowed),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 3, 8, 0, 5), (1, 2, 0, 4, 4), (1, 2, 5, 4, 4, 0)])
def test_degenerate_dims_as_sdpa(shape):
    B, H, L, D, Dv = shape[:5]
    Lk = shape[5] if len(shape) > 5 else L
    q, k, v = torch.randn(B, H, L, D), torch.randn(B, H, Lk, D), torch.randn(B, H, Lk, Dv)
    torch.testing.assert_close(masked_attention(q, k, v), F.scaled_dot_product_attention(q, k, v))


# ---- formats, modules, ops -----------------------------------------------------------------

@pytest.mark.parametrize("shape", [(2.7, 4), (2, True), ("2", 4), (2,), (2, 4, 1), (-1, 4)])
def test_shapes_must_be_non_negative_integers(shape):
    with pytest.raises(ValueError, match="shape must be two non-negative integers"):
        pysparse.CSR(torch.zeros(3, dtype=torch.int32), torch.zeros(0, dtype=torch.int16), torch.zeros(0), shape)


def test_from_state_dict_names_what_is_missing_or_wrong():
    with pytest.raises(ValueError, match=r"SparseLinear.from_state_dict: missing 'weight_shape', 'weight_crow_indices'"):
        pysparse.nn.SparseLinear.from_state_dict({})
    sd = pysparse.nn.SparseLinear(pysparse.CSR.from_dense(torch.eye(4))).state_dict()
    sd["weight_shape"] = torch.tensor([4.0, 4.0])
    with pytest.raises(ValueError, match=r"'shape' must be an integer tensor of 2 entries, got torch.float32"):
        pysparse.nn.SparseLinear.from_state_dict(sd)
    with pytest.raises(ValueError, match=r"CSR.from_state_dict: missing entry 'values'"):
        pysparse.CSR.from_state_dict({"crow_indices": torch.zeros(1), "col_indices": torch.zeros(0),
                                      "shape": torch.tensor([0, 0])})


def test_bias_dtype_is_refused_when_the_module_is_built():
    with pytest.raises(ValueError, match=r"bias is torch.float64 on cpu but the weight is torch.float32 on cpu"):
        pysparse.nn.SparseLinear(pysparse.CSR.from_dense(torch.eye(4)), torch.zeros(4, dtype=torch.float64))


@pytest.mark.parametrize("values,meta,msg", [
    (torch.randn(3, 5).half(), torch.zeros(7, dtype=torch.int16), r"must be torch.int16 of shape \(3, cols\)"),
    (torch.randn(32, 8).half(), torch.zeros(32, 1, dtype=torch.int32), r"must be torch.int16"),
    (torch.randn(32, 8).half(), torch.zeros(32, 1, dtype=torch.int16), r"even number of metadata columns"),
    (torch.randn(16, 16).half(), torch.zeros(16, 2, dtype=torch.int16), r"rows divisible by 32"),
    (torch.randn(32, 16).half(), torch.zeros(32, 2, dtype=torch.int16), r"nibble 0x0, which names no 2:4 pair"),
    (torch.randn(32, 16).double(), torch.zeros(32, 2, dtype=torch.int16), r"no torch.float64 variant"),
    ("values", torch.zeros(1), r"needs a 2-D values tensor"),
])
def test_from_cutlass_refuses_garbage(values, meta, msg):
    with pytest.raises(ValueError, match=msg):
        pysparse.Sparse24.from_cutlass(values, meta)


def test_from_scipy_refuses_lossy_values():
    sp = pytest.importorskip("scipy.sparse")
    import numpy as np
    with pytest.raises(ValueError, match="the matrix has complex values"):
        pysparse.CSR.from_scipy(sp.csr_matrix(np.array([[1 + 2j, 0], [0, 3j]])))
    with pytest.raises(ValueError, match=r"value 1000000.0 at stored position 0 overflows torch.float16"):
        pysparse.CSR.from_scipy(sp.csr_matrix(np.array([[1e6, 0.0]])), dtype=torch.float16)
    A = pysparse.CSR.from_scipy(sp.csr_matrix(np.array([[1 + 0j, 0], [0, 2]])))  # real-valued complex is fine
    assert torch.equal(A.to_dense(), torch.tensor([[1.0, 0], [0, 2]]))


@pytest.mark.parametrize("tag", ["nm:2:4:junk", "nm:2:4x", "nm:2", "nm:x:y"])
def test_pruned_ffn_format_tags_are_read_whole(tag):
    A = pysparse.Sparse24.from_dense(pysparse.prune.nm(torch.randn(16, 8), 2, 4))
    with pytest.raises(ValueError, match=f"w1 format '{tag}' must read nm:N:M"):
        torch.ops.pysparse.pruned_ffn(torch.randn(2, 8), tag, [A.values, A.mask], None, "dense",
                                      [torch.randn(8, 16)], None, "none", [], 16, "relu", 0.0)


@pytest.mark.parametrize("change,msg", [
    (dict(groups=0), r"groups must be an integer >= 1, got 0"),
    (dict(kind="dense2"), r"kind must be csr, bsr, nm or dense"),
    (dict(stride=[1]), r"stride must be two integers >= 1"),
    (dict(in_channels=2.5), r"in_channels must be an integer >= 1, got 2.5"),
])
def test_tampered_conv_configs_are_refused(change, msg):
    conv = pysparse.nn.SparseConv2d.from_conv(torch.nn.Conv2d(4, 8, 3), "csr", sparsity=0.5)
    config = {**conv.config(), **change}
    with pytest.raises(ValueError, match=msg):
        pysparse.nn.SparseConv2d.from_state_dict(conv.state_dict(), config)


def test_cli_refuses_an_unwritable_out_before_pruning(tmp_path, capsys):
    from pysparse.__main__ import main
    with pytest.raises(SystemExit, match=r"cannot write --out .*: (No such file or directory|Permission denied)"):
        main(["sparsify", "pysparse.models.cnn:resnet18", "--recipe", "{}", "--out",
              str(tmp_path / "missing" / "x.safetensors")])
    with pytest.raises(SystemExit, match="is a folder, not a file"):
        main(["sparsify", "pysparse.models.cnn:resnet18", "--recipe", "{}", "--out", str(tmp_path)])
    assert not list(tmp_path.iterdir())
