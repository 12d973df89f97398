"""WeightAverageCB (EMA/SWA of the weights) and TimeToAccuracyCB: the average is the one defined, validation runs on
it, training is untouched by it, checkpoints resume both exactly, and the clock reports the first epoch at target."""
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn, optim

from miniai.callbacks.averaging import WeightAverageCB
from miniai.core.events import Callback, CancelFitException
from miniai.runs.checkpoint import SaveModelCB, save_mid_epoch
from miniai.runs.ckptfile import read_checkpoint
from miniai.datasets import DataLoaders
from miniai.data.fashion import find_fashion_mnist
from miniai.data.loader import TensorDataLoader
from miniai.learner import MetricsCB, TrainLearner
from miniai.callbacks.loggers import TimeToAccuracyCB

needs_data = pytest.mark.skipif(find_fashion_mnist() is None, reason='Fashion-MNIST is not installed')


def dls(n_train=64, n_valid=32, bs=16):
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (n_train + n_valid,), generator=g)
    x = torch.randn(n_train + n_valid, 1, 8, 8, generator=g) + 2 * (y.float() - 0.5).view(-1, 1, 1, 1)  # learnable
    return DataLoaders(TensorDataLoader(x[:n_train], y[:n_train], bs, shuffle=True, seed=0),
                       TensorDataLoader(x[n_train:], y[n_train:], bs))


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 2))


def learner(*cbs, lr=0.1):
    from torcheval.metrics import MulticlassAccuracy
    return TrainLearner(model(), dls(), F.cross_entropy, lr, cbs=[MetricsCB(accuracy=MulticlassAccuracy()), *cbs],
                        opt_func=optim.SGD)


def floats(m: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in m.state_dict().items() if v.is_floating_point()}


class Record(Callback):
    "The model's float tensors after every optimizer step, and the validation epochs' weights."
    order = 30  # after WeightAverageCB (25) has swapped the average in for validation
    def __init__(self): self.steps, self.valid = [], []
    def after_step(self, learn): self.steps.append(floats(learn.model))
    def before_epoch(self, learn):
        if not learn.training: self.valid.append(floats(learn.model))


def test_ema_is_the_warmed_up_exponential_average_of_the_steps():
    rec, avg = Record(), WeightAverageCB('ema', decay=0.9, keep=False)
    learn = learner(rec, avg)
    learn.fit(2)
    first = floats(model())
    expect = dict(first)
    for n, w in enumerate(rec.steps):  # the weights entering step n's update are those after step n
        d = min(0.9, (1 + n) / (10 + n))
        expect = {k: d * expect[k] + (1 - d) * w[k] for k in expect}
    assert avg.n == len(rec.steps) == 2 * len(learn.dls.train)
    for k, a in zip(avg._keys, avg.avg): torch.testing.assert_close(a, expect[k])
    # keep=False: the model ends on the training weights, not the average
    for k, v in floats(learn.model).items(): assert torch.equal(v, rec.steps[-1][k])


