"""pysparse.prune.iterative.Iterative: gradual pruning during training, and its example."""
from __future__ import annotations

import importlib.util
import pathlib
import re
from collections import OrderedDict

import pytest
import torch
from torch import nn

from pysparse.nn import SparseLinear
from pysparse.prune.iterative import Iterative

ROOT = pathlib.Path(__file__).resolve().parents[1]
PRUNED = ["body.0", "body.2", "fc"]  # what skip_ends leaves of _model(): not stem, not head


def _model(seed: int = 0) -> nn.Module:
    """Convs and linears with odd sizes: stem and head are the ends; K = 72, 144, 64 inside."""
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict(
        stem=nn.Conv2d(3, 8, 3, padding=1),
        body=nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)),
        pool=nn.AdaptiveAvgPool2d(2), flat=nn.Flatten(),
        fc=nn.Linear(64, 36), act=nn.ReLU(), head=nn.Linear(36, 10)))


def _weights(model: nn.Module, names=PRUNED):
    return {n: model.get_submodule(n).weight for n in names}


def _train(model, pruner, opt, steps, after=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        loss = model(torch.randn(4, 3, 8, 8, generator=g)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        pruner.step()
        if after is not None:
            after()


def _pruned_count(w: torch.Tensor) -> int:
    return int((w == 0).sum())


# ---- schedule ----------------------------------------------------------------------------

def test_schedule_cubic_with_start_and_every():
    p = Iterative(_model(), 0.8, steps=10, start=5, every=2)
    cubic = lambda done: 0.8 * (1 - (1 - done / 10) ** 3)  # noqa: E731
    expected = {0: 0.0, 4: 0.0, 5: 0.0, 6: 0.0, 7: cubic(2), 8: cubic(2), 9: cubic(4), 14: cubic(8),
                15: 0.8, 16: 0.8, 1000: 0.8}
    for t, s in expected.items():
        assert p.target_at(t) == pytest.approx(s, abs=1e-12), t
    assert cubic(2) == pytest.approx(0.3904)
    # step() returns the same values, one training step at a time
    got = [p.step() for _ in range(17)]
    assert got == pytest.approx([p.target_at(t) for t in range(1, 18)], abs=1e-12)


def test_schedule_linear_and_last_step_reaches_target():
    p = Iterative(_model(), 0.5, steps=10, schedule="linear", every=4)
    # updates at 4 and 8, and always at the last ramp step even when `every` does not divide it
    assert [p.target_at(t) for t in range(12)] == pytest.approx(
        [0, 0, 0, 0, 0.2, 0.2, 0.2, 0.2, 0.4, 0.4, 0.5, 0.5], abs=1e-12)
    p = Iterative(_model(), 0.9, steps=4, schedule="linear")
    assert [p.target_at(t) for t in range(6)] == pytest.approx([0, 0.225, 0.45, 0.675, 0.9, 0.9])


def test_schedule_is_monotone_and_front_loaded():
    p = Iterative(_model(), 0.9, steps=100)
    s = [p.target_at(t) for t in range(102)]
    assert all(a <= b for a, b in zip(s, s[1:]))
    assert s[50] == pytest.approx(0.9 * 0.875)  # cubic: 7/8 of the way at half time


# ---- exact sparsity ----------------------------------------------------------------------

@pytest.mark.parametrize("schedule", ["cubic", "linear"])
@pytest.mark.parametrize("target", [0.0, 0.37, 0.9])
def test_unstructured_local_reaches_target_exactly(schedule, target):
    model = _model()
    p = Iterative(model, target, steps=7, schedule=schedule, every=2)
    _train(model, p, torch.optim.SGD(model.parameters(), lr=0.01), 9)
    for name, w in _weights(model).items():
        assert _pruned_count(w) == round(target * w.numel()), name
        assert p.sparsity()[name] == pytest.approx(round(target * w.numel()) / w.numel())
        assert int((~p.masks[name]).sum()) == round(target * w.numel())
    # the ends are untouched
    assert _pruned_count(model.stem.weight) == 0 and _pruned_count(model.head.weight) == 0


def test_unstructured_keeps_the_largest_in_one_shot():
    model = _model()
    before = {n: w.detach().clone() for n, w in _weights(model).items()}
    p = Iterative(model, 0.6, steps=1)
    p.step()
    for name, w in _weights(model).items():
        kept = w != 0
        assert before[name].abs()[kept].min() >= before[name].abs()[~kept].max()
        assert torch.equal(w[kept], before[name][kept])


def test_global_scope_counts_over_all_layers():
    model = _model()
    with torch.no_grad():
        w = model.fc.weight
        w.copy_(w.sign() * (1 + w.abs()))  # all larger than any other: global ranking keeps them
    p = Iterative(model, 0.5, steps=3, scope="global")
    for _ in range(3):
        p.step()
    ws = _weights(model)
    total = sum(w.numel() for w in ws.values())
    assert sum(_pruned_count(w) for w in ws.values()) == round(0.5 * total)
    assert _pruned_count(ws["fc"]) == 0
    assert p.sparsity()["body.2"] > 0.5


@pytest.mark.parametrize("scope", ["local", "global"])
def test_block_pattern(scope):
    model = _model()
    p = Iterative(model, 0.75, steps=5, pattern="block", blocksize=(4, 4), scope=scope)
    _train(model, p, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), 6)
    counts = 0
    for name, w in _weights(model).items():
        z = (w.detach().reshape(w.shape[0] // 4, 4, -1, 4) == 0).permute(0, 2, 1, 3).reshape(
            w.shape[0] // 4, -1, 16)
        full, none = z.all(-1), ~z.any(-1)
        assert bool((full | none).all()), f"{name}: a block is partly pruned"
        counts += int(full.sum())
        if scope == "local":
            assert int(full.sum()) == round(0.75 * full.numel()), name
    assert counts == 0.75 * sum(w.numel() // 16 for w in _weights(model).values())


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 8), (2, 8)])
def test_nm_every_group_ends_exactly_n_of_m(n, m):
    model = _model()
    p = Iterative(model, None, steps=6, pattern="nm", n=n, m=m, every=2)
    assert p.target == 1 - n / m

    def groups_ok():
        for name, w in _weights(model).items():
            nnz = (w.detach().reshape(w.shape[0], -1, m) != 0).sum(-1)
            assert int(nnz.min()) >= n, name  # on the way: no group below n
    _train(model, p, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-3), 8,
           after=groups_ok)
    for name, w in _weights(model).items():
        nnz = (w.detach().reshape(w.shape[0], -1, m) != 0).sum(-1)
        assert bool((nnz == n).all()), name
        assert _pruned_count(w) == round((1 - n / m) * w.numel())


