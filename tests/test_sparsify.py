"""pysparse.sparsify: recipes, criteria, the never-slower-than-dense choice, the report."""
from __future__ import annotations

import pytest
import torch

import pysparse
from pysparse._safetensors import load_file, save_file
from pysparse.nn import SparseLinear
from conftest import gen


def mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 128), torch.nn.ReLU(),
                               torch.nn.Linear(128, 128), torch.nn.ReLU(), torch.nn.Linear(128, 32))


def test_recipe_swaps_the_inner_layers_and_reports():
    model = mlp()
    x = torch.randn(16, 64, generator=gen(1))
    report = pysparse.sparsify(model, {"*": {"format": "nm", "n": 2, "m": 4, "min_speedup": 0.0}},
                               calibration=lambda m: m(x))
    assert isinstance(model[0], torch.nn.Linear) and isinstance(model[6], torch.nn.Linear)  # ends skipped
    assert isinstance(model[2], SparseLinear) and isinstance(model[4], SparseLinear)
    assert [r["name"] for r in report] == ["2", "4"]
    for r in report:
        assert r["format"] == "2:4" and r["kernel"] in ("2:4", "csr") and r["sparsity"] == pytest.approx(0.5, abs=0.01)
        t = r["times_us"][16]  # tuned at the calibration shape: 16 tokens
        assert set(t) == {"2:4", "csr", "dense"} and all(v > 0 for v in t.values())
    dense = torch.nn.Sequential(*[m.to_linear() if isinstance(m, SparseLinear) else m for m in model])
    torch.testing.assert_close(model(x), dense(x), rtol=1e-5, atol=1e-5)


def test_a_layer_that_would_be_slower_stays_dense_but_pruned():
    model = mlp(1)
    report = pysparse.sparsify(model, {"4": {"format": "csr", "sparsity": 0.5, "min_speedup": 1e9}}, skip_ends=False)
    assert [r["kernel"] for r in report] == ["dense"]
    assert isinstance(model[4], torch.nn.Linear)
    assert (model[4].weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)


def test_patterns_none_and_last_match_wins():
    model = mlp(2)
    recipe = {"*": {"format": "csr", "sparsity": 0.9, "min_speedup": 0.0}, "2": None}
    report = pysparse.sparsify(model, recipe, skip_ends=False, time_layers=False)
    assert [r["name"] for r in report] == ["0", "4", "6"]
    assert isinstance(model[2], torch.nn.Linear) and all("speedup" not in r for r in report)


def test_wanda_keeps_the_weights_on_loud_inputs():
    # Input feature 0 is 1000x louder than the others: |W| * ||x|| must keep its weights even where
    # |W| alone would drop them.
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8, bias=False))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[0].weight[:, 0] = 0.01
    x = torch.randn(32, 8, generator=gen(4))
    x[:, 0] *= 1000
    pysparse.sparsify(model, {"*": {"format": "nm", "criterion": "wanda", "min_speedup": 0.0}},
                      calibration=lambda m: m(x), skip_ends=False, time_layers=False)
    assert torch.all(model[0].weight.to_dense()[:, 0] != 0)
    magnitude = torch.nn.Sequential(torch.nn.Linear(8, 8, bias=False))
    with torch.no_grad():
        magnitude[0].weight.copy_(torch.ones(8, 8))
        magnitude[0].weight[:, 0] = 0.01
    pysparse.sparsify(magnitude, {"*": {"format": "nm", "min_speedup": 0.0}}, skip_ends=False, time_layers=False)
    assert torch.all(magnitude[0].weight.to_dense()[:, 0] == 0)


def test_bad_recipes():
    with pytest.raises(ValueError, match=r"criterion 'wanda' for '2' needs calibration inputs"):
        pysparse.sparsify(mlp(), {"*": {"format": "nm", "criterion": "wanda"}})
    with pytest.raises(ValueError, match=r"criterion must be 'magnitude', 'wanda' or 'taylor', got 'obd'"):
        pysparse.sparsify(mlp(), {"*": {"format": "nm", "criterion": "obd"}})
    with pytest.raises(ValueError, match=r"criterion 'taylor' for '2' needs calibration inputs"):
        pysparse.sparsify(mlp(), {"*": {"format": "nm", "criterion": "taylor"}})
    x = torch.randn(4, 64, generator=gen(2))
    with pytest.raises(ValueError, match=r"'taylor' needs calibration callables that return a scalar loss"):
        pysparse.sparsify(mlp(), {"*": {"format": "nm", "criterion": "taylor"}}, calibration=lambda m: m(x))
    with pytest.raises(ValueError, match=r"mixes structured keys \['heads'\] with weight keys \['format'\]"):
        pysparse.sparsify(mlp(), {"*": {"format": "nm", "heads": 0.5}})
    with pytest.raises(ValueError, match=r"prunes heads but no module matching its pattern is a recognised attention"):
        pysparse.sparsify(mlp(), {"*": {"heads": 0.5}})
    with pytest.raises(ValueError, match=r"kernel must be 'auto', 'sparse' or 'dense', got 'fast'"):
        pysparse.sparsify(mlp(), {"*": {"format": "nm", "kernel": "fast"}})
    with pytest.raises(ValueError, match=r"has no nn.Linear or nn.Conv2d layers"):
        pysparse.sparsify(torch.nn.ReLU(), {"*": {}})


