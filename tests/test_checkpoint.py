"""Checkpoints: exact resume after SIGKILL, safe loading of bad files, atomic writes, SaveModelCB."""
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn, optim

from miniai.core.state import CheckpointError
from miniai.runs.checkpoint import SaveModelCB, save_checkpoint
from miniai.runs.ckptfile import read_checkpoint
from miniai.datasets import DataLoaders
from miniai.data.fashion import find_fashion_mnist, fashion_dls
from miniai.learner import MetricsCB, TrainLearner
from miniai.sgd import BatchSchedCB

JOB = Path(__file__).parent / 'resume_job.py'
needs_data = pytest.mark.skipif(find_fashion_mnist() is None, reason='Fashion-MNIST is not installed')


def run_job(*args):
    return subprocess.run([sys.executable, str(JOB), *map(str, args)], capture_output=True, text=True, timeout=300)


@needs_data
def test_run_killed_and_resumed_ends_bitwise_identical(tmp_path):
    full, crashed = tmp_path / 'full', tmp_path / 'crashed'
    r = run_job(full, 4)
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_job(crashed, 4, '--kill-after', 1)
    assert r.returncode == -9, (r.returncode, r.stderr[-2000:])
    assert 'killing myself after epoch 1' in r.stdout and not (crashed / 'final.safetensors').exists()
    assert read_checkpoint(crashed / 'last.ckpt')['epoch'] == 1
    r = run_job(crashed, 4, '--resume', crashed / 'last.ckpt')
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = load_file(full / 'final.safetensors'), load_file(crashed / 'final.safetensors')
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), 'resumed weights differ from the uninterrupted run'
    print('\nresume equality: all', len(a), 'tensors bitwise equal after SIGKILL at epoch 1 and resume')


def small_learner(n_out=3, seed=0):
    torch.manual_seed(seed)
    x, y = torch.randn(64, 5), torch.randint(0, n_out, (64,))
    dl = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, n_out))
    return TrainLearner(model, DataLoaders(dl, dl), F.cross_entropy, lr=0.1, opt_func=optim.AdamW,
                        cbs=[MetricsCB()])


def test_save_and_load_round_trip(tmp_path, capsys):
    learn = small_learner()
    learn.fit(1)
    path = learn.save(tmp_path / 'a.ckpt')
    ck = read_checkpoint(path)
    assert all(torch.equal(ck['model'][k], v) for k, v in learn.model.state_dict().items())
    assert ck['epoch'] == 0 and ck['opt']['state'][0]['exp_avg'].shape == (8, 5)
    other = small_learner(seed=1)
    other.fit(1)
    other.load(path)
    assert all(torch.equal(learn.model.state_dict()[k], v) for k, v in other.model.state_dict().items())
    assert torch.equal(other.opt.state_dict()['state'][0]['exp_avg'], learn.opt.state_dict()['state'][0]['exp_avg'])


def test_wrong_architecture_lists_keys_and_shapes(tmp_path):
    learn = small_learner(n_out=3)
    learn.save(tmp_path / 'a.ckpt')
    other = small_learner(n_out=4)
    before = {k: v.clone() for k, v in other.model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r'another model: different shapes: 3.weight: checkpoint \(3, 8\) vs '
                                              r'model \(4, 8\)'):
        other.load(tmp_path / 'a.ckpt')
    assert all(torch.equal(before[k], v) for k, v in other.model.state_dict().items()), 'half-loaded'
    deeper = small_learner()
    deeper.model.append(nn.Linear(3, 3))
    with pytest.raises(CheckpointError, match=r"missing keys \['4.bias', '4.weight'\]"):
        deeper.load(tmp_path / 'a.ckpt')


BAD_FILES = {}


def test_truncated_file(tmp_path):
    learn = small_learner()
    p = learn.save(tmp_path / 'a.ckpt')
    p.write_bytes(p.read_bytes()[:-50])
    with pytest.raises(CheckpointError, match='not a readable miniai checkpoint') as e:
        learn.load(p)
    BAD_FILES['truncated'] = str(e.value)


