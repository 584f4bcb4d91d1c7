"""pysparse.analyze.sensitivity: one layer pruned at a time, the output change measured."""
from __future__ import annotations

import re
import sys

import pytest
import torch
from torch import nn

import pysparse.analyze
from pysparse.analyze import sensitivity
from conftest import gen, single_thread

PREFIX = re.escape("pysparse.analyze.sensitivity: ")


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny matmuls on a shared 2-core machine: one thread is ~100x faster than a contended pool
    with single_thread():
        yield


def _mlp(seed: int = 0) -> nn.Sequential:
    g = gen(seed)
    net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    with torch.no_grad():
        for lin in net[::2]:
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) / lin.in_features ** 0.5)
            lin.bias.copy_(torch.randn(lin.bias.shape, generator=g) * 0.1)
    return net


def _cnn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(32, 5)).eval()


def _x(*shape, seed=1):
    return torch.randn(*shape, generator=gen(seed))


def _nearly_sparse(shape, density, g):
    """Exactly round(density * numel) entries of magnitude 0.5..1.5, the rest ~1e-4: magnitude
    pruning up to 1 - density removes only the tiny ones, beyond it large ones."""
    n = shape[0] * shape[1]
    big = torch.randperm(n, generator=g)[:round(density * n)]
    W = torch.randn(n, generator=g) * 1e-4
    W[big] = torch.sign(torch.randn(len(big), generator=g)) * (0.5 + torch.rand(len(big), generator=g))
    return W.view(shape) / shape[1] ** 0.5


def _flat(shape, g):
    """Every magnitude within 10% of the others: any pruning removes real weight."""
    return torch.sign(torch.randn(shape, generator=g)) * (1 + 0.1 * torch.rand(shape, generator=g)) / shape[1] ** 0.5


def _bits(model):
    """Every parameter and buffer as raw bits (torch.equal would call 0.0 and -0.0 equal)."""
    return {k: v.detach().clone().view(torch.int32) if v.dtype == torch.float32 else v.detach().clone()
            for k, v in model.state_dict().items()}


def _assert_same_bits(before, model):
    after = _bits(model)
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), f"{k} changed"


def _table_rows(report):
    return [[c.strip() for c in line.strip("|").split("|")] for line in report.table().splitlines()
            if line.startswith("|")]


@pytest.mark.parametrize("kind", ["unstructured", "block", "nm", "neurons"])
@pytest.mark.parametrize("make", [_mlp, _cnn], ids=["mlp", "cnn"])
def test_weights_restored_bit_for_bit(make, kind):
    net = make()
    x = _x(2, 4, 6, 6) if make is _cnn else _x(5, 32)
    before = _bits(net)
    y_before = net(x)
    r = sensitivity(net, (x,), levels=(0.3, 0.9), kind=kind, blocksize=(4, 4))
    _assert_same_bits(before, net)
    assert torch.equal(net(x), y_before)
    assert not net.training
    assert r.rows and all(row["change"] > 0 for row in r.rows)


def test_weights_restored_when_forward_raises():
    net, x = _mlp(), _x(5, 32)
    before, calls = _bits(net), []

    def run(model):
        calls.append(1)
        if len(calls) == 3:  # the dense run, one pruned run, then fail with a layer pruned
            raise RuntimeError("boom")
        return model(x)

    with pytest.raises(RuntimeError, match="boom"):
        sensitivity(net, run, levels=(0.5, 0.9))
    _assert_same_bits(before, net)


def test_conv_weight_pruned_as_matrix():
    net, x = _cnn(), _x(2, 4, 6, 6)
    r = sensitivity(net, x, levels=(0.5,))
    assert [row["layer"] for row in r.rows] == ["0", "4"]
    assert r.rows[0]["shape"] == (8, 4, 3, 3)
    assert _table_rows(r)[2][:2] == ["0", "8x4x3x3"]
    # nm groups run along in*kh*kw = 36, a multiple of 4; 8 groups of 16 do not fit 3*3*3 = 27
    assert sensitivity(net, x, kind="nm", n=2, m=4).skipped == {}
    skipped = sensitivity(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 16, 16)).eval(),
                          _x(1, 3, 6, 6), kind="nm", n=4, m=16).skipped
    assert list(skipped) == ["0"] and "27" in skipped["0"]


@pytest.mark.parametrize("metric", ["cosine", "relative_l2"])
def test_change_grows_with_level(metric):
    r = sensitivity(_mlp(), _x(16, 32), levels=(0.9, 0.3, 0.6), metric=metric)  # any order in, sorted out
    assert r.levels == [0.3, 0.6, 0.9]
    for name in ("0", "2", "4"):
        changes = [row["change"] for row in r.rows if row["layer"] == name]
        assert len(changes) == 3 and changes == sorted(changes), (name, changes)
        assert all(row["max_abs"] > 0 for row in r.rows)


def test_level_zero_changes_nothing():
    r = sensitivity(_mlp(), _x(4, 32), levels=(0.0, 0.5))
    assert [(row["change"], row["max_abs"]) for row in r.rows if row["level"] == 0.0] == [(0.0, 0.0)] * 3


