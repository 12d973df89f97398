"""ResBlock, GlobalAvgPool and the model constructors."""
import pytest
import torch
import torchvision
from torch import nn

from miniai.resnet import (BasicBlock, Bottleneck, GlobalAvgPool, ResBlock, fashion_resnet, resnet18, resnet34,
                           resnet50, seed002_resnet)


def n_params(m): return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize('ours,theirs,expected', [(resnet18, torchvision.models.resnet18, 11689512),
                                                  (resnet34, torchvision.models.resnet34, 21797672),
                                                  (resnet50, torchvision.models.resnet50, 25557032)])
def test_parameter_counts_equal_torchvision(ours, theirs, expected):
    assert n_params(ours(in_channels=3, n_classes=1000)) == n_params(theirs()) == expected


def test_resnet_family_takes_channels_and_classes():
    m = resnet18(in_channels=1, n_classes=10).eval()
    assert m(torch.randn(2, 1, 64, 64)).shape == (2, 10)
    assert resnet50(n_classes=7)(torch.randn(1, 3, 96, 96)).shape == (1, 7)


def test_resblock_shortcut():
    b = ResBlock(8, 8)
    assert b.idconv is not None and not isinstance(b.pool, nn.Module), 'same shape: identity shortcut'
    b = ResBlock(8, 16, stride=2)
    assert isinstance(b.pool, nn.AvgPool2d) and b(torch.randn(2, 8, 7, 7)).shape == (2, 16, 4, 4)
    # the shortcut carries the input: with the conv path's last weights zeroed, the output is act(pooled idconv(x))
    blk = ResBlock(4, 4, act=nn.Identity)
    nn.init.zeros_(blk.convs[1][0].weight)
    nn.init.zeros_(blk.convs[1][0].bias)
    x = torch.randn(2, 4, 6, 6)
    assert torch.allclose(blk(x), x)


def test_global_avg_pool_any_size():
    x = torch.randn(3, 5, 7, 9)
    assert torch.allclose(GlobalAvgPool()(x), x.mean((2, 3)))


def test_seed_models_parameter_totals():
    assert n_params(seed002_resnet()) == 1247362
    assert n_params(seed002_resnet(pool=True)) == 1226882
    assert seed002_resnet(pool=True)(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_fashion_resnet_shapes():
    m = fashion_resnet()
    assert m(torch.randn(4, 1, 28, 28)).shape == (4, 10)
    assert isinstance(m[-1], nn.BatchNorm1d) and m[-2].bias is None
    assert fashion_resnet(nfs=(8, 16), n_classes=3)(torch.randn(2, 1, 28, 28)).shape == (2, 3)


def test_blocks_shapes():
    assert BasicBlock(64, 128, stride=2)(torch.randn(1, 64, 8, 8)).shape == (1, 128, 4, 4)
    assert Bottleneck(256, 64)(torch.randn(1, 256, 8, 8)).shape == (1, 256, 8, 8)


def test_resnet9_fits_any_channels_size_and_classes():
    from miniai.resnet import fashion_resnet9, resnet9
    m = resnet9(8, in_channels=3, n_classes=5).eval()
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 5) and m(torch.randn(2, 3, 20, 36)).shape == (2, 5)
    assert n_params(fashion_resnet9(8)) == n_params(resnet9(8, in_channels=1, n_classes=10))
    pools = lambda m: sum(isinstance(l, nn.MaxPool2d) for l in m)
    big = resnet9(8, in_channels=3, n_classes=5, size=224).eval()
    assert pools(resnet9(8, size=64)) == 3 and pools(big) == 5, '224 is pooled to 56 before the first stage'
    assert big(torch.randn(1, 3, 224, 224)).shape == (1, 5) and n_params(big) == n_params(resnet9(8, n_classes=5))
