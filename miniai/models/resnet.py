"""ResNets: the course's `ResBlock` (average-pool shortcut) and models, and a torchvision-sized ResNet family."""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial

import fastcore.all as fc
import torch
from torch import nn

from .layers import Act, GeneralRelu, Norm, conv

__all__ = ['act_gr', 'ResBlock', 'GlobalAvgPool', 'fashion_resnet', 'seed002_resnet', 'resnet9', 'fashion_resnet9',
           'BasicBlock',
           'Bottleneck',
           'ResNet', 'resnet18', 'resnet34', 'resnet50']

act_gr = partial(GeneralRelu, leak=0.1, sub=0.4)


def _conv_block(ni: int, nf: int, stride: int, act: Act = act_gr, norm: Norm = None, ks: int = 3,
                bias: bool | None = None) -> nn.Sequential:
    return nn.Sequential(conv(ni, nf, stride=1, act=act, norm=norm, ks=ks, bias=bias),
                         conv(nf, nf, stride=stride, act=None, norm=norm, ks=ks, bias=bias))


class ResBlock(nn.Module):
    """Two convolutions plus a shortcut: `act(convs(x) + idconv(pool(x)))`. The shortcut average-pools when the
    block strides and uses a 1x1 convolution when the channel count changes, so it never drops information. Its
    parameters are the course's (`ResBlock(16, 32, norm=nn.BatchNorm2d)`: 14,560); `bias=False` drops the two
    convolutions' biases, redundant before a BatchNorm (14,496), not the shortcut's, which has no norm."""
    def __init__(self, ni: int, nf: int, stride: int = 1, ks: int = 3, act: Callable[[], nn.Module] = act_gr,
                 norm: Norm = None, bias: bool | None = None) -> None:
        super().__init__()
        self.convs = _conv_block(ni, nf, stride, act=act, ks=ks, norm=norm, bias=bias)
        self.idconv = fc.noop if ni == nf else conv(ni, nf, ks=1, stride=1, act=None)
        self.pool = fc.noop if stride == 1 else nn.AvgPool2d(2, ceil_mode=True)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor: return self.act(self.convs(x) + self.idconv(self.pool(x)))


class GlobalAvgPool(nn.Module):
    "Average over the last two (spatial) dimensions: (N, C, H, W) -> (N, C), for inputs of any size."
    def forward(self, x: torch.Tensor) -> torch.Tensor: return x.mean((-2, -1))


def fashion_resnet(nfs: Sequence[int] = (16, 32, 64, 128, 256, 512), act: Callable[[], nn.Module] = act_gr,
                   norm: Norm = nn.BatchNorm2d, drop: float = 0., in_channels: int = 1, n_classes: int = 10,
                   ks: int = 5, bias: bool | None = None) -> nn.Sequential:
    """The course's Fashion-MNIST ResNet: a `ks`x`ks` `ResBlock` stem, a stride-2 `ResBlock` per further entry of
    `nfs`, global average pooling, dropout, and a bias-free linear head followed by BatchNorm: 4,907,588 parameters,
    as the course's lesson 14 prints (4,905,572 with `bias=False`, see `ResBlock`). The course's earlier, 5-stage
    model is `fashion_resnet(nfs=(16, 32, 64, 128, 256), ks=3)`."""
    layers = [ResBlock(in_channels, nfs[0], ks=ks, stride=1, act=act, norm=norm, bias=bias)]
    layers += [ResBlock(nfs[i], nfs[i + 1], act=act, norm=norm, stride=2, bias=bias) for i in range(len(nfs) - 1)]
    layers += [GlobalAvgPool(), nn.Dropout(drop), nn.Linear(nfs[-1], n_classes, bias=False), nn.BatchNorm1d(n_classes)]
    return nn.Sequential(*layers)


def seed002_resnet(act: Callable[[], nn.Module] = nn.ReLU, nfs: Sequence[int] = (8, 16, 32, 64, 128, 256),
                   norm: Norm = None, pool: bool = False, in_channels: int = 1, n_classes: int = 10,
                   bias: bool | None = None) -> nn.Sequential:
    """The two models of the ResNet walk-through (seed 002): `pool=False` ends with a 1x1-output conv and Flatten
    (1,247,362 parameters; 28x28 inputs only), `pool=True` with `GlobalAvgPool`, Flatten and Linear (1,226,882)."""
    layers = [ResBlock(in_channels, nfs[0], stride=1, act=act, norm=norm, bias=bias)]
    layers += [ResBlock(nfs[i], nfs[i + 1], stride=2, act=act, norm=norm, bias=bias) for i in range(len(nfs) - 1)]
    head = ([GlobalAvgPool(), nn.Flatten(), nn.Linear(nfs[-1], n_classes)] if pool else
            [conv(nfs[-1], n_classes, act=None, norm=False, bias=True), nn.Flatten()])
    return nn.Sequential(*layers, *head)


def _cbr(ni, nf): return nn.Sequential(nn.Conv2d(ni, nf, 3, padding=1, bias=False), nn.BatchNorm2d(nf), nn.ReLU())


class _Residual(nn.Module):
    "`x + f(x)` with `f` two 3x3 conv-BN-ReLU layers of `nf` channels."
    def __init__(self, nf: int):
        super().__init__()
        self.f = nn.Sequential(_cbr(nf, nf), _cbr(nf, nf))

    def forward(self, x): return x + self.f(x)


