"""Filter (channel) pruning of CNNs: ResNet-18/50 and VGG shrink consistently (residual adds, BN,
flatten -> Linear), exactness when the removed filters are zero (torch.cat, depthwise convs,
flatten with spatial positions), the criteria, global vs local, min_channels, skip, unsupported
ops and untraceable models, bad input."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from pysparse.models.cnn import resnet18, resnet50, vgg
from pysparse.prune.filters import filter_groups, filters
from conftest import gen


def image(n=2, c=3, hw=32, seed=0):
    return torch.randn(n, c, hw, hw, generator=gen(seed))


def seeded(fn, *args, seed=0, **kw):
    torch.manual_seed(seed)
    return fn(*args, **kw)


def conv_params(model):
    return sum(p.numel() for p in model.parameters() if p.dim() >= 3)


def prunable_channels(model, x, **kw):
    return sum(g["channels"] for g in filter_groups(model, x, **kw) if g["prunable"])


def check_consistent(model):
    """Every BatchNorm matches the conv before it in a Sequential or block (by name)."""
    mods = dict(model.named_modules())
    for name, m in mods.items():
        if isinstance(m, nn.Conv2d):
            assert m.weight.shape[0] == m.out_channels and m.weight.shape[1] * m.groups == m.in_channels
            bn = mods.get(name.replace("conv", "bn")) if "conv" in name else None
            if isinstance(bn, nn.BatchNorm2d):
                assert bn.num_features == m.out_channels == bn.weight.numel() == bn.running_mean.numel()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These convs are tiny: on a shared machine two OpenMP threads spend 100x the time waiting for
    each other (measured), so this file runs on one and restores the setting after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def r50():
    return seeded(resnet50, 10).eval()


# ---------------------------------------------------------------- whole networks

def test_ratio_zero_is_identity():
    m = seeded(resnet18, 10).eval()
    x = image(hw=64)
    p = filters(m, x, 0.0)
    assert p is not m and torch.equal(p(x), m(x))


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "vgg"])
def test_half_global(name, r50):
    m = {"resnet18": lambda: seeded(resnet18, 10).eval(), "resnet50": lambda: r50,
         "vgg": lambda: seeded(vgg, pool=2, hidden=32).eval()}[name]()
    x = image(hw=64 if name != "vgg" else 32)
    before = copy.deepcopy(m.state_dict())
    total = prunable_channels(m, x)
    p = filters(m, x, 0.5)
    assert p(x).shape == m(x).shape  # runs: every residual add and flatten -> Linear fits
    check_consistent(p)
    assert prunable_channels(p, x) == total - round(0.5 * total)
    # Conv parameters scale with in x out channels: half the channels leaves about a quarter.
    assert conv_params(p) < 0.5 * conv_params(m)
    first = lambda mod: next(c for c in mod.modules() if isinstance(c, nn.Conv2d))
    last = lambda mod: [c for c in mod.modules() if isinstance(c, nn.Linear)][-1]
    assert first(p).weight.shape == first(m).weight.shape
    assert last(p).out_features == last(m).out_features
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())  # the input model is untouched


def test_resnet_groups():
    m = seeded(resnet18, 10)
    groups = filter_groups(m, image())
    res = [g for g in groups if "layer3.0.downsample.0" in g["members"]]
    assert len(res) == 1 and res[0]["prunable"] and res[0]["channels"] == 256
    # One channel set for the whole stage: both blocks' conv2 / bn2 and the shortcut.
    assert {"layer3.0.conv2", "layer3.1.conv2", "layer3.0.bn2", "layer3.1.bn2", "layer3.0.downsample.1"} \
        <= set(res[0]["members"])
    assert {"layer3.1.conv1", "layer4.0.conv1", "layer4.0.downsample.0"} <= set(res[0]["consumers"])
    stem = next(g for g in groups if "conv1" in g["members"])
    assert not stem["prunable"] and stem["reason"] == "skipped: conv1"  # and layer1's residual adds with it
    assert "layer1.1.conv2" in stem["members"]
    fc = next(g for g in groups if "fc" in g["members"])
    assert not fc["prunable"]


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_train_and_eval_mode(mode):
    m = seeded(resnet18, 10).train(mode == "train")
    before = copy.deepcopy(m.state_dict())
    x = image(hw=16)
    p = filters(m, x, 0.3)
    assert p.training == m.training and all(a.training == m.training for a in p.modules())
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
    # No forward in train mode: BatchNorm statistics are the original ones (sliced).
    assert torch.equal(p.bn1.running_mean, m.bn1.running_mean)
    p.eval()
    assert p(x).shape == (2, 10)


# ---------------------------------------------------------------- exactness with zero filters

def zero_filters(conv, idx):
    with torch.no_grad():
        conv.weight[idx] = 0
        if conv.bias is not None:
            conv.bias[idx] = 0


def ratio_for(model, x, n_zero, **kw):
    return n_zero / prunable_channels(model, x, **kw)


class Dense(nn.Module):
    """DenseNet-like: every layer reads the concatenation of all earlier outputs (no BN: exact)."""

    def __init__(self, c=6, growth=5, layers=3, classes=4):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.convs = nn.ModuleList(nn.Conv2d(c + i * growth, growth, 3, padding=1) for i in range(layers))
        self.trans = nn.Conv2d(c + layers * growth, 7, 1)
        self.fc = nn.Linear(7, classes)

    def forward(self, x):
        x = self.stem(x)
        for conv in self.convs:
            x = torch.cat([x, torch.relu(conv(x))], dim=1)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(torch.relu(self.trans(x)), 1), 1))


def test_cat_zero_filters_exact():
    m = seeded(Dense).eval()
    x = image(hw=9)
    zero_filters(m.convs[0], [1, 3])
    zero_filters(m.convs[2], [0])
    zero_filters(m.trans, [6])
    groups = filter_groups(m, x)
    assert sum(g["prunable"] for g in groups) == 4  # three growth layers + the transition; stem and fc skipped
    p = filters(m, x, ratio_for(m, x, 4))
    assert [c.out_channels for c in p.convs] == [3, 5, 4] and p.trans.out_channels == 6
    # Each reader drops exactly the columns of the removed channels at their concat offsets.
    assert [c.in_channels for c in p.convs] == [6, 9, 14] and p.trans.in_channels == 18
    torch.testing.assert_close(p(x), m(x), rtol=0, atol=1e-6)


def test_flatten_spatial_zero_filters_exact():
    m = seeded(vgg, (8, "M", 12, 10), batch_norm=False, pool=3, hidden=16).eval()
    x = image(hw=16)
    zero_filters(m[3], [0, 5])     # middle conv
    zero_filters(m[5], [2, 7, 9])  # last conv: 3 x 3 Linear columns each
    with torch.no_grad():
        m[9].weight[[4, 11]] = 0   # hidden Linear features
        m[9].bias[[4, 11]] = 0
    p = filters(m, x, ratio_for(m, x, 7))
    assert p[3].out_channels == 10 and p[5].out_channels == 7
    assert p[9].in_features == 7 * 9 and p[9].out_features == 14 and p[12].in_features == 14
    torch.testing.assert_close(p(x), m(x), rtol=0, atol=1e-6)


class Mobile(nn.Module):
    """MobileNetV2-style inverted residual (1x1 expand, 3x3 depthwise, squeeze-excite, 1x1 project)."""

    def __init__(self, c=8, e=24, bn=True, bias=False):
        super().__init__()
        norm = (lambda n: nn.BatchNorm2d(n)) if bn else (lambda n: nn.Identity())
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.expand, self.bn1 = nn.Conv2d(c, e, 1, bias=bias), norm(e)
        self.dw, self.bn2 = nn.Conv2d(e, e, 3, padding=1, groups=e, bias=bias), norm(e)
        self.se_reduce, self.se_expand = nn.Conv2d(e, 4, 1), nn.Conv2d(4, e, 1)
        self.project, self.bn3 = nn.Conv2d(e, c, 1, bias=bias), norm(c)
        self.fc = nn.Linear(c, 5)

    def forward(self, x):
        x = self.stem(x)
        h = nn.functional.relu6(self.bn1(self.expand(x)))
        h = nn.functional.relu6(self.bn2(self.dw(h)))
        h = h * torch.sigmoid(self.se_expand(torch.relu(self.se_reduce(h.mean((2, 3), keepdim=True)))))
        x = x + self.bn3(self.project(h))
        return self.fc(x.mean((2, 3)))


def test_depthwise_group():
    m = seeded(Mobile)
    x = image(hw=8)
    g = next(g for g in filter_groups(m, x) if "expand" in g["members"])
    # The depthwise conv passes channels through and the SE gate multiplies them: one group.
    assert {"expand", "bn1", "dw", "bn2", "se_expand"} <= set(g["members"]) and g["prunable"]
    assert {"se_reduce", "project"} <= set(g["consumers"]) and "dw" not in g["consumers"]
    p = filters(m.eval(), x, 0.5, scope="local")
    assert p.dw.groups == p.dw.in_channels == p.dw.out_channels == p.expand.out_channels == 12
    assert p.bn2.num_features == p.se_expand.out_channels == p.project.in_channels == 12
    assert p(x).shape == (2, 5)


def test_depthwise_zero_filters_exact():
    m = seeded(Mobile, bn=False).eval()
    x = image(hw=8)
    zero = [0, 4, 9]
    zero_filters(m.expand, zero)
    # A zero expand filter gives a zero depthwise input, a zero depthwise output (no bias) and so a
    # zero product with the SE gate: removing the channel does not change the output. The channel's
    # score sums over the group (expand, dw, se_expand), so zero the other two as well.
    zero_filters(m.dw, zero)
    zero_filters(m.se_expand, zero)
    p = filters(m, x, ratio_for(m, x, 3), criterion="l1")
    assert p.dw.out_channels == 21 and p.se_reduce.in_channels == 21
    torch.testing.assert_close(p(x), m(x), rtol=0, atol=1e-6)


class CatAddSE(nn.Module):
    """A concatenation added to a conv output, then a squeeze-excite gate built with view()."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 12, 1)
        self.fc1, self.fc2 = nn.Linear(12, 4), nn.Linear(4, 12)
        self.d = nn.Conv2d(12, 6, 3)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], 1) + self.c(x)
        n, c, _, _ = y.size()
        y = y * torch.sigmoid(self.fc2(torch.relu(self.fc1(y.mean((2, 3)).view(n, c))))).view(n, c, 1, 1)
        return self.out(self.d(y).mean((2, 3)))


