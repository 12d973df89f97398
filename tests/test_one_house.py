"""What the one-house layout promises besides where files are: code written for the old flat modules still runs, no
callback rewrites another object's methods, callbacks are found by name, any callback's state goes through one
protocol into checkpoints, checkpoints written before the move still resume exactly, and each shared job has one
mechanism that does it right."""
import json
import os
import shutil
import subprocess
import sys
import warnings
from collections import namedtuple
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn, optim

import miniai.engines.precision as precision
from miniai._moved import MOVED
from miniai.accel import MixedPrecision
from miniai.callbacks.averaging import WeightAverageCB
from miniai.callbacks.loggers import CSVLoggerCB, TimeToAccuracyCB
from miniai.callbacks.metrics import improved, monitor_mode
from miniai.callbacks.preds import CapturePreds
from miniai.core.devices import model_device, model_dtype
from miniai.core.files import atomic_path, write_atomic
from miniai.core.nested import apply_to_tensors, first_shape, tensors_in
from miniai.core.state import plain_saved_keys
from miniai.data.loader import TensorDataLoader
from miniai.data.normalise import Normalise
from miniai.datasets import DataLoaders
from miniai.engines.compile import CompileCB
from miniai.engines.ddp import DDPCB
from miniai.learner import Callback, CancelFitException, DeviceCB, Learner, MetricsCB, ProgressCB, TrainCB
from miniai.runs.checkpoint import SaveModelCB
from miniai.runs.ckptfile import CheckpointError, read_checkpoint
from miniai.runs.interrupt import InterruptCB
from miniai.sgd import BatchSchedCB, RecorderCB
from miniai.tools.interpret import ClassificationInterpretation

ROOT = Path(__file__).resolve().parents[1]
LEGACY = Path(__file__).parent / 'data' / 'legacy'


def tiny_dls(n=64, nv=32, bs=16):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n + nv, 1, 8, 8), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 4, (n + nv,), generator=g)
    return DataLoaders(TensorDataLoader(x[:n], y[:n], bs, shuffle=True, seed=1, mean=0.5, std=0.3),
                       TensorDataLoader(x[n:], y[n:], bs, mean=0.5, std=0.3))


def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 4))


# -- code written for the old flat modules -------------------------------------------------------------------------
def test_every_old_module_name_still_imports_the_same_objects_with_one_warning_naming_the_new_place():
    code = f"""
import importlib, json, warnings
import miniai
from miniai._moved import MOVED
out = {{}}
for old, names in MOVED.items():
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        mod = importlib.import_module('miniai.' + old)
        got = {{n: getattr(mod, n) for n in names}}
        if old == 'data': got = {{n: getattr(mod, n) for n in names}}  # twice: the room warns once a name
    same = all(got[n] is getattr(importlib.import_module('miniai.' + w_.partition(':')[0]), w_.partition(':')[2] or n)
               for n, w_ in names.items())
    out[old] = dict(same=same, warnings=[str(x.message) for x in w if x.category is FutureWarning],
                    all=sorted(getattr(mod, '__all__', names)) == sorted(names))
print(json.dumps(out))
"""
    res = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert set(out) == set(MOVED) and len(out) >= 29
    for old, r in out.items():
        assert r['same'], f'miniai.{old}: a name gives another object than its new home'
        if old == 'data':
            assert len(r['warnings']) == len(MOVED['data']), 'one warning a name, naming its module'
            assert all('has moved: import it from miniai.data.' in m for m in r['warnings'])
        else:
            assert len(r['warnings']) == 1 and f'miniai.{old} has moved' in r['warnings'][0], r['warnings']
            assert r['all'], f'`from miniai.{old} import *` gives the names it gave'


def test_the_quick_start_of_earlier_versions_runs_unchanged():
    "The README's quick start as it was (`from miniai.fashion import fashion_dls`), on a few batches."
    code = """
import warnings; warnings.simplefilter('error', FutureWarning)
try:
    from miniai.fashion import fashion_dls
    raise SystemExit('no FutureWarning')
except FutureWarning as e: print('warned:', e)
warnings.simplefilter('ignore', FutureWarning)
from miniai.learner import *
from miniai.data import TensorDataLoader
from miniai.datasets import DataLoaders
import torch
x, y = torch.randint(0, 256, (32, 1, 8, 8), dtype=torch.uint8), torch.randint(0, 2, (32,))
dls = DataLoaders(TensorDataLoader(x, y, 8, mean=0.5, std=0.3), TensorDataLoader(x, y, 8, mean=0.5, std=0.3))
learn = TrainLearner(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2)), dls, torch.nn.functional.cross_entropy,
                     lr=0.1, cbs=[MetricsCB()])
learn.fit(1)
print('trained', len(learn.metrics.history))
"""
    res = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert 'warned: miniai.fashion has moved: its names are now in miniai.data.fashion' in res.stdout
    assert 'trained 2' in res.stdout


