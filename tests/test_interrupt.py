"""Interrupts that keep the work: SIGINT/SIGTERM stop a fit at a batch boundary with a checkpoint of that point, and
resuming from it gives bitwise the weights of an uninterrupted run (in this process; the CLI test runs the main job)."""
import os
import signal
import warnings
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn, optim
from torch.utils.data import DataLoader, TensorDataset

from miniai.augment import RandFlip, augment_cb
from miniai.core.events import Callback
from miniai.core.events import CancelFitException
from miniai.core.state import CheckpointError
from miniai.runs.checkpoint import SaveModelCB
from miniai.runs.ckptfile import read_checkpoint
from miniai.datasets import DataLoaders
from miniai.data.loader import TensorDataLoader
from miniai.runs.interrupt import InterruptCB, Interrupted, SignalGuard
from miniai.learner import MetricsCB, TrainLearner
from miniai.callbacks.tricks import GradAccumCB
from miniai.sgd import BatchSchedCB, EpochSchedCB

N_EPOCHS, BS, N_TRAIN = 3, 16, 64  # 4 training batches an epoch


pytestmark = pytest.mark.usefixtures('one_thread')


def data(shuffle=True):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(N_TRAIN + 32, 1, 8, 8, generator=g), torch.randint(0, 3, (N_TRAIN + 32,), generator=g)
    if shuffle == 'torch':  # torch DataLoaders shuffling with a generator of their own
        own = torch.Generator().manual_seed(3)
        return DataLoaders(DataLoader(TensorDataset(x[:N_TRAIN], y[:N_TRAIN]), BS, shuffle=True, generator=own),
                           DataLoader(TensorDataset(x[N_TRAIN:], y[N_TRAIN:]), BS))
    if not shuffle:  # a loader that cannot repeat an epoch's order: a plain list of batches, the same every epoch
        return DataLoaders([(x[i:i + BS], y[i:i + BS]) for i in range(0, N_TRAIN, BS)],
                           [(x[i:i + BS], y[i:i + BS]) for i in range(N_TRAIN, N_TRAIN + 32, BS)])
    return DataLoaders(TensorDataLoader(x[:N_TRAIN], y[:N_TRAIN], BS, shuffle=True, seed=3),
                       TensorDataLoader(x[N_TRAIN:], y[N_TRAIN:], BS))


class ValidDraws(Callback):
    "Draws from the global RNG during validation, as a stochastic metric or augmentation might."
    def after_batch(self, learn):
        if not learn.training: torch.rand(3)


def make(extra=(), shuffle=True):
    "A small run that uses every kind of state: dropout and augmentation (RNG), AdamW, two schedulers, shuffling."
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, 2, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.3), nn.Flatten(),
                          nn.Linear(64, 3))
    sched = partial(optim.lr_scheduler.OneCycleLR, max_lr=1e-2, total_steps=N_EPOCHS * N_TRAIN // BS)
    cbs = [MetricsCB(), BatchSchedCB(sched), EpochSchedCB(partial(optim.lr_scheduler.StepLR, step_size=1, gamma=0.9)),
           augment_cb(RandFlip()), ValidDraws(), *extra]
    return TrainLearner(model, data(shuffle), F.cross_entropy, lr=1e-2, opt_func=optim.AdamW, cbs=cbs)


class SignalAt(Callback):
    "Sends `signum` to this process in `after_batch` of (epoch, iter, training), `times` times."
    def __init__(self, epoch, it, training, signum=signal.SIGTERM, times=1):
        self.at, self.signum, self.times = (epoch, it, training), signum, times
    def after_batch(self, learn):
        if (learn.epoch, learn.iter, learn.training) == self.at:
            for _ in range(self.times): os.kill(os.getpid(), self.signum)


class BatchLosses(Callback):
    def __init__(self): self.losses = {}
    def after_loss(self, learn):
        if learn.training: self.losses[(learn.epoch, learn.iter)] = (learn.loss.item(), len(learn.batch[1]))


def weights(learn): return {k: v.clone() for k, v in learn.model.state_dict().items()}


def same(a, b): return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope='module')
def uninterrupted():
    losses = BatchLosses()
    learn = make([losses])
    learn.fit(N_EPOCHS)
    return weights(learn), losses.losses, learn.metrics.history