def test_swa_averages_every_step_equally_from_start_on():
    rec, avg = Record(), WeightAverageCB('swa', start=0.5, keep=True)
    learn = learner(rec, avg)
    learn.fit(2)
    tail = rec.steps[len(rec.steps) // 2:]  # start=0.5 of 8 steps: the average of steps 4..7, 4 weights equally
    for k, a in zip(avg._keys, avg.avg):
        torch.testing.assert_close(a, torch.stack([w[k] for w in tail]).mean(0))
        torch.testing.assert_close(learn.model.state_dict()[k], a)  # keep=True: the model ends on the average


def test_validation_runs_on_the_average_and_training_is_untouched():
    plain = learner()
    plain.fit(3)
    rec, avg = Record(), WeightAverageCB('ema', decay=0.9, keep=True)
    learn = learner(rec, avg)
    learn.fit(3)
    # every validation epoch saw the average at that point; the next training step started from the real weights
    assert len(rec.valid) == 3 and not torch.equal(rec.valid[-1]['5.weight'], rec.steps[-1]['5.weight'])
    for k, v in floats(plain.model).items(): assert torch.equal(v, rec.steps[-1][k]), k  # same training as without
    # the reported validation accuracy is the averaged model's (keep=True put it in the model at the end)
    learn.model.eval()
    with torch.no_grad():
        x, y = learn.dls.valid.x, learn.dls.valid.y
        acc = (learn.model(x).argmax(1) == y).float().mean().item()
    assert learn.metrics.history[-1]['accuracy'] == pytest.approx(acc, abs=1e-6)


def test_an_error_during_validation_puts_the_training_weights_back():
    class Boom(Exception): pass
    class FailInValid(Callback):
        def after_batch(self, learn):
            if not learn.training: raise Boom()
    rec, avg = Record(), WeightAverageCB('ema', decay=0.9, keep=False)
    learn = learner(rec, avg)
    with pytest.raises(Boom): learn.fit(1, cbs=[FailInValid()])
    for k, v in floats(learn.model).items(): assert torch.equal(v, rec.steps[-1][k]), k


class StopAt(Callback):
    "Stop the fit: after epoch `epoch`'s validation, or part-way through it after saving mid-epoch to `path`."
    order = 95
    def __init__(self, epoch, path=None): self.epoch, self.path = epoch, path
    def after_batch(self, learn):
        if self.path is not None and not learn.training and learn.epoch == self.epoch:
            save_mid_epoch(learn, self.path)
            raise CancelFitException()
    def after_epoch(self, learn):
        if self.path is None and not learn.training and learn.epoch == self.epoch: raise CancelFitException()


@pytest.mark.parametrize('where', ['end of epoch', 'during validation'])
def test_resume_continues_the_average_and_the_clock_exactly(tmp_path, where):
    full_avg, full_clock = WeightAverageCB('ema', decay=0.9), TimeToAccuracyCB(0.5, verbose=False)
    full = learner(full_avg, full_clock)
    full.fit(3)
    avg, clock = WeightAverageCB('ema', decay=0.9), TimeToAccuracyCB(0.5, verbose=False)
    learn = learner(avg, clock, SaveModelCB(tmp_path, every_epoch=True))
    mid = tmp_path / 'mid.ckpt'
    learn.fit(3, cbs=[StopAt(1, mid if where == 'during validation' else None)])
    ck = mid if where == 'during validation' else tmp_path / 'last.ckpt'
    saved = read_checkpoint(ck)['callbacks']
    assert set(saved) == {'WeightAverageCB', 'TimeToAccuracyCB', 'SaveModelCB'}
    # saved at or during validation: the file's model is the evaluated average, the training weights ride along
    model_saved = read_checkpoint(ck)['model']
    assert saved['WeightAverageCB']['training'] is not None
    assert all(torch.equal(model_saved[k], a) for k, a in saved['WeightAverageCB']['avg'].items())
    again = learner(WeightAverageCB('ema', decay=0.9), TimeToAccuracyCB(0.5, verbose=False))
    again.fit(3, resume=ck)
    a2 = next(cb for cb in again.cbs if isinstance(cb, WeightAverageCB))
    c2 = next(cb for cb in again.cbs if isinstance(cb, TimeToAccuracyCB))
    assert a2.n == full_avg.n
    for x, y in zip(a2.avg, full_avg.avg): assert torch.equal(x, y)
    for k, v in floats(again.model).items(): assert torch.equal(v, floats(full.model)[k]), k
    assert [r['accuracy'] for r in c2.curve] == [r['accuracy'] for r in full_clock.curve]
    assert [r['epoch'] for r in c2.curve] == [0, 1, 2]
    assert c2.curve[:2 if where == 'end of epoch' else 1] == clock.curve[:2 if where == 'end of epoch' else 1]
    assert all(a['seconds'] <= b['seconds'] for a, b in zip(c2.curve, c2.curve[1:])), 'the clock went on, not anew'


def test_a_saved_average_without_its_callback_is_named_in_a_warning(tmp_path):
    learner(WeightAverageCB(), SaveModelCB(tmp_path, every_epoch=True)).fit(1)
    with pytest.warns(UserWarning, match='holds the state of a WeightAverageCB, which this fit does not have') as got:
        learner().fit(2, resume=tmp_path / 'last.ckpt')
    assert not [w for w in got if 'SaveModelCB' in str(w.message)], 'only state the training goes on from is warned of'


def test_time_to_accuracy_reports_the_first_epoch_at_target(capsys):
    clock = TimeToAccuracyCB(target=0.75)
    learn = learner(clock)
    learn.fit(4)
    accs = [r['accuracy'] for r in learn.metrics.history if r['train'] == 'eval']
    assert [r['accuracy'] for r in clock.curve] == pytest.approx(accs)
    first = next(i for i, a in enumerate(accs) if a >= 0.75)  # the data is learnable: it gets there
    assert clock.reached == clock.curve[first]
    assert (f'Reached accuracy 75.00% in epoch {first} (numbered as in the table; {first + 1} epoch(s) of training): '
            in capsys.readouterr().out), 'the table numbers epochs from 0'
    assert all(0 < a['seconds'] <= b['seconds'] for a, b in zip(clock.curve, clock.curve[1:]))
    never = TimeToAccuracyCB(target=1.0 + 1e-9, verbose=False)
    learner(never).fit(2)
    assert never.reached is None and len(never.curve) == 2


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="mode must be 'ema' or 'swa', got 'sma'"): WeightAverageCB('sma')
    with pytest.raises(ValueError, match=r'decay must be in \(0, 1\), got 1.5'): WeightAverageCB(decay=1.5)
    with pytest.raises(ValueError, match=r'start must be in \[0, 1\), got 1'): WeightAverageCB('swa', start=1)


@needs_data
def test_the_main_job_reports_time_to_target_with_ema_on_fashion_mnist(tmp_path):
    out = tmp_path / 'run'
    r = subprocess.run([sys.executable, '-m', 'miniai', 'train', '--epochs', '2', '--bs', '64', '--n-train', '1024',
                        '--n-valid', '512', '--model', 'resnet9_small', '--average', 'ema', '--ema-decay', '0.9',
                        '--target', '0.5', '--no-summary', '--no-tta', '--threads', '1', '--out', str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / 'result.json').read_text())
    assert res['average'] == 'ema' and res['target'] == 0.5 and len(res['curve']) == 2
    assert res['curve'][-1]['accuracy'] == pytest.approx(res['accuracy'])
    assert res['time_to_target'] is not None, res['curve']  # 1024 images of Fashion-MNIST get past 50% in 2 epochs
    said = (f"Time to 50.0% test accuracy: {res['time_to_target']:.1f} s (in epoch {res['epoch_reached']} as numbered "
            f"in the table; {res['epochs_to_target']} epoch(s) of training)")
    assert res['epoch_reached'] == res['epochs_to_target'] - 1 == res['curve'].index(next(
        c for c in res['curve'] if c['accuracy'] >= 0.5))
    assert said in r.stdout
    final = read_checkpoint(out / 'final.ckpt')
    assert 'WeightAverageCB' in final['callbacks']


def test_a_probe_after_the_fit_leaves_the_average_alone():
    avg = WeightAverageCB('ema', decay=0.9)
    learn = learner(avg)
    learn.fit(2)
    n, kept = avg.n, [a.clone() for a in avg.avg]
    learn.lr_find(max_mult=3, plot=False)
    assert avg.n == n and all(torch.equal(a, b) for a, b in zip(avg.avg, kept))