def test_nm_ramp_is_gradual():
    model = _model()
    p = Iterative(model, 0.5, steps=4, pattern="nm", schedule="linear")
    seen = []
    for _ in range(4):
        p.step()
        seen.append(p.sparsity()["body.2"])
    assert seen == pytest.approx([0.125, 0.25, 0.375, 0.5], abs=1 / 2304)


def test_weights_already_zero_are_not_counted_twice():
    model = _model()
    with torch.no_grad():
        model.fc.weight[:, :8] = 0  # 288 of 2304 weights: pruned first, no extra ones
    p = Iterative(model, 0.5, steps=2)
    p.step()
    p.step()
    assert _pruned_count(model.fc.weight) == round(0.5 * 2304)
    assert not p.masks["fc"][:, :8].any()


# ---- masks kept through training ---------------------------------------------------------

@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-2),
    lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=1e-2),
    lambda ps: torch.optim.AdamW(ps, lr=1e-2),
], ids=["sgd-momentum-wd", "adam-wd", "adamw"])
@pytest.mark.parametrize("pattern", ["unstructured", "nm", "block"])
def test_pruned_weights_stay_zero_and_masks_are_monotone(make_opt, pattern):
    model = _model()
    p = Iterative(model, None if pattern == "nm" else 0.8, steps=8, pattern=pattern, every=2)
    previous = {n: torch.ones_like(w, dtype=torch.bool) for n, w in _weights(model).items()}

    def check():
        for name, w in _weights(model).items():
            mask = p.masks[name]
            assert bool((w[~mask] == 0).all()), f"{name}: a pruned weight moved"
            assert not bool((mask & ~previous[name]).any()), f"{name}: a pruned weight came back"
            previous[name] = mask.clone()
    _train(model, p, make_opt(model.parameters()), 14, after=check)
    assert all(not m.all() for m in previous.values())