def test_cat_then_add():
    m = seeded(CatAddSE).eval()
    x = image(hw=8)
    g = next(g for g in filter_groups(m, x, skip=[]) if "a" in g["members"])
    assert set(g["members"]) == {"a", "b", "c", "fc2"} and g["channels"] == 12  # c's channels at a's and b's offsets
    p = filters(m, x, 0.5, skip=[], scope="local")
    assert p.a.out_channels + p.b.out_channels == p.c.out_channels == p.fc2.out_features == p.d.in_channels == 6
    assert p.fc1.out_features == 2 and p.d.out_channels == 3 and p(x).shape == (2, 3)


# ---------------------------------------------------------------- criteria, scope, limits

@pytest.mark.parametrize("criterion", ["l1", "l2", "bn", "geometric_median", "taylor"])
def test_criteria_run(criterion):
    m = seeded(resnet18, 10)
    x = image(hw=16)
    y = torch.randint(0, 10, (2,), generator=gen(1))
    cal = (lambda model: nn.functional.cross_entropy(model(x), y)) if criterion == "taylor" else None
    before = copy.deepcopy(m.state_dict())
    p = filters(m, x, 0.4, criterion=criterion, calibration=cal)
    assert conv_params(p) < conv_params(m) and p.eval()(x).shape == (2, 10)
    assert all(q.grad is None for q in p.parameters())
    assert torch.equal(p.bn1.running_mean, m.bn1.running_mean)  # taylor's train-mode calibration undone
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())