# -- no callback rewrites another object's methods -----------------------------------------------------------------
def shadowed_methods(obj) -> list[str]:
    "Instance attributes of `obj` that hide a method (or static method) its class defines."
    cls = type(obj)
    return [n for n, v in vars(obj).items() if callable(getattr(cls, n, None)) and not isinstance(v, type)]


class Inspect(Callback):
    "Looks, in the middle of a fit, at every object the other callbacks might have changed."
    order = 1000
    def after_batch(self, learn):
        self.found = {type(o).__name__: shadowed_methods(o) for o in [learn, *learn.cbs]}
        raise CancelFitException()


def test_no_callback_rewrites_another_objects_methods_during_a_fit(tmp_path):
    sched = partial(optim.lr_scheduler.OneCycleLR, max_lr=0.1, total_steps=4)
    cbs = [DeviceCB('cpu'), DDPCB(), MetricsCB(), ProgressCB(), CompileCB(backend='eager'), BatchSchedCB(sched),
           RecorderCB(lr=lambda cb: cb.pg['lr']), WeightAverageCB(), SaveModelCB(tmp_path), CSVLoggerCB(tmp_path / 'm.csv'),
           TimeToAccuracyCB(verbose=False), InterruptCB(tmp_path / 'i.ckpt'), MixedPrecision(torch.bfloat16)]
    look = Inspect()
    Learner(tiny_model(), tiny_dls(), F.cross_entropy, lr=0.1, cbs=cbs).fit(1, cbs=[look])
    assert look.found and all(v == [] for v in look.found.values()), look.found


def test_the_inspection_sees_a_rewritten_method():
    "The check above would fail for what DDPCB, CompileCB and ProgressCB used to do to MetricsCB."
    class Rewrites(Callback):
        def before_fit(self, learn): learn.metrics._log = print
    look = Inspect()
    Learner(tiny_model(), tiny_dls(), F.cross_entropy, lr=0.1, cbs=[TrainCB(), MetricsCB()]).fit(1, cbs=[Rewrites(), look])
    assert look.found['MetricsCB'] == ['_log']


def test_metrics_rows_go_through_the_extension_points_in_order(capsys):
    "`annotate_metrics` changes each row, then it goes to every `show_metrics` (and is not printed as well)."
    shown = []
    class Annotate(Callback):
        def annotate_metrics(self, row): return {**row, 'note': 'seen'}
    class Show(Callback):
        def show_metrics(self, row): shown.append(row)
    Learner(tiny_model(), tiny_dls(), F.cross_entropy, lr=0.1, cbs=[TrainCB(), MetricsCB(), Annotate(), Show()]).fit(1)
    assert [(r['train'], r['note']) for r in shown] == [('train', 'seen'), ('eval', 'seen')]
    assert "'note'" not in capsys.readouterr().out, 'a row that is shown is not printed too'
    Learner(tiny_model(), tiny_dls(), F.cross_entropy, lr=0.1, cbs=[TrainCB(), MetricsCB()]).fit(1)
    assert capsys.readouterr().out.count("'epoch': 0") == 2, 'with nothing to show them, the rows are printed'


# -- callbacks by name -----------------------------------------------------------------------------------------------
def test_a_learner_finds_its_callbacks_by_name():
    class MyMetrics(MetricsCB): pass
    prog, rec, mine, mp = ProgressCB(), RecorderCB(), MyMetrics(), MixedPrecision(torch.bfloat16)
    learn = Learner(tiny_model(), tiny_dls(), F.cross_entropy, cbs=[prog, rec, mine, mp])
    assert (learn.progress, learn.recorder, learn.mixed_precision) == (prog, rec, mp)
    assert learn.my_metrics is mine and learn.metrics is mine, 'a subclass also answers to its base class name'
    assert learn.train is mp, 'MixedPrecision does the steps: it is a TrainCB'
    with pytest.raises(AttributeError, match="'Learner' object has no attribute 'nothing_here'"): learn.nothing_here
    learn.fit(1, cbs=[InterruptCB('/nonexistent/i.ckpt'), Inspect()])
    with pytest.raises(AttributeError): learn.interrupt  # a callback given to fit leaves with the fit


