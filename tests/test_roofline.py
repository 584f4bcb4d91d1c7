"""The roofline probes (pysparse.bench.roofline): they measure something plausible, agree with
torch's own matmul (no kernel can beat the FMA peak by much) and refuse bad arguments."""
import time

import pytest
import torch

from pysparse import _C
from pysparse.bench import Roofline, cache_sizes, roofline


def test_fma_peak_bounds_torch_matmul():
    # torch's fp32 GEMM runs on the same FMA units: it cannot beat the probe (10% for noise). The
    # two alternate and each keeps its best, so a busy second on a shared host (which once read
    # the probe at 169 GFLOP/s against torch's 243) lowers neither alone.
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    torch.mm(a, b)
    best, peak = 1e9, 0.0
    for _ in range(3):
        for _ in range(3):
            t0 = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - t0)
        peak = max(peak, _C.probe_flops("fp32", torch.get_num_threads(), 0.1))
    torch_gflops = 2 * 1024**3 / best / 1e9
    assert peak > 0
    assert torch_gflops < 1.1 * peak, (torch_gflops, peak)


def test_roofline_levels_ordered():
    r = roofline(1, 0.05)
    assert isinstance(r, Roofline) and r.threads == 1
    assert r.fp32_gflops > 1
    assert set(r.read_gbps) >= {"L1", "L2", "DRAM"}
    assert all(v > 0 for v in r.read_gbps.values())
    # A cache is faster than DRAM (by far more than noise on any machine we run on).
    assert r.read_gbps["L1"] > r.read_gbps["DRAM"]
    assert r.working_set_bytes["L1"] < r.working_set_bytes["DRAM"]
    assert r.fraction(r.fp32_gflops / 2) == pytest.approx(0.5)
    assert r.fraction(1.0, "bf16") <= r.fraction(1.0, "fp32")
    assert r.as_dict()["fp32_gflops"] == r.fp32_gflops


def test_bf16_probe_matches_cpu_support():
    v = _C.probe_flops("bf16", 1, 0.02)
    assert (v > 0) == _C.bf16_dot_supported()


def test_cache_sizes_from_sysfs():
    c = cache_sizes()
    assert all(isinstance(v, int) and v > 0 for v in c.values())


@pytest.mark.parametrize("call, msg", [
    (lambda: _C.probe_flops("fp64", 1, 0.1), "unknown FLOP kind 'fp64'"),
    (lambda: _C.probe_flops("fp32", 0, 0.1), "threads must be in"),
    (lambda: _C.probe_flops("fp32", 1, 0.0), "seconds must be in"),
    (lambda: _C.probe_flops("fp32", 1, float("nan")), "seconds must be in"),
    (lambda: _C.probe_read_bandwidth(100, 1, 0.1), "bytes per thread"),
    (lambda: _C.probe_read_bandwidth(1 << 40, 1, 0.1), "bytes per thread"),
    (lambda: roofline(-1), "threads must be >= 1"),
])
def test_bad_arguments(call, msg):
    with pytest.raises(ValueError, match=msg):
        call()


def test_cli(capsys):
    from pysparse.__main__ import main

    assert main(["roofline", "--threads", "1", "--seconds", "0.02"]) == 0
    assert '"fp32_gflops"' in capsys.readouterr().out
    with pytest.raises(SystemExit, match="pysparse roofline: pysparse.bench.roofline: seconds"):
        main(["roofline", "--seconds", "100"])
