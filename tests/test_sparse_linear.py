"""pysparse.nn.SparseLinear: a drop-in nn.Linear over the sparse formats."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pysparse
from pysparse.nn import SparseLinear
from conftest import gen, save_load

CASES = [("csr", dict(sparsity=0.8)), ("bsr", dict(sparsity=0.75, blocksize=(16, 16))), ("nm", dict(n=2, m=4)),
         ("nm", dict(n=4, m=8))]


def linear(seed=0, bias=True):
    torch.manual_seed(seed)
    return torch.nn.Linear(64, 48, bias=bias)


@pytest.mark.parametrize("fmt,kw", CASES)
def test_from_linear_matches_the_pruned_dense_layer(fmt, kw):
    lin = linear()
    before = lin.weight.detach().clone()
    sl = SparseLinear.from_linear(lin, fmt, **kw)
    assert torch.equal(lin.weight, before)  # the original is left alone
    dense = sl.to_linear()
    W = dense.weight.detach()
    if fmt == "csr":
        assert (W == 0).float().mean().item() == pytest.approx(0.8, abs=0.01)
    elif fmt == "nm":
        assert torch.all((W.view(48, -1, kw["m"]) != 0).sum(-1) <= kw["n"])
    x = torch.randn(2, 5, 64, generator=gen(1))
    torch.testing.assert_close(sl(x), F.linear(x, W, lin.bias.detach()), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dense(x), sl(x), rtol=1e-5, atol=1e-5)
    assert "format=" in repr(sl) and sl.in_features == 64 and sl.out_features == 48


@pytest.mark.parametrize("fmt,kw", CASES)
def test_state_dict_round_trip_and_dtype(fmt, kw):
    sl = SparseLinear.from_linear(linear(2, bias=fmt != "bsr"), fmt, **kw)
    back = SparseLinear.from_state_dict(save_load(sl.state_dict()))
    x = torch.randn(3, 64, generator=gen(3))
    assert torch.equal(back(x), sl(x))
    half = SparseLinear.from_state_dict(sl.state_dict()).to(torch.bfloat16)
    assert half.weight_values.dtype == torch.bfloat16 and half.weight.values.dtype == torch.bfloat16
    torch.testing.assert_close(half(x.bfloat16()).float(), sl(x), rtol=3e-2, atol=3e-2)


def test_swaps_into_a_model_and_compiles():
    torch.manual_seed(4)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64))
    x = torch.randn(4, 64, generator=gen(5))
    model[0] = SparseLinear.from_linear(model[0], "nm")
    model[2] = SparseLinear.from_linear(model[2], "csr", sparsity=0.5)
    ref = model(x)
    f = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(f(x), ref)


def test_tampered_state_is_refused():
    sd = SparseLinear.from_linear(linear(6), "csr", sparsity=0.5).state_dict()
    sd["weight_col_indices"] = sd["weight_col_indices"].clone()
    sd["weight_col_indices"][0] = 1000
    with pytest.raises(ValueError, match=r"column index"):
        SparseLinear.from_state_dict(sd)


def test_bad_input():
    with pytest.raises(TypeError, match=r"needs an nn.Linear, got Conv1d"):
        SparseLinear.from_linear(torch.nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match=r"format must be 'csr', 'bsr' or 'nm', got 'coo'"):
        SparseLinear.from_linear(linear(), "coo")
    with pytest.raises(TypeError, match=r"needs a CSR, BSR or SparseNM weight, got Tensor"):
        SparseLinear(torch.randn(4, 4))
    with pytest.raises(ValueError, match=r"bias must have shape \(48,\)"):
        SparseLinear(pysparse.CSR.from_dense(torch.randn(48, 64)), torch.randn(47))