@pytest.mark.parametrize("target", [0, 1, 2])
def test_most_sensitive_finds_the_fragile_layer(target):
    net, g = _mlp(), gen(7)
    with torch.no_grad():
        for i, lin in enumerate(net[::2]):
            # 90% pruning of a 5%-dense layer removes only ~1e-4 weights; of a flat one, real weight
            lin.weight.copy_(_flat(lin.weight.shape, g) if i == target else _nearly_sparse(lin.weight.shape, 0.05, g))
    r = sensitivity(net, _x(16, 32), levels=(0.5, 0.9))
    assert r.most_sensitive(1) == [str(2 * target)]
    assert len(r.most_sensitive(10)) == 3


def test_suggest_picks_the_highest_level_within_budget():
    net, g = _mlp(), gen(3)
    with torch.no_grad():
        net[0].weight.copy_(_nearly_sparse((64, 32), 0.05, g))  # up to 95% removes only tiny weights
        net[2].weight.copy_(_nearly_sparse((64, 64), 0.35, g))  # up to 65%
        net[4].weight.copy_(_flat((8, 64), g))                  # none
    r = sensitivity(net, _x(16, 32), levels=(0.3, 0.6, 0.9))
    assert r.suggest(1e-4) == {"0": 0.9, "2": 0.6, "4": 0.0}
    assert r.suggest(10.0) == {"0": 0.9, "2": 0.9, "4": 0.9}


def test_table_one_row_per_layer_one_column_per_level():
    r = sensitivity(_mlp(), _x(8, 32), levels=(0.5, 0.7, 0.9))
    rows = _table_rows(r)
    assert rows[0] == ["layer", "shape", "0.5", "0.7", "0.9"]
    assert [row[:2] for row in rows[2:]] == [["0", "64x32"], ["2", "64x64"], ["4", "8x64"]]
    assert all(len(row) == 5 for row in rows)
    assert "cosine" in r.table()


def test_nm_has_one_level():
    r = sensitivity(_mlp(), _x(8, 32), levels=(0.1, 0.2), kind="nm")
    assert r.levels == ["2:4"] and {row["level"] for row in r.rows} == {"2:4"}
    assert [len(row) for row in _table_rows(r)] == [3] * 5 and _table_rows(r)[0][2] == "2:4"
    assert set(r.suggest(10.0).values()) == {"2:4"} and set(r.suggest(-1.0).values()) == {0.0}


def test_block_skips_layers_it_does_not_divide():
    r = sensitivity(_mlp(), _x(8, 32), kind="block", blocksize=(16, 16))
    assert [row["layer"] for row in r.rows if row["level"] == 0.5] == ["0", "2"]
    assert "8x64" in r.skipped["4"] and "Skipped 4" in r.table()


def test_neurons_zero_whole_rows():
    net, x = _mlp(), _x(8, 32)
    r = sensitivity(net, x, levels=(0.5,), kind="neurons", layers=["4"])
    # the 4 of 8 output rows with the smallest norm are zeroed, so those outputs fall to the bias
    lin = net[4]
    drop = lin.weight.norm(dim=1).argsort()[:4]
    with torch.no_grad():
        expected = (net(x)[:, drop] - lin.bias[drop]).abs().max().item()
    assert r.rows[0]["max_abs"] == pytest.approx(expected, rel=1e-5)


def test_plot_writes_png(tmp_path):
    for levels, kind in (((0.5, 0.9), "unstructured"), ((0.5,), "nm")):
        path = tmp_path / f"{kind}.png"
        assert sensitivity(_mlp(), _x(8, 32), levels=levels, kind=kind).plot(path) == str(path)
        data = path.read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 1024


def test_plot_without_matplotlib(monkeypatch, tmp_path):
    r = sensitivity(_mlp(), _x(8, 32), levels=(0.5,))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.delitem(sys.modules, "matplotlib.figure", raising=False)
    with pytest.raises(ImportError, match=r"needs matplotlib: pip install matplotlib"):
        r.plot(tmp_path / "x.png")


@pytest.mark.parametrize("kwargs, msg", [
    (dict(levels=()), "levels must be"),
    (dict(levels=(0.5, 1.0)), "levels must be"),
    (dict(levels=(-0.1,)), "levels must be"),
    (dict(levels=("a",)), "levels must be"),
    (dict(kind="random"), "kind must be one of"),
    (dict(metric="kl"), "metric must be one of"),
    (dict(layers=["encoder.*"]), "no nn.Linear, nn.Conv2d or Conv1D module matches"),
    (dict(kind="nm", n=2, m=5), "m must be one of"),
    (dict(kind="nm", n=4, m=4), "n must satisfy"),
    (dict(kind="block", blocksize=(0, 4)), "blocksize must be"),
    (dict(kind="block", blocksize=(128, 128)), "no layer could be pruned"),
])
def test_bad_input(kwargs, msg):
    net = _mlp()
    before = _bits(net)
    with pytest.raises(ValueError, match=PREFIX + ".*" + re.escape(msg)):
        sensitivity(net, _x(4, 32), **kwargs)
    _assert_same_bits(before, net)