# -- one protocol for saved state ------------------------------------------------------------------------------------
class Counter(Callback):
    "A user's callback with state of its own, which miniai has never heard of."
    def __init__(self): self.batches, self.loaded = 0, None
    def after_batch(self, learn):
        if learn.training: self.batches += 1
    def state_dict(self): return {'batches': self.batches, 'tag': torch.tensor([7, 8])}
    def load_state_dict(self, state): self.loaded, self.batches = state, state['batches']


def test_any_callbacks_state_is_saved_and_handed_back_on_resume(tmp_path):
    counter = Counter()
    learn = Learner(tiny_model(), tiny_dls(), F.cross_entropy, lr=0.1,
                    cbs=[TrainCB(), MetricsCB(), SaveModelCB(tmp_path, every_epoch=True), counter])
    learn.fit(2)
    saved = read_checkpoint(tmp_path / 'last.ckpt')['callbacks']
    assert saved['Counter']['batches'] == 8 and torch.equal(saved['Counter']['tag'], torch.tensor([7, 8]))
    assert set(saved) == {'Counter', 'SaveModelCB'}
    again = Counter()
    Learner(tiny_model(), tiny_dls(), F.cross_entropy, lr=0.1, cbs=[TrainCB(), MetricsCB(), again]).fit(
        3, resume=tmp_path / 'last.ckpt')
    assert again.loaded['batches'] == 8 and again.batches == 8 + 4, 'restored, then counted the last epoch'


def test_a_schedule_the_run_had_and_the_fit_lacks_or_the_other_way_round_is_refused(tmp_path):
    "A schedule cannot go on from nothing, nor be left out part-way: one clear error, before anything is loaded."
    sched = lambda: BatchSchedCB(partial(optim.lr_scheduler.OneCycleLR, max_lr=0.1, total_steps=12))
    for d, cbs in (('a', [sched()]), ('b', [])):
        Learner(tiny_model(), tiny_dls(), F.cross_entropy, lr=0.1,
                cbs=[TrainCB(), MetricsCB(), SaveModelCB(tmp_path / d, every_epoch=True), *cbs]).fit(1)
    with pytest.raises(CheckpointError, match=r'a/last.ckpt and this fit differ in BatchSchedCB, whose state the run '
                                              r'cannot go on without'):
        Learner(tiny_model(), tiny_dls(), F.cross_entropy, cbs=[TrainCB()]).fit(3, resume=tmp_path / 'a' / 'last.ckpt')
    with pytest.raises(CheckpointError, match=r'b/last.ckpt and this fit differ in BatchSchedCB'):
        Learner(tiny_model(), tiny_dls(), F.cross_entropy, cbs=[TrainCB(), sched()]).fit(3, resume=tmp_path / 'b' / 'last.ckpt')


def test_an_average_the_run_had_and_the_fit_lacks_or_the_other_way_round_is_warned_of(tmp_path):
    "A weight average can start afresh, or be dropped: the run goes on, and says it will not be exact."
    for d, cbs in (('a', [WeightAverageCB()]), ('b', [])):
        Learner(tiny_model(), tiny_dls(), F.cross_entropy, lr=0.1,
                cbs=[TrainCB(), MetricsCB(), SaveModelCB(tmp_path / d, every_epoch=True), *cbs]).fit(1)
    with pytest.warns(UserWarning, match=r'holds the state of a WeightAverageCB, which this fit does not have'):
        Learner(tiny_model(), tiny_dls(), F.cross_entropy, cbs=[TrainCB()]).fit(2, resume=tmp_path / 'a' / 'last.ckpt')
    with pytest.warns(UserWarning, match=r"saved by a run without this fit's WeightAverageCB: it starts afresh"):
        Learner(tiny_model(), tiny_dls(), F.cross_entropy, cbs=[TrainCB(), WeightAverageCB()]).fit(
            2, resume=tmp_path / 'b' / 'last.ckpt')


