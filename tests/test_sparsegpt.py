"""pysparse.prune.sparsegpt and hessian: the pattern is exactly what was asked (unstructured
sparsity per batch of columns, N:M per group, whole blocks), the output error on held-out inputs
is below Wanda's and magnitude pruning's on correlated inputs with outlier features, H = I
reduces to magnitude pruning, dead inputs and dtypes are handled, bad input is one sentence."""
from __future__ import annotations

import pytest
import torch

import pysparse
from pysparse.prune import hessian, sparsegpt
from conftest import gen


def _layer(rows=96, cols=128, seed=0):
    g = gen(seed)
    A = torch.randn(cols, cols, generator=g) / cols ** 0.5
    X = torch.randn(1024, cols, generator=g) @ A
    X[:, :4] *= 10  # outlier features, as in transformer activations
    Xe = torch.randn(512, cols, generator=g) @ A
    Xe[:, :4] *= 10
    W = torch.randn(rows, cols, generator=g) / cols ** 0.5
    return W, X, Xe


def _error(W, Wp, X):
    return float(((W - Wp) @ X.t()).square().sum() / (W @ X.t()).square().sum())


def _wanda(W, X, sparsity):
    """Wanda (Sun et al. 2023): per output row, the smallest |w| * ||x|| pruned."""
    scores = W.abs() * X.norm(dim=0)
    k = int(sparsity * W.shape[1])
    return W.clone().scatter_(1, torch.topk(scores, k, dim=1, largest=False).indices, 0.0)


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_unstructured_beats_wanda_and_magnitude(sparsity):
    W, X, Xe = _layer()
    Wp = sparsegpt(W, hessian(X), sparsity)
    assert Wp.dtype == W.dtype and Wp.shape == W.shape
    assert float((Wp == 0).float().mean()) == pytest.approx(sparsity, abs=1e-3)
    e = _error(W, Wp, Xe)
    assert e < _error(W, _wanda(W, X, sparsity), Xe)
    assert e < _error(W, pysparse.prune.magnitude(W, sparsity), Xe)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_nm_pattern_is_exact_and_beats_wanda(n, m):
    W, X, Xe = _layer()
    Wp = sparsegpt(W, hessian(X), n=n, m=m)
    kept = (Wp != 0).view(W.shape[0], -1, m).sum(-1)
    assert bool((kept <= n).all())
    pysparse.SparseNM.from_dense(Wp, n, m)  # accepted as n:m
    wanda = pysparse.prune.nm(W, n, m, scores=W.abs() * X.norm(dim=0))
    assert _error(W, Wp, Xe) < _error(W, wanda, Xe)


def test_blocks_are_whole_and_beat_block_magnitude():
    W, X, Xe = _layer()
    Wp = sparsegpt(W, hessian(X), 0.5, blocksize=(8, 16), lazy=48)  # lazy rounds to the block width
    blocks = (Wp != 0).view(12, 8, 8, 16).transpose(1, 2).reshape(12, 8, -1)
    any_kept, all_kept = blocks.any(-1), blocks.all(-1)
    assert torch.equal(any_kept, all_kept)  # a block is kept whole or dropped whole
    assert float(any_kept.float().mean()) == pytest.approx(0.5, abs=0.02)
    assert _error(W, Wp, Xe) < _error(W, pysparse.prune.blocks(W, 0.5, blocksize=(8, 16)), Xe)


def test_identity_hessian_is_magnitude_pruning_per_batch():
    W, _, _ = _layer(rows=16, cols=64)
    Wp = sparsegpt(W, torch.eye(64, dtype=torch.float64), 0.25, lazy=32)
    for c0 in (0, 32):  # per batch of columns, the 25% smallest |w| over all rows, nothing updated
        part = W[:, c0:c0 + 32]
        thresh = part.abs().flatten().kthvalue(int(0.25 * part.numel())).values
        want = torch.where(part.abs() <= thresh, 0.0, part)
        torch.testing.assert_close(Wp[:, c0:c0 + 32], want)


def test_hessian_accumulates_and_dead_inputs():
    W, X, _ = _layer(rows=8, cols=32)
    H = hessian(X[:500])
    hessian(X[500:], out=H)
    torch.testing.assert_close(H, hessian(X))
    X[:, 5] = 0.0  # a dead input: its weights go, nothing breaks
    Wp = sparsegpt(W, hessian(X), 0.5)
    assert bool((Wp[:, 5] == 0).all()) and bool(torch.isfinite(Wp).all())


