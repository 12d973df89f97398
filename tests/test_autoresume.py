"""`fit(n, resume='auto')`: the newest complete checkpoint of the run, a damaged one skipped, a fresh start when there
is none; a checkpoint from another number of processes; metrics.csv after going back to a checkpoint; drills. In this
process, on tiny synthetic data (tests/test_cluster.py runs the main job under torchrun)."""
import os
import shutil
import signal
import time
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn, optim

from miniai.runs.autoresume import AutoResumeCB, newest_checkpoint
from miniai.core.events import Callback
from miniai.runs.checkpoint import SaveModelCB, save_checkpoint
from miniai.runs.ckptfile import read_checkpoint
from miniai.engines.cluster import rank_state
from miniai.datasets import DataLoaders
from miniai.data.loader import TensorDataLoader
from miniai.runs.interrupt import InterruptCB, Interrupted, drills_from_env
from miniai.learner import MetricsCB, TrainLearner
from miniai.callbacks.loggers import CSVLoggerCB
from miniai.sgd import BatchSchedCB

N_EPOCHS, BS, N = 3, 16, 64  # 4 training batches an epoch


pytestmark = pytest.mark.usefixtures('one_thread')


def make(out, extra=()):
    "A run with its checkpoints in `out` (SaveModelCB's last/best, InterruptCB's), dropout, shuffling, a schedule."
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(N + 32, 6, generator=g), torch.randint(0, 3, (N + 32,), generator=g)
    dls = DataLoaders(TensorDataLoader(x[:N], y[:N], BS, shuffle=True, seed=3), TensorDataLoader(x[N:], y[N:], BS))
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))
    sched = partial(optim.lr_scheduler.OneCycleLR, max_lr=1e-2, total_steps=N_EPOCHS * N // BS)
    cbs = [MetricsCB(), BatchSchedCB(sched), SaveModelCB(out, every_epoch=True), InterruptCB(out / 'interrupted.ckpt'),
           *extra]
    return TrainLearner(model, dls, F.cross_entropy, lr=1e-2, opt_func=optim.AdamW, cbs=cbs)


def weights(learn): return {k: v.clone() for k, v in learn.model.state_dict().items()}


def same(a, b): return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class SignalAt(Callback):
    order = InterruptCB.order - 1
    def __init__(self, epoch, it): self.at = (epoch, it)
    def after_batch(self, learn):
        if learn.training and (learn.epoch, learn.iter) == self.at: os.kill(os.getpid(), signal.SIGTERM)


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
    learn = make(tmp_path_factory.mktemp('full'))
    learn.fit(N_EPOCHS)
    return weights(learn)


def test_auto_starts_fresh_then_takes_the_newest_checkpoint_and_skips_a_damaged_one(uninterrupted, tmp_path, capsys):
    run, copy = tmp_path / 'run', tmp_path / 'copy'
    learn = make(run)
    with pytest.raises(Interrupted): learn.fit(N_EPOCHS, resume='auto', cbs=[SignalAt(1, 1)])
    assert f'no checkpoint to resume from in {run}: starting fresh' in capsys.readouterr().out
    shutil.copytree(run, copy)
    paths = [copy / 'last.ckpt', copy / 'interrupted.ckpt']
    assert newest_checkpoint(paths) == copy / 'interrupted.ckpt'
    # what decides is when a file was saved, by its own header, not the time a copy gave the file
    future = time.time() + 3600
    os.utime(copy / 'last.ckpt', (future, future))
    assert newest_checkpoint(paths) == copy / 'interrupted.ckpt'
    resumed = make(run)
    resumed.fit(N_EPOCHS, resume='auto')
    assert f'miniai: resuming from {run / "interrupted.ckpt"}' in capsys.readouterr().out
    assert same(weights(resumed), uninterrupted)
    # damaged: cut short (a disk that filled up), or its header overwritten: skipped, the one saved before it used
    good = (copy / 'interrupted.ckpt').read_bytes()
    for damaged in (good[:len(good) // 2], b'\xff' * 16 + good[16:]):
        (copy / 'interrupted.ckpt').write_bytes(damaged)
        with pytest.warns(UserWarning, match=rf'resume: skipping {copy / "interrupted.ckpt"}, which is damaged'):
            assert newest_checkpoint(paths) == copy / 'last.ckpt'
    resumed = make(copy)
    with pytest.warns(UserWarning, match='which is damaged'): resumed.fit(N_EPOCHS, resume='auto')
    assert f'miniai: resuming from {copy / "last.ckpt"}' in capsys.readouterr().out
    assert same(weights(resumed), uninterrupted), 'gone on from last.ckpt (after epoch 0) to the same end'


def test_auto_needs_to_know_where_the_run_saves(tmp_path):
    learn = make(tmp_path)
    learn.cbs = [cb for cb in learn.cbs if not isinstance(cb, (SaveModelCB, InterruptCB))]
    with pytest.raises(ValueError, match=r"fit\(resume='auto'\) looks for the run's checkpoints where its "
                                         r"InterruptCB and SaveModelCB write them, but this fit has neither"):
        learn.fit(1, resume='auto')
    assert not any(isinstance(cb, AutoResumeCB) for cb in learn.cbs)


def test_a_checkpoint_from_two_processes_resumes_in_one_with_a_warning_naming_both(uninterrupted, tmp_path):
    "Another world size works: the model, optimizer, schedule and position are exact; the file says what is not."
    learn = make(tmp_path)
    learn.fit(1)
    ck = read_checkpoint(tmp_path / 'last.ckpt')
    mine = rank_state(learn)
    other = {**mine, 'rank': 1, 'rng': {**mine['rng'], 'torch': torch.manual_seed(123).get_state()}}
    save_checkpoint(learn, tmp_path / 'two.ckpt', world_size=2, ranks=[mine, other], epoch=ck['epoch'],
                    callbacks=ck['callbacks'])
    resumed = make(tmp_path)
    with pytest.warns(UserWarning, match=r'two.ckpt was saved by 2 process\(es\) and is resumed by 1: the weights, '
                                         r'optimizer, schedulers, epoch and batch go on exactly'):
        resumed.fit(N_EPOCHS, resume=tmp_path / 'two.ckpt')
    assert same(weights(resumed), uninterrupted), 'rank 0 of the two takes its own streams: here, the same run'


def test_the_global_batches_are_the_same_images_whatever_the_number_of_processes():
    "What makes a resume with another world size exact in its data: each global batch is the same set of images."
    x = torch.arange(96.).view(96, 1)
    def global_batches(ws):
        dls = [TensorDataLoader(x, x, 24 // ws, shuffle=True, seed=5, rank=r, world_size=ws) for r in range(ws)]
        return [sorted(torch.cat([b[0] for b in bs]).flatten().tolist()) for bs in zip(*dls)]
    assert global_batches(1) == global_batches(2) == global_batches(4) and len(global_batches(1)) == 4


def test_a_resumed_run_replaces_the_csv_rows_logged_after_its_checkpoint(tmp_path):
    """A run killed after logging epoch 1's rows but before its checkpoint goes back to epoch 0's checkpoint and logs
    epoch 1 again: one row per epoch and stage, not two."""
    class KeepEpoch0(Callback):
        order = SaveModelCB.order + 1
        def after_epoch(self, learn):
            if not learn.training and learn.epoch == 0: shutil.copy(tmp_path / 'last.ckpt', tmp_path / 'epoch0.ckpt')
    learn = make(tmp_path, [CSVLoggerCB(tmp_path / 'metrics.csv'), KeepEpoch0()])
    learn.fit(N_EPOCHS)
    first = (tmp_path / 'metrics.csv').read_text().splitlines()
    resumed = make(tmp_path, [CSVLoggerCB(tmp_path / 'metrics.csv')])
    resumed.fit(N_EPOCHS, resume=tmp_path / 'epoch0.ckpt')
    rows = (tmp_path / 'metrics.csv').read_text().splitlines()
    assert [r.split(',')[-3:-1] for r in rows[1:]] == [[str(e), s] for e in range(N_EPOCHS) for s in ('train', 'eval')]
    assert rows[:3] == first[:3], "epoch 0's rows, from before the checkpoint, stay"


def test_drills_come_from_the_environment(monkeypatch):
    monkeypatch.setenv('MINIAI_DRILL', 'SIGTERM@1:2:3, sigkill@0:0:5')
    assert [(d.signum, d.at) for d in drills_from_env()] == [(signal.SIGTERM, (1, 2, 3)), (signal.SIGKILL, (0, 0, 5))]
    monkeypatch.setenv('MINIAI_DRILL', 'SIGTERM@1:2')
    with pytest.raises(ValueError, match=r"'SIGTERM@1:2' is not SIGNAL@RANK:EPOCH:BATCH"): drills_from_env()
    monkeypatch.delenv('MINIAI_DRILL')
    assert drills_from_env() == []
