"""benchmarks/bench_engines.py: the ONNX graphs the peer engines run compute what the
transformers models compute, and the driver runs engines in worker processes, checks their
outputs and times them in rounds (tiny models: the real run is `make bench-engines`)."""
import argparse
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "benchmarks" / "engines"))

ort = pytest.importorskip("onnxruntime")
transformers = pytest.importorskip("transformers")

import bench_engines  # noqa: E402
from onnx_graphs import BUILDERS  # noqa: E402

TINY = {
    "bert": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                 vocab_size=100, layer_norm_eps=1e-12, hidden_act="gelu"),
    "llama": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=100, rms_norm_eps=1e-6, hidden_act="silu"),
}


def _hf(model):
    torch.manual_seed(0)
    if model == "bert":
        return transformers.BertModel(transformers.BertConfig(**TINY[model]), add_pooling_layer=False).eval()
    return transformers.LlamaModel(transformers.LlamaConfig(**TINY[model])).eval()


@pytest.mark.parametrize("model, shape", [("bert", (2, 7, 64)), ("llama", (1, 1, 64))])
def test_onnx_graph_matches_transformers(model, shape, tmp_path):
    m = _hf(model)
    with torch.no_grad():  # non-trivial norms and biases, so that a dropped term shows
        for name, p in m.named_parameters():
            if "norm" in name.lower() or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(*shape)
    with torch.inference_mode():
        ref = (m.encoder(x)[0] if model == "bert" else m(inputs_embeds=x, use_cache=False)[0]).numpy()
    weights = {k: v.detach().numpy() for k, v in m.state_dict().items()}
    graph = BUILDERS[model](weights, TINY[model], shape)
    sess = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    out = sess.run(None, {graph.graph.input[0].name: x.numpy()})[0]
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_llama_graph_refuses_more_than_one_token():
    weights = {k: v.detach().numpy() for k, v in _hf("llama").state_dict().items()}
    with pytest.raises(ValueError, match="one token"):
        BUILDERS["llama"](weights, TINY["llama"], (1, 2, 64))


def test_driver_runs_checks_and_times_engines(tmp_path, monkeypatch):
    monkeypatch.setenv("PYSPARSE_CACHE_DIR", str(tmp_path / "cache"))  # the workers' kernel choices
    monkeypatch.setattr(bench_engines, "VENVS", {"ort": tmp_path / "none", "deepsparse": tmp_path / "none"})
    args = argparse.Namespace(threads=1, rounds=2, reps=2)
    with open(tmp_path / "log", "w") as log:
        row = bench_engines.run_config("tiny-bert-80%", "bert", TINY["bert"], 2, 8, "80%", "encoder.layer.*",
                                       ["torch", "pysparse", "ort"], args, log, tmp_path)
    eng = row["engines"]
    for e in ("torch", "pysparse", "ort"):
        assert "skipped" not in eng[e], eng[e]
        assert len(eng[e]["rounds_s"]) == 2 and eng[e]["median_s"] > 0
        assert eng[e]["max_rel_diff"] < 1e-4  # every engine ran pysparse's zeroed weights
    assert eng["pysparse"]["detail"].startswith("kernels ")
    # the zeroed weights the peers ran: 80% of each encoder linear
    w = np.load(tmp_path / "w.npz")
    q = w["encoder.layer.0.attention.self.query.weight"]
    assert abs((q == 0).mean() - 0.8) < 0.02
    table = bench_engines.markdown([row], ["torch", "pysparse", "ort"])
    assert "| BERT-base encoder | 2 x 8 | 80% |" in table


def test_driver_skips_a_missing_peer(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_engines, "VENVS", {"ort": tmp_path / "none", "deepsparse": tmp_path / "none"})
    monkeypatch.setattr(bench_engines, "MODULES", {"ort": "onnxruntime", "deepsparse": "no_such_module_here"})
    args = argparse.Namespace(threads=1, rounds=1, reps=1)
    with open(tmp_path / "log", "w") as log:
        row = bench_engines.run_config("tiny-bert-unpruned", "bert", TINY["bert"], 1, 4, "unpruned",
                                       "encoder.layer.*", ["torch", "deepsparse"], args, log, tmp_path)
    assert "no virtualenv" in row["engines"]["deepsparse"]["skipped"]
    assert row["engines"]["torch"]["median_s"] > 0