def test_gradient_hooks_alone_keep_plain_sgd_at_zero():
    model = _model()
    p = Iterative(model, 0.7, steps=1)
    p.step()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):  # no p.step(): only the hooks act
        opt.zero_grad()
        model(torch.randn(4, 3, 8, 8)).square().mean().backward()
        for name, w in _weights(model).items():
            assert bool((w.grad[~p.masks[name]] == 0).all())
        opt.step()
        for name, w in _weights(model).items():
            assert bool((w[~p.masks[name]] == 0).all())


def test_hook_does_not_turn_inf_gradients_into_nan():
    model = _model()
    p = Iterative(model, 0.5, steps=1)
    p.step()
    w = model.fc.weight
    (w * float("inf")).sum().backward()
    assert not bool(w.grad.isnan().any())
    assert bool((w.grad[~p.masks["fc"]] == 0).all())


# ---- finalize / state --------------------------------------------------------------------

def test_finalize_removes_hooks_and_leaves_a_clean_model():
    model = _model()
    keys = set(model.state_dict())
    p = Iterative(model, 0.6, steps=2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    _train(model, p, opt, 3)
    masks = p.masks
    assert p.finalize() is model
    assert set(model.state_dict()) == keys  # no mask buffers, no parametrizations
    for name, w in _weights(model).items():
        assert _pruned_count(w) == round(0.6 * w.numel())
    model.zero_grad()
    model(torch.randn(4, 3, 8, 8)).square().mean().backward()
    for name, w in _weights(model).items():
        assert bool((w.grad[~masks[name]] != 0).any()), f"{name}: gradients still masked"
    with pytest.raises(ValueError, match=r"^pysparse\.prune\.Iterative: step\(\) was called after finalize\(\)$"):
        p.step()


def test_state_dict_resumes():
    a, b = _model(), _model()
    pa = Iterative(a, 0.8, steps=10)
    _train(a, pa, torch.optim.SGD(a.parameters(), lr=0.01), 4)
    b.load_state_dict(a.state_dict())
    pb = Iterative(b, 0.8, steps=10)
    pb.load_state_dict(pa.state_dict())
    assert pb.t == 4 and all(torch.equal(pb.masks[k], pa.masks[k]) for k in pa.masks)
    assert pb.step() == pa.step() == pytest.approx(pa.target_at(5))
    assert all(torch.equal(pb.masks[k], pa.masks[k]) for k in pa.masks)


def test_fisher_criterion():
    model = _model()
    p = Iterative(model, 0.7, steps=4, criterion="fisher")
    _train(model, p, torch.optim.SGD(model.parameters(), lr=0.01), 5)
    for name, w in _weights(model).items():
        assert _pruned_count(w) == round(0.7 * w.numel()), name
    q = Iterative(_model(), 0.7, steps=4, criterion="fisher")
    with pytest.raises(ValueError, match=r"^pysparse\.prune\.Iterative: criterion 'fisher' found no gradient for 'body\.0'"):
        q.step()  # no backward() ran


def test_old_criterion_name_taylor_warns_and_means_fisher():
    a, b = _model(), _model()
    with pytest.warns(DeprecationWarning, match=r"criterion 'taylor' is deprecated, use 'fisher'"):
        pa = Iterative(a, 0.7, steps=4, criterion="taylor")
    pb = Iterative(b, 0.7, steps=4, criterion="fisher")
    assert pa.criterion == "fisher"
    _train(a, pa, torch.optim.SGD(a.parameters(), lr=0.01), 5)
    _train(b, pb, torch.optim.SGD(b.parameters(), lr=0.01), 5)
    assert all(torch.equal(pa.masks[k], pb.masks[k]) for k in pb.masks)


# ---- which layers ------------------------------------------------------------------------

def test_skip_ends_and_layer_patterns():
    assert Iterative(_model(), 0.5, steps=1).layers == PRUNED
    assert Iterative(_model(), 0.5, steps=1, skip_ends=False).layers == ["stem"] + PRUNED + ["head"]
    assert Iterative(_model(), 0.5, steps=1, layers="body.*").layers == ["body.0", "body.2"]
    assert Iterative(_model(), 0.5, steps=1, layers=["fc", "body.2"]).layers == ["body.2", "fc"]
    assert Iterative(_model(), 0.5, steps=1, layers=["stem", "fc"], skip_ends=False).layers == ["stem", "fc"]
    model = _model()
    p = Iterative(model, 0.5, steps=1, layers="body.*")
    p.step()
    assert _pruned_count(model.fc.weight) == 0 and _pruned_count(model.body[2].weight) == 1152


# ---- bad input ---------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,message", [
    (dict(target=1.0), "target must be a number in [0, 1), got 1.0"),
    (dict(target=-0.1), "target must be a number in [0, 1), got -0.1"),
    (dict(target="0.5"), "target must be a number in [0, 1), got '0.5'"),
    (dict(target=None), "target must be a number in [0, 1), got None"),
    (dict(steps=0), "steps must be an integer >= 1, got 0"),
    (dict(steps=2.5), "steps must be an integer >= 1, got 2.5"),
    (dict(every=0), "every must be an integer >= 1, got 0"),
    (dict(start=-1), "start must be an integer >= 0, got -1"),
    (dict(schedule="exp"), "schedule must be one of 'cubic', 'linear', got 'exp'"),
    (dict(pattern="2:4"), "pattern must be one of 'unstructured', 'nm', 'block', got '2:4'"),
    (dict(criterion="l1"), "criterion must be one of 'magnitude' (|w|), 'fisher' ((w * dL/dw)^2 summed over the "
                           "steps between updates), got 'l1'"),
    (dict(scope="net"), "scope must be one of 'local', 'global', got 'net'"),
    (dict(pattern="nm", m=16, target=None), "layer 'body.0' has 72 inputs per output (in * kh * kw for a conv), "
                                            "not a multiple of m = 16"),
    (dict(pattern="nm", n=4, m=4, target=None), "pattern 'nm' needs m in (4, 8, 16) and an integer 0 < n < m, "
                                                "got n=4, m=4"),
    (dict(pattern="nm", target=0.9), "pattern 'nm' with n=2, m=4 ends at sparsity 0.5, so target must be 0.5 "
                                     "or None, got 0.9"),
    (dict(pattern="nm", target=None, scope="global"),
     "scope 'global' applies to the unstructured and block patterns, not 'nm'"),
    (dict(pattern="block", blocksize=(3, 4)), "layer 'body.0' has the shape (16, 72), not divisible by the block "
                                              "size (3, 4)"),
    (dict(pattern="block", blocksize=(4, 0)), "blocksize must be two positive integers, got (4, 0)"),
    (dict(layers="nothing.*"), "no nn.Linear, nn.Conv2d or Conv1D layer matches layers=['nothing.*'] once the first "
                               "and last are skipped (skip_ends=True)"),
    (dict(layers=["stem", "head"]), "no nn.Linear, nn.Conv2d or Conv1D layer matches layers=['stem', 'head'] once the "
                                    "first and last are skipped (skip_ends=True)"),
    (dict(layers=[3]), "layers must be None, a pattern or a list of patterns, got [3]"),
])
def test_bad_input(kwargs, message):
    kwargs = {"target": 0.5, "steps": 10, **kwargs}
    with pytest.raises(ValueError, match="^" + re.escape("pysparse.prune.Iterative: " + message) + "$"):
        Iterative(_model(), **kwargs)


