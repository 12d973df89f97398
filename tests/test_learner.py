"""The Learner's loop: event order, cancellation, exceptions at every event, clear errors, no per-batch sync."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn, optim

import miniai.core.events as events
from miniai.datasets import DataLoaders
from miniai.learner import (EVENTS, STEPS, Callback, CancelBatchException, CancelEpochException, CancelFitException,
                            DeviceCB, Learner, MetricsCB, MomentumLearner, SingleBatchCB, TrainCB, TrainLearner,
                            run_cbs, to_cpu)
from miniai.training import Dataset, get_dls


def synth_dls(n=64, bs=16, nf=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, nf, generator=g)
    y = (x[:, 0] > 0).long()
    ds = Dataset(x, y)
    return DataLoaders(torch.utils.data.DataLoader(ds, batch_size=bs), torch.utils.data.DataLoader(ds, batch_size=bs))


def small_model(nf=4): return nn.Sequential(nn.Linear(nf, 8), nn.ReLU(), nn.Linear(8, 2))


class Recorder(Callback):
    "Records every event and step it sees, in order."
    def __init__(self): self.events = []
for _name in EVENTS:
    setattr(Recorder, _name, lambda self, learn, _n=_name: self.events.append(_n))


def expected_events(n_epochs, n_train, n_valid):
    "The documented loop, written out."
    ev = ['before_fit']
    def batch(training):
        b = ['before_batch', 'after_predict', 'after_loss']
        if training: b += ['after_backward', 'after_step']
        return b + ['after_batch', 'cleanup_batch']
    for _ in range(n_epochs):
        for training, n in ((True, n_train), (False, n_valid)):
            ev += ['before_epoch'] + batch(training) * n + ['after_epoch', 'cleanup_epoch']
    return ev + ['after_fit', 'cleanup_fit']


def test_event_order_is_the_documented_loop():
    rec = Recorder()
    learn = TrainLearner(small_model(), synth_dls(n=48, bs=16), F.cross_entropy, cbs=[rec])
    learn.fit(2)
    assert rec.events == expected_events(2, 3, 3)


def test_steps_come_from_a_callback_on_a_plain_learner():
    rec = Recorder()
    learn = Learner(small_model(), synth_dls(), F.cross_entropy, lr=0.1, cbs=[TrainCB(), rec])
    before = [p.clone() for p in learn.model.parameters()]
    learn.fit(1)
    assert rec.events == expected_events(1, 4, 4)
    assert any(not torch.equal(a, b) for a, b in zip(before, learn.model.parameters())), 'TrainCB did not train'


def test_callbacks_run_in_order():
    seen = []
    class A(Callback):
        order = 2
        def before_fit(self, learn): seen.append('A')
    class B(Callback):
        order = -1
        def before_fit(self, learn): seen.append('B')
    TrainLearner(small_model(), synth_dls(), F.cross_entropy, cbs=[A(), B(), SingleBatchCB()]).fit(1)
    assert seen == ['B', 'A']


def test_run_cbs_sorts_and_skips_missing_methods():
    seen = []
    class A(Callback):
        order = 1
        def foo(self, learn): seen.append(('A', learn))
    class B(Callback):
        def foo(self, learn): seen.append(('B', learn))
    run_cbs([A(), B(), Callback()], 'foo', 'L')
    assert seen == [('B', 'L'), ('A', 'L')]


def test_dispatch_is_sorted_once_per_fit(monkeypatch):
    calls = []
    orig = events.sort_cbs
    import miniai.core.learner as learner_mod
    monkeypatch.setattr(learner_mod, 'sort_cbs', lambda cbs: calls.append(1) or orig(cbs))
    TrainLearner(small_model(), synth_dls(n=160, bs=16), F.cross_entropy, cbs=[Recorder()]).fit(2)
    assert len(calls) == 1


@pytest.mark.parametrize('exc,stage', [(CancelBatchException, 'batch'), (CancelEpochException, 'epoch'),
                                       (CancelFitException, 'fit')])
def test_cancel_exceptions_end_their_stage_quietly(exc, stage):
    class Raiser(Callback):
        order = -1
        def __init__(self): self.n = 0
        def after_predict(self, learn):
            self.n += 1
            if self.n == 1: raise exc()
    rec = Recorder()
    learn = TrainLearner(small_model(), synth_dls(n=32, bs=16), F.cross_entropy, cbs=[Raiser(), rec])
    learn.fit(1)
    ev = rec.events  # the raiser runs first, so the recorder never sees the cancelled after_predict
    first_batch = ev[ev.index('before_batch'):]
    if stage == 'batch':
        # the first batch skips the rest of its steps and after_batch, but cleans up; the loop goes on
        assert first_batch[:3] == ['before_batch', 'cleanup_batch', 'before_batch']
        assert ev.count('before_batch') == 4 and ev[-2:] == ['after_fit', 'cleanup_fit']
    elif stage == 'epoch':
        assert first_batch[:4] == ['before_batch', 'cleanup_batch', 'cleanup_epoch', 'before_epoch']
        assert ev.count('before_epoch') == 2 and ev.count('after_epoch') == 1
    else:
        assert first_batch == ['before_batch', 'cleanup_batch', 'cleanup_epoch', 'cleanup_fit']


class Boom(Exception): pass


@pytest.mark.filterwarnings('ignore:several callbacks do the')  # the raiser does a step beside TrainCB on purpose
@pytest.mark.parametrize('event', EVENTS + STEPS)
@pytest.mark.parametrize('exc_type', [Boom, KeyboardInterrupt])
def test_exception_at_any_event_leaves_learner_reusable(event, exc_type):
    err = exc_type('at ' + event)
    class Raiser(Callback):
        def __init__(self): self.fired = False
    def raise_once(self, learn):
        if not self.fired:
            self.fired = True
            raise err
    setattr(Raiser, event, raise_once)
    cleaned = []
    class Cleanup(Callback):
        def cleanup_fit(self, learn): cleaned.append('fit')
        def cleanup_epoch(self, learn): cleaned.append('epoch')
        def cleanup_batch(self, learn): cleaned.append('batch')
    # a plain Learner takes its steps (predict, backward...) from callbacks, so a step can raise too
    learn = Learner(small_model(), synth_dls(n=32, bs=16), F.cross_entropy, cbs=[TrainCB()])
    raiser, cleanup = Raiser(), Cleanup()
    with pytest.raises(exc_type) as info:
        learn.fit(1, cbs=[raiser, cleanup])
    assert info.value is err, 'the original exception object must reach the caller'
    assert raiser.fired
    assert 'fit' in cleaned
    if event not in ('before_fit', 'after_fit', 'cleanup_fit'): assert 'epoch' in cleaned
    assert list(learn.cbs) == [learn.cbs[0]] and isinstance(learn.cbs[0], TrainCB), 'fit callbacks must be removed'
    rec = Recorder()
    learn.fit(1, cbs=[rec])
    assert rec.events == expected_events(1, 2, 2)


def test_loss_shape_mismatch_names_loss_and_shapes():
    model = nn.Sequential(nn.Linear(4, 3))  # 3 outputs for a target of shape (16, 5)
    x, y = torch.randn(32, 4), torch.randn(32, 5)
    dls = DataLoaders(*get_dls(Dataset(x, y), Dataset(x, y), 16))
    learn = TrainLearner(model, dls, F.mse_loss)
    with pytest.raises(ValueError, match=r'mse_loss.*\(16, 3\).*\(16, 5\)'), pytest.warns(UserWarning):
        learn.fit(1)


def test_dls_without_train_or_valid_is_a_clear_error():
    learn = TrainLearner(small_model(), (0,), F.cross_entropy)
    with pytest.raises(TypeError, match=r'dls has no \.train'):
        learn.fit(1)
    only_train = synth_dls()
    learn = TrainLearner(small_model(), type('D', (), {'train': only_train.train})(), F.cross_entropy)
    with pytest.raises(TypeError, match=r'\.valid'):
        learn.fit(1)
    learn.fit(1, valid=False)  # asking only for training is fine


def test_empty_dataloader_is_a_clear_error():
    x, y = torch.randn(10, 4), torch.zeros(10, dtype=torch.long)
    empty = torch.utils.data.DataLoader(Dataset(x, y), batch_size=16, drop_last=True)
    learn = TrainLearner(small_model(), DataLoaders(empty, empty), F.cross_entropy)
    with pytest.raises(ValueError, match='dls.train is empty'):
        learn.fit(1)
    # a loader without a length that yields nothing is caught when the epoch ends
    learn = TrainLearner(small_model(), DataLoaders(iter([]), iter([])), F.cross_entropy)
    with pytest.raises(ValueError, match='training data loader is empty'):
        learn.fit(1)


@pytest.mark.parametrize('n', [-1, 1.5, True, '2'])
def test_bad_n_epochs(n):
    with pytest.raises(ValueError, match='n_epochs'):
        TrainLearner(small_model(), synth_dls(), F.cross_entropy).fit(n)


def test_zero_epochs_runs_fit_events_only():
    rec = Recorder()
    TrainLearner(small_model(), synth_dls(), F.cross_entropy, cbs=[rec]).fit(0)
    assert rec.events == ['before_fit', 'after_fit', 'cleanup_fit']


def test_misspelt_event_is_warned():
    class Typo(Callback):
        def after_batc(self, learn): pass
    learn = TrainLearner(small_model(), synth_dls(), F.cross_entropy, cbs=[Typo(), SingleBatchCB()])
    with pytest.warns(UserWarning, match=r"Typo\.after_batc .*did you mean 'after_batch'"):
        learn.fit(1)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        TrainLearner(small_model(), synth_dls(), F.cross_entropy, cbs=[Recorder(), SingleBatchCB()]).fit(1)


def test_single_batch_cb_runs_one_batch():
    rec = Recorder()
    TrainLearner(small_model(), synth_dls(), F.cross_entropy, cbs=[SingleBatchCB(), rec]).fit(3)
    assert rec.events.count('before_batch') == 1 and rec.events[-1] == 'cleanup_fit'


def test_momentum_learner_keeps_a_fraction_of_the_gradient():
    learn = MomentumLearner(small_model(), synth_dls(n=16, bs=16), F.cross_entropy, lr=0.1, mom=0.5)
    learn.fit(1, valid=False)
    p = next(learn.model.parameters())
    # after the only batch, zero_grad left mom * grad; recompute that gradient at the pre-step weights is hard, so
    # check the defining property instead: a second zero_grad halves what is there
    g = p.grad.clone()
    learn.zero_grad()
    assert torch.allclose(p.grad, g * 0.5) and g.abs().sum() > 0


def test_device_cb_moves_model_and_batch():
    seen = []
    class Spy(Callback):
        order = 1
        def before_batch(self, learn): seen.append(learn.batch[0].device)
    learn = TrainLearner(small_model(), synth_dls(), F.cross_entropy, cbs=[DeviceCB('cpu'), Spy(), SingleBatchCB()])
    learn.fit(1)
    assert seen == [torch.device('cpu')]


def test_to_cpu_handles_containers_and_half():
    x = {'a': [torch.ones(2, dtype=torch.float16, requires_grad=False)], 'b': (torch.zeros(1),)}
    out = to_cpu(x)
    assert out['a'][0].dtype == torch.float32 and isinstance(out['b'], tuple)


def test_fit_lr_and_opt_func_are_used():
    learn = TrainLearner(small_model(), synth_dls(), F.cross_entropy, lr=0.3, opt_func=optim.AdamW)
    learn.fit(1, lr=0.01, cbs=[SingleBatchCB()])
    assert isinstance(learn.opt, optim.AdamW) and learn.opt.param_groups[0]['lr'] == 0.01


def test_learner_never_changes_the_callers_list_of_callbacks():
    cbs = [SingleBatchCB()]
    learn = TrainLearner(small_model(), synth_dls(), F.cross_entropy, cbs=cbs)
    learn.fit(1, cbs=[Recorder()])
    learn.lr_find(plot=False, max_epochs=1)
    learn.cbs.remove(learn.cbs[0])
    assert len(cbs) == 1 and isinstance(cbs[0], SingleBatchCB)