def test_tampered_header(tmp_path):
    learn = small_learner()
    p = learn.save(tmp_path / 'a.ckpt')
    data = bytearray(p.read_bytes())
    i = data.index(b'__tensor__')
    data[i:i + 10] = b'__tensoR__'
    p.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as e:
        learn.load(p)
    BAD_FILES['tampered header'] = str(e.value)


def test_tampered_format_tag(tmp_path):
    learn = small_learner()
    p = learn.save(tmp_path / 'a.ckpt')
    data = p.read_bytes().replace(b'miniai-checkpoint-1', b'miniai-checkpoint-9')
    p.write_bytes(data)
    with pytest.raises(CheckpointError, match="format is 'miniai-checkpoint-9'") as e:
        learn.load(p)
    BAD_FILES['other format version'] = str(e.value)


class _Exploit:
    def __init__(self, marker): self.marker = marker
    def __reduce__(self): return (os.system, (f'touch {self.marker}',))


def test_crafted_pickle_never_runs(tmp_path):
    marker = tmp_path / 'pwned'
    p = tmp_path / 'evil.ckpt'
    p.write_bytes(pickle.dumps(_Exploit(marker)))
    torch.save({'model': _Exploit(marker)}, tmp_path / 'evil.pt')
    learn = small_learner()
    for f in (p, tmp_path / 'evil.pt'):
        with pytest.raises(CheckpointError, match='pickles are never loaded') as e:
            learn.load(f)
        BAD_FILES[f'crafted pickle ({f.suffix})'] = str(e.value)
    assert not marker.exists(), 'loading ran code from the file'


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match='no checkpoint at'):
        small_learner().load(tmp_path / 'nope.ckpt')


def test_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import miniai.runs.ckptfile as ck
    learn = small_learner()
    learn.fit(1)
    p = learn.save(tmp_path / 'last.ckpt')
    good = p.read_bytes()
    def half_write(tensors, filename, metadata=None):
        Path(filename).write_bytes(b'partial')
        raise OSError('disk full')
    monkeypatch.setattr(ck, 'save_file', half_write)
    learn.fit(1)
    with pytest.raises(OSError, match='disk full'):
        learn.save(p)
    assert p.read_bytes() == good and read_checkpoint(p)['epoch'] == 0
    assert [f.name for f in tmp_path.iterdir()] == ['last.ckpt'], 'no temporary file left behind'


def test_save_model_cb_keeps_best_and_last(tmp_path):
    learn = small_learner()
    cb = SaveModelCB(tmp_path, monitor='valid loss', every_epoch=True)
    learn.fit(3, cbs=[cb])
    best = read_checkpoint(tmp_path / 'best.ckpt')
    losses = [r['loss'] for r in learn.metrics.history if r['train'] == 'eval']
    assert best['best']['value'] == min(losses) and best['epoch'] == losses.index(min(losses))
    assert read_checkpoint(tmp_path / 'last.ckpt')['epoch'] == 2
    assert SaveModelCB(tmp_path, monitor='accuracy').mode == 'max'
    with pytest.raises(ValueError, match="no metric 'accuracy'"):
        learn.fit(1, cbs=[SaveModelCB(tmp_path / 'x', monitor='accuracy')])


def test_report_bad_files():
    "Not a check: prints the errors the bad files got, for the record."
    for k, v in BAD_FILES.items(): print(f'{k}: {v}')


def test_tensor_loader_repeats_the_epoch_under_way():
    "The state taken part-way through an epoch can give that epoch again, in the same order, then the same next ones."
    from miniai.data.loader import TensorDataLoader
    x = torch.arange(40.)
    dl = TensorDataLoader(x, x, bs=8, shuffle=True, seed=0)
    next(iter(dl))
    it = iter(dl)
    first = [b[0] for b in [next(it), next(it)]]  # stopped after two batches of epoch 1
    sd = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in dl.state_dict().items()}
    rest = [b[0] for b in it] + [b[0] for b in dl]  # the rest of epoch 1, then epoch 2
    again = TensorDataLoader(x, x, bs=8, shuffle=True, seed=0)
    again.load_state_dict(sd, repeat_epoch=True)
    assert again.epochs_drawn == 1
    replay = [b[0] for b in again] + [b[0] for b in again]
    assert all(torch.equal(a, b) for a, b in zip(replay, first + rest)) and len(replay) == len(first + rest)
    plain = TensorDataLoader(x, x, bs=8, shuffle=True, seed=0)
    plain.load_state_dict(sd)  # without repeat_epoch: the next epoch is epoch 2
    assert all(torch.equal(a[0], b) for a, b in zip(plain, rest[3:]))
    with pytest.raises(ValueError, match='no epoch under way'):
        TensorDataLoader(x, x, bs=8, shuffle=True, seed=0).load_state_dict(
            TensorDataLoader(x, x, bs=8, shuffle=True, seed=0).state_dict(), repeat_epoch=True)