@pytest.mark.parametrize('at,signum', [((1, 1, True), signal.SIGTERM), ((0, 0, True), signal.SIGINT),
                                       ((1, 3, True), signal.SIGTERM), ((1, 0, False), signal.SIGINT),
                                       ((2, 1, False), signal.SIGTERM)],
                         ids=['mid-train', 'first-batch', 'last-train-batch', 'in-validation', 'last-validation'])
def test_interrupted_then_resumed_gives_bitwise_the_same_weights(at, signum, tmp_path, uninterrupted):
    ref, ref_losses, ref_history = uninterrupted
    handlers = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
    learn = make()
    with pytest.raises(Interrupted) as info: learn.fit(N_EPOCHS, cbs=[InterruptCB(tmp_path / 'i.ckpt'), SignalAt(*at, signum)])
    e = info.value
    assert e.signum == signum and e.exit_code == 128 + signum and e.where == 'training'
    epoch, it, training = at
    assert e.position == {'epoch': epoch, 'phase': 'train' if training else 'valid', 'n_batches': 4,
                          'batch': it + 1 if training else 4}
    assert e.checkpoint == tmp_path / 'i.ckpt' and str(e.checkpoint) in str(e)
    assert read_checkpoint(e.checkpoint)['position'] == e.position
    assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == handlers, 'handlers must be put back'
    resumed = make([BatchLosses()])
    resumed.fit(N_EPOCHS, resume=e.checkpoint)
    assert same(weights(resumed), ref), 'resumed weights differ from the uninterrupted run'
    # the epoch resumed mid-way reports only the batches run after resuming: their mean loss, weighted by size
    rows = resumed.metrics.history
    assert rows[0]['epoch'] == epoch
    if training and it + 1 < 4:
        rest = [ref_losses[(epoch, i)] for i in range(it + 1, 4)]
        assert rows[0]['train'] == 'train'
        assert rows[0]['loss'] == pytest.approx(sum(l * n for l, n in rest) / sum(n for _, n in rest), rel=1e-5)
        assert rows[0]['loss'] != pytest.approx(ref_history[2 * epoch]['loss'], rel=1e-6)
    else: assert rows[0]['train'] == 'eval', 'no training batch was left in that epoch: no train row'
    # later rows (every full epoch and every validation) are the uninterrupted run's
    later = [r for r in ref_history if r['epoch'] > epoch or (r['epoch'] == epoch and r['train'] == 'eval')]
    for a, b in zip([r for r in rows if r['epoch'] > epoch or r['train'] == 'eval'], later):
        assert (a['epoch'], a['train']) == (b['epoch'], b['train']) and a['loss'] == pytest.approx(b['loss'], abs=1e-7)


def test_loader_that_cannot_repeat_its_order_skips_the_batches_done(tmp_path):
    ref = make(shuffle=False)
    ref.fit(N_EPOCHS)
    learn = make(shuffle=False)
    with pytest.raises(Interrupted) as info: learn.fit(N_EPOCHS, cbs=[InterruptCB(tmp_path / 'i.ckpt'), SignalAt(1, 1, True)])
    resumed = make(shuffle=False)
    with pytest.warns(UserWarning, match='cannot repeat the order of epoch 1.*the first 2 it gives are skipped'):
        resumed.fit(N_EPOCHS, resume=info.value.checkpoint)
    assert same(weights(resumed), weights(ref)), 'a loader with a fixed order resumes exactly too'