# -- checkpoints written before the move -----------------------------------------------------------------------------
def legacy_learner(d: Path):
    "The run tests/data/legacy/make.py made with the code before the move (its module paths are the old ones)."
    from miniai.callbacks.metrics import MetricsCB as M
    from torcheval.metrics import MulticlassAccuracy
    sched = partial(optim.lr_scheduler.OneCycleLR, max_lr=0.05, total_steps=3 * 4)
    cbs = [M(accuracy=MulticlassAccuracy()), BatchSchedCB(sched), MixedPrecision(torch.float16),
           WeightAverageCB('ema', decay=0.9), SaveModelCB(d, monitor='accuracy', every_epoch=True),
           CSVLoggerCB(d / 'metrics.csv'), TimeToAccuracyCB(0.99, verbose=False)]
    return Learner(tiny_model(), tiny_dls(), F.cross_entropy, lr=0.05, cbs=cbs,
                   opt_func=partial(optim.AdamW, eps=1e-5))


@pytest.fixture
def cpu_loss_scaling(monkeypatch):
    "fp16 scales the loss on the CPU as on CUDA, as when the fixture files were made (see make.py)."
    monkeypatch.setattr(precision, '_needs_loss_scaling', lambda device_type, dtype: dtype == torch.float16)
    monkeypatch.setattr(precision, 'warn_fp16_on_cpu', lambda: None)


def test_this_code_trains_bitwise_as_the_code_before_the_move(cpu_loss_scaling, tmp_path, capsys):
    full = load_file(LEGACY / 'full.safetensors')
    learn = legacy_learner(tmp_path)
    learn.fit(3)
    assert all(torch.equal(v, learn.model.state_dict()[k]) for k, v in full.items())


