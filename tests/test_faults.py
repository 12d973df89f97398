"""Fault injection: an exception at any event or step, raised first or last among every callback the library ships
that can sit in one fit, reaches the caller as the same object and leaves no hook, no autocast, no half-written file
and no signal handler behind; the next fit works. And cleanups that fail never hide the error on its way."""
import csv
import importlib
import inspect
import pkgutil
import signal
import warnings
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn, optim

import miniai
from miniai.accel import AccelerateCB, ChannelsLastCB, MixedPrecision
from miniai.activations import ActivationStats, append_stats
from miniai.augment import CapturePreds
from miniai.core.events import (EVENTS, STEPS, Callback, CancelBatchException, CancelEpochException,
                                CancelFitException, note_failure)
from miniai.engines.compile import CompileCB
from miniai.core.state import CheckpointError
from miniai.runs.checkpoint import SaveModelCB, save_mid_epoch
from miniai.runs.ckptfile import read_checkpoint
from miniai.datasets import DataLoaders
from miniai.engines.ddp import DDPCB
from miniai.data.loader import TensorDataLoader
from miniai.runs.interrupt import DrillCB, InterruptCB
from miniai.learner import DeviceCB, Learner, MetricsCB, NamedBatchCB, ProgressCB, TrainCB, TrainLearner
from miniai.callbacks.loggers import CSVLoggerCB, TensorBoardCB
from miniai.callbacks.mix import CutMixCB, MixUpCB
from miniai.callbacks.tricks import EarlyStoppingCB, GradAccumCB, GradClipCB, TerminateOnNaNCB
from miniai.app.recipe import make_learner
from miniai.sgd import BatchSchedCB, EpochSchedCB, HasLearnCB, RecorderCB

ALL_EVENTS = EVENTS + STEPS


pytestmark = pytest.mark.usefixtures('one_thread')  # tiny bf16 models run ten times slower on two threads


class Boom(Exception): pass
class CleanupBoom(Exception): pass


def synth_dls(n_train=48, n_valid=32, bs=16):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n_train + n_valid, 1, 12, 12, generator=g), torch.randint(0, 10, (n_train + n_valid,), generator=g)
    return DataLoaders(TensorDataLoader(x[:n_train], y[:n_train], bs, shuffle=True, seed=0),
                       TensorDataLoader(x[n_train:], y[n_train:], bs))


def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))


def main_job_lineup(out: Path):
    """The main job's callbacks exactly as `make_learner` builds them (bf16 + channels-last, full augmentation,
    checkpoints, CSV log, interrupt handling, EMA of the weights, time to accuracy), plus ActivationStats; a plain
    Learner, so that MixedPrecision does the steps and an injected step runs beside it."""
    made, _ = make_learner(tiny_model(), synth_dls(), epochs=2, lr=1e-2, precision='bf16-cl', augment='full', out=out,
                           average='ema', target=0.94)
    cbs = list(made.cbs) + [ActivationStats(lambda m: isinstance(m, nn.Conv2d)), CutMixCB()]
    return Learner(made.model, made.dls, made.loss_func, made.lr, cbs=cbs, opt_func=made.opt_func)


def everything_lineup(out: Path):
    "Every other callback that can sit in a training fit, all at once."
    dls = synth_dls()
    sched = partial(optim.lr_scheduler.OneCycleLR, max_lr=1e-2, total_steps=2 * len(dls.train))
    cbs = [DeviceCB('cpu'), MetricsCB(), ProgressCB(plot=True), BatchSchedCB(sched),
           EpochSchedCB(partial(optim.lr_scheduler.StepLR, step_size=1)), RecorderCB(lr=lambda cb: cb.pg['lr']),
           MixedPrecision(torch.bfloat16), ChannelsLastCB(), SaveModelCB(out, every_epoch=True),
           CSVLoggerCB(out / 'metrics.csv'), TensorBoardCB(out / 'tb'), ActivationStats(), CapturePreds(),
           EarlyStoppingCB(patience=10), TerminateOnNaNCB(), GradClipCB(1.0), GradAccumCB(2), DDPCB(), HasLearnCB(),
           InterruptCB(out / 'interrupted.ckpt'), NamedBatchCB('x', 'y'), MixUpCB(),
           DrillCB(signal.SIGTERM, rank=99, epoch=0, batch=0)]  # a rank absent: never fires
    return Learner(tiny_model(), dls, F.cross_entropy, 1e-2, cbs=cbs, opt_func=optim.AdamW)