class StopAfterEpoch0(Callback):
    order = 100  # SaveModelCB (20) has written last.ckpt of that epoch
    def after_epoch(self, learn):
        if not learn.training and learn.epoch == 0: raise CancelFitException()


@pytest.mark.parametrize('at', [(1, 1, True), (1, 0, False), 'end-of-epoch-0'],
                         ids=['mid-train', 'in-validation', 'end-of-epoch-0'])
def test_a_torch_dataloader_with_its_own_generator_resumes_exactly(at, tmp_path):
    """`DataLoader(..., shuffle=True, generator=g)` draws each epoch's order from `g`, which no checkpoint kept: a run
    resumed from last.ckpt went on in other orders without a word, and one stopped part-way was warned that it
    could not repeat the epoch. The generator's state is kept, and for a stop part-way its state as the epoch began."""
    ref = make(shuffle='torch')
    ref.fit(N_EPOCHS)
    learn = make(shuffle='torch')
    if at == 'end-of-epoch-0':
        learn.fit(N_EPOCHS, cbs=[SaveModelCB(tmp_path, every_epoch=True), StopAfterEpoch0()])
        path = tmp_path / 'last.ckpt'
    else:
        with pytest.raises(Interrupted) as info: learn.fit(N_EPOCHS, cbs=[InterruptCB(tmp_path / 'i.ckpt'), SignalAt(*at)])
        path = info.value.checkpoint
    resumed = make(shuffle='torch')
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter('always')
        resumed.fit(N_EPOCHS, resume=path)
    assert not [w for w in seen if 'cannot repeat' in str(w.message)]
    assert same(weights(resumed), weights(ref)), 'resumed weights differ from the uninterrupted run'


def test_a_probe_leaves_a_torch_dataloaders_generator_as_it_was():
    "lr_find promises the data order as it was: a torch DataLoader's own generator moved on with every epoch it ran."
    learn = make(shuffle='torch')
    gen = learn.dls.train.generator
    before = gen.get_state()
    learn.lr_find(max_epochs=2, plot=False)
    assert torch.equal(gen.get_state(), before)


def test_resuming_with_another_batch_count_is_refused(tmp_path):
    learn = make()
    with pytest.raises(Interrupted) as info: learn.fit(N_EPOCHS, cbs=[InterruptCB(tmp_path / 'i.ckpt'), SignalAt(1, 1, True)])
    other = make()
    other.dls.train.bs = 32
    with pytest.raises(CheckpointError, match='saved with 4 training batches an epoch, this fit has 2'):
        other.fit(N_EPOCHS, resume=info.value.checkpoint)


@pytest.mark.filterwarnings('ignore:Detected call of `lr_scheduler.step')  # GradAccumCB skips steps on purpose
def test_gradient_accumulation_stops_only_after_its_step(tmp_path):
    "A stop inside an accumulation group would lose the gradients summed so far: it waits for the group's step."
    ref = make([GradAccumCB(2)])
    ref.fit(N_EPOCHS)
    learn = make([GradAccumCB(2)])
    with pytest.raises(Interrupted) as info:
        learn.fit(N_EPOCHS, cbs=[InterruptCB(tmp_path / 'i.ckpt'), SignalAt(1, 0, True)])
    assert info.value.position['batch'] == 2, 'batch 0 leaves a group half-summed; the stop comes after batch 1'
    resumed = make([GradAccumCB(2)])
    resumed.fit(N_EPOCHS, resume=info.value.checkpoint)
    assert same(weights(resumed), weights(ref))