def small_vgg(**kw):
    return seeded(vgg, (16, 16, 16), **kw).eval()  # convs at 0, 3, 6 (BN) / 0, 2, 4 (no BN)


def test_bn_criterion_removes_smallest_gamma():
    m = small_vgg()
    with torch.no_grad():
        for bn in (m[1], m[4], m[7]):
            bn.weight.copy_(torch.linspace(1, 2, 16))
        m[4].weight[[3, 7, 11]] = torch.tensor([0.01, -0.02, 0.03])  # |gamma|: the sign does not matter
    p = filters(m, image(), 3 / 16, criterion="bn", skip=["0", "6", "11"])  # only conv 3 + BN 4 prunable
    keep = [i for i in range(16) if i not in (3, 7, 11)]
    assert torch.equal(p[4].weight, m[4].weight[keep]) and torch.equal(p[3].weight, m[3].weight[keep])
    assert torch.equal(p[4].running_var, m[4].running_var[keep]) and torch.equal(p[6].weight, m[6].weight[:, keep])


def test_geometric_median():
    m = seeded(vgg, (5, 5), batch_norm=False).eval()  # prunable: conv 2 only
    base = torch.randn(m[2].weight[0].shape, generator=gen(2))
    with torch.no_grad():
        for i, c in enumerate([5.0, 6.0, 7.0, 8.0, 20.0]):
            m[2].weight[i] = c * base  # summed distances to the others: 21, 18, 17, 18, 54
    x = image()
    fpgm = filters(m, x, 0.2, criterion="geometric_median")
    l1 = filters(m, x, 0.2, criterion="l1")
    assert torch.equal(fpgm[2].weight, m[2].weight[[0, 1, 3, 4]])  # the median filter goes
    assert torch.equal(l1[2].weight, m[2].weight[[1, 2, 3, 4]])    # the smallest filter goes


