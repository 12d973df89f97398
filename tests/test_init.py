"""GeneralRelu, init_weights, lsuv_init, conv, BatchTransformCB, plot_func, clean_mem."""
import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from miniai.core.events import Callback
from miniai.datasets import DataLoaders
from miniai.data.fashion import fashion_dls, find_fashion_mnist
from miniai.init import BatchTransformCB, GeneralRelu, clean_mem, conv, init_weights, lsuv_init, plot_func
from miniai.learner import TrainLearner


def test_general_relu():
    x = torch.tensor([-2., 0., 1., 5.])
    assert torch.allclose(GeneralRelu()(x), F.relu(x))
    assert torch.allclose(GeneralRelu(leak=0.1, sub=0.4, maxv=3)(x), torch.tensor([-0.6, -0.4, 0.6, 3.]))


def test_init_weights_gives_kaiming_std():
    torch.manual_seed(0)
    lin = nn.Linear(1000, 500)
    init_weights(lin)
    assert lin.weight.std().item() == pytest.approx((2 / 1000) ** 0.5, rel=0.03)
    c = nn.Conv2d(16, 32, 3)
    init_weights(c, leaky=0.1)
    assert c.weight.std().item() == pytest.approx((2 / (1 + 0.01) / 144) ** 0.5, rel=0.05)
    bn = nn.BatchNorm2d(3)
    init_weights(bn)
    assert torch.equal(bn.weight, torch.ones(3))


def test_conv_layers_and_bias_default():
    c = conv(3, 8, norm=nn.BatchNorm2d)
    assert [type(m) for m in c] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU] and c[0].bias is not None, "the course's bias"
    assert conv(3, 8, norm=nn.BatchNorm2d, bias=False)[0].bias is None
    c = conv(3, 8, act=None)
    assert [type(m) for m in c] == [nn.Conv2d] and c[0].bias is not None
    assert conv(3, 8, act=False, bias=False)[0].bias is None
    assert conv(3, 8, ks=5, stride=1)(torch.zeros(1, 3, 9, 9)).shape == (1, 8, 9, 9)
    assert conv(3, 8)(torch.zeros(1, 3, 9, 9)).shape == (1, 8, 5, 5)


@pytest.mark.skipif(find_fashion_mnist() is None, reason='Fashion-MNIST is not installed')
def test_lsuv_init_reaches_unit_variance_on_real_data():
    torch.manual_seed(0)
    xb, _ = next(iter(fashion_dls(bs=512, seed=0, device='cpu').train))
    act = lambda: GeneralRelu(leak=0.1, sub=0.4)
    model = nn.Sequential(conv(1, 8, act=act), conv(8, 16, act=act), nn.Flatten())
    for layer in model[:2]:
        lsuv_init(model, layer[1], layer[0], xb)
    outs = {}
    with torch.no_grad():
        h = model[1][1].register_forward_hook(lambda m, i, o: outs.update(o=o))
        model(xb)
        h.remove()
    assert abs(outs["o"].mean().item()) < 2e-3 and abs(outs["o"].std().item() - 1) < 2e-3
    assert all(len(m._forward_hooks) == 0 for m in model.modules())


def test_lsuv_init_gives_up_with_a_clear_error():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    nn.init.zeros_(model[0].weight)  # every output is 0: std 0, it cannot be scaled to 1
    nn.init.zeros_(model[0].bias)
    with pytest.raises(ValueError, match='ReLU has std 0'):
        lsuv_init(model, model[1], model[0], torch.randn(16, 4))
    lin = nn.Linear(4, 4, bias=False)  # without a bias the mean cannot be moved: bounded rounds, then an error
    with pytest.raises(ValueError, match='did not reach mean 0'):
        lsuv_init(nn.Sequential(lin), lin, lin, torch.randn(64, 4) + 5, max_iters=5)


def test_batch_transform_cb_phases():
    x, y = torch.ones(8, 2), torch.zeros(8, dtype=torch.long)
    seen = []
    class Spy(Callback):
        order = 1
        def before_batch(self, learn): seen.append((learn.training, learn.batch[0][0, 0].item()))
    double = lambda b: (b[0] * 2, b[1])
    for on_train, on_val in ((True, False), (False, True)):
        seen.clear()
        learn = TrainLearner(nn.Linear(2, 2), DataLoaders([(x, y)], [(x, y)]), F.cross_entropy,
                             cbs=[BatchTransformCB(double, on_train=on_train, on_val=on_val), Spy()])
        learn.fit(1)
        assert seen == [(True, 2. if on_train else 1.), (False, 2. if on_val else 1.)]


def test_plot_func_and_clean_mem():
    ax = plot_func(GeneralRelu(leak=0.1, sub=0.4))
    assert len(ax.lines[0].get_xdata()) == 100
    plt.close('all')
    clean_mem()  # must work without CUDA and outside IPython
