"""MixUp and CutMix (miniai.callbacks.mix) on a Fashion-MNIST subset: the mixed batch and the loss are the formulas
for a known weight and permutation, the metrics see the hard labels, validation is untouched; and fits with them or
with the photo augmentation (miniai.data.warp), stopped mid-epoch and resumed, end with the weights of fits that were
not stopped."""
import contextlib
import io
import os
import signal

import pytest
import torch
import torch.nn.functional as F
from torch import nn, optim

from miniai.callbacks.mix import CutMixCB, MixUpCB
from miniai.callbacks.transform import augment_cb
from miniai.core.events import Callback
from miniai.data.fashion import fashion_dls, find_fashion_mnist
from miniai.data.warp import aug_transforms
from miniai.learner import MetricsCB, TrainLearner
from miniai.runs.interrupt import Interrupted, InterruptCB

pytestmark = [pytest.mark.skipif(find_fashion_mnist() is None, reason='Fashion-MNIST is not installed'),
              pytest.mark.usefixtures('one_thread')]


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 14 * 14, 10))


def learner(*cbs, seed=0):
    from torcheval.metrics import MulticlassAccuracy
    dls = fashion_dls(bs=64, n_train=256, n_valid=128, seed=seed, device='cpu')
    return TrainLearner(model(), dls, F.cross_entropy, 0.05, opt_func=optim.SGD,
                        cbs=[MetricsCB(accuracy=MulticlassAccuracy()), *cbs])


class Known:
    "Stands in for a MixCB's draws: a known weight and permutation."
    def __init__(self, lam, perm): self.lam, self.perm = lam, perm
    def __call__(self, n): return self.lam, self.perm, True


class FakeLearn:
    training, loss_func = True, staticmethod(F.cross_entropy)


@pytest.mark.parametrize('cls', [MixUpCB, CutMixCB])
def test_the_batch_and_the_loss_are_the_mixed_formulas_for_a_known_draw(cls):
    xb, yb = next(iter(fashion_dls(bs=16, n_train=64, n_valid=16, seed=0, device='cpu').train))
    perm, mix = torch.arange(16).roll(1), cls()
    mix.draw, learn = Known(0.7, perm), FakeLearn()
    if cls is CutMixCB: mix._centre = [0.5, 0.5]
    learn.batch = (xb, yb)
    mix.before_batch(learn)
    x = learn.batch[0]
    assert torch.equal(learn.batch[1], yb), 'the targets stay the hard labels'
    if cls is MixUpCB:
        assert mix.lam == 0.7 and torch.allclose(x, 0.7 * xb + 0.3 * xb[perm], atol=1e-6)
    else:  # a centred box of sqrt(0.3) of each side from the shifted batch: 14x14 of 28x28 -> lam = 1 - 196/784
        assert mix.lam == pytest.approx(1 - 14 * 14 / 784)
        assert torch.equal(x[..., 7:21, 7:21], xb[perm][..., 7:21, 7:21])
        out = torch.ones(28, 28, dtype=torch.bool)
        out[7:21, 7:21] = False
        assert torch.equal(x[..., out], xb[..., out])
    learn.preds = torch.randn(16, 10, generator=torch.Generator().manual_seed(1))
    learn.loss = F.cross_entropy(learn.preds, yb)
    mix.after_loss(learn)
    lam = mix.lam
    soft = lam * F.one_hot(yb, 10).float() + (1 - lam) * F.one_hot(yb[perm], 10).float()
    assert torch.allclose(learn.loss, F.cross_entropy(learn.preds, soft)), 'cross-entropy on the soft targets'


class Spy(Callback):
    "Every batch's targets as the loader gave them (before MixCB) and as the model and metrics got them (after)."
    def __init__(self, order, key): self.order, self.key, self.rows = order, key, []
    def before_batch(self, learn): self.rows.append((learn.training, learn.batch[0].clone(), learn.batch[1].clone()))
    def after_batch(self, learn):
        if self.key == 'after': self.rows[-1] += (learn.preds.detach().clone(),)


@pytest.mark.parametrize('cls', [MixUpCB, CutMixCB])
def test_metrics_see_the_hard_labels_and_validation_is_untouched(cls):
    before, after = Spy(-1, 'before'), Spy(5, 'after')
    learn = learner(cls(), before, after)
    with contextlib.redirect_stdout(io.StringIO()): learn.fit(1)
    assert all(torch.equal(a[2], b[2]) for a, b in zip(before.rows, after.rows)), 'targets never changed'
    train = [(a, b) for a, b in zip(before.rows, after.rows) if a[0]]
    valid = [(a, b) for a, b in zip(before.rows, after.rows) if not a[0]]
    assert all(not torch.equal(a[1], b[1]) for a, b in train), 'every training batch was mixed'
    assert all(torch.equal(a[1], b[1]) for a, b in valid), 'validation batches left as they came'
    rows = learn.metrics.rows()
    for training, part in ((True, train), (False, valid)):
        preds, ys = torch.cat([b[3] for _, b in part]), torch.cat([b[2] for _, b in part])
        acc = (preds.argmax(1) == ys).float().mean().item()
        row = next(r for r in rows if r['train'] == ('train' if training else 'eval'))
        assert float(row['accuracy']) == pytest.approx(acc, abs=1e-3), 'accuracy against the true labels'


def test_bad_arguments_and_batches_are_named():
    with pytest.raises(ValueError, match='alpha'): MixUpCB(alpha=0)
    with pytest.raises(ValueError, match='p is a probability'): CutMixCB(p=1.5)
    learn = FakeLearn()
    learn.batch = (torch.zeros(4, 1, 8, 8), torch.zeros(4, 10))
    with pytest.raises(ValueError, match=r'class indices.*float32 \(4, 10\)'): MixUpCB().before_batch(learn)


class StopAt(Callback):
    "Sends SIGTERM to this process after training batch `it` of epoch `epoch`."
    def __init__(self, epoch, it): self.at = (epoch, it)
    def after_batch(self, learn):
        if learn.training and (learn.epoch, learn.iter) == self.at: os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.parametrize('what', ['augment', 'mixup', 'cutmix'])
def test_a_fit_stopped_mid_epoch_and_resumed_ends_with_the_same_weights(tmp_path, what):
    def make():
        torch.manual_seed(0)  # what the draws start from, as set_seed would make it
        aug = lambda: augment_cb(aug_transforms(size=28, min_scale=0.5, stats=(0.3, 0.35)))
        cb = {'augment': aug, 'mixup': MixUpCB, 'cutmix': CutMixCB}[what]()
        return learner(cb, InterruptCB(tmp_path / 'stop.ckpt'))
    weights = lambda l: {k: v.clone() for k, v in l.model.state_dict().items()}
    ref = make()
    with contextlib.redirect_stdout(io.StringIO()): ref.fit(2)
    stopped = make()
    with pytest.raises(Interrupted) as e, contextlib.redirect_stdout(io.StringIO()): stopped.fit(2, cbs=[StopAt(1, 1)])
    assert e.value.position['epoch'] == 1 and e.value.position['batch'] == 2
    resumed = make()
    torch.manual_seed(123)  # whatever the generator holds now: the checkpoint's state is what counts
    with contextlib.redirect_stdout(io.StringIO()): resumed.fit(2, resume=e.value.checkpoint)
    a, b = weights(ref), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a), what
    other = make()
    torch.manual_seed(1)
    with contextlib.redirect_stdout(io.StringIO()): other.fit(2)
    assert not all(torch.equal(a[k], v) for k, v in weights(other).items()), 'other draws give other weights'
