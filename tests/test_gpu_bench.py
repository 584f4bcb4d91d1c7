"""benchmarks/gpu_check.sh and gpu_bench.py run where no CI reaches (a GPU lent for minutes), so
CI runs what it can of them here: the shell script must parse, and gpu_bench.py --dry-run must
build every table (each section's code on small fp32 CPU tensors, Triton under the interpreter,
untimed), so that the one GPU run is not lost to a broken script."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_script_parses():
    subprocess.run(["bash", "-n", os.path.join(ROOT, "benchmarks", "gpu_check.sh")], check=True)


@pytest.mark.slow
def test_gpu_bench_dry_run_prints_every_table():
    env = dict(os.environ, PYTHONPATH=ROOT, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_bench.py"), "--dry-run"],
                         capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    headers = [i for i, line in enumerate(lines) if line.startswith("|---")]
    titles = [lines[i - 1].split("|")[1].strip() for i in headers]
    assert [t.split(" ")[0] for t in titles] == ["W", "mask", "FFN", "dtype", "dtype"], titles
    for i in headers:  # every table has rows
        assert lines[i + 1].startswith("| "), lines[i - 1]