def test_dtypes_and_hessian_of_batched_inputs():
    W, X, _ = _layer(rows=16, cols=32)
    H = hessian(X.view(4, 256, 32))  # (..., in)
    torch.testing.assert_close(H, hessian(X))
    for dt in (torch.bfloat16, torch.float16):
        Wp = sparsegpt(W.to(dt), H, n=2, m=4)
        assert Wp.dtype == dt
        pysparse.SparseNM.from_dense(Wp, 2, 4)


@pytest.mark.parametrize("kwargs,message", [
    (dict(sparsity=1.0), r"sparsity must be a number in \[0, 1\)"),
    (dict(n=2, m=5), r"n:m needs m in"),
    (dict(n=2, m=4, sparsity=0.5), r"give either n and m, or sparsity"),
    (dict(sparsity=0.5, blocksize=(5, 8)), r"W.s shape \(16, 32\) is not divisible by the block size"),
    (dict(sparsity=0.5, damp=0.0), r"damp must be a positive number"),
    (dict(sparsity=0.5, lazy=0), r"lazy must be a positive integer"),
])
def test_bad_arguments(kwargs, message):
    W, X, _ = _layer(rows=16, cols=32)
    with pytest.raises(ValueError, match=r"^pysparse.prune.sparsegpt: " + message):
        sparsegpt(W, hessian(X), **kwargs)


def test_bad_tensors():
    W, X, _ = _layer(rows=16, cols=32)
    with pytest.raises(ValueError, match=r"H must be the \(32, 32\) input Hessian"):
        sparsegpt(W, hessian(X[:, :16]), 0.5)
    with pytest.raises(ValueError, match="W must be a 2-D floating-point tensor"):
        sparsegpt(W.long(), hessian(X), 0.5)
    bad = hessian(X)
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="H holds NaN or Inf"):
        sparsegpt(W, bad, 0.5)
    with pytest.raises(ValueError, match="is not positive definite"):
        sparsegpt(W, -torch.eye(32, dtype=torch.float64) * 1e3 - 1, 0.5)
    with pytest.raises(ValueError, match="out has shape"):
        hessian(X, out=torch.zeros(3, 3))


# ---------------------------------------------------------------------------------------------
# In sparsify: criterion "sparsegpt"

def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 64), torch.nn.GELU(),
                               torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 8)).eval()


@pytest.mark.parametrize("rule", [{"format": "csr", "sparsity": 0.7}, {"format": "nm", "n": 2, "m": 4},
                                  {"format": "bsr", "sparsity": 0.5, "blocksize": (8, 8)}])
def test_sparsify_sparsegpt_keeps_the_output_closer_than_wanda_and_magnitude(rule):
    import copy
    g = gen(5)
    A = torch.randn(32, 32, generator=g)
    X, Xe = torch.randn(512, 32, generator=g) @ A, torch.randn(256, 32, generator=g) @ A
    net = _mlp()
    with torch.no_grad():
        ref = net(Xe)
    errors = {}
    for crit in ("magnitude", "wanda", "sparsegpt"):
        model = copy.deepcopy(net)
        pysparse.sparsify(model, {"*": dict(rule, criterion=crit)}, calibration=lambda m: m(X), time_layers=False)
        with torch.no_grad():
            errors[crit] = float((model(Xe) - ref).square().sum() / ref.square().sum())
    assert errors["sparsegpt"] < min(errors["wanda"], errors["magnitude"]), errors


def test_sparsify_sparsegpt_calibrates_each_layer_on_the_pruned_ones_before_it():
    import copy
    X = torch.randn(256, 32, generator=gen(6))
    net = _mlp()
    model = copy.deepcopy(net)
    # kernel "dense": the pruned layers stay nn.Linear, so the check below reads their weights
    pysparse.sparsify(model, {"*": {"format": "csr", "sparsity": 0.6, "criterion": "sparsegpt", "kernel": "dense"}},
                      calibration=lambda m: m(X), time_layers=False)
    # by hand: layer 2 pruned on its dense inputs, layer 4 on the inputs through pruned layer 2
    manual = copy.deepcopy(net)
    with torch.no_grad():
        for i in (2, 4):
            inputs = manual[:i](X)
            manual[i].weight.copy_(sparsegpt(manual[i].weight, hessian(inputs), 0.6))
    for i in (2, 4):
        torch.testing.assert_close(model[i].weight, manual[i].weight, rtol=1e-4, atol=1e-5)
    assert float((model[4].weight == 0).float().mean()) == pytest.approx(0.6, abs=0.01)