def test_taylor_removes_unused_channel():
    m = small_vgg(batch_norm=False)
    with torch.no_grad():
        m[4].weight[:, 5] = 0  # conv 2's channel 5 is never read: zero gradient, zero score
    x = image()
    p = filters(m, x, 1 / 16, criterion="taylor", skip=["0", "4", "8"],
                calibration=[lambda model: model(x).square().sum(), lambda model: model(-x).sum()])
    assert p[2].out_channels == 15 and torch.equal(p[2].weight, m[2].weight[[i for i in range(16) if i != 5]])
    torch.testing.assert_close(p(x), m(x), rtol=0, atol=1e-6)


def test_taylor_needs_calibration():
    with pytest.raises(ValueError, match=r"^pysparse\.prune\.filters: criterion 'taylor' needs calibration="):
        filters(small_vgg(), image(), 0.5, criterion="taylor")


def test_global_vs_local():
    m = small_vgg(batch_norm=False)
    with torch.no_grad():
        m[2].weight[:8] *= 1e-3  # half of conv 2's filters are tiny
    x = image()
    glob, loc = filters(m, x, 0.25), filters(m, x, 0.25, scope="local")
    assert (glob[2].out_channels, glob[4].out_channels) == (8, 16)  # global: all from the tiny half
    assert (loc[2].out_channels, loc[4].out_channels) == (12, 12)


@pytest.mark.parametrize("min_channels,expect", [(10, 10), (0.75, 12), (0, 1)])
def test_min_channels(min_channels, expect):
    m = small_vgg()
    p = filters(m, image(), 0.99, min_channels=min_channels)
    assert p[0].out_channels == 16 and p[3].out_channels == p[6].out_channels == expect


def test_skip_patterns():
    m = seeded(resnet18, 10)
    x = image(hw=16)
    p = filters(m, x, 0.5, skip=["conv1", "fc", "layer2", "layer3.0.conv1"])
    sd, psd = m.state_dict(), p.state_dict()
    for k in sd:
        if k.startswith(("layer2.", "layer3.0.conv1", "layer3.0.bn1")):
            assert psd[k].shape == sd[k].shape, k
        elif k.startswith("layer3.0.conv2"):
            assert psd[k].shape[0] < sd[k].shape[0] and psd[k].shape[1] == sd[k].shape[1]
    assert p.layer4[1].conv1.out_channels < 512
    groups = filter_groups(m, x, skip=["conv1", "fc", "layer2", "layer3.0.conv1"])
    assert any(g["members"] == ["layer2"] and g["reason"] == "skipped: layer2" for g in groups)  # kept whole


# ---------------------------------------------------------------- unsupported and bad input

