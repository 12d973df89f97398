"""The course's `get_model`, and the accelerated-SGD lesson's path through it on real Fashion-MNIST: a hand-written
optimizer (a plain class with `step` and `zero_grad` over `params`, no torch.optim), then torch's schedulers through
`BatchSchedCB`, which the lesson pairs with `optim.AdamW` (torch's schedulers need a torch Optimizer)."""
from functools import partial

import fastcore.all as fc
import matplotlib
matplotlib.use('Agg')
import pytest
import torch
import torch.nn.functional as F
from torch import nn, optim
from torch.optim import lr_scheduler
from torcheval.metrics import MulticlassAccuracy

from miniai.activations import ActivationStats, set_seed
from miniai.conv import def_device
from miniai.data.fashion import fashion_dls, find_fashion_mnist
from miniai.init import GeneralRelu, get_model, init_weights
from miniai.learner import DeviceCB, MetricsCB, ProgressCB, TrainLearner
from miniai.resnet import act_gr
from miniai.sgd import BatchSchedCB, RecorderCB

needs_data = pytest.mark.skipif(find_fashion_mnist() is None, reason='Fashion-MNIST is not installed')


def convs(model): return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


def test_get_model_default_is_the_course_cnn():
    model = get_model()
    assert [tuple(c.weight.shape) for c in convs(model)] == [(8, 1, 3, 3), (16, 8, 3, 3), (32, 16, 3, 3),
                                                             (64, 32, 3, 3), (10, 64, 3, 3)]
    assert all(c.stride == (2, 2) and c.padding == (1, 1) for c in convs(model))
    assert [type(m) for m in model[0]] == [nn.Conv2d, nn.ReLU]
    assert [type(m) for m in model[-2]] == [nn.Conv2d] and model[-2][0].bias is not None  # head: no act, no norm
    assert isinstance(model[-1], nn.Flatten)
    assert next(model.parameters()).device.type == torch.device(def_device).type
    assert model(torch.randn(3, 1, 28, 28, device=def_device)).shape == (3, 10)


def test_get_model_with_act_norm_and_widths():
    model = get_model(act_gr, nfs=[1, 4, 8, 16, 32], norm=nn.BatchNorm2d)
    block = model[0]
    assert [type(m) for m in block] == [nn.Conv2d, nn.BatchNorm2d, GeneralRelu]
    assert block[0].bias is not None  # the course's conv keeps its bias before a BatchNorm (given as a class)
    assert (block[2].leak, block[2].sub) == (0.1, 0.4)
    assert [c.out_channels for c in convs(model)] == [4, 8, 16, 32, 10]
    head = model[-2]
    assert len(head) == 1 and head[0].bias is not None
    assert model(torch.randn(2, 1, 28, 28, device=def_device)).shape == (2, 10)


class HandMomentum:
    "The lesson's kind of optimizer: a plain class over `params` (weight decay, then an averaged gradient step)."
    def __init__(self, params, lr, wd=0., mom=0.9):
        self.params, self.lr, self.wd, self.mom = list(params), lr, wd, mom
        self.avg = {}

    def step(self):
        with torch.no_grad():
            for p in self.params:
                if self.wd: p.mul_(1 - self.lr * self.wd)
                a = self.avg.get(p)
                a = p.grad.clone() if a is None else a.mul_(self.mom).add_(p.grad, alpha=1 - self.mom)
                self.avg[p] = a
                p.sub_(a, alpha=self.lr)

    def zero_grad(self):
        for p in self.params:
            if p.grad is not None: p.grad.zero_()


@pytest.fixture(scope='module')
def dls():
    return fashion_dls(bs=256, n_train=10240, n_valid=2000, seed=0, device=def_device)


def lesson_cbs():
    metrics = MetricsCB(accuracy=MulticlassAccuracy())
    return metrics, [DeviceCB(), metrics, ProgressCB(), ActivationStats(fc.risinstance(GeneralRelu))]


@needs_data
def test_hand_written_optimizer_trains_the_lesson_model(dls):
    set_seed(42)
    iw = partial(init_weights, leaky=0.1)
    model = get_model(act_gr, norm=nn.BatchNorm2d).apply(iw)
    metrics, cbs = lesson_cbs()
    learn = TrainLearner(model, dls, F.cross_entropy, lr=0.4, cbs=cbs, opt_func=HandMomentum)
    before = [p.detach().clone() for p in model.parameters()]
    learn.fit(1)
    assert isinstance(learn.opt, HandMomentum)
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters())), 'a parameter was never updated'
    acc = metrics.history[-1]['accuracy']
    print(f'\nhand-written momentum SGD, 1 epoch of 40 batches: valid accuracy {acc:.3f}')
    assert metrics.history[-1]['train'] == 'eval' and acc > 0.7  # chance is 0.1
    astats = cbs[-1]
    assert len(astats) == 4 and all(len(h.stats[0]) == len(dls.train) for h in astats)


@needs_data
def test_one_cycle_through_batch_sched_cb(dls):
    set_seed(42)
    lr, epochs = 6e-2, 1
    model = get_model(act_gr, norm=nn.BatchNorm2d).apply(partial(init_weights, leaky=0.1))
    tmax = epochs * len(dls.train)
    rec = RecorderCB(lr=lambda cb: cb.pg['lr'], mom=lambda cb: cb.pg['betas'][0])
    metrics, cbs = lesson_cbs()
    sched = partial(lr_scheduler.OneCycleLR, max_lr=lr, total_steps=tmax)
    learn = TrainLearner(model, dls, F.cross_entropy, lr=lr, cbs=cbs + [BatchSchedCB(sched), rec],
                         opt_func=optim.AdamW)
    learn.fit(epochs)
    lrs, moms = rec.recs['lr'], rec.recs['mom']
    assert len(lrs) == tmax
    top = max(range(tmax), key=lrs.__getitem__)
    assert 0 < top < tmax - 1 and lrs[top] == pytest.approx(lr, rel=0.05) and lrs[-1] < lr / 100
    assert moms[top] == min(moms) < moms[0] and moms[-1] == pytest.approx(0.95, abs=1e-3)  # falls as the rate rises
    acc = metrics.history[-1]['accuracy']
    print(f'\n1cycle AdamW, 1 epoch of 40 batches: valid accuracy {acc:.3f}')
    assert acc > 0.7