@pytest.mark.parametrize('name', ['mid.ckpt', 'last.ckpt'])
def test_a_checkpoint_written_before_the_move_resumes_to_the_same_weights(name, cpu_loss_scaling, tmp_path, capsys):
    "Written by the code before the move: schedulers and the loss scaler kept in lists, no callback state by name."
    ck = read_checkpoint(LEGACY / name)
    assert 'scheds' in ck and ck['amp'][0]['scaler']['scale'] == 65536.0, 'the old layout'
    shutil.copy(LEGACY / 'metrics.csv', tmp_path / 'metrics.csv')
    learn = legacy_learner(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # nothing is missing, so nothing is warned of
        learn.fit(3, resume=LEGACY / name)
    full = load_file(LEGACY / 'full.safetensors')
    assert all(torch.equal(v, learn.model.state_dict()[k]) for k, v in full.items())
    assert learn.mixed_precision.scaler.get_scale() == 65536.0
    rows = (tmp_path / 'metrics.csv').read_text().splitlines()
    assert [r.split(',')[2:4] for r in rows[1:]] == [[str(e), s] for e in range(3) for s in ('train', 'eval')]


# -- one mechanism per job -------------------------------------------------------------------------------------------
def test_atomic_writes_leave_the_old_file_on_a_failure_and_nothing_else_behind(tmp_path):
    p = write_atomic(tmp_path / 'a.json', '{"v": 1}')
    with pytest.raises(RuntimeError):
        with atomic_path(p) as tmp:
            tmp.write_text('{"v": 2')  # half written when the crash comes
            raise RuntimeError('crash')
    assert json.loads(p.read_text()) == {'v': 1} and os.listdir(tmp_path) == ['a.json']
    with atomic_path(tmp_path / 'folder') as tmp:  # a folder, made whole or not at all
        tmp.mkdir()
        (tmp / 'x').write_text('x')
    assert (tmp_path / 'folder' / 'x').read_text() == 'x' and sorted(os.listdir(tmp_path)) == ['a.json', 'folder']


def test_one_normaliser_gives_the_loaders_batches_and_undoes_them():
    x = torch.randint(0, 256, (6, 3, 5, 5), dtype=torch.uint8)
    norm = Normalise((0.2, 0.5, 0.7), (0.1, 0.2, 0.3))
    enc = norm.encode(x)
    ref = (x.float() / 255 - torch.tensor([0.2, 0.5, 0.7]).view(3, 1, 1)) / torch.tensor([0.1, 0.2, 0.3]).view(3, 1, 1)
    assert enc.dtype == torch.float32 and torch.allclose(enc, ref, atol=1e-5)
    assert torch.allclose(norm.decode(enc), x.float() / 255, atol=1e-6), 'decode undoes encode'
    assert torch.allclose(norm.encode(x.float() / 255), enc, atol=1e-5), 'floats in [0, 1] normalise alike'
    dl = TensorDataLoader(x, torch.zeros(6), bs=6, mean=(0.2, 0.5, 0.7), std=(0.1, 0.2, 0.3))
    assert torch.equal(next(iter(dl))[0], enc), "the loader's batches are the normaliser's, bit for bit"
    one = Normalise(0.5, 0.25, channels=1, spatial_dims=2).decode(torch.zeros(1, 4, 4))
    assert torch.all(one == 0.5), 'one value for every channel; an image without its batch dimension'


def test_one_walker_reaches_tensors_in_any_container_and_keeps_their_types():
    Pair = namedtuple('Pair', 'a b')
    x = {'img': torch.ones(2, 3), 'rest': [Pair(torch.zeros(1), 'label'), (torch.ones(4),)]}
    y = apply_to_tensors(lambda t: t * 2, x)
    assert isinstance(y['rest'][0], Pair) and y['rest'][0].b == 'label' and isinstance(y['rest'][1], tuple)
    assert torch.equal(y['img'], torch.full((2, 3), 2.)) and [t.shape for t in tensors_in(y)] == [(2, 3), (1,), (4,)]
    assert first_shape(x) == (2, 3) and first_shape(['no tensor']) is None


def test_one_helper_says_where_a_model_is():
    assert model_device(nn.Linear(2, 2).to(torch.float64)) == torch.device('cpu')
    assert model_dtype(nn.Linear(2, 2).to(torch.float64)) == torch.float64
    buffers_only = nn.BatchNorm1d(2, affine=False).to('meta')
    assert model_device(buffers_only) == torch.device('meta') and model_device(nn.ReLU()) == torch.device('cpu')


def test_weights_saved_under_wrapped_names_come_back_under_plain_ones():
    want = {'0.weight', '1.bn.bias'}
    assert set(plain_saved_keys({'module.0.weight': 1, 'module.1.bn.bias': 2}, want)) == want
    assert set(plain_saved_keys({'_orig_mod.0.weight': 1, '1._orig_mod.bn.bias': 2}, want)) == want
    odd = {'module.x': 1}
    assert plain_saved_keys(odd, want) is odd, 'what does not fit is returned as given (and refused by the loader)'


def test_one_rule_says_which_way_is_better():
    assert monitor_mode('valid loss') == 'min' and monitor_mode('accuracy') == 'max'
    assert monitor_mode('accuracy', 'min') == 'min'
    with pytest.raises(ValueError, match="mode must be 'min' or 'max'"): monitor_mode('loss', 'lowest')
    assert improved(0.5, None, 'min') and improved(0.5, 0.6, 'min') and not improved(0.59, 0.6, 'min', min_delta=0.05)
    assert improved(0.7, 0.6, 'max') and not improved(0.6, 0.6, 'max')


def test_one_collector_takes_predictions_with_or_without_the_loss():
    dls = tiny_dls()
    for skip in (False, True):
        cp = CapturePreds(inps=True, skip_loss=skip)
        learn = Learner(tiny_model(), dls, F.cross_entropy, cbs=[TrainCB(), MetricsCB()])
        learn.fit(1, train=False, cbs=[cp])
        assert cp.all_preds.shape == (32, 4) and cp.all_targs.shape == (32,) and cp.all_inps.shape == (32, 1, 8, 8)
        assert (learn.metrics.history == []) == skip, 'without the loss the batch ends before anything measures it'


def test_the_confusion_matrix_is_torchevals_and_counts_each_pair():
    g = torch.Generator().manual_seed(0)
    targs, probs = torch.randint(0, 5, (200,), generator=g), torch.rand(200, 5, generator=g)
    interp = ClassificationInterpretation(probs, targs, None, torch.zeros(200), classes=list('abcde'))
    cm = interp.confusion_matrix()
    expect = torch.zeros(5, 5, dtype=torch.int64)
    for t, p in zip(targs.tolist(), probs.argmax(1).tolist()): expect[t, p] += 1
    assert torch.equal(cm, expect)
