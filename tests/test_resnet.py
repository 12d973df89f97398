"""ResBlock, GlobalAvgPool and the model constructors."""
import pytest
import torch
import torchvision
from torch import nn

from miniai.init import GeneralRelu
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


# The course's conv and ResBlock (lessons 13-14), written out here as the course lays them out: its conv drops the
# bias only for a BatchNorm *instance*, and every call passes the class, so each convolution keeps its bias.
def course_conv(ni, nf, ks=3, stride=2, act=nn.ReLU, norm=None, bias=None):
    if bias is None: bias = not isinstance(norm, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d))
    layers = [nn.Conv2d(ni, nf, ks, stride=stride, padding=ks // 2, bias=bias)]
    if norm: layers.append(norm(nf))
    if act: layers.append(act())
    return nn.Sequential(*layers)


class CourseResBlock(nn.Module):
    def __init__(self, ni, nf, stride=1, ks=3, act=nn.ReLU, norm=None):
        super().__init__()
        self.convs = nn.Sequential(course_conv(ni, nf, ks, 1, act, norm), course_conv(nf, nf, ks, stride, None, norm))
        self.idconv = nn.Identity() if ni == nf else course_conv(ni, nf, 1, 1, None)
        self.pool = nn.Identity() if stride == 1 else nn.AvgPool2d(2, ceil_mode=True)
        self.act = act()

    def forward(self, x): return self.act(self.convs(x) + self.idconv(self.pool(x)))


def course_lesson14_model(nfs=(16, 32, 64, 128, 256, 512), norm=nn.BatchNorm2d):
    "Lesson 14's get_model: a 5x5 stem block, stride-2 blocks, global average pooling, a bias-free Linear, BatchNorm1d."
    act = lambda: GeneralRelu(leak=0.1, sub=0.4)
    blocks = [CourseResBlock(1, nfs[0], ks=5, act=act, norm=norm)]
    blocks += [CourseResBlock(nfs[i], nfs[i + 1], stride=2, act=act, norm=norm) for i in range(len(nfs) - 1)]
    return nn.Sequential(*blocks, GlobalAvgPool(), nn.Dropout(0.), nn.Linear(nfs[-1], 10, bias=False),
                         nn.BatchNorm1d(10))


def test_parameter_counts_are_the_courses():
    assert n_params(ResBlock(16, 32, norm=nn.BatchNorm2d)) == n_params(CourseResBlock(16, 32, norm=nn.BatchNorm2d)) \
        == 14560
    assert n_params(fashion_resnet()) == n_params(course_lesson14_model()) == 4907588, "lesson 14's printed total"
    # the bias-free layout, on request: the two BatchNorm'd convolutions of each block lose their biases
    assert n_params(ResBlock(16, 32, norm=nn.BatchNorm2d, bias=False)) == 14496
    assert n_params(fashion_resnet(bias=False)) == 4905572
    assert fashion_resnet(bias=False)[1].idconv[0].bias is not None, 'the shortcut has no norm: its bias stays'


def test_a_state_dict_of_the_courses_layout_loads_strictly():
    torch.manual_seed(0)
    course = course_lesson14_model()
    with torch.no_grad():  # BatchNorm statistics other than the defaults, so loading them shows
        for m in course.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.)
    ours = fashion_resnet()
    ours.load_state_dict(course.state_dict(), strict=True)
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(ours.eval()(x), course.eval()(x))
    with pytest.raises(RuntimeError, match='Unexpected key'):
        fashion_resnet(bias=False).load_state_dict(course.state_dict(), strict=True)


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
