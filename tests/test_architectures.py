"""Every Hugging Face architecture of issue 21, built from its config at tiny sizes: structured
pruning equals zeroing what it removes (heads: their output-projection columns; neurons: their
down-projection columns; experts: per expert), and sparsify (unstructured CSR 80%, 2:4, heads 25% +
neurons 30%) gives a model that runs, saves with save_pretrained and loads back bit-identical; at
ratio 0 the model is unchanged."""
from __future__ import annotations

import copy

import pytest
import torch

import pysparse
from pysparse import prune
from tiny_transformers import ARCHITECTURES, architecture

RECIPES = {
    "csr80": {"*": {"format": "csr", "sparsity": 0.8, "kernel": "sparse"}},
    "2:4": {"*": {"format": "2:4", "kernel": "sparse"}},
    "structured": {"*": {"heads": 0.25, "neurons": 0.3}},
}
HAS_FFN = set(ARCHITECTURES) - {"mixtral"}  # Mixtral's feed-forward is its experts


def _attention(model):
    for name, mod in model.named_modules():
        prune.structured.linear_conv1d_attention(mod)
    return [(n, m) for n, m in model.named_modules() if prune.attention_parts(m) is not None]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_attention_is_recognised_and_pruning_heads_equals_zeroing_them(arch):
    model, run = architecture(arch)
    with torch.no_grad():
        dense = run(model)
    attention = _attention(model)
    expected = {"t5": 6, "t5_gated": 6, "bart": 6, "albert": 1, "swin": 4}.get(arch, 2)  # decoders: self + cross
    assert len(attention) == expected
    zeroed = copy.deepcopy(model)
    prune.t5_own_position_bias(model)
    with torch.no_grad():
        torch.testing.assert_close(run(model), dense, rtol=0, atol=0)  # own position biases change nothing
    for (name, mod), (_, zmod) in zip(attention, _attention(zeroed)):
        p = prune.attention_parts(mod)
        keep = [u for u in range(p.units) if u % 2 == 0]
        with torch.no_grad():
            zo = prune.attention_parts(zmod).o.weight
            for u in range(p.units):
                if u not in keep:
                    zo[:, u * p.unit_width:(u + 1) * p.unit_width] = 0
        prune.shrink_attention(mod, keep)
        q = prune.attention_parts(mod)
        assert (q.units, q.heads, q.o.in_features) == (len(keep), p.heads // p.units * len(keep),
                                                       p.unit_width * len(keep)), name
    with torch.no_grad():
        torch.testing.assert_close(run(model), run(zeroed), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_pruning_neurons_equals_zeroing_them(arch):
    model, run = architecture(arch)
    zeroed = copy.deepcopy(model)
    for mod in model.modules():
        prune.structured.linear_conv1d_ffn(mod)
    for mod in zeroed.modules():
        prune.structured.linear_conv1d_ffn(mod)
    ffn = [m for m in model.modules() if prune.ffn_parts(m) is not None]
    zffn = [m for m in zeroed.modules() if prune.ffn_parts(m) is not None]
    experts = [m for m in model.modules() if prune.expert_parts(m) is not None]
    zexperts = [m for m in zeroed.modules() if prune.expert_parts(m) is not None]
    assert len(ffn) == (0 if arch not in HAS_FFN else 1 if arch == "albert" else 4 if arch in ("t5", "t5_gated", "bart", "swin") else 2)
    assert len(experts) == (2 if arch == "mixtral" else 0)
    for mod, zmod in zip(ffn, zffn):
        n = prune.ffn_parts(mod).neurons
        keep = torch.arange(0, n, 3)
        drop = torch.ones(n, dtype=torch.bool)
        drop[keep] = False
        with torch.no_grad():
            prune.ffn_parts(zmod).down.weight[:, drop] = 0
        prune.shrink_ffn(mod, keep)
        assert prune.ffn_parts(mod).neurons == keep.numel()
    for mod, zmod in zip(experts, zexperts):
        E, n = mod.down_proj.shape[0], mod.down_proj.shape[2]
        keep = torch.stack([torch.randperm(n, generator=torch.Generator().manual_seed(e))[:n // 2] for e in range(E)])
        with torch.no_grad():
            for e in range(E):
                drop = torch.ones(n, dtype=torch.bool)
                drop[keep[e]] = False
                zmod.down_proj[e][:, drop] = 0
        prune.shrink_experts(mod, keep)
        assert tuple(mod.down_proj.shape) == (E, mod.down_proj.shape[1], n // 2)
    with torch.no_grad():
        torch.testing.assert_close(run(model), run(zeroed), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_sparsify_save_load_round_trip(arch, recipe, tmp_path):
    model, run = architecture(arch)
    with torch.no_grad():
        dense = run(model)
    report = pysparse.sparsify(model, RECIPES[recipe], skip_ends=False, progress=False)
    kinds = [r["kind"] for r in report]
    if recipe == "structured":
        assert kinds.count("heads") >= 1 and kinds.count("neurons") >= 1
    else:
        assert kinds.count("linear") + kinds.count("conv") >= 8
    with torch.no_grad():
        out = run(model)
    assert out.shape == dense.shape and torch.isfinite(out).all()
    pysparse.nn.save_pretrained(model, tmp_path)
    back = pysparse.nn.load_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(run(back), out)
    if arch == "mixtral" and recipe != "structured":
        assert all("3-D tensors" in report.skipped[f"layers.{i}.mlp.experts"] for i in range(2))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_structured_ratio_zero_changes_nothing(arch):
    model, run = architecture(arch)
    with torch.no_grad():
        dense = run(model)
    pysparse.sparsify(model, {"*": {"heads": 0.0, "neurons": 0.0}}, progress=False, fast_activations=False)
    with torch.no_grad():
        torch.testing.assert_close(run(model), dense, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["bert", "gpt2", "gpt_neox", "phi3", "t5", "swin", "mixtral"])
def test_heads_and_neurons_then_sparse_projections_round_trip(arch, tmp_path):
    """Pruned heads whose projections are then sparse: the loaded model's head counts come from the
    sparse layers' shapes (there is no dense weight in the file to read them from)."""
    model, run = architecture(arch)
    pysparse.sparsify(model, {"*": {"heads": 0.5, "neurons": 0.5}, "re:.*": {"format": "csr", "sparsity": 0.8,
                                                                             "kernel": "sparse"}},
                      skip_ends=False, progress=False)
    with torch.no_grad():
        out = run(model)
    heads = [(n, p.heads, p.kv_heads) for n, m in model.named_modules() if (p := prune.attention_parts(m))]
    pysparse.nn.save_pretrained(model, tmp_path)
    back = pysparse.nn.load_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(run(back), out)
    for n, h, kv in heads:  # the modules' own head-count attributes, as their forward reads them
        mod = back.get_submodule(n)
        for attr, want in (("num_heads", h), ("num_attention_heads", h), ("n_heads", h), ("num_key_value_heads", kv)):
            if hasattr(mod, attr):
                assert getattr(mod, attr) == want, (n, attr)


def test_a_tampered_sparse_shape_or_own_bias_record_is_refused(tmp_path):
    from pysparse._safetensors import load_file, save_file
    model, _ = architecture("t5")
    pysparse.sparsify(model, {"*": {"heads": 0.5}, "re:.*q$": {"format": "csr", "sparsity": 0.8, "kernel": "sparse"}},
                      skip_ends=False, progress=False)
    pysparse.nn.save_sparse(model, tmp_path / "t5.safetensors")
    tensors, meta = load_file(tmp_path / "t5.safetensors")
    bad = dict(tensors)
    bad["encoder.block.0.layer.0.SelfAttention.q.weight_shape"] = torch.tensor([0, 64])
    save_file(bad, tmp_path / "bad.safetensors", meta)
    with pytest.raises(ValueError, match=r"q\.weight_shape must hold 2 positive integers, got \[0, 64\]"):
        pysparse.nn.load_sparse(architecture("t5")[0], tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match=r"had its own position bias, but is no T5 attention in this model"):
        pysparse.nn.load_sparse(architecture("bert")[0], tmp_path / "t5.safetensors")


def test_t5_heads_need_own_position_biases_first():
    model, _ = architecture("t5")
    with pytest.raises(ValueError, match=r"call pysparse\.prune\.t5_own_position_bias\(model\) first"):
        prune.shrink_attention(model.encoder.block[1].layer[0].SelfAttention, [0])
    assert len(prune.t5_own_position_bias(model)) == 6 and prune.t5_own_position_bias(model) == []


def test_experts_refuse_criteria_they_cannot_have():
    model, _ = architecture("mixtral")
    with pytest.raises(ValueError, match=r"neurons of the 3-D experts of 'layers\.0\.mlp\.experts' are chosen by "
                                         r"magnitude"):
        pysparse.sparsify(model, {"*.experts": {"neurons": 0.5, "criterion": "activation"}}, [lambda m: None])


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_criterion_runs_or_says_why_not(arch):
    for crit in ("activation", "fisher", "entropy"):
        model, run = architecture(arch)
        cal = [lambda m: run(m).square().mean()] if crit == "fisher" else [run]
        rule = {"heads": 0.5, "criterion": crit, "reconstruct": crit == "activation"}
        if crit != "entropy" and arch != "mixtral":
            rule["neurons"] = 0.5
        if crit == "entropy" and arch in ("gpt_neox", "llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "mixtral",
                                          "t5", "t5_gated", "swin"):
            with pytest.raises(ValueError, match=r"criterion 'entropy' for .*: the attention probabilities of (rotary|"
                                                 r"modules with a position bias)"):
                pysparse.sparsify(model, {"*": rule}, cal, progress=False)
            continue
        report = pysparse.sparsify(model, {"*": rule}, cal, progress=False)
        assert {r["criterion"] for r in report if r["kind"] != "activation"} == {crit}
        with torch.no_grad():
            assert torch.isfinite(run(model)).all()


def test_a_rule_never_passes_over_an_attention_or_mlp_it_cannot_prune():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=100, n_positions=64, bos_token_id=1,
                                  eos_token_id=2, add_cross_attention=True)
    model = transformers.GPT2Model(cfg).eval()
    with pytest.raises(ValueError, match=r"the heads rule matches 'h\.0\.crossattention' \(GPT2Attention\), whose layout "
                                         r"pysparse\.prune\.structured does not recognise .* ignore=\['h\.0\.crossattention'\]"):
        pysparse.sparsify(model, {"*": {"heads": 0.5}}, progress=False)
    report = pysparse.sparsify(model, {"*": {"heads": 0.5}}, progress=False, ignore=["h.0.crossattention"])
    assert [r["name"] for r in report if r["kind"] == "heads"] == ["h.0.attn"]

    class OddMLP(torch.nn.Module):  # a feed-forward block in a layout no rule knows
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.w(x)
    with pytest.raises(ValueError, match=r"the neurons rule matches 'mlp' \(OddMLP\)"):
        pysparse.sparsify(torch.nn.Sequential(__import__("collections").OrderedDict(mlp=OddMLP())),
                          {"*": {"neurons": 0.5}}, progress=False)


def test_gpt2_new_gelu_becomes_fast_gelu_tanh_and_round_trips(tmp_path):
    model, run = architecture("gpt2")
    with torch.no_grad():
        dense = run(model)
    report = pysparse.sparsify(model, {"*": {"format": "csr", "sparsity": 0.5, "kernel": "dense"}}, skip_ends=False,
                               progress=False)
    acts = [r for r in report if r["kind"] == "activation"]
    assert [r["name"] for r in acts] == ["h.0.mlp.act", "h.1.mlp.act"] and report.totals()["activations"] == 2
    assert {r["shape"] for r in acts} == {"NewGELUActivation"} and model.config.activation_function == "gelu_new"
    pysparse.nn.save_pretrained(model, tmp_path)
    back = pysparse.nn.load_pretrained(tmp_path)
    assert type(back.h[0].mlp.act) is pysparse.nn.FastGELUTanh
    with torch.no_grad():
        assert torch.equal(run(back), run(model))
    kept, _ = architecture("gpt2")
    pysparse.sparsify(kept, {"*": {"heads": 0.0}}, progress=False, fast_activations=False)
    assert type(kept.h[0].mlp.act).__name__ == "NewGELUActivation"
    with torch.no_grad():
        torch.testing.assert_close(run(kept), dense, rtol=0, atol=0)


def test_experts_with_parameters_of_another_layout_are_not_taken_for_mixtrals():
    class BiasedExperts(torch.nn.Module):  # GPT-OSS-like: biases beside the 3-D weights
        def __init__(self):
            super().__init__()
            self.gate_up_proj = torch.nn.Parameter(torch.zeros(2, 8, 4))
            self.down_proj = torch.nn.Parameter(torch.zeros(2, 4, 4))
            self.gate_up_proj_bias = torch.nn.Parameter(torch.zeros(2, 8))

    assert prune.expert_parts(BiasedExperts()) is None
    model, _ = architecture("mixtral")
    assert prune.expert_parts(model.layers[0].mlp.experts) is not None