def _with_bad_index(path, out, key: str, pos: int, value: int):
    """Writes the model file at `path` to `out` with entry `pos` of index tensor `key` set to
    `value`; returns the (tensors, metadata) written."""
    tensors, meta = load_file(path)
    tensors[key] = tensors[key].clone()
    tensors[key][pos] = value
    save_file(tensors, out, meta)
    return tensors, meta


def test_save_and_load_bit_identical_and_tamper_refused(tmp_path):
    model = mlp(5)
    x = torch.randn(8, 64, generator=gen(6))
    pysparse.sparsify(model, {"2": {"format": "csr", "sparsity": 0.8, "min_speedup": 0.0},
                              "4": {"format": "nm", "min_speedup": 0.0}}, time_layers=False)
    path = tmp_path / "m.safetensors"
    pysparse.nn.save_sparse(model, path)
    back = pysparse.nn.load_sparse(mlp(99), path)  # a fresh dense model of the same architecture
    assert isinstance(back[2], SparseLinear) and back[2].format_name == "csr" and back[4].format_name == "2:4"
    assert torch.equal(back(x), model(x))
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k

    tensors, meta = _with_bad_index(path, tmp_path / "bad.safetensors", "2.weight_col_indices", 3, 5000)
    with pytest.raises(ValueError, match=r"layer '2': .*column index"):
        pysparse.nn.load_sparse(mlp(99), tmp_path / "bad.safetensors")
    meta2 = dict(meta, **{"pysparse.sparse_layers": '["9"]'})
    save_file(tensors, tmp_path / "bad2.safetensors", meta2)
    with pytest.raises(ValueError, match=r"layer '9' does not exist in this model"):
        pysparse.nn.load_sparse(mlp(99), tmp_path / "bad2.safetensors")
    save_file({"a": torch.ones(1)}, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match=r"not a pysparse model file"):
        pysparse.nn.load_sparse(mlp(99), tmp_path / "plain.safetensors")


def test_global_scope_ranks_weights_across_layers():
    model = mlp(7)
    with torch.no_grad():
        model[2].weight.mul_(100.0)  # layer 2's weights dominate a global magnitude ranking
    report = pysparse.sparsify(model, {"*": {"format": "csr", "sparsity": 0.5, "scope": "global", "kernel": "sparse"}},
                               time_layers=False)
    by = {r["name"]: r["sparsity"] for r in report}
    assert by["2"] < 0.02 and by["4"] > 0.98  # the global half comes almost all from layer 4
    assert (by["2"] + by["4"]) / 2 == pytest.approx(0.5, abs=0.01)  # equal sizes: the average is the target
    with pytest.raises(ValueError, match=r"scope 'global' for '2' needs format 'csr'"):
        pysparse.sparsify(mlp(), {"*": {"format": "nm", "scope": "global"}})


def small_cnn(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 32, 3, padding=1),
                               torch.nn.ReLU(), torch.nn.Conv2d(32, 32, 1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(32, 10)).eval()


def test_convolutions_are_swapped_timed_and_pruned():
    from pysparse.nn import SparseConv2d

    model = small_cnn()
    x = torch.randn(2, 3, 16, 16, generator=gen(8))
    report = pysparse.sparsify(model, {"*": {"format": "csr", "sparsity": 0.8, "criterion": "wanda", "min_speedup": 0.0}},
                               calibration=lambda m: m(x))
    assert [r["name"] for r in report] == ["2", "4"]  # the stem conv and the classifier are the ends
    assert all(r["kind"] == "conv" and r["sparsity"] == pytest.approx(0.8, abs=0.01) for r in report)
    assert report[0]["times_us"][2] and isinstance(model[2], SparseConv2d)
    dense = torch.nn.Sequential(*[m.to_conv() if isinstance(m, SparseConv2d) else m for m in model])
    torch.testing.assert_close(model(x), dense(x), rtol=1e-4, atol=1e-5)
    untimed = pysparse.sparsify(small_cnn(), {"2": {"format": "nm"}})  # no calibration: no input shape to time at
    assert untimed[0]["times_us"] is None and untimed[0]["kernel"] == "2:4"


def test_sparse_convs_save_and_load(tmp_path):
    from pysparse.nn import SparseConv2d

    model = small_cnn(3)
    model[4] = torch.nn.Conv2d(32, 32, 3, padding=1, groups=4)
    x = torch.randn(2, 3, 16, 16, generator=gen(9))
    pysparse.sparsify(model, {"2": {"format": "csr", "sparsity": 0.7, "kernel": "sparse"},
                              "4": {"format": "nm", "n": 4, "m": 8, "kernel": "sparse"}})
    path = tmp_path / "cnn.safetensors"
    pysparse.nn.save_sparse(model, path)
    fresh = small_cnn(4)
    fresh[4] = torch.nn.Conv2d(32, 32, 3, padding=1, groups=4)
    back = pysparse.nn.load_sparse(fresh, path)
    assert isinstance(back[2], SparseConv2d) and back[4].format_name == "4:8" and back[4].groups == 4
    with torch.no_grad():
        assert torch.equal(back(x), model(x))
    _with_bad_index(path, tmp_path / "bad.safetensors", "2.weight_col_indices", 0, 10_000)
    with pytest.raises(ValueError, match=r"layer '2': .*column index"):
        pysparse.nn.load_sparse(small_cnn(5), tmp_path / "bad.safetensors")