def test_bad_model_and_mismatched_state():
    with pytest.raises(ValueError, match=r"^pysparse\.prune\.Iterative: model must be a torch\.nn\.Module, got Tensor$"):
        Iterative(torch.ones(3), 0.5, 10)
    p = Iterative(_model(), 0.5, 10, layers="body.*")
    with pytest.raises(ValueError, match=r"^pysparse\.prune\.Iterative: the saved masks do not match this pruner's layers$"):
        p.load_state_dict(Iterative(_model(), 0.5, 10).state_dict())


# ---- the example -------------------------------------------------------------------------

@pytest.mark.slow
def test_example_quick(capsys):
    spec = importlib.util.spec_from_file_location("iterative_pruning", ROOT / "examples" / "iterative_pruning.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    res = example.main(["--quick"])
    out = capsys.readouterr().out
    for label in ("dense", "one-shot 90%, before fine-tuning", "one-shot 90%, fine-tuned", "iterative 90%"):
        assert re.search(rf"^{re.escape(label)}\s.*test accuracy \d+\.\d%$", out, re.M), label
    assert re.search(r"^sparsity of the pruned layers, one-shot: +3 0\.900, 7 0\.900$", out, re.M)
    assert re.search(r"^sparsity of the pruned layers, iterative: 3 0\.900, 7 0\.900$", out, re.M)
    assert set(res) == {"dense", "oneshot_pruned", "oneshot", "iterative"}
    assert res["dense"] > 0.3  # it learned something (10 classes); the comparison is for the full run


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = _model()
        self.tied = nn.Linear(64, 36)
        self.tied.weight = self.net.fc.weight

    def forward(self, x):
        return self.net(x)


def test_tied_and_frozen_weights():
    model = _Tied()
    model.net.body[0].weight.requires_grad_(False)  # frozen: pruned, no hook needed
    p = Iterative(model, 0.5, steps=2, layers=["net.body.*", "net.fc", "tied"], skip_ends=False)
    assert p.layers == ["net.body.0", "net.body.2", "net.fc"]  # the tied weight once, under its first name
    params = [q for q in model.parameters() if q.requires_grad]
    _train(model, p, torch.optim.SGD(params, lr=0.1, momentum=0.9), 3)
    assert _pruned_count(model.tied.weight) == round(0.5 * 2304)
    assert _pruned_count(model.net.body[0].weight) == round(0.5 * 1152)


# ---- hand-over to sparse layers ------------------------------------------------------------

def _dense_of(mod: nn.Module) -> torch.Tensor:
    return mod.dense_weight() if hasattr(mod, "dense_weight") else (
        mod.weight.to_dense() if hasattr(mod.weight, "to_dense") else mod.weight)


@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-2),
    lambda ps: torch.optim.Adam(ps, lr=1e-2),
], ids=["sgd-momentum-wd", "adam"])
@pytest.mark.parametrize("pattern,fmt", [("unstructured", "csr"), ("nm", "2:4"), ("block", "bsr")])
def test_handover_continues_the_same_training_on_sparse_layers(make_opt, pattern, fmt, tmp_path, monkeypatch):
    """At the end of the ramp the pruned layers become sparse layers in the pattern's format,
    the optimizer trains their values with its state carried over, and training follows the
    dense masked run's trajectory."""
    monkeypatch.setenv("PYSPARSE_CACHE_DIR", str(tmp_path))  # SparseLinear's timed train kernel
    target = None if pattern == "nm" else 0.75
    plain, sparse = _model(), _model()
    opt_a, opt_b = make_opt(plain.parameters()), make_opt(sparse.parameters())
    pa = Iterative(plain, target, steps=5, pattern=pattern)
    pb = Iterative(sparse, target, steps=5, pattern=pattern, handover=True, optimizer=opt_b)
    _train(plain, pa, opt_a, 4)
    _train(sparse, pb, opt_b, 4)
    assert pb.handed_over == {}
    _train(plain, pa, opt_a, 1, seed=1)
    _train(sparse, pb, opt_b, 1, seed=1)  # the ramp ends: hand-over
    assert set(pb.handed_over) == set(PRUNED) and {sparse.get_submodule(n).format_name for n in PRUNED} == {fmt}
    for name in PRUNED:
        torch.testing.assert_close(_dense_of(sparse.get_submodule(name)), plain.get_submodule(name).weight)
    n_params = sum(p.numel() for g in opt_b.param_groups for p in g["params"])
    assert n_params < sum(p.numel() for p in plain.parameters())  # the pruned weights left the optimizer
    _train(plain, pa, opt_a, 6, seed=2)
    _train(sparse, pb, opt_b, 6, seed=2)
    for name in PRUNED:
        torch.testing.assert_close(_dense_of(sparse.get_submodule(name)), plain.get_submodule(name).weight,
                                   rtol=1e-4, atol=1e-5)
    assert pb.sparsity() == pytest.approx(pa.sparsity())
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(sparse(x), plain(x), rtol=1e-4, atol=1e-5)