def test_sparsify_sparsegpt_needs_calibration_and_linears():
    with pytest.raises(ValueError, match="criterion 'sparsegpt' for '2' needs calibration inputs"):
        pysparse.sparsify(_mlp(), {"*": {"format": "csr", "sparsity": 0.5, "criterion": "sparsegpt"}}, time_layers=False)
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 8, 3), torch.nn.Conv2d(8, 4, 3))
    with pytest.raises(ValueError, match="criterion 'sparsegpt' is for nn.Linear layers; '1' is an nn.Conv2d"):
        pysparse.sparsify(conv, {"*": {"format": "csr", "sparsity": 0.5, "criterion": "sparsegpt"}},
                          calibration=lambda m: m(torch.randn(1, 3, 12, 12)), time_layers=False)


class _Siblings(torch.nn.Module):
    """q, k, v read one tensor (siblings); `shared` runs twice per forward; `out` reads their sum;
    `late` runs after a layer a pass may stop before."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.inp = torch.nn.Linear(16, 32)
        self.q, self.k, self.v = (torch.nn.Linear(32, 32) for _ in range(3))
        self.shared = torch.nn.Linear(32, 32)
        self.out = torch.nn.Linear(32, 32)
        self.late = torch.nn.Linear(32, 8)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        a = self.q(h) * torch.sigmoid(self.k(h)) + self.v(h)
        a = self.shared(torch.relu(self.shared(a)))
        return self.late(torch.relu(self.out(a)))


def test_sparsify_sparsegpt_shares_passes_between_siblings_and_stops_early_yet_equals_one_pass_per_layer(monkeypatch):
    """q/k/v get one calibration pass; later calls end after the last layer a pass records; the
    module run twice per forward (shared) gets both inputs; the result is bit-identical to one
    full pass per layer (the plain sequential way)."""
    import copy
    from pysparse.nn._sparsify import calibration as cal
    X = [torch.randn(64, 16, generator=gen(s)) for s in (7, 8, 9)]
    calib = [lambda m, x=x: m(x) for x in X]
    rule = {"*": {"format": "csr", "sparsity": 0.5, "criterion": "sparsegpt", "kernel": "dense"}}
    net = _Siblings().eval()

    passes, modules_run = [], []
    fast = copy.deepcopy(net)
    for name, m in fast.named_modules():
        if name:
            m.register_forward_pre_hook(lambda m, a, name=name: modules_run.append(name))
    real = cal.input_hessians

    def counted(*a):
        start = len(modules_run)
        out = real(*a)
        passes.append((a[1][0], modules_run[start:]))
        return out
    monkeypatch.setattr(cal, "input_hessians", counted)
    pysparse.sparsify(fast, rule, calibration=calib, time_layers=False, skip_ends=False)
    assert [p for p, _ in passes] == ["inp", "q", "shared", "out", "late"]  # k and v: no pass of their own
    ran = dict(passes)
    # q's pass: the first call runs everything, the next two end after v; shared runs twice per
    # call, so its pass never ends early; inp's pass ends right after inp
    assert ran["q"].count("v") == 3 and ran["q"].count("late") == 1 and ran["q"].count("shared") == 2
    assert ran["shared"].count("late") == 3 and ran["inp"].count("q") == 1

    def one_pass_per_layer(model, names, calibration):
        H = None

        def hook(m, args):
            nonlocal H
            H = hessian(args[0]) if H is None else hessian(args[0], out=H)
        cal.run(model, calibration, [model.get_submodule(names[0]).register_forward_pre_hook(hook)])
        return {names[0]: H}
    monkeypatch.setattr(cal, "input_hessians", one_pass_per_layer)
    plain = copy.deepcopy(net)
    pysparse.sparsify(plain, rule, calibration=calib, time_layers=False, skip_ends=False)
    for (n, a), (_, b) in zip(fast.state_dict().items(), plain.state_dict().items()):
        assert torch.equal(a, b), n
