"""Structured pruning (heads, neurons, layers) through sparsify: exactness against zeroed weights,
the three module layouts (pysparse's BERT layer, Hugging Face BERT, LLaMA with grouped-query
attention), the criteria, least-squares reconstruction, global ranking, save/load, kernel-choice
cache, the command line."""
from __future__ import annotations

import copy
import json
import sys

import pytest
import torch

import pysparse
from pysparse.models.minilm import MiniLM
from pysparse.nn import SparseLinear
from pysparse.prune import structured as st
from conftest import gen

transformers = pytest.importorskip("transformers")


def minilm(seed=0, layers=2):
    torch.manual_seed(seed)
    cfg = dict(hidden_size=64, layer_norm_eps=1e-12, vocab_size=100, max_position_embeddings=64, type_vocab_size=2,
               num_hidden_layers=layers, num_attention_heads=4, intermediate_size=128)
    return MiniLM(cfg).eval()


def hf_bert(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                  vocab_size=100, max_position_embeddings=64)
    return transformers.BertModel(cfg).eval()


def llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
                                   intermediate_size=128, vocab_size=100, max_position_embeddings=64)
    return transformers.LlamaModel(cfg).eval()


def ids(seed=1, b=3, L=9):
    return torch.randint(1, 100, (b, L), generator=gen(seed))


def run(model, x):
    if isinstance(model, MiniLM):
        return model.hidden_states(x, torch.ones_like(x))
    return model(input_ids=x).last_hidden_state


def attn_modules(model):
    return [(n, m) for n, m in model.named_modules() if st.attention_parts(m) is not None]


def ffn_modules(model):
    return [(n, m) for n, m in model.named_modules() if st.ffn_parts(m) is not None]


