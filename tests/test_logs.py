"""Scripts and logs: progress lines at a steady pace when output is not a terminal (reading the loss once a line, never
once a batch), plots that cannot show are saved or announced once, and importing the library prints no warning."""
import re
import subprocess
import sys
from pathlib import Path

import matplotlib
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import miniai.core.checks as checks
import miniai.core.messages as messages
from miniai.datasets import DataLoaders
from miniai.data.loader import TensorDataLoader
from miniai.learner import MetricsCB, ProgressCB, TrainLearner

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(r'^epoch (\d) (train|eval): (\d+)/(\d+) batches, loss \d+\.\d{4}, [\d.]+ batches/s, \d+:\d\d left$')


def learner(n_batches=4, cbs=()):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8 * n_batches, 5, generator=g), torch.randint(0, 2, (8 * n_batches,), generator=g)
    dls = DataLoaders(TensorDataLoader(x, y, 8), TensorDataLoader(x[:16], y[:16], 8))
    return TrainLearner(nn.Linear(5, 2), dls, F.cross_entropy, lr=0.1, cbs=[MetricsCB(), *cbs])


@pytest.fixture(autouse=True)
def fresh_once_registry(monkeypatch): monkeypatch.setattr(messages, '_warned', set())


def progress_lines(out: str) -> list:
    return [LINE.match(l).groups() for l in out.splitlines() if l.startswith('epoch ')]


def test_a_log_gets_progress_lines_with_batches_loss_rate_and_time_left(capsys):
    learner(cbs=[ProgressCB(refresh=0, log_every=0)]).fit(1)
    out = capsys.readouterr().out
    lines = progress_lines(out)
    assert [(e, s, int(d), int(n)) for e, s, d, n in lines] == (
        [('0', 'train', i, 4) for i in range(1, 5)] + [('0', 'eval', i, 2) for i in range(1, 3)])
    table = [l.split() for l in out.splitlines() if not l.startswith('epoch ')]
    assert [r[1:3] for r in table] == [['epoch', 'train'], ['0', 'train'], ['0', 'eval']], 'and the table as before'
    learner(cbs=[ProgressCB()]).fit(1)  # a fast epoch: under `log_every` (10 s), no line
    assert progress_lines(capsys.readouterr().out) == []


def test_the_loss_is_read_once_a_line_and_never_once_a_batch(monkeypatch, capsys):
    reads = []
    item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, 'item', lambda self: reads.append(1) or item(self))
    def count(n_batches, **kw):
        reads.clear()
        learner(n_batches, [ProgressCB(refresh=0, **kw)]).fit(1)
        return len(reads), len(progress_lines(capsys.readouterr().out))
    quiet4, quiet8 = count(4), count(8)
    assert quiet4[0] == quiet8[0] and quiet4[1] == quiet8[1] == 0, 'no read that grows with the batches'
    reads_with_lines, n_lines = count(8, log_every=0)
    assert n_lines == 10 and reads_with_lines - quiet8[0] == n_lines


def test_a_live_plot_outside_jupyter_is_announced_once_or_saved(tmp_path, capsys):
    with pytest.warns(UserWarning, match=r"^ProgressCB\(plot=True\): the live loss plot needs Jupyter; here the losses "
                                         r"are kept in .losses and .val_losses. Pass ProgressCB\(plot='loss.png'\)"):
        learner(cbs=[ProgressCB(plot=True)]).fit(1)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        learner(cbs=[ProgressCB(plot=True)]).fit(1)  # once a process
        prog = ProgressCB(plot=tmp_path / 'plots' / 'loss.png')
        learner(cbs=[prog]).fit(2)
    assert (tmp_path / 'plots' / 'loss.png').stat().st_size > 1000 and len(prog.losses) == 8


def test_lr_find_saves_its_plot_or_says_once_that_it_cannot_show(tmp_path):
    matplotlib.use('Agg')  # a script's backend where there is no display
    learn = learner(8)
    learn.lr_find(plot=tmp_path / 'lr.png', max_epochs=2)
    assert (tmp_path / 'lr.png').stat().st_size > 1000
    with pytest.warns(UserWarning, match=r"^lr_find: nothing can show the plot here \(not Jupyter; matplotlib backend "
                                         r"'[Aa]gg'\): pass lr_find\(plot='lr_find.png'\) to save it"):
        learn.lr_find(max_epochs=2)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        learn.lr_find(max_epochs=2)
        learn.lr_find(max_epochs=2, plot=False)


def test_importing_the_library_and_the_quick_starts_metric_prints_no_warning():
    code = 'import miniai\nfrom miniai.learner import *\nfrom torcheval.metrics import MulticlassAccuracy\nprint("ok")'
    r = subprocess.run([sys.executable, '-W', 'default', '-c', code], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == 'ok' and r.stderr == '', r.stderr