def test_a_second_signal_while_saving_waits_for_the_file(tmp_path, monkeypatch, capfd):
    "The save goes through a temporary file; a second Ctrl-C in the middle of it must neither cut it nor stop it."
    import miniai.runs.ckptfile as ck
    real, calls = ck.save_file, []
    def save_with_a_second_ctrl_c(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # arrives while the tensors are being written
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(ck, 'save_file', save_with_a_second_ctrl_c)
    learn = make()
    with pytest.raises(Interrupted) as info:
        learn.fit(N_EPOCHS, cbs=[InterruptCB(tmp_path / 'i.ckpt'), SignalAt(1, 1, True, signal.SIGINT)])
    assert calls and info.value.where == 'training' and info.value.checkpoint is not None
    assert 'while the checkpoint is being written' in capfd.readouterr().err
    assert read_checkpoint(tmp_path / 'i.ckpt')['position']['batch'] == 2
    assert [p.name for p in tmp_path.iterdir()] == ['i.ckpt'], 'no temporary file may be left'


def test_a_second_signal_outside_the_save_stops_at_once(tmp_path):
    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN in a pytest-xdist worker
    learn = make()
    with pytest.raises(Interrupted) as info:
        learn.fit(N_EPOCHS, cbs=[InterruptCB(tmp_path / 'i.ckpt'), SignalAt(1, 1, True, signal.SIGINT, times=2)])
    assert info.value.where == 'at once' and info.value.checkpoint is None and 'nothing was saved' in str(info.value)
    assert not (tmp_path / 'i.ckpt').exists()
    assert signal.getsignal(signal.SIGINT) is before  # the handler that was there is put back


def test_a_repeated_sigterm_still_saves(tmp_path, capfd):
    "A launcher may pass on a notice the process already got: a second SIGTERM is noted, the stop and save go on."
    learn = make()
    with pytest.raises(Interrupted) as info:
        learn.fit(N_EPOCHS, cbs=[InterruptCB(tmp_path / 'i.ckpt'), SignalAt(1, 1, True, signal.SIGTERM, times=2)])
    assert info.value.where == 'training' and read_checkpoint(tmp_path / 'i.ckpt')['position']['batch'] == 2
    assert 'SIGTERM received again: still stopping after this batch' in capfd.readouterr().err


def test_a_signal_after_the_last_batch_ends_the_fit_complete(tmp_path):
    class SignalInAfterFit(Callback):
        order = 0  # before InterruptCB's after_fit
        def after_fit(self, learn): os.kill(os.getpid(), signal.SIGTERM)
    learn = make()
    with pytest.raises(Interrupted) as info: learn.fit(N_EPOCHS, cbs=[InterruptCB(tmp_path / 'i.ckpt'), SignalInAfterFit()])
    assert info.value.where == 'after training' and info.value.exit_code == 143
    assert len(learn.metrics.history) == 2 * N_EPOCHS and not (tmp_path / 'i.ckpt').exists()


def test_signal_guard_stops_a_script_outside_the_fit_and_restores_handlers():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as info:
        with SignalGuard() as g:
            assert signal.getsignal(signal.SIGTERM) == g._handle
            os.kill(os.getpid(), signal.SIGTERM)
    assert info.value.where == 'before training' and info.value.exit_code == 143
    assert signal.getsignal(signal.SIGTERM) == before


def test_interrupt_cb_uses_the_guard_in_force(tmp_path):
    with SignalGuard() as g:
        learn = make()
        with pytest.raises(Interrupted): learn.fit(1, cbs=[InterruptCB(tmp_path / 'i.ckpt'), SignalAt(0, 1, True)])
        assert signal.getsignal(signal.SIGTERM) == g._handle, 'the guard in force stays in force after the fit'
        assert g.requested is None and g.trained
        with pytest.raises(Interrupted) as info: os.kill(os.getpid(), signal.SIGTERM)
        assert info.value.where == 'after training'


def test_probes_do_not_save(tmp_path):
    "lr_find, TTA and friends are not training: InterruptCB sits out, and the look still changes nothing."
    learn = make([InterruptCB(tmp_path / 'i.ckpt')])
    learn.fit(1)
    preds, targs = learn.capture_preds()
    assert len(preds) == 32 and not (tmp_path / 'i.ckpt').exists()