def _tiny_learner(*cbs):
    torch.manual_seed(0)
    x, y = torch.randn(64, 4), torch.randint(0, 2, (64,))
    from miniai.data.loader import TensorDataLoader
    dls = DataLoaders(TensorDataLoader(x[:48], y[:48], 16, shuffle=True, seed=0), TensorDataLoader(x[48:], y[48:], 16))
    return TrainLearner(nn.Linear(4, 2), dls, F.cross_entropy, 0.1, cbs=[MetricsCB(), *cbs], opt_func=optim.SGD)


def test_resumed_run_keeps_the_best_value_so_far(tmp_path):
    "Before, the first epoch after a resume always overwrote best.ckpt, however bad: the best value was forgotten."
    from miniai.core.events import Callback, CancelFitException
    class StopAfter(Callback):
        order = 95
        def after_epoch(self, learn):
            if not learn.training and learn.epoch == 1: raise CancelFitException()
    saver = SaveModelCB(tmp_path, every_epoch=True)
    _tiny_learner(saver).fit(4, cbs=[StopAfter()])
    best = saver.best
    saved = read_checkpoint(tmp_path / 'last.ckpt')['callbacks']['SaveModelCB']
    assert saved == {'monitor': 'valid loss', 'best': best}
    seen = []
    class Look(Callback):
        def before_epoch(self, learn): seen.append(fresh.best)
    fresh = SaveModelCB(tmp_path, every_epoch=True)
    _tiny_learner(fresh, Look()).fit(4, resume=tmp_path / 'last.ckpt')
    assert seen[0] == best, 'the resumed fit must start from the best value before the stop'


def test_resuming_a_finished_run_says_it_is_finished(tmp_path):
    _tiny_learner(SaveModelCB(tmp_path, every_epoch=True)).fit(2)
    with pytest.raises(CheckpointError, match=r'saved after epoch 2 of a 2-epoch fit: that run is complete'):
        _tiny_learner().fit(2, resume=tmp_path / 'last.ckpt')


def test_fused_adamw_with_channels_last_resumes_exactly(tmp_path):
    "Loaded optimizer state is contiguous; with NHWC weights a fused AdamW paired the wrong elements until matched."
    from miniai.accel import ChannelsLastCB
    from miniai.core.events import Callback, CancelFitException
    from miniai.data.loader import TensorDataLoader
    from functools import partial
    def conv_learner(*cbs):
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(64, 3, 8, 8, generator=g), torch.randint(0, 2, (64,), generator=g)
        dls = DataLoaders(TensorDataLoader(x[:48], y[:48], 16, shuffle=True, seed=0),
                          TensorDataLoader(x[48:], y[48:], 16))
        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
        return TrainLearner(model, dls, F.cross_entropy, 0.05, opt_func=partial(optim.AdamW, fused=True),
                            cbs=[MetricsCB(), ChannelsLastCB(), *cbs])
    class StopAfterFirst(Callback):
        order = 95
        def after_epoch(self, learn):
            if not learn.training: raise CancelFitException()
    whole = conv_learner()
    whole.fit(3)
    conv_learner(SaveModelCB(tmp_path, every_epoch=True)).fit(3, cbs=[StopAfterFirst()])
    resumed = conv_learner()
    resumed.fit(3, resume=tmp_path / 'last.ckpt')
    w = resumed.model[0].weight
    assert all(v.stride() == w.stride() for v in resumed.opt.state[w].values() if v.shape == w.shape)
    for a, b in zip(whole.model.state_dict().values(), resumed.model.state_dict().values()): assert torch.equal(a, b)
