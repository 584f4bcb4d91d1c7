"""pysparse.sparsify: recipes, criteria, the never-slower-than-dense choice, the report."""
from __future__ import annotations

import json
import math

import pytest
import torch

import pysparse
from pysparse._safetensors import load_file, save_file
from pysparse.nn import SparseLinear, _choice
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


# Every dtype a model file can hold (the float8 ones where this torch has them).
_BUFFER_DTYPES = [getattr(torch, n) for n in (
    "float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint64", "uint32", "uint16",
    "uint8", "bool", "complex64", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
    "float8_e8m0fnu") if hasattr(torch, n)]


class _Scaled(torch.nn.Module):
    """A linear layer times a 0-d learned scale, with a 0-d step counter and a buffer of each
    dtype (random bytes: NaN payloads included, bools 0 or 1)."""

    def __init__(self, seed: int):
        super().__init__()
        g = gen(seed)
        self.lin = torch.nn.Linear(32, 16)
        self.scale = torch.nn.Parameter(torch.randn((), generator=g))
        self.register_buffer("step", torch.tensor(seed * 1000 + 7))
        for i, dt in enumerate(_BUFFER_DTYPES):
            raw = torch.randint(0, 2 if dt == torch.bool else 256, (6 * dt.itemsize,), dtype=torch.uint8, generator=g)
            self.register_buffer(f"b{i}", raw.view(dt).reshape(2, 3) if i % 2 else raw.view(dt)[:1].reshape(()))

    def forward(self, x):
        return self.lin(x) * self.scale


def _bytes_equal(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8),
                                                                      b.reshape(-1).view(torch.uint8))


def test_save_and_load_0d_tensors_and_every_dtype(tmp_path):
    torch.manual_seed(0)
    model = _Scaled(1)
    model.lin = SparseLinear.from_linear(model.lin, "csr", sparsity=0.5)
    pysparse.nn.save_sparse(model, tmp_path / "m.safetensors")
    torch.manual_seed(1)
    back = pysparse.nn.load_sparse(_Scaled(2), tmp_path / "m.safetensors")
    assert isinstance(back.lin, SparseLinear) and back.scale.shape == () and back.step.item() == 1007
    for k, v in model.state_dict().items():
        assert _bytes_equal(back.state_dict()[k], v), k
    x = torch.randn(3, 32, generator=gen(3))
    assert torch.equal(back(x), model(x))


def test_a_malformed_file_is_a_value_error_naming_it(tmp_path):
    path = tmp_path / "m.safetensors"
    pysparse.nn.save_sparse(mlp(2), path)
    path.write_bytes(path.read_bytes() + b"\x00")  # a byte that no tensor owns
    with pytest.raises(ValueError, match=r"m\.safetensors: data bytes \d+\.\.\d+ belong to no tensor \(after the last"):
        pysparse.nn.load_sparse(mlp(3), path)
    save_file({"a": torch.ones(1)}, path, {"pysparse.sparse_layers": "[" * 100_000})
    with pytest.raises(ValueError, match=r"the 'pysparse.sparse_layers' metadata is not a JSON list"):
        pysparse.nn.load_sparse(mlp(3), path)


# Cache entries that are valid JSON but no timing: each must be timed again and replaced.
_BAD_ENTRIES = {
    "int": 5, "list of the names": ["dense", "csr"], "string": "fast", "null": None,
    "other names": {"dense": 1e-3, "sparse": 1e-3}, "a name more": {"dense": 1e-3, "csr": 1e-3, "bsr": 1e-3},
    "zero": {"dense": 1e-3, "csr": 0}, "negative": {"dense": -1e-3, "csr": 1e-3},
    "NaN": {"dense": math.nan, "csr": 1e-3}, "infinite": {"dense": math.inf, "csr": 1e-3},
    "NaN string": {"dense": "NaN", "csr": 1e-3}, "number string": {"dense": "1e-3", "csr": 1e-3},
    "bool": {"dense": True, "csr": 1e-3}, "null time": {"dense": None, "csr": 1e-3},
    "huge int": {"dense": 10**400, "csr": 1e-3}, "below a tick": {"dense": 1e-300, "csr": 1e-3},
    "nested": {"dense": [1e-3], "csr": 1e-3},
}


@pytest.mark.parametrize("case", list(_BAD_ENTRIES))
def test_a_bad_cache_entry_is_timed_again_and_replaced(tmp_path, monkeypatch, case):
    monkeypatch.setenv("PYSPARSE_CACHE_DIR", str(tmp_path))
    full = f"{_choice.machine_key()}|layer"
    _choice.cache_path().write_text(json.dumps({full: _BAD_ENTRIES[case], "other": [[[]]]}))
    candidates = {"dense": lambda: torch.ones(8).sum(), "csr": lambda: torch.ones(8).sum()}
    times, hit = _choice.time_candidates("layer", candidates, reps=3)
    assert not hit and set(times) == {"dense", "csr"} and all(0 < v < math.inf for v in times.values())
    assert json.loads(_choice.cache_path().read_text()) == {full: times}  # replaced; junk dropped
    assert _choice.time_candidates("layer", candidates, reps=3) == (times, True)


@pytest.mark.parametrize("text", ["[1, 2]", "5", "{not json", "[" * 100_000, "\udcff"])
def test_a_bad_cache_file_counts_as_empty(tmp_path, monkeypatch, text):
    monkeypatch.setenv("PYSPARSE_CACHE_DIR", str(tmp_path))
    _choice.cache_path().write_text(text, errors="surrogateescape")
    times, hit = _choice.time_candidates("layer", {"dense": lambda: None}, reps=3)
    assert not hit and _choice.time_candidates("layer", {"dense": lambda: None}, reps=3) == (times, True)


def test_sparsify_retimes_over_a_cache_of_zeros(tmp_path, monkeypatch):
    monkeypatch.setenv("PYSPARSE_CACHE_DIR", str(tmp_path))
    x = torch.randn(4, 64, generator=gen(4))
    recipe = {"2": {"format": "csr", "sparsity": 0.5, "min_speedup": 0.0}}
    pysparse.sparsify(mlp(1), recipe, calibration=lambda m: m(x))
    cache = json.loads(_choice.cache_path().read_text())
    _choice.cache_path().write_text(json.dumps({k: {name: 0 for name in v} for k, v in cache.items()}))
    report = pysparse.sparsify(mlp(1), recipe, calibration=lambda m: m(x))  # would divide by zero if trusted
    assert report[0]["cached"] is False and all(v > 0 for v in report[0]["times_us"][4].values())
