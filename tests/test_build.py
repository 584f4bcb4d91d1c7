"""What was built and what runs: pysparse.info(), the torch-version check at import, CPU ISA
selection (set_cpu_isa and PYSPARSE_CPU_ISA)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import pysparse
from pysparse import _build_info, _loader
from conftest import SUPPORTED_ISAS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Every op of csrc/registry.cpp (tests/test_op_registry.py checks each is whole in every layer).
OPS = ["activation", "bsr_linear", "bsr_spmm", "csr_linear", "csr_sddmm", "csr_spmm", "csr_transpose_values",
       "masked_attention", "masked_attention_backward", "nm_compress", "nm_decompress", "nm_linear", "nm_spmm",
       "pruned_ffn"]


def _python(code, *, env=None, pythonpath=ROOT, cwd=ROOT):
    e = dict(os.environ, PYTHONPATH=pythonpath)
    e.pop("PYSPARSE_CPU_ISA", None)
    e.update(env or {})
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=e, cwd=cwd)


def test_info():
    info = pysparse.info()
    assert info["pysparse"] == pysparse.__version__ == _build_info.VERSION
    assert info["torch_built_against"] == _build_info.TORCH_VERSION
    assert info["torch_runtime"] == torch.__version__
    assert info["torch_built_against"].split("+")[0] == torch.__version__.split("+")[0]
    assert info["cuda_built"] is False or info["cuda_version_built"] is not None
    assert info["cuda_available"] == torch.cuda.is_available()
    assert info["cpu_isa_supported"] == list(SUPPORTED_ISAS)
    assert info["cpu_isa_supported"][0] == "scalar"
    assert set(info["cpu_isa_supported"]) <= set(info["cpu_isa_compiled"]) <= {"scalar", "avx2", "avx512"}
    assert info["cpu_isa_selected"] == SUPPORTED_ISAS[-1]
    assert info["threads"] == torch.get_num_threads()
    assert info["ops"] == OPS
    if not torch.cuda.is_available():
        assert info["triton_kernels"] is None and info["triton_kernels_why_not"].startswith("no CUDA device")
    for op in OPS:
        assert hasattr(torch.ops.pysparse, op)


def test_version_check_passes_for_this_torch():
    _loader._check_torch_matches()


@pytest.mark.parametrize("built", ["2.0.1+cpu", "2.12.0", "3.0.0+cu121"])
def test_torch_version_mismatch_is_one_sentence(monkeypatch, built):
    monkeypatch.setattr(_build_info, "TORCH_VERSION", built)
    with pytest.raises(ImportError) as e:
        _loader._check_torch_matches()
    msg = str(e.value)
    have = torch.__version__
    assert msg.startswith(f"pysparse {_build_info.VERSION} was built for torch {built} (CUDA none) but torch {have}")
    assert f"install the pysparse-kernels wheel built for torch {have.split('+')[0]}" in msg
    assert "\n" not in msg and len(re.findall(r"[.:;!?]\s", msg)) <= 1, "one sentence"


def test_cuda_version_mismatch(monkeypatch):
    monkeypatch.setattr(_build_info, "CUDA_VERSION", "12.1")
    with pytest.raises(ImportError, match=re.escape(f"(CUDA 12.1) but torch {torch.__version__} (CUDA "
                                                    f"{torch.version.cuda or 'none'}) is installed")):
        _loader._check_torch_matches()


def test_local_version_label_alone_is_not_a_mismatch(monkeypatch):
    """Only the release matters for the CPU library ("2.13.0" vs "2.13.0+cpu")."""
    monkeypatch.setattr(_build_info, "TORCH_VERSION", torch.__version__.split("+")[0] + "+abc")
    _loader._check_torch_matches()


@pytest.mark.slow
def test_import_with_mismatched_build_fails_cleanly(tmp_path):
    """`import pysparse` with a build recorded for another torch: one ImportError sentence, the
    extension never loaded (no undefined-symbol traceback)."""
    pkg = tmp_path / "pysparse"
    shutil.copytree(os.path.join(ROOT, "pysparse"), pkg, ignore=shutil.ignore_patterns("__pycache__", "_C*.so"))
    (pkg / "_C.so").write_text("not a shared object: loading it would fail differently")
    info = (pkg / "_build_info.py").read_text()
    (pkg / "_build_info.py").write_text(re.sub(r"TORCH_VERSION = .*", "TORCH_VERSION = '1.13.1+cpu'", info))
    r = _python("import pysparse; print(pysparse.__file__)", pythonpath=str(tmp_path), cwd=str(tmp_path))
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: pysparse ") and "was built for torch 1.13.1+cpu" in last, r.stderr


def test_set_cpu_isa_switches_kernels():
    try:
        for name in SUPPORTED_ISAS:
            assert pysparse.set_cpu_isa(name) == name
            assert pysparse._C.cpu_isa() == name and pysparse.info()["cpu_isa_selected"] == name
            A = pysparse.CSR.from_dense(torch.eye(3))
            assert torch.equal(pysparse.spmm(A, torch.ones(3, 2)), torch.ones(3, 2))
        assert pysparse.set_cpu_isa("auto") == SUPPORTED_ISAS[-1]
        assert pysparse.set_cpu_isa("") == SUPPORTED_ISAS[-1]
    finally:
        pysparse.set_cpu_isa("auto")


@pytest.mark.parametrize("name", ["sse9", "AVX2", "neon", "avx2 "])
def test_unknown_isa(name):
    pysparse.set_cpu_isa("scalar")
    try:
        msg = f"pysparse: unknown CPU ISA '{name}': choose scalar, avx2, avx512 or auto"
        with pytest.raises(ValueError, match=re.escape(msg)):
            pysparse.set_cpu_isa(name)
        assert pysparse._C.cpu_isa() == "scalar"  # a failed switch changes nothing
    finally:
        pysparse.set_cpu_isa("auto")


def test_unsupported_isa():
    missing = [n for n in ("avx2", "avx512") if n not in SUPPORTED_ISAS]
    if not missing:
        pytest.skip("this CPU supports every ISA")
    with pytest.raises(RuntimeError, match=rf"pysparse: this CPU does not support the '{missing[-1]}' kernels"):
        pysparse.set_cpu_isa(missing[-1])


@pytest.mark.slow
def test_isa_from_environment():
    code = ("import torch, pysparse; A = pysparse.CSR.from_dense(torch.eye(2)); "
            "assert torch.equal(pysparse.spmm(A, torch.ones(2, 3)), torch.ones(2, 3)); print(pysparse._C.cpu_isa())")
    r = _python(code, env={"PYSPARSE_CPU_ISA": "scalar"})
    assert r.returncode == 0 and r.stdout.strip() == "scalar", r.stderr
    r = _python(code, env={"PYSPARSE_CPU_ISA": "bogus"})
    assert r.returncode == 1 and ("ValueError: pysparse: the environment variable PYSPARSE_CPU_ISA=bogus is not "
                                  "usable (unknown CPU ISA 'bogus': choose scalar, avx2, avx512 or auto); unset it"
                                  ) in r.stderr, r.stderr
    # info still answers, and says why no kernels can run
    r = subprocess.run([sys.executable, "-m", "pysparse", "info"], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": ROOT, "PYSPARSE_CPU_ISA": "bogus"})
    assert r.returncode == 0 and '"cpu_isa_selected": "none: pysparse: the environment variable' in r.stdout, r.stderr


def test_gpu_kernels_say_why_they_are_missing(monkeypatch):
    """A failing import of our own Triton launchers is reported (a warning and info()), never
    swallowed: the CPU ops stay usable."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "pysparse._triton", None)  # the import now raises ImportError
    monkeypatch.delattr(pysparse, "_triton", raising=False)  # (else an earlier import is found on the package)
    with pytest.warns(RuntimeWarning, match="GPU kernels unavailable; pysparse._triton failed to import: ModuleNotFound"):
        version, why = pysparse._load_gpu_kernels()
    assert version is None and why.startswith("pysparse._triton failed to import: ModuleNotFoundError")
