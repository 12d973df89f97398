"""MetricsCB, ProgressCB, lr_find and the schedulers."""
import copy
import math

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt
import pytest
import torch
import torch.nn.functional as F
from torch import nn, optim
from torch.optim import lr_scheduler
from torcheval.metrics import MulticlassAccuracy

from miniai.datasets import DataLoaders
from miniai.data.fashion import find_fashion_mnist
from miniai.learner import Callback, DeviceCB, LRFinderCB, MetricsCB, ProgressCB, TrainLearner
from miniai.callbacks.schedule import suggest_lr
from miniai.sgd import BatchSchedCB, EpochSchedCB, HasLearnCB, RecorderCB
from miniai.training import Dataset


def synth(n=256, bs=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    tr = torch.utils.data.DataLoader(Dataset(x, y), batch_size=bs, shuffle=True, generator=g)
    va = torch.utils.data.DataLoader(Dataset(x[:96], y[:96]), batch_size=bs)
    return DataLoaders(tr, va), x[:96], y[:96]


def mlp(): return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 2))


def test_metrics_match_a_direct_computation():
    dls, xv, yv = synth()
    metrics = MetricsCB(accuracy=MulticlassAccuracy())
    learn = TrainLearner(mlp(), dls, F.cross_entropy, lr=0.2, cbs=[metrics])
    learn.fit(2)
    h = metrics.history
    assert [(r['epoch'], r['train']) for r in h] == [(0, 'train'), (0, 'eval'), (1, 'train'), (1, 'eval')]
    with torch.no_grad():
        out = learn.model.eval()(xv)
    assert h[-1]['accuracy'] == pytest.approx((out.argmax(1) == yv).float().mean().item(), abs=1e-6)
    assert h[-1]['loss'] == pytest.approx(F.cross_entropy(out, yv).item(), rel=1e-5)
    assert all(math.isfinite(r['time']) and r['time'] >= 0 for r in h)


def test_positional_metrics_are_named_after_their_class(capsys):
    metrics = MetricsCB(MulticlassAccuracy())
    assert list(metrics.all_metrics) == ['MulticlassAccuracy', 'loss']
    dls, *_ = synth()
    TrainLearner(mlp(), dls, F.cross_entropy, cbs=[metrics]).fit(1)
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and "'MulticlassAccuracy'" in out[0] and "'train': 'train'" in out[0]


def test_no_host_sync_per_batch(monkeypatch):
    "Metric values are read once per epoch, not per batch: .item() calls do not grow with the number of batches."
    calls = []
    orig = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, 'item', lambda self: calls.append(1) or orig(self))
    counts = []
    for n in (320, 1280):
        dls, *_ = synth(n=n, bs=32)
        calls.clear()
        learn = TrainLearner(mlp(), dls, F.cross_entropy, cbs=[MetricsCB(accuracy=MulticlassAccuracy()),
                                                                ProgressCB(refresh=3600)])
        learn.fit(1)
        counts.append(len(calls))
    assert counts[0] == counts[1] and counts[0] <= 8, f'.item() calls for 13 and 43 batches: {counts}'


def test_progress_prints_one_line_per_epoch_in_a_log(capsys):
    dls, *_ = synth()
    learn = TrainLearner(mlp(), dls, F.cross_entropy, cbs=[MetricsCB(accuracy=MulticlassAccuracy()), ProgressCB()])
    learn.fit(3)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ['accuracy', 'loss', 'epoch', 'train', 'time']
    assert len(lines) == 1 + 6
    assert [l.split()[2:4] for l in lines[1:3]] == [['0', 'train'], ['0', 'eval']]
    assert '\r' not in capsys.readouterr().out


def test_progress_plot_records_every_training_loss():
    dls, *_ = synth(n=256, bs=32)
    prog = ProgressCB(plot=True, refresh=0)
    learn = TrainLearner(mlp(), dls, F.cross_entropy, cbs=[MetricsCB(), prog])
    learn.fit(2)
    assert len(prog.losses) == 2 * 8 and all(math.isfinite(l) for l in prog.losses)
    assert [x for x, _ in prog.val_losses] == [8, 16]


def test_lr_find_stops_on_divergence_and_restores_everything():
    dls, *_ = synth(n=2048, bs=32)
    learn = TrainLearner(mlp(), dls, F.cross_entropy, lr=1e-5, opt_func=optim.AdamW,
                         cbs=[DeviceCB('cpu'), MetricsCB(), ProgressCB()])
    learn.fit(1, valid=False)  # gives the optimizer some state (AdamW's moments) that lr_find must not touch
    before = {k: v.clone() for k, v in learn.model.state_dict().items()}
    opt = learn.opt
    opt_state = copy.deepcopy(opt.state_dict())
    rng = torch.get_rng_state()
    n_cbs = len(learn.cbs)
    sugg = learn.lr_find(gamma=1.3, max_mult=3, start_lr=1e-5, max_epochs=10, plot=True)
    assert learn.opt is opt and len(opt.state) > 0
    assert all(torch.equal(a['exp_avg'], b['exp_avg']) for a, b in zip(opt.state_dict()['state'].values(), opt_state['state'].values()))
    assert all(torch.equal(before[k], v) for k, v in learn.model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)
    assert len(learn.cbs) == n_cbs
    assert 1e-5 < sugg < 10 and isinstance(sugg, float)
    assert plt.gcf().axes[0].get_xscale() == 'log'
    plt.close('all')