def engines_lineup(out: Path):
    "The callbacks that hand the model to another engine: torch.compile (its eager backend) and HF Accelerate."
    cbs = [MetricsCB(), ProgressCB(), CompileCB(backend='eager'), AccelerateCB(mixed_precision='bf16'),
           SaveModelCB(out, every_epoch=True), ActivationStats(), InterruptCB(out / 'interrupted.ckpt')]
    return Learner(tiny_model(), synth_dls(), F.cross_entropy, 1e-2, cbs=cbs, opt_func=optim.AdamW)


LINEUPS = {'main job': main_job_lineup, 'everything': everything_lineup, 'engines': engines_lineup}


@pytest.fixture(scope='module')
def mid_epoch_ckpt(tmp_path_factory):
    "A checkpoint of the main job's line-up saved after batch 1 of epoch 0, so its fits also resume mid-epoch."
    out = tmp_path_factory.mktemp('resume')
    class SaveAndStop(Callback):
        order = 95
        def after_batch(self, learn):
            if learn.iter == 1:
                save_mid_epoch(learn, out / 'mid.ckpt')
                raise CancelFitException()
    main_job_lineup(out).fit(2, cbs=[SaveAndStop()])
    return out / 'mid.ckpt'


def raiser_at(event: str, exc: BaseException, order: int) -> Callback:
    "A callback that raises `exc` the first time `event` (an event or a step) comes to it."
    class Raiser(Callback):
        fired = False
    def raise_once(self, learn):
        if not self.fired:
            self.fired = True
            raise exc
    setattr(Raiser, event, raise_once)
    r = Raiser()
    r.order = order
    return r


def hooks_left(model: nn.Module) -> list[str]:
    names = ('_forward_hooks', '_forward_pre_hooks', '_backward_hooks', '_backward_pre_hooks')
    left = [f'{type(m).__name__}.{n}' for m in model.modules() for n in names if getattr(m, n, None)]
    import torch.nn.modules.module as mm
    return left + [n for n in ('_global_forward_hooks', '_global_forward_pre_hooks', '_global_backward_hooks')
                   if getattr(mm, n, None)]


def check_files(out: Path) -> None:
    "Nothing half-written: no temporary files, every checkpoint reads back, every CSV row complete, TB events load."
    files = [p for p in out.rglob('*') if p.is_file()]
    assert not [p for p in files if p.name.startswith('.') or p.suffix == '.tmp'], files
    for p in files:
        if p.suffix == '.ckpt': read_checkpoint(p)
        elif p.suffix == '.csv':
            rows = list(csv.reader(p.read_text().splitlines()))
            assert rows and all(len(r) == len(rows[0]) for r in rows), rows
        elif 'tfevents' in p.name:
            from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
            assert list(EventFileLoader(str(p)).Load())


# The two pure-miniai line-ups get every event, both positions and both kinds of exception. The engines line-up costs
# about 2.5 s a case (dynamo traces each fit, Accelerate prepares each fit), so it gets one event of each phase, with
# the exception raised first and the interrupt raised last.
ENGINE_EVENTS = ('before_fit', 'before_batch', 'predict', 'backward', 'after_epoch', 'cleanup_fit')
CASES = ([(ev, pos, lineup, exc) for ev in ALL_EVENTS for pos in ('first', 'last') for lineup in ('main job', 'everything')
          for exc in (Boom, KeyboardInterrupt)]
         + [(ev, pos, 'engines', exc) for ev in ENGINE_EVENTS for pos, exc in (('first', Boom), ('last', KeyboardInterrupt))])


@pytest.mark.filterwarnings('ignore:several callbacks do the')  # an injected step runs beside MixedPrecision's
@pytest.mark.filterwarnings('ignore:Detected call of `lr_scheduler.step')  # GradAccumCB skips steps on purpose
@pytest.mark.parametrize('event,position,lineup,exc_type', CASES,
                         ids=[f'{e}-{p}-{l}-{x.__name__}' for e, p, l, x in CASES])
