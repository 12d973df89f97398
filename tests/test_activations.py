"""Hooks, HooksCallback and ActivationStats."""
import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt
import fastcore.all as fc
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from miniai.activations import ActivationStats, Hook, Hooks, HooksCallback, append_stats, get_hist, get_min, set_seed
from miniai.data.fashion import fashion_dls, find_fashion_mnist
from miniai.init import GeneralRelu, conv
from miniai.learner import Callback, MetricsCB, TrainLearner
from miniai.datasets import DataLoaders


def cnn():
    act = lambda: GeneralRelu(leak=0.1, sub=0.4)
    # 28 -> 14 -> 7 -> 4 -> 2 pixels: pooled to one value per class (flattened as it was, it gave 40 outputs for 10
    # classes, which the Learner's first-batch check now refuses)
    return nn.Sequential(conv(1, 8, act=act), conv(8, 16, act=act), conv(16, 32, act=act), conv(32, 10, act=None),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())


def n_hooks(model): return sum(len(m._forward_hooks) for m in model.modules())


def test_hook_calls_f_with_itself_and_removes():
    lin = nn.Linear(3, 2)
    seen = []
    h = Hook(lin, lambda hook, m, i, o: seen.append((hook, m, o.shape)))
    lin(torch.zeros(4, 3))
    assert seen == [(h, lin, (4, 2))]
    h.remove()
    lin(torch.zeros(4, 3))
    assert len(seen) == 1 and n_hooks(lin) == 0


def test_hooks_context_manager_and_item_removal():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 1))
    calls = []
    with Hooks(model, lambda h, m, i, o: calls.append(type(m).__name__)) as hs:
        assert len(hs) == 3
        del hs[1]
        model(torch.zeros(2, 3))
        assert n_hooks(model) == 2
    assert calls == ['Linear', 'Linear'] and n_hooks(model) == 0
    hs = Hooks([model[0]], lambda *a: None)
    hs.remove()
    assert n_hooks(model) == 0


def test_set_seed_repeats_random_draws():
    set_seed(3)
    a = torch.rand(3), torch.randn(2)
    set_seed(3)
    assert all(torch.equal(x, y) for x, y in zip(a, (torch.rand(3), torch.randn(2))))


@pytest.mark.parametrize('fail_at', [None, 'before_epoch', 'after_batch', 'after_fit'])
def test_hooks_callback_removes_hooks_however_fit_ends(fail_at):
    class Boom(Exception): pass
    class Raiser(Callback): pass
    if fail_at: setattr(Raiser, fail_at, lambda self, learn: (_ for _ in ()).throw(Boom()))
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,))
    dl = [(x[:32], y[:32]), (x[32:], y[32:])]
    model = cnn()
    cb = HooksCallback(append_stats, fc.risinstance(GeneralRelu))
    learn = TrainLearner(model, DataLoaders(dl, dl), F.cross_entropy, cbs=[cb])
    if fail_at:
        with pytest.raises(Boom): learn.fit(1, cbs=[Raiser()])
    else: learn.fit(1)
    assert n_hooks(model) == 0 and len(cb) == 3


def test_hooks_callback_phases():
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    dl = [(x, y)] * 3
    counts = {}
    for on_train, on_valid in ((True, False), (False, True), (True, True)):
        cb = HooksCallback(append_stats, fc.risinstance(GeneralRelu), on_train=on_train, on_valid=on_valid)
        TrainLearner(cnn(), DataLoaders(dl, dl[:2]), F.cross_entropy, cbs=[cb]).fit(1)
        counts[(on_train, on_valid)] = len(next(iter(cb)).stats[0])
    assert counts == {(True, False): 3, (False, True): 2, (True, True): 5}


@pytest.mark.skipif(find_fashion_mnist() is None, reason='Fashion-MNIST is not installed')
def test_activation_stats_on_fashion_mnist():
    set_seed(0)
    astats = ActivationStats(fc.risinstance(GeneralRelu))
    dls = fashion_dls(bs=256, n_train=2560, n_valid=512, seed=0, device='cpu')  # the model stays on the CPU
    learn = TrainLearner(cnn(), dls, F.cross_entropy, lr=0.2, cbs=[astats])
    learn.fit(1)
    assert len(astats) == 3
    for h in astats:
        means, stds, hists = h.stats
        assert len(means) == 10 and all(isinstance(m, torch.Tensor) for m in means), 'stats stay tensors per batch'
        assert torch.isfinite(torch.stack(means)).all() and (torch.stack(stds) > 0).all()
        assert get_hist(h).shape == (40, 10)
        dead = get_min(h)
        assert dead.shape == (10,) and ((dead >= 0) & (dead <= 1)).all()
    for plot in (astats.color_dim, astats.dead_chart, astats.plot_stats):
        n = len(plt.get_fignums())
        assert plot() is None, 'a Figure returned at the end of a Jupyter cell shows twice'
        assert len(plt.get_fignums()) == n + 1 and len(plt.gcf().axes) >= 2
    plt.close('all')