def test_output_without_tensor():
    with pytest.raises(ValueError, match=PREFIX + "the model's output"):
        sensitivity(_mlp(), lambda m: [m(_x(4, 32)).sum().item()])


def test_layers_filter():
    r = sensitivity(_mlp(), _x(8, 32), levels=(0.5,), layers=["[02]"])
    assert [row["layer"] for row in r.rows] == ["0", "2"]
    assert [row["layer"] for row in sensitivity(_mlp(), _x(8, 32), levels=0.5, layers="4").rows] == ["4"]


def test_inputs_forms_agree():
    net, x = _mlp(), _x(8, 32)

    class TwoArgs(nn.Module):  # a keyword argument and a dict output, like a transformers model
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x, scale=1.0):
            return {"loss": None, "logits": self.net(x) * scale, "hidden": x}

    ref = [row["change"] for row in sensitivity(net, (x,)).rows]
    assert [row["change"] for row in sensitivity(net, x).rows] == ref
    assert [row["change"] for row in sensitivity(net, lambda m: m(x)).rows] == ref
    wrapped = sensitivity(TwoArgs().eval(), lambda m: m(x, scale=2.0))
    assert [row["layer"] for row in wrapped.rows][::3] == ["net.0", "net.2", "net.4"]
    assert [row["change"] for row in wrapped.rows] == pytest.approx(ref, rel=1e-6)
    assert [row["change"] for row in sensitivity(TwoArgs().eval(), {"x": x, "scale": 2.0}).rows] == \
        [row["change"] for row in wrapped.rows]


def test_training_mode_warns_and_is_kept():
    net = _mlp().train()
    with pytest.warns(UserWarning, match="model.eval()"):
        sensitivity(net, _x(4, 32), levels=(0.5,))
    assert net.training


def test_progress_on_stderr(capsys):
    sensitivity(_mlp(), _x(4, 32), levels=(0.5, 0.9), progress=True)
    err = capsys.readouterr().err
    assert err.count("\r") == 6 and "6/6" in err and err.endswith("\n")


def test_module_importable():
    assert pysparse.analyze.sensitivity is sensitivity


def test_gpt2_conv1d_layers_are_measured():
    """GPT-2's Conv1D layers (weight stored (in, out)) are pruned as the (out, in) matrices they
    are: 2:4 along each output's inputs."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=16,
                                                                vocab_size=50)).eval()
    ids = torch.randint(0, 50, (2, 8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fc = model.get_submodule("transformer.h.0.mlp.c_fc").weight  # (in 32, out 128)
    seen = []

    def run(m):
        if (fc == 0).any():  # c_fc is the layer pruned now: 2 of every 4 inputs of each output kept
            seen.append(int((fc.t().reshape(128, 8, 4) != 0).sum(-1).max()))
        return m(ids).logits

    report = pysparse.analyze.sensitivity(model, run, kind="nm", n=2, m=4)
    assert seen == [2]
    names = {r["layer"] for r in report.rows}
    assert {"transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"} <= names
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # weights restored


# ---- profile ---------------------------------------------------------------------------------

def test_profile_times_each_pysparse_layer_and_the_whole_model():
    from pysparse.analyze import profile

    model = _mlp()
    pysparse.sparsify(model, {"*": {"format": "csr", "sparsity": 0.9, "kernel": "sparse"}}, time_layers=False,
                      skip_ends=False)
    x = _x(64, 32)
    y = model(x)
    rep = profile(model, (x,), rounds=3, reps=2)
    assert [r["name"] for r in rep.rows] == ["0", "2", "4"]
    for r in rep.rows:
        assert r["kind"] == "linear" and r["format"] == "csr" and r["sparse_us"] > 0 and r["dense_us"] > 0
        assert r["speedup"] == pytest.approx(r["dense_us"] / r["sparse_us"])
    e = rep.end_to_end
    assert e["sparse_ms"] > 0 and e["dense_ms"] > 0 and e["speedup"] == pytest.approx(e["dense_ms"] / e["sparse_ms"])
    table = rep.table()
    assert table.count("\n") == 2 + 3 and "**whole model**" in table
    assert torch.equal(model(x), y)  # the model is left as it was
    assert rep.as_dict()["rows"] == rep.rows


def test_profile_refuses_a_model_without_pysparse_layers():
    from pysparse.analyze import profile

    with pytest.raises(ValueError, match=r"the model has no pysparse layers .*: run pysparse.sparsify first"):
        profile(_mlp(), _x(4, 32))
    model = _mlp()
    pysparse.sparsify(model, {"*": {"format": "csr", "sparsity": 0.9, "kernel": "sparse"}}, time_layers=False,
                      skip_ends=False)
    with pytest.raises(ValueError, match=r"inputs must be a tensor, tuple, dict or callable, got int"):
        profile(model, 3)
