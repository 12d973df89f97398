"""Early stopping, stopping on NaN, gradient clipping and accumulation, CSV and TensorBoard logs."""
import copy
import csv
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn, optim

from miniai.core.events import Callback
from miniai.runs.checkpoint import SaveModelCB
from miniai.runs.ckptfile import read_checkpoint
from miniai.datasets import DataLoaders
from miniai.learner import MetricsCB, TrainLearner
from miniai.callbacks.loggers import CSVLoggerCB, TensorBoardCB
from miniai.callbacks.tricks import EarlyStoppingCB, GradAccumCB, GradClipCB, TerminateOnNaNCB


def learner(n=64, bs=16, lr=0.1, seed=0, opt_func=optim.SGD, model=None, cbs=()):
    torch.manual_seed(seed)
    x, y = torch.randn(n, 5), torch.randint(0, 3, (n,))
    dl = [(x[i:i + bs], y[i:i + bs]) for i in range(0, n, bs)]
    model = model or nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    return TrainLearner(model, DataLoaders(dl, dl), F.cross_entropy, lr=lr, opt_func=opt_func,
                        cbs=[MetricsCB(), *cbs])


class FakeValidLoss(Callback):
    "Replaces the logged validation loss by a scripted sequence, to make improvement exact."
    order = 5
    def __init__(self, seq): self.seq = seq
    def after_epoch(self, learn):
        if not learn.training: learn.metrics.history[-1]['loss'] = self.seq[learn.epoch]


def test_early_stopping_at_the_right_epoch():
    es = EarlyStoppingCB('valid loss', patience=2, min_delta=0.01)
    learn = learner(cbs=[FakeValidLoss([1.0, 0.8, 0.795, 0.81, 0.5, 0.4]), es])
    learn.fit(6)
    # 0.8 is the best; 0.795 improves by less than min_delta (wait 1), 0.81 (wait 2): stop after epoch 3
    assert es.stopped_epoch == 3 and es.best == 0.8
    assert max(r['epoch'] for r in learn.metrics.history) == 3


def test_terminate_on_nan_stops_before_the_bad_step(tmp_path):
    class PoisonBatch(Callback):
        order = -1
        def before_batch(self, learn):
            if learn.epoch == 1 and learn.iter == 2 and learn.training:
                learn.batch = (learn.batch[0] * float('nan'), learn.batch[1])
    nan_cb = TerminateOnNaNCB()
    learn = learner(cbs=[PoisonBatch(), nan_cb, SaveModelCB(tmp_path, every_epoch=True)])
    seen = {}
    class Weights(Callback):
        def after_step(self, learn): seen['w'] = [p.clone() for p in learn.model.parameters()]
    with pytest.warns(RuntimeWarning, match='loss is nan at epoch 1, batch 2'):
        learn.fit(3, cbs=[Weights()])
    assert nan_cb.nan_at == (1, 2)
    assert all(torch.isfinite(p).all() for p in learn.model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(seen['w'], learn.model.parameters())), 'a step after the NaN'
    ck = read_checkpoint(tmp_path / 'last.ckpt')
    assert ck['epoch'] == 0 and all(torch.isfinite(v).all() for v in ck['model'].values())


def test_grad_clip_bounds_the_norm():
    clip = GradClipCB(max_norm=0.01)
    norms = []
    class Norm(Callback):
        order = 10
        def after_backward(self, learn):
            norms.append(torch.nn.utils.get_total_norm([p.grad for p in learn.model.parameters()]))
    learner(lr=1.0, cbs=[clip, Norm()]).fit(1, valid=False)
    assert float(clip.last_norm) > 0.01 and all(float(n) <= 0.01 + 1e-6 for n in norms)


def test_accumulated_batches_equal_one_big_batch():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    small = learner(n=64, bs=16, model=copy.deepcopy(base),
                    cbs=[GradAccumCB(4)])
    big = learner(n=64, bs=64, model=copy.deepcopy(base))
    small.fit(1, valid=False)
    big.fit(1, valid=False)
    for a, b in zip(small.model.parameters(), big.model.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    assert isinstance(small.opt, optim.SGD), 'the real optimizer is back after the fit'
    moved = [not torch.equal(a, b) for a, b in zip(small.model.parameters(), base.parameters())]
    assert all(moved)


def test_accumulation_steps_the_tail_of_an_epoch():
    steps = []
    learn = learner(n=80, bs=16, cbs=[GradAccumCB(3)])  # 5 batches: steps after 3 and after the last 2
    class Count(Callback):
        order = 60
        def before_fit(self, learn):
            real = learn.opt.opt.step
            learn.opt.opt.step = lambda *a, **k: steps.append(1) or real(*a, **k)
    learn.fit(1, valid=False, cbs=[Count()])
    assert len(steps) == 2
    with pytest.raises(ValueError, match='n must be >= 1'):
        GradAccumCB(0)


def test_csv_logger_appends_across_fits(tmp_path):
    path = tmp_path / 'log' / 'metrics.csv'
    learner(cbs=[CSVLoggerCB(path)]).fit(2)
    learner(cbs=[CSVLoggerCB(path)]).fit(1)
    rows = list(csv.reader(open(path)))
    assert rows[0] == ['loss', 'epoch', 'train', 'time'] and len(rows) == 1 + 4 + 2
    assert [r[1:3] for r in rows[1:3]] == [['0', 'train'], ['0', 'eval']]
    assert all(math.isfinite(float(r[0])) for r in rows[1:])


def test_csv_logger_refuses_other_columns(tmp_path):
    path = tmp_path / 'm.csv'
    path.write_text('a,b\n1,2\n')
    with pytest.raises(ValueError, match="has columns \\['a', 'b'\\]"):
        learner(cbs=[CSVLoggerCB(path)]).fit(1)


def test_tensorboard_event_file_reads_back(tmp_path):
    ea_mod = pytest.importorskip('tensorboard.backend.event_processing.event_accumulator')
    learner(cbs=[TensorBoardCB(tmp_path)]).fit(2)
    ea = ea_mod.EventAccumulator(str(tmp_path))
    ea.Reload()
    tags = ea.Tags()['scalars']
    assert {'batch/loss', 'train/loss', 'valid/loss'} <= set(tags)
    assert len(ea.Scalars('batch/loss')) == 8 and [e.step for e in ea.Scalars('valid/loss')] == [0, 1]