class Shuffle(nn.Module):
    """Channel shuffle (ShuffleNet), a grouped conv and a slice of the channel dim."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.g = nn.Conv2d(8, 8, 1, groups=2)
        self.c = nn.Conv2d(8, 6, 3, padding=1)
        self.d = nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = torch.relu(self.b(self.a(x)))
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        x = self.c(self.g(x))
        return self.fc(self.d(x)[:, :4].mean((2, 3)))


def test_unsupported_ops_are_unprunable():
    m = seeded(Shuffle).eval()
    x = image(hw=6)
    reasons = {tuple(g["members"]): g["reason"] for g in filter_groups(m, x, skip=[])}
    assert reasons[("a",)] == ""
    assert reasons[("b", "g")] == ""  # the shuffle and the grouped conv are followed (below)
    assert reasons[("c",)] == ""
    assert reasons[("d",)] == "unsupported op getitem"  # a slice of the channel dim
    p = filters(m, x, 0.5, skip=[])
    assert [p.a.out_channels, p.b.out_channels, p.c.out_channels, p.d.out_channels] == [4, 4, 3, 6]
    assert p.d.in_channels == p.c.out_channels and p.g.groups == 1 and p.g.in_channels == p.b.out_channels
    assert p(x).shape == (2, 2)


def test_shuffle_and_grouped_conv_zero_filters_exact():
    """Channel j of every shuffle group is one unit, and the grouped conv loses whole groups: b's
    channels 2, 3, 6, 7 are what the conv's group 1 reads after the shuffle (positions 4..7)."""
    m = seeded(Shuffle).eval()
    x = image(hw=6)
    g = next(g for g in filter_groups(m, x, skip=["a", "c", "d", "fc"]) if g["members"] == ["b", "g"])
    assert g["channels"] == 2 and g["prunable"]
    zero_filters(m.b, [2, 3, 6, 7])
    zero_filters(m.g, [4, 5, 6, 7])
    p = filters(m, x, 0.5, skip=["a", "c", "d", "fc"], scope="local")
    assert p.b.out_channels == 4 and (p.g.groups, p.g.in_channels, p.g.out_channels) == (1, 4, 4)
    assert p.c.in_channels == 4
    torch.testing.assert_close(p(x), m(x), rtol=0, atol=1e-6)


# ---------------------------------------------------------------- modern CNNs and vision transformers

MODERN = ["resnext", "regnet", "convnext", "efficientnet"]


@pytest.mark.parametrize("name", MODERN)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_modern_cnns_keep_at_most_35_percent(name, mode):
    """At ratio 0.5 every one keeps <= 35% of its parameters (a dependency-graph pruner keeps
    26-32% of their full-size versions), with outputs of the right shape; ratio 0 changes nothing.
    Stochastic depth is traced as in eval mode whatever the model's mode."""
    from pysparse.models import cnn
    m = seeded(getattr(cnn, name))
    m.train(mode == "train")
    x = image(hw=32)
    before = sum(p.numel() for p in m.parameters())
    p = filters(m, x, 0.5)
    assert p.training == (mode == "train")
    p.eval(), m.eval()
    kept = sum(q.numel() for q in p.parameters()) / before
    assert kept <= 0.35, kept
    with torch.no_grad():
        assert p(x).shape == m(x).shape
        assert torch.equal(filters(m, x, 0.0)(x), m(x))
    unprunable = {g["reason"] for g in filter_groups(m, x) if not g["prunable"]}
    assert all(r.startswith("skipped: ") or r == "model output" for r in unprunable), unprunable


def test_grouped_conv_loses_whole_groups():
    from pysparse.models import cnn
    m = seeded(cnn.resnext).eval()
    x = image(hw=32)
    block = dict(m.named_modules())["1"]
    g = next(g for g in filter_groups(m, x) if "1.b.0" in g["members"])
    assert g["channels"] == block.b[0].groups and set(g["members"]) == {"1.a.0", "1.a.1", "1.b.0", "1.b.1"}
    p = filters(m, x, 0.5, scope="local")
    conv = dict(p.named_modules())["1.b.0"]
    assert conv.groups == block.b[0].groups // 2 and conv.in_channels == conv.out_channels == block.b[0].in_channels // 2
    assert conv.weight.shape[1] == block.b[0].weight.shape[1]  # each kept group reads its own inputs


