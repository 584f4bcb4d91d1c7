"""Every registered op is whole in every layer: a CPU kernel, a fake (meta) implementation that
torch.compile and export trace, a CUDA kernel where a GPU exists, a sample that passes
torch.library.opcheck, and a true row in csrc/README.md (the op map). An op added to
csrc/registry.cpp without one of these fails here, by name."""
from __future__ import annotations

import os
import re

import pytest
import torch

import pysparse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPS = sorted(n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("pysparse::"))


def _csr():
    return pysparse.CSR.from_dense(pysparse.prune.magnitude(torch.randn(24, 40, generator=torch.Generator().manual_seed(0)), 0.7))


def _bsr():
    return pysparse.BSR.from_dense(pysparse.prune.blocks(torch.randn(24, 40, generator=torch.Generator().manual_seed(1)),
                                                         0.5, blocksize=(8, 8)), blocksize=(8, 8))


def _nm():
    W = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    return pysparse.Sparse24.from_dense(pysparse.prune.nm(W, 2, 4))


def _x(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(3))


# One small valid call per op: what opcheck runs (schema, fake vs real, autograd registration).
SAMPLES = {
    "csr_spmm": lambda: (*_csr().tensors(), [24, 40], _x(40, 9)),
    "csr_linear": lambda: (_x(3, 40), *_csr().tensors(), [24, 40], _x(24)),
    "csr_transpose_values": lambda: (_csr().values, pysparse.autograd.transpose_order(*_csr().tensors()[:2], 24, 40)),
    "csr_sddmm": lambda: (*_csr().tensors()[:2], [24, 40], _x(24, 6), _x(40, 6)),
    "bsr_spmm": lambda: (*_bsr().tensors(), [24, 40], _x(2, 40, 5)),
    "bsr_linear": lambda: (_x(5, 40), *_bsr().tensors(), [24, 40], None),
    "activation": lambda: (_x(3, 37), "gelu_tanh"),
    "nm_compress": lambda: (_nm().to_dense(), 2, 4),
    "nm_decompress": lambda: (*_nm().tensors(), [32, 64], 2, 4),
    "nm_spmm": lambda: (*_nm().tensors(), [32, 64], 2, 4, _x(64, 7)),
    "nm_linear": lambda: (_x(3, 64), *_nm().tensors(), [32, 64], 2, 4, _x(32), "gelu"),
    "masked_attention": lambda: (_x(1, 2, 70, 16), _x(1, 2, 70, 16), _x(1, 2, 70, 16), None, 64, 64, None, None,
                                 -70, 0, None, 0.25, None),
    "masked_attention_backward": lambda: (_x(1, 2, 70, 16), _x(1, 2, 70, 16), _x(1, 2, 70, 16), _x(1, 1, 70, 16),
                                          _x(1, 1, 70, 16), None, 64, 64, None, None, -70, 0, None, 0.25, None),
    "pruned_ffn": lambda: (_x(4, 64), "nm:2:4", list(_nm().tensors()), _x(32), "dense", [_x(64, 32)], None,
                           "none", [], 32, "relu", 0.0),
}


def test_every_op_has_a_sample():
    assert OPS and set(OPS) == set(SAMPLES), f"ops without a sample: {set(OPS) - set(SAMPLES)}; " \
                                             f"samples of no op: {set(SAMPLES) - set(OPS)}"


@pytest.mark.parametrize("op", OPS)
def test_kernels_and_fake(op):
    name = f"pysparse::{op}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU"), f"{op} has no CPU kernel"
    entry = torch._library.simple_registry.singleton.find(name)
    assert entry.fake_impl.kernel is not None, f"{op} has no fake implementation (torch.library.register_fake)"
    if torch.cuda.is_available():
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA"), f"{op} has no CUDA kernel"
    assert op in pysparse.info()["ops"]


@pytest.mark.parametrize("op", OPS)
def test_opcheck(op):
    torch.library.opcheck(getattr(torch.ops.pysparse, op).default, SAMPLES[op]())


def _readme_rows():
    with open(os.path.join(ROOT, "csrc", "README.md")) as f:
        return [line for line in f if line.startswith("|")]


@pytest.mark.parametrize("op", OPS)
def test_the_op_map_is_true(op):
    """csrc/README.md has the op's row, and every file the row names exists."""
    rows = [r for r in _readme_rows() if re.match(rf"\|\s*`?{op}`?\s*\|", r)]
    assert len(rows) == 1, f"csrc/README.md must have one row for {op}, has {len(rows)}"
    paths = re.findall(r"`([\w./-]+\.(?:py|cpp|cu|cuh|h))`", rows[0])
    assert paths, f"the row of {op} names no file"
    for p in paths:  # a bare file name is a test or a benchmark
        where = [p] if "/" in p else [os.path.join("tests", p), os.path.join("benchmarks", p)]
        assert any(os.path.exists(os.path.join(ROOT, w)) for w in where), \
            f"csrc/README.md: {op}'s row names {p}, which does not exist"