def test_fault_injection(event, position, lineup, exc_type, tmp_path, mid_epoch_ckpt):
    learn = LINEUPS[lineup](tmp_path)
    model, cbs, handlers = learn.model, list(learn.cbs), [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
    err = exc_type(f'injected at {event}')
    raiser = raiser_at(event, err, -1000 if position == 'first' else 1000)
    resume = mid_epoch_ckpt if lineup == 'main job' else None
    with pytest.raises(exc_type) as info: learn.fit(2, cbs=[raiser], resume=resume)
    assert info.value is err, 'the original exception object must reach the caller'
    assert raiser.fired
    assert not getattr(err, '__notes__', None), f'a library cleanup failed on the way: {err.__notes__}'
    assert not hooks_left(model), hooks_left(model)
    assert learn.model is model, 'the model must be unwrapped (DDP)'
    assert type(learn.__dict__.get('opt')).__name__ != '_AccumulatingOpt'
    assert not torch.is_autocast_enabled('cpu') and torch.is_grad_enabled()
    assert list(learn.cbs) == cbs, 'callbacks given to fit must be removed'
    assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == handlers, 'signal handlers not restored'
    check_files(tmp_path)
    # the next fit works, and leaves everything clean too
    learn.fit(2)
    assert [r['train'] for r in learn.metrics.rows()] == ['train', 'eval'] * 2
    stats = next(cb for cb in learn.cbs if isinstance(cb, ActivationStats))
    assert stats.hooks and all(len(h.stats[0]) for h in stats.hooks), 'hooks must work in the next fit'
    assert not hooks_left(model)
    check_files(tmp_path)


def test_the_matrix_covers_every_shipped_callback_that_can_sit_in_a_fit(tmp_path):
    "A new training callback must join a line-up (or be listed here with why it cannot sit in a training fit)."
    outside = {'LRFinderCB': 'ends every epoch at validation and the fit when the loss grows: a probe',
               'SingleBatchCB': 'ends the fit after one batch', '_GrabBatch': 'ends the fit at the first batch',
               'ResumeCB': 'added by fit(resume=...): the main job line-up resumes', 'TrainCB': 'MixedPrecision is one',
               'AutoResumeCB': "added by fit(resume='auto'), a ResumeCB choosing its file: a line-up's next fit would "
                               "find the first one complete",
               'BatchTransformCB': "the main job's augmentation is one", 'HooksCallback': 'ActivationStats is one',
               'BaseSchedCB': 'abstract', '_Collect': 'get_preds: ends every batch after its prediction, a probe',
               '_InputShape': "ImageEval's probe: notes the first batch's image shape",
               'LoaderSchedCB': 'a BatchSchedCB whose scheduler is built from the loaders (fit_one_cycle): BatchSchedCB '
                                'is one; test_fine_tune.py resumes it exactly',
               'TrackerCB': 'the base of WandBCB and MLflowCB',
               'MixCB': 'the base of MixUpCB (in the everything line-up) and CutMixCB (in the main job one)',
               'WandBCB': 'needs its client: test_trackers.py fails it, resumes it and checks the training untouched',
               'MLflowCB': 'needs its client: test_trackers.py fails it, resumes it and checks the training untouched'}
    seen = {type(cb).__name__ for f in LINEUPS.values() for cb in f(tmp_path).cbs}
    shipped = {c.__name__ for c in shipped_callbacks()}
    assert shipped - seen - set(outside) == set()


# -- every cleanup is safe when its before_* never ran ------------------------------------------------------------------
def shipped_callbacks() -> list[type]:
    for m in pkgutil.iter_modules(miniai.__path__): importlib.import_module(f'miniai.{m.name}')
    found, todo = set(), [Callback]
    while todo:
        for c in todo.pop().__subclasses__():
            if c.__module__.startswith('miniai.') and c not in found: found.add(c)
            todo.append(c)
    return sorted(found, key=lambda c: c.__name__)


def instance_of(cls, tmp: Path):
    "An instance of a shipped callback class, built with the arguments it needs."
    sched = partial(optim.lr_scheduler.StepLR, step_size=1)
    args = {'BaseSchedCB': (sched,), 'BatchSchedCB': (sched,), 'EpochSchedCB': (sched,), 'GradClipCB': (1.,),
            'GradAccumCB': (2,), 'HooksCallback': (append_stats,), 'BatchTransformCB': (lambda b: b,),
            'ResumeCB': (tmp / 'x.ckpt',), 'InterruptCB': (tmp / 'i.ckpt',), 'SaveModelCB': (tmp,),
            'CSVLoggerCB': (tmp / 'm.csv',), 'TensorBoardCB': (tmp / 'tb',), 'DrillCB': (signal.SIGTERM, 99, 0, 0),
            'LoaderSchedCB': (lambda opt, total_steps, base_lrs: sched(opt),)}
    return cls(*args.get(cls.__name__, ()), **({'lr': lambda cb: 0} if cls is RecorderCB else {}))


@pytest.mark.parametrize('cls', shipped_callbacks(), ids=lambda c: c.__name__)
def test_cleanups_are_safe_before_anything_ran(cls, tmp_path):
    cb = instance_of(cls, tmp_path)
    learn = TrainLearner(tiny_model(), synth_dls(), F.cross_entropy)  # never fitted: no opt, no epoch, no batch
    for ev in ('cleanup_batch', 'cleanup_epoch', 'cleanup_fit'):
        if hasattr(cb, ev): getattr(cb, ev)(learn)
    assert not list(tmp_path.iterdir()), 'a cleanup with nothing to clean must not write files'


def test_issue_garbage_resume_file_gives_its_own_error(tmp_path):
    bad = tmp_path / 'bad.ckpt'
    bad.write_text('not a checkpoint')
    learn, _ = make_learner(tiny_model(), synth_dls(), epochs=1, lr=1e-2, precision='bf16-cl', augment='full',
                            out=tmp_path / 'run')
    with pytest.raises(CheckpointError, match='is not a readable miniai checkpoint') as info: learn.fit(1, resume=bad)
    assert not getattr(info.value, '__notes__', None)


def test_issue_first_callback_failing_in_before_fit_beside_activation_stats(tmp_path):
    learn = main_job_lineup(tmp_path)
    err = Boom('first')
    with pytest.raises(Boom) as info: learn.fit(1, cbs=[raiser_at('before_fit', err, -1000)])
    assert info.value is err and not getattr(err, '__notes__', None)


# -- a cleanup that fails never replaces the exception on its way ----------------------------------------------------------
LEVEL = {'batch': 0, 'epoch': 1, 'fit': 2}


def level_of(event: str) -> int:
    return LEVEL[event.rsplit('_', 1)[1]] if event.rsplit('_', 1)[-1] in LEVEL else LEVEL['batch']  # steps: batch


class Cleaned(Callback):
    order = 500
    def __init__(self): self.seen = []
    def cleanup_batch(self, learn): self.seen.append('batch')
    def cleanup_epoch(self, learn): self.seen.append('epoch')
    def cleanup_fit(self, learn): self.seen.append('fit')


class BadCleanup(Callback):
    "Its `cleanup_{stage}` raises CleanupBoom once `after` has fired."
    order = 1  # after the raiser (order -1) within the same cleanup
    def __init__(self, stage: str, after: Callback): self.stage, self.after = stage, after
    def cleanup_batch(self, learn):
        if self.stage == 'batch' and self.after.fired: raise CleanupBoom('cleanup_batch failed')
    def cleanup_epoch(self, learn):
        if self.stage == 'epoch' and self.after.fired: raise CleanupBoom('cleanup_epoch failed')
    def cleanup_fit(self, learn):
        if self.stage == 'fit' and self.after.fired: raise CleanupBoom('cleanup_fit failed')


def plain_learner():
    return Learner(tiny_model(), synth_dls(), F.cross_entropy, cbs=[TrainCB()])


@pytest.mark.filterwarnings('ignore:several callbacks do the')
@pytest.mark.parametrize('stage', list(LEVEL))
@pytest.mark.parametrize('event', ALL_EVENTS)
def test_failing_cleanup_is_attached_not_raised(event, stage):
    learn = plain_learner()
    err = Boom(f'at {event}')
    raiser, cleaned = raiser_at(event, err, -1), Cleaned()
    bad = BadCleanup(stage, raiser)
    with pytest.raises(Boom) as info: learn.fit(1, cbs=[raiser, bad, cleaned])
    assert info.value is err
    notes = getattr(err, '__notes__', [])
    if LEVEL[stage] >= level_of(event):  # that cleanup ran while the error was on its way
        assert len(notes) == 1 and 'CleanupBoom' in notes[0] and f'BadCleanup.cleanup_{stage}' in notes[0], notes
    else: assert not notes
    assert 'fit' in cleaned.seen, 'the other cleanups must still run'
    learn.fit(1)  # reusable


def test_a_data_attribute_named_like_a_step_is_not_a_handler():
    "TensorBoardCB once kept a counter in `self.step`, which a plain Learner called as its 'step' step."
    class Counter(Callback):
        step, after_batch = 0, None
    learn = plain_learner()
    before = [p.detach().clone() for p in learn.model.parameters()]
    learn.fit(1, cbs=[Counter()])  # was: TypeError: 'int' object is not callable
    assert any(not torch.equal(a, b) for a, b in zip(before, learn.model.parameters())), 'the model must have trained'


def test_failing_cleanup_alone_raises_its_own_error():
    learn = plain_learner()
    class Bad(Callback):
        def cleanup_epoch(self, learn): raise CleanupBoom('mine')
    cleaned = Cleaned()
    with pytest.raises(CleanupBoom, match='mine'): learn.fit(1, cbs=[Bad(), cleaned])
    assert cleaned.seen[-1] == 'fit'


def test_several_failing_cleanups_raise_the_first_with_the_others_noted():
    learn = plain_learner()
    class A(Callback):
        order = 1
        def cleanup_fit(self, learn): raise CleanupBoom('a')
    class B(Callback):
        order = 2
        def cleanup_fit(self, learn): raise ValueError('b')
    with pytest.raises(CleanupBoom, match='a') as info: learn.fit(1, cbs=[B(), A()])
    assert len(info.value.__notes__) == 1 and "B.cleanup_fit also failed: ValueError: b" in info.value.__notes__[0]


@pytest.mark.parametrize('cancel', [CancelBatchException, CancelEpochException, CancelFitException])
def test_failing_cleanup_under_a_quiet_cancel_is_not_swallowed(cancel):
    "A cancel ends its stage quietly, so a note on it would vanish: the cleanup's error goes on instead."
    learn = plain_learner()
    class Cancel(Callback):
        def after_loss(self, learn): raise cancel()
    class Bad(Callback):
        def cleanup_batch(self, learn): raise CleanupBoom('under a cancel')
    with pytest.raises(CleanupBoom) as info: learn.fit(1, cbs=[Cancel(), Bad()])
    # a batch's own cancel is over before its cleanup runs; an epoch's or the fit's is still on its way
    if cancel is not CancelBatchException: assert isinstance(info.value.__context__, cancel)


def test_note_falls_back_to_a_warning_without_add_note():
    "Python 3.10 has no add_note: the failure is warned instead, and the original still goes on."
    class OldStyle(Exception):
        add_note = property(lambda self: (_ for _ in ()).throw(AttributeError('add_note')))
    exc = OldStyle('original')
    assert not hasattr(exc, 'add_note')
    with pytest.warns(RuntimeWarning, match='`cleanup_fit` also failed: .*CleanupBoom: x'):
        note_failure(exc, CleanupBoom('x'), '`cleanup_fit`')


def test_a_callback_that_removed_itself_does_not_replace_the_error():
    learn = plain_learner()
    class Leaves(Callback):
        def before_fit(self, learn): learn.cbs.remove(self)
    err = Boom('mine')
    with pytest.raises(Boom) as info: learn.fit(1, cbs=[Leaves(), raiser_at('after_batch', err, 0)])
    assert info.value is err and len(learn.cbs) == 1
