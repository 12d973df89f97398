"""`learn.get_preds` on any loader and `learn.predict` for one item or a batch: the numbers a direct computation gives,
through the Learner's callbacks, and a look that leaves the model, optimizer, loaders, RNGs and callbacks as they
were."""
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn, optim

from miniai.accel import precision_cbs
from miniai.core.events import Callback
from miniai.datasets import DataLoaders
from miniai.data.loader import TensorDataLoader
from miniai.tools.inference import Prediction, per_item_loss
from miniai.learner import Learner, MetricsCB, ProgressCB, TrainCB, TrainLearner


def data(n_train=64, n_valid=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n_train + n_valid, 1, 6, 6, generator=g), torch.randint(0, 4, (n_train + n_valid,), generator=g)
    dls = DataLoaders(TensorDataLoader(x[:n_train], y[:n_train], 16, shuffle=True, seed=0),
                      TensorDataLoader(x[n_train:], y[n_train:], 16))
    dls.classes = ['ant', 'bee', 'cat', 'dog']
    return dls


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5), nn.Flatten(),
                         nn.Linear(64, 4))


def trained(cbs=(), loss=F.cross_entropy, m=None):
    learn = TrainLearner(m or model(), data(), loss, lr=0.1, opt_func=optim.AdamW, cbs=[MetricsCB(), *cbs])
    learn.fit(1)
    return learn


def test_get_preds_gives_the_models_outputs_targets_inputs_and_losses_on_the_validation_set():
    learn = trained()
    preds, targs, xs, losses = learn.get_preds(with_input=True, with_loss=True)
    xv, yv = learn.dls.valid.x, learn.dls.valid.y
    with torch.no_grad(): want = learn.model.eval()(xv)
    assert torch.allclose(preds, want, atol=1e-6) and torch.equal(targs, yv) and torch.equal(xs, xv)
    assert torch.allclose(losses, F.cross_entropy(want, yv, reduction='none'), atol=1e-6)
    assert losses.mean().item() == pytest.approx(learn.metrics.history[-1]['loss'], rel=1e-5), 'the validation loss'
    probs, _ = learn.get_preds(act=lambda p: p.softmax(1))
    assert torch.allclose(probs, want.softmax(1), atol=1e-6)


def test_get_preds_on_another_loader_and_on_one_without_targets():
    learn = trained()
    x = torch.randn(10, 1, 6, 6)
    zeros, ones = torch.zeros(6, dtype=torch.long), torch.ones(4, dtype=torch.long)
    preds, targs = learn.get_preds(dl=[(x[:6], zeros), (x[6:], ones)])
    with torch.no_grad(): want = learn.model.eval()(x)
    assert torch.allclose(preds, want, atol=1e-6) and targs.tolist() == [0] * 6 + [1] * 4
    preds, targs = learn.get_preds(dl=[(x,)])  # inputs alone: no loss, no targets
    assert torch.allclose(preds, want, atol=1e-6) and targs is None
    with pytest.raises(ValueError, match='no targets to take a loss on'): learn.get_preds(dl=[(x,)], with_loss=True)
    assert learn.dls.valid.x.shape[0] == 40, "the Learner's own loaders are back"


def test_get_preds_is_a_look_that_changes_nothing(capsys):
    class Counts(Callback):  # reports nothing, so it takes part; its view of the batches shows what ran
        def __init__(self): self.n = 0
        def after_predict(self, learn): self.n += 1
    counts, prog = Counts(), ProgressCB()
    learn = trained(cbs=[counts, prog])
    learn.model.train()
    opt_state = {k: v.clone() for k, v in learn.opt.state_dict()['state'][0].items()}
    weights = [p.detach().clone() for p in learn.model.state_dict().values()]
    dl_state, history, x = learn.dls.train.state_dict(), list(learn.metrics.history), torch.randn(1, 6, 6)
    rng = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    capsys.readouterr()
    counts.n = 0
    learn.get_preds(with_loss=True)
    learn.predict(x)
    assert learn.model.training and all(m.training for m in learn.model.modules()), 'train mode kept'
    assert all(torch.equal(a, b) for a, b in zip(weights, learn.model.state_dict().values())), 'BatchNorm stats kept'
    assert all(torch.equal(v, learn.opt.state_dict()['state'][0][k]) for k, v in opt_state.items())
    assert learn.dls.train.state_dict()['epochs_drawn'] == dl_state['epochs_drawn']
    assert learn.metrics.history == history and capsys.readouterr().out == '', 'metrics and progress sat out'
    assert torch.equal(torch.get_rng_state(), rng[0]) and random.getstate() == rng[1]
    assert (np.random.get_state()[1] == rng[2]).all()
    assert counts.n == 3 + 1, 'other callbacks take part (3 validation batches, then the one of predict)'
    assert prog in learn.cbs and counts in learn.cbs and len(learn.cbs) == 3


def test_predict_one_item_and_a_batch_with_class_names():
    learn = trained()
    xv = learn.dls.valid.x
    with torch.no_grad(): probs = learn.model.eval()(xv[:5]).softmax(1)
    one = learn.predict(xv[0])
    assert isinstance(one, Prediction) and one.label == learn.dls.classes[probs[0].argmax()]
    assert one.prob == pytest.approx(probs[0].max().item(), rel=1e-5) and torch.allclose(one.probs, probs[0], atol=1e-6)
    many = learn.predict(xv[:5])
    assert many.label == [learn.dls.classes[i] for i in probs.argmax(1)]
    assert torch.allclose(many.prob, probs.max(1).values, atol=1e-6) and torch.allclose(many.probs, probs, atol=1e-6)


def test_predict_without_class_names_through_a_plain_learner_and_bf16():
    "A plain Learner takes its steps from TrainCB (here MixedPrecision's); classes are numbered when not named."
    dls = data()
    del dls.classes
    learn = Learner(model(), dls, F.cross_entropy, lr=0.1, cbs=[TrainCB()])
    learn.fit(1)
    p = learn.predict(dls.valid.x[:3])
    assert all(isinstance(i, int) for i in p.label) and p.probs.shape == (3, 4)
    learn.cbs = [c for c in learn.cbs if not isinstance(c, TrainCB)] + precision_cbs('bf16')
    p16 = learn.predict(dls.valid.x[:3])
    assert p16.probs.dtype == torch.float32 and torch.allclose(p16.probs, p.probs, atol=0.05), 'bf16 autocast applied'


def test_predict_of_an_nll_model_takes_exp_of_its_log_probabilities():
    learn = trained(loss=F.nll_loss, m=nn.Sequential(model(), nn.LogSoftmax(1)))
    p = learn.predict(learn.dls.valid.x[:4])
    assert torch.allclose(p.probs.sum(1), torch.ones(4), atol=1e-5)


def test_the_predict_step_is_still_the_loops():
    learn = trained()
    learn.batch = (learn.dls.valid.x[:2], learn.dls.valid.y[:2])
    assert learn.predict() is None and learn.preds.shape == (2, 4)


def test_per_item_loss_for_functions_modules_and_losses_without_reduction():
    p, t = torch.randn(5, 3), torch.tensor([0, 2, 1, 1, 0])
    want = F.cross_entropy(p, t, reduction='none')
    assert torch.allclose(per_item_loss(F.cross_entropy, p, t), want)
    ce = nn.CrossEntropyLoss()
    assert torch.allclose(per_item_loss(ce, p, t), want) and ce.reduction == 'mean'
    assert torch.allclose(per_item_loss(lambda a, b: F.cross_entropy(a, b), p, t), want)