@pytest.mark.parametrize("make", [minilm, hf_bert, llama])
def test_pruning_heads_equals_zeroing_their_output_columns(make):
    model, x = make(), ids()
    zeroed = copy.deepcopy(model)
    for (name, mod), (_, zmod) in zip(attn_modules(model), attn_modules(zeroed)):
        p = st.attention_parts(mod)
        keep = [u for u in range(p.units) if u % 2 == 0]
        with torch.no_grad():  # the dropped units' columns of O, i.e. their contribution
            zp = st.attention_parts(zmod)
            for u in range(p.units):
                if u not in keep:
                    zp.o.weight[:, u * p.unit_width:(u + 1) * p.unit_width] = 0
        st.prune_heads(mod, keep)
        q = st.attention_parts(mod)
        assert q.units == len(keep) and q.heads == p.heads // 2 and q.o.in_features == p.o.in_features // 2
    torch.testing.assert_close(run(model, x), run(zeroed, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [minilm, hf_bert, llama])
def test_pruning_neurons_equals_zeroing_their_down_columns(make):
    model, x = make(), ids()
    zeroed = copy.deepcopy(model)
    for (name, mod), (_, zmod) in zip(ffn_modules(model), ffn_modules(zeroed)):
        p = st.ffn_parts(mod)
        keep = torch.arange(0, p.down.in_features, 3)
        drop = torch.ones(p.down.in_features, dtype=torch.bool)
        drop[keep] = False
        with torch.no_grad():
            st.ffn_parts(zmod).down.weight[:, drop] = 0
        st.prune_neurons(mod, keep)
        assert st.ffn_parts(mod).down.in_features == keep.numel()
    torch.testing.assert_close(run(model, x), run(zeroed, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [minilm, hf_bert, llama])
def test_ratio_zero_changes_nothing(make):
    model, x = make(), ids()
    want = run(model, x)
    pysparse.sparsify(model, {"*": {"heads": 0.0, "neurons": 0.0}})
    torch.testing.assert_close(run(model, x), want, rtol=0, atol=0)


def test_llama_gqa_prunes_whole_groups():
    model, x = llama(), ids()
    report = pysparse.sparsify(model, {"*.self_attn": {"heads": 0.5}, "*.mlp": {"neurons": 0.25}})
    a = model.layers[0].self_attn
    assert a.q_proj.out_features == 4 * 8 and a.k_proj.out_features == 2 * 8  # 8 -> 4 query heads, 4 -> 2 groups
    assert a.num_key_value_groups == 2  # unchanged: 2 query heads per key/value head
    assert model.layers[0].mlp.down_proj.in_features == 96
    assert {r["kind"] for r in report} == {"heads", "neurons"}
    assert run(model, x).shape == (3, 9, 64)


def calib_batches(model, n=4):
    xs = [ids(10 + i) for i in range(n)]
    return [lambda m, x=x: run(m, x) for x in xs], xs


def test_activation_criterion_drops_a_dead_head_first():
    model = minilm()
    with torch.no_grad():
        model.layers[1].attn_out.weight[:, 16:32] = 0  # head 1 of layer 1 contributes nothing
    cal, _ = calib_batches(model)
    pysparse.sparsify(model, {"layers.1": {"heads": 0.25, "criterion": "activation"}}, cal)
    assert model.layers[1].heads == 3 and model.layers[0].heads == 4
    kept = model.layers[1].attn_out.weight
    assert kept.abs().sum(0).min() > 0  # the dead head was the one removed


def test_taylor_criterion_drops_a_dead_neuron_block_first():
    model = minilm()
    dead = torch.arange(0, 32)
    with torch.no_grad():
        model.layers[0].ffn_out.weight[:, dead] = 0
    xs = [ids(20 + i) for i in range(3)]
    r = torch.randn(3, 9, 64, generator=gen(5))
    cal = [lambda m, x=x: (run(m, x) * r).sum() for x in xs]
    pysparse.sparsify(model, {"layers.0": {"neurons": 0.25, "criterion": "taylor"}}, cal)
    assert model.layers[0].ffn_out.weight.abs().sum(0).min() > 0 and model.layers[0].ffn_out.in_features == 96


def test_entropy_drops_the_uniform_head_and_is_refused_for_rotary():
    model = minilm()
    with torch.no_grad():  # head 2 of layer 0: zero queries -> uniform attention (maximal entropy)
        model.layers[0].query.weight[32:48] = 0
        model.layers[0].query.bias[32:48] = 0
    cal, _ = calib_batches(model)
    pysparse.sparsify(model, {"layers.0": {"heads": 0.25, "criterion": "entropy"}}, cal)
    assert model.layers[0].query.weight.abs().sum(1).min() > 0
    lm = llama()
    cal, _ = calib_batches(lm)
    with pytest.raises(ValueError, match=r"'entropy' for 'layers.0.self_attn'.*rotary"):
        pysparse.sparsify(lm, {"*.self_attn": {"heads": 0.25, "criterion": "entropy"}}, cal)


@pytest.mark.parametrize("make", [minilm, hf_bert, llama])
def test_reconstruction_reduces_the_output_error(make):
    base = make(3)
    cal, xs = calib_batches(base, 6)
    want = torch.cat([run(base, x) for x in xs])
    errs = {}
    for rec in (False, True):
        m = copy.deepcopy(base)
        pysparse.sparsify(m, {"*": {"heads": 0.25, "neurons": 0.5, "criterion": "activation", "reconstruct": rec}}, cal)
        errs[rec] = (torch.cat([run(m, x) for x in xs]) - want).norm().item()
    assert errs[True] < 0.8 * errs[False], errs


def test_global_scope_keeps_the_total_and_one_unit_per_layer():
    model = minilm(layers=3)
    with torch.no_grad():
        model.layers[2].ffn_out.weight.mul_(1e-4)  # layer 2's neurons are all unimportant
    cal, _ = calib_batches(model)
    pysparse.sparsify(model, {"layers.*": {"neurons": 0.3, "criterion": "activation", "scope": "global"}}, cal)
    sizes = [l.ffn_out.in_features for l in model.layers]
    assert sum(sizes) == round(3 * 128 * 0.7) and sizes[2] < sizes[0] and sizes[2] < sizes[1] and min(sizes) >= 1


def test_drop_layers_and_the_report():
    model, x = minilm(layers=3), ids()
    h = model.emb_norm(model.word(x) + model.position(torch.arange(9))[None] + model.token_type.weight[0])
    want = model.layers[2](model.layers[0](h, None), None)
    report = pysparse.sparsify(model, {"layers.1": {"drop": True}})
    assert isinstance(model.layers[1], st.Passthrough) and report == [
        {"name": "layers.1", "kind": "drop", "shape": "layer", "after": "passthrough"}]
    got = model.layers[2](model.layers[1](model.layers[0](h, None), None), None)
    torch.testing.assert_close(got, want)


def test_structured_then_sparse_then_save_and_load(tmp_path):
    model, x = hf_bert(4), ids()
    cal, _ = calib_batches(model)
    report = pysparse.sparsify(model, {
        "encoder.layer.*.attention": {"heads": 0.5, "criterion": "activation", "reconstruct": True},
        "encoder.layer.*": {"neurons": 0.25},
        "encoder.layer.*.intermediate.dense": {"format": "nm", "kernel": "sparse"},
        "encoder.layer.1.output.dense": {"format": "csr", "sparsity": 0.7, "kernel": "sparse"},
    }, cal, skip_ends=False)
    kinds = [r["kind"] for r in report]
    assert kinds.count("heads") == 2 and kinds.count("neurons") == 2 and kinds.count("linear") == 3
    assert isinstance(model.encoder.layer[0].intermediate.dense, SparseLinear)
    assert model.encoder.layer[0].attention.self.num_attention_heads == 2
    out = run(model, x)
    path = tmp_path / "bert.safetensors"
    pysparse.nn.save_sparse(model, path)
    back = pysparse.nn.load_sparse(hf_bert(99), path)
    assert back.encoder.layer[1].attention.self.num_attention_heads == 2
    assert torch.equal(run(back, x), out)
    # a dropped layer survives the round trip too
    m2 = minilm(5, layers=3)
    pysparse.sparsify(m2, {"layers.1": {"drop": True}, "layers.0": {"heads": 0.5}})
    pysparse.nn.save_sparse(m2, tmp_path / "m2.safetensors")
    b2 = pysparse.nn.load_sparse(minilm(6, layers=3), tmp_path / "m2.safetensors")
    assert isinstance(b2.layers[1], st.Passthrough) and b2.layers[0].heads == 2
    assert torch.equal(run(b2, x), run(m2, x))


def test_kernel_choice_is_cached_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("PYSPARSE_CACHE_DIR", str(tmp_path))
    torch.manual_seed(0)
    make = lambda: torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Linear(256, 256), torch.nn.Linear(256, 64))  # noqa: E731
    recipe = {"1": {"format": "csr", "sparsity": 0.9}}
    first = pysparse.sparsify(make(), recipe, shapes=[1, 64])
    assert not first[0]["cached"] and set(first[0]["times_us"]) == {1, 64}
    data = json.loads((tmp_path / "kernel_choice.json").read_text())
    assert len(data) == 2 and all("256x256|csr|0.10|" in k for k in data)
    second = pysparse.sparsify(make(), recipe, shapes=[1, 64])
    assert second[0]["cached"] and second[0]["times_us"] == first[0]["times_us"]
    assert second[0]["kernel"] == first[0]["kernel"]
    third = pysparse.sparsify(make(), recipe, shapes=[1, 64], cache=False)
    assert not third[0]["cached"]
    (tmp_path / "kernel_choice.json").write_text("{not json")  # a corrupt cache costs a re-timing only
    assert not pysparse.sparsify(make(), recipe, shapes=[1])[0]["cached"]


def test_a_sparse_choice_is_never_slower_than_dense_at_its_shapes():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(64, 512), torch.nn.Linear(512, 512), torch.nn.Linear(512, 64))
    for r in pysparse.sparsify(model, {"1": {"format": "nm"}}, shapes=[1, 128], cache=False):
        if r["kernel"] != "dense":
            for t in r["times_us"].values():
                assert t[r["kernel"]] <= t["dense"]