def test_lr_finder_cb_stops_when_loss_explodes():
    dls, *_ = synth(n=4096, bs=32)
    cb = LRFinderCB(gamma=1.5, max_mult=3, plot=False)
    learn = TrainLearner(mlp(), dls, F.cross_entropy)
    learn.fit(5, lr=1e-4, cbs=[cb])
    assert cb.lrs[0] == pytest.approx(1e-4)
    assert all(b == pytest.approx(a * 1.5) for a, b in zip(cb.lrs, cb.lrs[1:]))
    last = cb.losses[-1]
    assert not math.isfinite(last) or last > 3 * min(cb.losses)
    assert len(cb.lrs) < 128, 'it should stop on divergence long before the 5 epochs end'


def test_suggest_lr_picks_a_tenth_of_the_smoothed_minimum():
    lrs = [10 ** (i / 10 - 5) for i in range(60)]
    losses = [2 - 0.03 * i if i < 40 else 0.8 + 0.5 * (i - 40) for i in range(60)]
    s = suggest_lr(lrs, losses)
    i = lrs.index(s * 10)
    assert 30 <= i < 45
    with pytest.raises(ValueError, match='no learning rate'):
        suggest_lr([], [])


def test_batch_sched_cb_follows_torch_one_cycle():
    dls, *_ = synth(n=256, bs=32)
    rec = RecorderCB(lr=lambda cb: cb.pg['lr'], mom=lambda cb: cb.pg['betas'][0])
    sched = lambda opt: lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=16)
    learn = TrainLearner(mlp(), dls, F.cross_entropy, lr=0.05, opt_func=optim.AdamW, cbs=[BatchSchedCB(sched), rec])
    learn.fit(2)
    # the same schedule, stepped by hand on a lone optimizer
    ref_opt = optim.AdamW([nn.Parameter(torch.zeros(1))], lr=0.05)
    ref = lr_scheduler.OneCycleLR(ref_opt, max_lr=0.05, total_steps=16)
    expect = []
    for _ in range(16):
        ref_opt.step()
        ref.step()
        expect.append(ref_opt.param_groups[0]['lr'])
    assert rec.recs['lr'] == pytest.approx(expect)
    assert len(rec.recs['mom']) == 16
    assert rec.plot() is None, 'a Figure returned at the end of a Jupyter cell shows twice'
    assert len(plt.gcf().axes) == 2
    plt.close('all')


def test_epoch_sched_cb_steps_after_training_epochs_only():
    dls, *_ = synth(n=64, bs=32)
    lrs = []
    class Spy(Callback):
        def before_epoch(self, learn): lrs.append(learn.opt.param_groups[0]['lr'])
    sched = lambda opt: lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    TrainLearner(mlp(), dls, F.cross_entropy, lr=0.8, cbs=[EpochSchedCB(sched), Spy()]).fit(3)
    # before each train and each valid epoch: the valid epoch must not have stepped it
    assert lrs == pytest.approx([0.8, 0.4, 0.4, 0.2, 0.2, 0.1])


def test_has_learn_cb_holds_the_learner_during_fit_only():
    dls, *_ = synth(n=64)
    seen = []
    class Uses(HasLearnCB):
        def after_batch(self, learn): seen.append(self.learn is learn)
    cb = Uses()
    TrainLearner(mlp(), dls, F.cross_entropy, cbs=[cb]).fit(1)
    assert seen and all(seen) and cb.learn is None


@pytest.mark.skipif(find_fashion_mnist() is None, reason='Fashion-MNIST is not installed')
def test_small_cnn_learns_fashion_mnist_in_one_epoch():
    "The whole stack on real data: 10,000 training images, one epoch, a small CNN reaches 80% test accuracy."
    from miniai.activations import set_seed
    from miniai.data.fashion import fashion_dls
    from miniai.init import conv
    set_seed(0)
    dls = fashion_dls(bs=128, n_train=10000, n_valid=2000, seed=0)
    model = nn.Sequential(conv(1, 16, norm=nn.BatchNorm2d), conv(16, 32, norm=nn.BatchNorm2d),
                          conv(32, 64, norm=nn.BatchNorm2d), conv(64, 10, act=None),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten())  # 2x2 pixels left: without the pool, 40 outputs
    metrics = MetricsCB(accuracy=MulticlassAccuracy())
    sched = lambda opt: lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=len(dls.train))
    TrainLearner(model, dls, F.cross_entropy, lr=1e-2, opt_func=optim.AdamW,
                 cbs=[DeviceCB(), metrics, BatchSchedCB(sched)]).fit(1)
    assert metrics.history[-1]['train'] == 'eval' and metrics.history[-1]['accuracy'] > 0.80