def test_convnext_channels_last_blocks():
    """ConvNeXt's block: depthwise conv, permute, LayerNorm, Linear MLP on the channels, layer
    scale gamma * x, permute back. The hidden MLP channels are exact when zero; the residual
    stream is renormalised by its LayerNorms (reported), and gamma is sliced with it."""
    from pysparse.models import cnn
    m = seeded(cnn.convnext).eval()
    x = image(hw=32)
    groups = filter_groups(m, x)
    hidden = next(g for g in groups if g["members"] == ["2.fc1"])
    assert hidden["prunable"] and hidden["channels"] == 128 and hidden["consumers"] == ["2.fc2"]
    assert hidden["renormalised_by"] == []
    stream = next(g for g in groups if "5.fc2" in g["members"])  # stage 2's (the stem's stage is skipped)
    assert stream["prunable"] and "5.norm" in stream["renormalised_by"] and {"4", "5.dw"} <= set(stream["members"])
    with torch.no_grad():
        m[2].fc1.weight[:64] = 0
        m[2].fc1.bias[:64] = 0
    skip = [n for n, mod in m.named_modules() if isinstance(mod, (nn.Conv2d, nn.Linear)) and n != "2.fc1"]
    p = filters(m, x, 64 / sum(g["channels"] for g in filter_groups(m, x, skip=skip) if g["prunable"]), skip=skip)
    assert p[2].fc1.out_features == 64 and p[2].fc2.in_features == 64
    torch.testing.assert_close(p(x), m(x), rtol=0, atol=1e-6)
    q = filters(m, x, 0.5)
    assert q[5].gamma.shape == (q[5].fc2.out_features,) == (q[5].dw.out_channels,) == (q[5].norm.weight.numel(),)
    assert q[5].norm.normalized_shape == (q[5].dw.out_channels,) and q[5].dw.out_channels < 64
    assert q[6].normalized_shape == (q[5].dw.out_channels,) and q(x).shape == m(x).shape  # a LayerNorm2d


def test_vision_transformer_prunes_its_mlps_and_keeps_what_shapes_the_heads():
    from pysparse.models import cnn
    m = seeded(cnn.vit).eval()
    x = image(hw=32)
    groups = {g["members"][0]: g for g in filter_groups(m, x, skip=["head"])}
    assert groups["blocks.0.fc1"]["prunable"] and groups["blocks.1.fc1"]["prunable"]
    # The residual width C reshapes qkv's output into heads (C // heads): structural, kept.
    assert groups["patch"]["reason"] == "its channel count shapes another tensor (reshape)"
    p = filters(m, x, 0.5, skip=["head"], scope="local")
    assert p.blocks[0].fc1.out_features == 64 and p.blocks[0].fc2.in_features == 64
    with torch.no_grad():
        assert p(x).shape == (2, 10) and torch.equal(filters(m, x, 0.0)(x), m(x))


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        if x.sum() > 0:
            return self.conv(x)
        return -self.conv(x)


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 3, 1)
        self.inner = Branchy()
        self.head = nn.Conv2d(4, 8, 1)
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.out(torch.relu(self.head(self.inner(self.stem(x)))))


def test_untraceable_model():
    with pytest.raises(ValueError, match=r"^pysparse\.prune\.filters: torch\.fx cannot trace Branchy\.forward"):
        filters(Branchy(), image(), 0.5)
    with pytest.raises(ValueError, match=r"cannot trace module 'inner' \(Branchy\) of Outer .*skip=\['inner'\]"):
        filter_groups(Outer(), image())
    # As suggested: the skipped submodule is kept whole, the rest is pruned.
    p = filters(seeded(Outer), image(), 0.5, skip=["inner"])
    assert p.inner.conv.out_channels == 4 and p.head.out_channels == 4 and p.out.out_channels == 2


def test_example_input_must_run():
    with pytest.raises(ValueError, match=r"^pysparse\.prune\.filters: Sequential fails on example_input \(.*\)$"):
        filters(small_vgg(), image(c=4), 0.5)


@pytest.mark.parametrize("kw,msg", [
    (dict(ratio=1.0), "ratio must be in [0, 1), got 1.0"),
    (dict(ratio=-0.1), "ratio must be in [0, 1), got -0.1"),
    (dict(criterion="l3"), "unknown criterion 'l3'; choose one of l1, l2, bn, geometric_median, taylor"),
    (dict(scope="layer"), "unknown scope 'layer'; choose 'global' or 'local'"),
    (dict(min_channels=-1), "min_channels must be an int >= 0 or a fraction in (0, 1], got -1"),
    (dict(skip=[3]), "skip must be a list of module-name patterns, got [3]"),
    (dict(criterion="taylor", calibration=[]),
     "calibration must be a callable f(model) -> scalar loss, or a non-empty list of them"),
])
def test_bad_input(kw, msg):
    args = dict(ratio=0.5) | kw
    with pytest.raises(ValueError) as e:
        filters(small_vgg(), image(), args.pop("ratio"), **args)
    assert str(e.value) == "pysparse.prune.filters: " + msg