def test_cli_sparsify(tmp_path, monkeypatch, capsys):
    from pysparse.__main__ import main

    (tmp_path / "mymodel.py").write_text(
        "import torch\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64),\n"
        "                               torch.nn.ReLU(), torch.nn.Linear(64, 8))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("mymodel", None)
    x = torch.randn(16, 32, generator=gen(3))
    torch.save([(x,)], tmp_path / "calib.pt")
    out = tmp_path / "out.safetensors"
    recipe = json.dumps({"2": {"format": "nm", "criterion": "wanda", "kernel": "sparse"}})
    assert main(["sparsify", "mymodel:build", "--recipe", recipe, "--calibration", str(tmp_path / "calib.pt"),
                 "--out", str(out), "--report", str(tmp_path / "r.json")]) == 0
    assert "2:4" in capsys.readouterr().out
    import mymodel

    back = pysparse.nn.load_sparse(mymodel.build(), out)
    assert isinstance(back[2], SparseLinear) and back[2].format_name == "2:4"
    assert json.loads((tmp_path / "r.json").read_text())[0]["name"] == "2"
    with pytest.raises(SystemExit, match=r"MODEL must be 'package.module:factory'"):
        main(["sparsify", "mymodel", "--recipe", recipe, "--out", str(out)])
    with pytest.raises(SystemExit, match=r"criterion 'wanda' for '2' needs calibration"):
        main(["sparsify", "mymodel:build", "--recipe", recipe, "--out", str(out)])
    with pytest.raises(SystemExit) as e:
        main(["sparsify", "--help"])
    assert e.value.code == 0 and "--recipe" in capsys.readouterr().out
