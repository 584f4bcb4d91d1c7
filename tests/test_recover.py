"""pysparse.recover: distillation of a sparsified model towards the dense one lowers the
distance on held-out inputs, trains only what it should (patterns fixed), stops at steps or a
time budget, restores modes, and refuses bad arguments with one sentence."""
from __future__ import annotations

import copy

import pytest
import torch

import pysparse
from conftest import gen


def _pair(fmt_rule):
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 64), torch.nn.GELU(),
                                  torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 8)).eval()
    student = copy.deepcopy(teacher)
    pysparse.sparsify(student, {"*": fmt_rule}, time_layers=False)
    return teacher, student


def _data(seed):
    g = gen(seed)
    return [torch.randn(32, 16, generator=g) for _ in range(8)]


@pytest.mark.parametrize("rule", [{"format": "csr", "sparsity": 0.8}, {"format": "nm", "n": 2, "m": 4},
                                  {"format": "bsr", "sparsity": 0.5, "blocksize": (8, 8)}])
def test_recovery_lowers_the_held_out_distance_and_keeps_the_patterns(rule, tmp_path, monkeypatch):
    monkeypatch.setenv("PYSPARSE_CACHE_DIR", str(tmp_path))
    teacher, student = _pair(rule)
    patterns = {n: (m.weight.to_dense() != 0) for n, m in student.named_modules() if hasattr(m, "weight_values")}
    dense_before = [p.clone() for n, p in student.named_parameters() if "weight_values" not in n and n != "2.bias"
                    and n != "4.bias"]
    report = pysparse.recover(student, teacher, _data(1), steps=150, lr=3e-3, loss="mse", eval_batches=_data(2),
                              progress=False)
    assert report["steps"] == 150 and len(report["losses"]) == 150
    assert report["eval_after"] < 0.5 * report["eval_before"], report
    for n, m in student.named_modules():  # nothing grew outside the pattern
        if hasattr(m, "weight_values"):
            assert not (m.weight.to_dense() != 0)[~patterns[n]].any()
    # train="sparse": the dense first and last layers did not move
    after = [p for n, p in student.named_parameters() if "weight_values" not in n and n != "2.bias" and n != "4.bias"]
    assert all(torch.equal(a, b) for a, b in zip(after, dense_before))
    assert not student.training and all(not m.training for m in student.modules())


def test_time_budget_train_all_and_output_kinds():
    teacher, student = _pair({"format": "csr", "sparsity": 0.8})
    report = pysparse.recover(student, teacher, _data(3), time_budget=0.3, loss="cosine", train="all", progress=False)
    assert report["steps"] >= 1 and report["seconds"] < 5 and report["eval_before"] is None
    assert report["trained_parameters"] == sum(p.numel() for p in student.parameters())

    class Tupled(torch.nn.Module):  # (logits, extra) outputs and keyword inputs
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return {"logits": self.net(x), "n": 1}
    batches = [{"x": b} for b in _data(4)]
    r = pysparse.recover(Tupled(student), Tupled(teacher), batches, steps=5, loss="kl", temperature=2.0, progress=False)
    assert r["steps"] == 5 and all(v == v for v in r["losses"])


@pytest.mark.parametrize("kwargs,message", [
    (dict(), r"give steps, time_budget or both"),
    (dict(steps=0), r"steps must be a positive integer"),
    (dict(steps=3, loss="l1"), r"loss must be one of"),
    (dict(steps=3, train="dense"), r"train must be one of"),
    (dict(steps=3, lr=-1.0), r"lr must be a positive number"),
    (dict(time_budget=0), r"time_budget must be a positive number"),
    (dict(steps=3, hidden=["9"]), r"hidden names '9', which the student does not have"),
    (dict(steps=3, hidden=["1"], hidden_weight=-1.0), r"hidden_weight must be a non-negative number"),
])
def test_bad_arguments(kwargs, message):
    teacher, student = _pair({"format": "csr", "sparsity": 0.5})
    with pytest.raises(ValueError, match=r"^pysparse.recover: " + message):
        pysparse.recover(student, teacher, _data(5), **kwargs)


def test_nothing_to_train_and_empty_batches():
    teacher = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match="no trainable parameters in pysparse layers"):
        pysparse.recover(copy.deepcopy(teacher), teacher, [torch.randn(2, 4)], steps=1)
    with pytest.raises(ValueError, match="batches is empty"):
        pysparse.recover(copy.deepcopy(teacher), teacher, [], steps=1)