def test_handover_resumes_from_state_dict_and_needs_the_optimizer(tmp_path, monkeypatch):
    monkeypatch.setenv("PYSPARSE_CACHE_DIR", str(tmp_path))
    a = _model()
    opt = torch.optim.Adam(a.parameters(), lr=1e-2)
    pa = Iterative(a, 0.8, steps=3, handover=True, optimizer=opt)
    _train(a, pa, opt, 4)
    assert set(pa.handed_over) == set(PRUNED)
    b = _model()  # resume: a fresh dense model, the saved masks, the weights of a as dense tensors
    opt_b = torch.optim.Adam(b.parameters(), lr=1e-2)
    pb = Iterative(b, 0.8, steps=3, handover=True, optimizer=opt_b)
    with torch.no_grad():
        for name in PRUNED:
            b.get_submodule(name).weight.copy_(_dense_of(a.get_submodule(name)))
    pb.load_state_dict(pa.state_dict())
    assert set(pb.handed_over) == set(PRUNED)
    for name in PRUNED:
        torch.testing.assert_close(_dense_of(b.get_submodule(name)), _dense_of(a.get_submodule(name)))
    with pytest.raises(ValueError, match="handover=True needs optimizer="):
        Iterative(_model(), 0.8, steps=3, handover=True)
    with pytest.raises(ValueError, match="handover must be True or False"):
        Iterative(_model(), 0.8, steps=3, handover="csr", optimizer=opt)


