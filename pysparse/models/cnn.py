"""Small reference CNNs in plain PyTorch (torchvision is not a dependency): ResNet-18/50, a
VGG-style stack, and the structures of modern networks at small widths (ResNeXt- and RegNetY-style
grouped bottlenecks, ConvNeXt-style channels-last blocks, EfficientNet-style MBConv, a small ViT),
randomly initialised, for testing and benchmarking structured (filter) pruning.

The ResNets follow torchvision's layout and parameter names (conv1/bn1/layer1..4/fc, BasicBlock and
Bottleneck with a 1x1 conv + BN `downsample` shortcut, stride on the 3x3 conv), so a torchvision
state_dict loads into them.
"""
from __future__ import annotations

from typing import Sequence, Type, Union

import torch
from torch import nn


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    def __init__(self, block: Type[Union[BasicBlock, Bottleneck]], layers: Sequence[int], num_classes: int = 1000):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._layer(block, 64, layers[0], 1)
        self.layer2 = self._layer(block, 128, layers[1], 2)
        self.layer3 = self._layer(block, 256, layers[2], 2)
        self.layer4 = self._layer(block, 512, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _layer(self, block, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 1000) -> ResNet:
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes)


def resnet50(num_classes: int = 1000) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes)


def vgg(cfg: Sequence[Union[int, str]] = (64, "M", 128, "M", 256, 256, "M"), num_classes: int = 10,
        in_channels: int = 3, batch_norm: bool = True, pool: int = 1, hidden: int = 0) -> nn.Sequential:
    """A VGG-style stack: 3x3 convs (int: output channels) and 2x2 max pools ("M"), then
    AdaptiveAvgPool2d(pool), flatten and a Linear classifier (one hidden Linear + ReLU + Dropout
    layer first when hidden > 0). pool > 1 makes the classifier read a C x pool x pool map."""
    layers = []
    c = in_channels
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        layers.append(nn.Conv2d(c, v, 3, padding=1, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(v))
        layers.append(nn.ReLU(inplace=True))
        c = v
    layers += [nn.AdaptiveAvgPool2d(pool), nn.Flatten()]
    features = c * pool * pool
    if hidden:
        layers += [nn.Linear(features, hidden), nn.ReLU(inplace=True), nn.Dropout()]
        features = hidden
    layers.append(nn.Linear(features, num_classes))
    return nn.Sequential(*layers)


# ---- the structures of modern CNNs, small: for prune.filters' coverage (grouped convolutions,
# squeeze-excitation, stochastic depth, channels-last LayerNorm blocks). Layouts follow the papers
# (ResNeXt, RegNetY, ConvNeXt, EfficientNet), widths are the caller's.

class DropPath(nn.Module):
    """Stochastic depth: in training, each sample's branch is dropped with probability p (and the
    kept ones scaled by 1 / (1 - p)); the identity in eval mode."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        keep = torch.rand(x.shape[0], *([1] * (x.dim() - 1)), device=x.device) >= self.p
        return x * keep.to(x.dtype) / (1.0 - self.p)


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act=nn.ReLU) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, act()) if act is not None else nn.Sequential(*layers)


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, squeezed: int, act=nn.ReLU):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, squeezed, 1)
        self.act = act()
        self.expand = nn.Conv2d(squeezed, channels, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.expand(self.act(self.reduce(self.pool(x)))))


class GroupedBottleneck(nn.Module):
    """ResNeXt's block (1x1, grouped 3x3, 1x1, residual), with squeeze-excitation: RegNetY's."""

    def __init__(self, cin: int, cout: int, width: int, group_width: int, stride: int = 1, se: float = 0.0):
        super().__init__()
        self.a = _conv_bn(cin, width, 1)
        self.b = _conv_bn(width, width, 3, stride, groups=width // group_width)
        self.se = SqueezeExcite(width, max(1, int(cin * se))) if se else nn.Identity()
        self.c = _conv_bn(width, cout, 1, act=None)
        self.shortcut = _conv_bn(cin, cout, 1, stride, act=None) if stride != 1 or cin != cout else nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.c(self.se(self.b(self.a(x)))) + self.shortcut(x))


def _grouped_net(widths: Sequence[int], depths: Sequence[int], group_width: int, bottleneck: float, se: float,
                 num_classes: int, stem: int) -> nn.Sequential:
    layers = [_conv_bn(3, stem, 3, 2)]
    c = stem
    for i, (w, d) in enumerate(zip(widths, depths)):
        for j in range(d):
            layers.append(GroupedBottleneck(c, w, int(w * bottleneck), group_width, 2 if j == 0 and i else 1, se))
            c = w
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes))


def resnext(widths: Sequence[int] = (64, 128, 256), depths: Sequence[int] = (1, 2, 1), cardinality: int = 8,
            num_classes: int = 10) -> nn.Sequential:
    """ResNeXt-style: grouped bottlenecks (cardinality groups, width = half the output)."""
    return _grouped_net(widths, depths, widths[0] // 2 // cardinality, 0.5, 0.0, num_classes, 32)


def regnet(widths: Sequence[int] = (48, 96, 192), depths: Sequence[int] = (1, 2, 2), group_width: int = 8,
           num_classes: int = 10) -> nn.Sequential:
    """RegNetY-style: bottleneck ratio 1, grouped 3x3 of group_width, squeeze-excitation 0.25."""
    return _grouped_net(widths, depths, group_width, 1.0, 0.25, num_classes, 32)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an (N, C, H, W) map, through channels-last (as torchvision)."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale: float = 1e-6):
        super().__init__()
        self.dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale))
        self.drop_path = DropPath(drop_path)

    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.gamma * self.fc2(self.act(self.fc1(self.norm(y))))
        return x + self.drop_path(y.permute(0, 3, 1, 2))


def convnext(dims: Sequence[int] = (32, 64, 128), depths: Sequence[int] = (1, 1, 2), drop_path: float = 0.1,
             num_classes: int = 10) -> nn.Sequential:
    """ConvNeXt-style: 4x4 patchify stem, depthwise 7x7 + channels-last LayerNorm / MLP blocks with
    layer scale and stochastic depth, LayerNorm + 2x2 strided conv between stages."""
    layers = [nn.Conv2d(3, dims[0], 4, 4), LayerNorm2d(dims[0], eps=1e-6)]
    for i, (d, n) in enumerate(zip(dims, depths)):
        if i:
            layers += [LayerNorm2d(dims[i - 1], eps=1e-6), nn.Conv2d(dims[i - 1], d, 2, 2)]
        layers += [ConvNeXtBlock(d, drop_path) for _ in range(n)]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LayerNorm(dims[-1], eps=1e-6),
                         nn.Linear(dims[-1], num_classes))


class MBConv(nn.Module):
    """EfficientNet's block: 1x1 expansion, depthwise conv, squeeze-excitation, 1x1 projection,
    stochastic depth on the residual."""

    def __init__(self, cin: int, cout: int, expand: int, k: int, stride: int, drop_path: float = 0.0):
        super().__init__()
        mid = cin * expand
        self.expand = _conv_bn(cin, mid, 1, act=nn.SiLU) if expand != 1 else nn.Identity()
        self.dw = _conv_bn(mid, mid, k, stride, groups=mid, act=nn.SiLU)
        self.se = SqueezeExcite(mid, max(1, cin // 4), act=nn.SiLU)
        self.project = _conv_bn(mid, cout, 1, act=None)
        self.residual = stride == 1 and cin == cout
        self.drop_path = DropPath(drop_path)

    def forward(self, x):
        y = self.project(self.se(self.dw(self.expand(x))))
        return x + self.drop_path(y) if self.residual else y


def efficientnet(stages: Sequence[tuple] = ((1, 16, 1, 3, 1), (6, 24, 2, 3, 2), (6, 40, 2, 5, 2), (6, 80, 2, 3, 2)),
                 head: int = 320, drop_path: float = 0.1, num_classes: int = 10) -> nn.Sequential:
    """EfficientNet-style: stages of MBConv blocks given as (expand, channels, repeats, kernel,
    stride), a 1x1 head conv, pooling, dropout and the classifier."""
    layers = [_conv_bn(3, 32, 3, 2, act=nn.SiLU)]
    c = 32
    for expand, cout, repeats, k, stride in stages:
        for j in range(repeats):
            layers.append(MBConv(c, cout, expand, k, stride if j == 0 else 1, drop_path))
            c = cout
    return nn.Sequential(*layers, _conv_bn(c, head, 1, act=nn.SiLU), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Dropout(0.2), nn.Linear(head, num_classes))


class ViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.qkv, self.proj = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.norm2, self.fc1, self.act, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim)

    def forward(self, x):
        B, L, C = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(B, L, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        a = nn.functional.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(a.transpose(1, 2).reshape(B, L, C))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    """A vision transformer: patch embedding conv, class token, learned positions, pre-norm blocks,
    the class token's final state classified."""

    def __init__(self, image: int = 32, patch: int = 8, dim: int = 64, depth: int = 2, heads: int = 4, mlp: int = 128,
                 num_classes: int = 10):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[ViTBlock(dim, heads, mlp) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])


def vit(**kw) -> ViT:
    return ViT(**kw)