def test_layers_kept_dense_by_the_kernel_choice_train_with_their_zeros_held():
    """sparsify keeps a pruned layer as nn.Linear where dense is faster; recover still trains its
    kept weights (train="sparse"), and its zeros stay exactly zero."""
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 64), torch.nn.GELU(),
                                  torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 8)).eval()
    student = copy.deepcopy(teacher)
    report = pysparse.sparsify(student, {"*": {"format": "csr", "sparsity": 0.8, "kernel": "dense"}}, time_layers=False)
    assert {r["kernel"] for r in report} == {"dense"}
    pruned = {n: m.weight.detach().clone() for n, m in student.named_modules()
              if isinstance(m, torch.nn.Linear) and (m.weight == 0).any()}
    assert set(pruned) == {"2", "4"}  # sparsify skips the first and last linear
    rep = pysparse.recover(student, teacher, _data(1), steps=100, lr=3e-3, loss="mse", weight_decay=0.01,
                           eval_batches=_data(2), progress=False)
    assert rep["eval_after"] < 0.5 * rep["eval_before"], rep
    for n, before in pruned.items():
        w = student.get_submodule(n).weight.detach()
        assert torch.equal(w[before == 0], torch.zeros_like(w[before == 0]))  # zeros held
        assert not torch.equal(w[before != 0], before[before != 0])  # kept weights trained
    assert torch.equal(student[0].weight, teacher[0].weight)  # unpruned layers untouched
    # the hooks are gone: a plain backward afterwards sees the full gradient
    student(_data(3)[0]).sum().backward()
    assert (student[2].weight.grad[pruned["2"] == 0] != 0).any()


def test_hidden_states_are_matched_and_the_teacher_runs_once_per_batch(tmp_path, monkeypatch):
    """hidden adds ||s - t||^2 / ||t||^2 of the named modules' outputs to the loss (the step's loss
    equals that sum, checked by hand on the first step); the teacher's outputs are cached, so it
    runs once per distinct batch; hooks are gone afterwards."""
    monkeypatch.setenv("PYSPARSE_CACHE_DIR", str(tmp_path))
    teacher, student = _pair({"format": "csr", "sparsity": 0.8})
    data = _data(6)[:3]
    with torch.no_grad():
        x = data[0]
        s_out, t_out = student(x), teacher(x)
        s_h = [student[:2](x), student[:4](x)]
        t_h = [teacher[:2](x), teacher[:4](x)]
        first = float(torch.nn.functional.mse_loss(s_out, t_out) + 0.5 * sum(
            (a - b).square().sum() / b.square().sum() for a, b in zip(s_h, t_h)) / 2)
    calls = []
    teacher.register_forward_hook(lambda *a: calls.append(1))
    report = pysparse.recover(student, teacher, data, steps=7, lr=1e-3, loss="mse", hidden=["1", "3"],
                              hidden_weight=0.5, progress=False)
    assert report["losses"][0] == pytest.approx(first, rel=1e-5)
    assert len(calls) == 3  # 7 steps over 3 batches: the teacher ran once per batch
    assert all(not m._forward_hooks for m in student.modules())
    plain = pysparse.recover(copy.deepcopy(student), teacher, data, steps=2, loss="mse", progress=False)
    assert plain["steps"] == 2


def test_keep_best_returns_the_best_evaluated_state():
    """An lr that makes things worse: keep_best hands back the untrained student (best_step 0),
    bit for bit; a good lr keeps a later state, and eval_after is that state's held-out loss."""
    teacher, student = _pair({"format": "csr", "sparsity": 0.8})
    before = {n: p.clone() for n, p in student.named_parameters()}
    rep = pysparse.recover(student, teacher, _data(1), steps=20, lr=10.0, loss="mse", eval_batches=_data(2),
                           keep_best=True, eval_every=5, progress=False)
    assert [s for s, _ in rep["evals"]] == [0, 5, 10, 15, 20]
    assert rep["best_step"] == 0 and rep["eval_after"] == rep["eval_before"]
    assert all(torch.equal(p, before[n]) for n, p in student.named_parameters())
    rep = pysparse.recover(student, teacher, _data(1), steps=30, lr=3e-3, loss="mse", eval_batches=_data(2),
                           keep_best=True, eval_every=10, progress=False)
    assert rep["best_step"] > 0 and rep["eval_after"] == min(v for _, v in rep["evals"]) < rep["eval_before"]
    again = pysparse.recover(student, teacher, _data(1), steps=1, lr=1e-12, loss="mse", eval_batches=_data(2),
                             progress=False)
    assert again["eval_before"] == pytest.approx(rep["eval_after"], rel=1e-6)  # the state kept is the one evaluated
    with pytest.raises(ValueError, match="keep_best needs eval_batches"):
        pysparse.recover(student, teacher, _data(1), steps=3, keep_best=True)
    with pytest.raises(ValueError, match="eval_every must be a positive integer"):
        pysparse.recover(student, teacher, _data(1), steps=3, eval_batches=_data(2), keep_best=True, eval_every=0)