def test_handover_leaves_tied_weights_dense():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4))
    model[2].weight = model[1].weight
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    p = Iterative(model, 0.5, steps=1, handover=True, optimizer=opt)
    p.step()
    assert p.handed_over == {} and isinstance(model[1], nn.Linear)


# ---- Hugging Face Conv1D (GPT-2's layers: weight stored (in, out)) -----------------------------

def _conv1d_pair():
    """A Conv1D MLP and the nn.Linear MLP it equals."""
    Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
    conv = nn.Sequential(Conv1D(32, 16), nn.ReLU(), Conv1D(32, 32), nn.ReLU(), Conv1D(8, 32))
    with torch.no_grad():
        for i in (0, 2, 4):
            conv[i].weight.copy_(lin[i].weight.t())
            conv[i].bias.copy_(lin[i].bias)
    return lin, conv


def _train_mlp(model, pruner, opt, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        loss = (model(torch.randn(8, 16, generator=g)) - 1.0).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        pruner.step()


@pytest.mark.parametrize("criterion", ["magnitude", "fisher"])
@pytest.mark.parametrize("pattern,kw", [("unstructured", {}), ("nm", {}), ("block", {"blocksize": (4, 8)})])
def test_conv1d_layers_prune_and_hand_over_as_the_linears_they_equal(pattern, kw, criterion, tmp_path, monkeypatch):
    """Conv1D weights are ranked, masked and handed over as their (out, in) matrices: the same
    masks (transposed), the same training trajectory and, after the hand-over, SparseLinear
    layers (marked, so save_sparse records them) holding the linear run's values."""
    monkeypatch.setenv("PYSPARSE_CACHE_DIR", str(tmp_path))
    lin, conv = _conv1d_pair()
    target = None if pattern == "nm" else 0.5
    opt_l, opt_c = torch.optim.Adam(lin.parameters(), lr=1e-2), torch.optim.Adam(conv.parameters(), lr=1e-2)
    pl = Iterative(lin, target, steps=4, pattern=pattern, criterion=criterion, skip_ends=False, **kw)
    pc = Iterative(conv, target, steps=4, pattern=pattern, criterion=criterion, skip_ends=False, handover=True,
                   optimizer=opt_c, **kw)
    assert pc.layers == ["0", "2", "4"]
    _train_mlp(lin, pl, opt_l, 3)
    _train_mlp(conv, pc, opt_c, 3)
    for name in pc.layers:
        assert pc.masks[name].shape == conv.get_submodule(name).weight.shape
        assert torch.equal(pc.masks[name], pl.masks[name].t())
    _train_mlp(lin, pl, opt_l, 4, seed=1)
    _train_mlp(conv, pc, opt_c, 4, seed=1)  # the ramp ends at step 4: hand-over, then 3 sparse steps
    assert set(pc.handed_over) == {"0", "2", "4"}
    for name in pc.layers:
        mod = conv.get_submodule(name)
        assert isinstance(mod, SparseLinear) and mod._pysparse_conv1d
        torch.testing.assert_close(_dense_of(mod), lin.get_submodule(name).weight, rtol=1e-4, atol=1e-5)
    assert pc.sparsity() == pytest.approx(pl.sparsity())