def resnet9(c: int = 64, drop: float = 0., in_channels: int = 3, n_classes: int = 10,
            size: int | None = None) -> nn.Sequential:
    """A ResNet-9 as in the fast CIFAR-10 training records, for images of any channel count and size: a stem of `c`
    channels, then three stages that double the channels and max-pool (32 -> 16 -> 8 -> 4, 28 -> 14 -> 7 -> 3), with
    a residual pair of convolutions after the first and the last; global max pooling, dropout and a bias-free linear
    head followed by BatchNorm. Images larger than 64 pixels (`size`, their larger side) are max-pooled after the
    stem down to 64 or less first, so the cost per image stays near the small-image network's."""
    extra = max(0, math.ceil(math.log2(size / 64))) if size else 0
    return nn.Sequential(_cbr(in_channels, c), *[nn.MaxPool2d(2) for _ in range(extra)], _cbr(c, 2 * c),
                         nn.MaxPool2d(2), _Residual(2 * c), _cbr(2 * c, 4 * c), nn.MaxPool2d(2), _cbr(4 * c, 8 * c),
                         nn.MaxPool2d(2), _Residual(8 * c), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Dropout(drop),
                         nn.Linear(8 * c, n_classes, bias=False), nn.BatchNorm1d(n_classes))


def fashion_resnet9(c: int = 64, drop: float = 0., in_channels: int = 1, n_classes: int = 10) -> nn.Sequential:
    """`resnet9` for Fashion-MNIST (28x28 grey, 10 classes): most of its work is at 14x14 and below, so it is cheap
    per image for its width (see `learn.summary()`)."""
    return resnet9(c, drop, in_channels, n_classes)


def _cbn(ni, nf, ks, stride, act=True):
    "conv-BatchNorm(-ReLU) in torchvision's layout: no conv bias, padding ks//2."
    return conv(ni, nf, ks=ks, stride=stride, act=nn.ReLU if act else None, norm=nn.BatchNorm2d, bias=False)


class BasicBlock(nn.Module):
    "Two 3x3 conv-BN layers with a shortcut (a strided 1x1 conv-BN when the shape changes), as in ResNet-18/34."
    expansion = 1
    def __init__(self, ni: int, nf: int, stride: int = 1) -> None:
        super().__init__()
        self.convs = nn.Sequential(_cbn(ni, nf, 3, stride), _cbn(nf, nf, 3, 1, act=False))
        self.shortcut = (nn.Identity() if stride == 1 and ni == nf else _cbn(ni, nf, 1, stride, act=False))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor: return self.act(self.convs(x) + self.shortcut(x))


class Bottleneck(nn.Module):
    "1x1 reduce, 3x3 (strided), 1x1 expand by 4, with a projection shortcut where needed, as in ResNet-50."
    expansion = 4
    def __init__(self, ni: int, nf: int, stride: int = 1) -> None:
        super().__init__()
        out = nf * self.expansion
        self.convs = nn.Sequential(_cbn(ni, nf, 1, 1), _cbn(nf, nf, 3, stride), _cbn(nf, out, 1, 1, act=False))
        self.shortcut = nn.Identity() if stride == 1 and ni == out else _cbn(ni, out, 1, stride, act=False)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor: return self.act(self.convs(x) + self.shortcut(x))


class ResNet(nn.Sequential):
    """Stem (7x7 stride-2 conv-BN-ReLU, 3x3 max-pool), four stages of `block`s with `layers[i]` blocks each
    (64, 128, 256, 512 channels times the block's expansion), global average pooling and a linear classifier."""
    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: Sequence[int], in_channels: int = 3,
                 n_classes: int = 1000) -> None:
        stem = nn.Sequential(_cbn(in_channels, 64, 7, 2), nn.MaxPool2d(3, stride=2, padding=1))
        stages, ni = [], 64
        for i, (n, nf) in enumerate(zip(layers, (64, 128, 256, 512))):
            blocks = []
            for j in range(n):
                blocks.append(block(ni, nf, stride=2 if j == 0 and i > 0 else 1))
                ni = nf * block.expansion
            stages.append(nn.Sequential(*blocks))
        super().__init__(stem, *stages, GlobalAvgPool(), nn.Linear(ni, n_classes))


def resnet18(in_channels: int = 3, n_classes: int = 1000) -> ResNet:
    "ResNet-18: basic blocks (2, 2, 2, 2); 11,689,512 parameters at 3 channels and 1000 classes, like torchvision's."
    return ResNet(BasicBlock, (2, 2, 2, 2), in_channels, n_classes)


def resnet34(in_channels: int = 3, n_classes: int = 1000) -> ResNet:
    "ResNet-34: basic blocks (3, 4, 6, 3); 21,797,672 parameters at 3 channels and 1000 classes."
    return ResNet(BasicBlock, (3, 4, 6, 3), in_channels, n_classes)


def resnet50(in_channels: int = 3, n_classes: int = 1000) -> ResNet:
    "ResNet-50: bottleneck blocks (3, 4, 6, 3); 25,557,032 parameters at 3 channels and 1000 classes."
    return ResNet(Bottleneck, (3, 4, 6, 3), in_channels, n_classes)
