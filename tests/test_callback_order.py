"""A stop never costs a finished epoch its checkpoint, whatever the order of the callback that stops; the table of
built-in callbacks (docs/callbacks.md) says each one's real `order` and every event it handles; history is kept across
fits."""
import csv
import importlib
import pkgutil
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import miniai
from miniai.core.events import EVENTS, STEPS, Callback, CancelFitException
from miniai.runs.checkpoint import SaveModelCB
from miniai.runs.ckptfile import read_checkpoint
from miniai.datasets import DataLoaders
from miniai.data.loader import TensorDataLoader
from miniai.learner import MetricsCB, ProgressCB, TrainLearner
from miniai.callbacks.loggers import CSVLoggerCB

TABLE = Path(__file__).resolve().parents[1] / 'docs' / 'callbacks.md'  # the callback table, once in the README


def learner(cbs=()):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 6, generator=g), torch.randint(0, 3, (48,), generator=g)
    dls = DataLoaders(TensorDataLoader(x[:32], y[:32], 8, shuffle=True, seed=0), TensorDataLoader(x[32:], y[32:], 8))
    torch.manual_seed(0)
    return TrainLearner(nn.Linear(6, 3), dls, F.cross_entropy, lr=0.1, cbs=[MetricsCB(), *cbs])


class StopAfterEpoch(Callback):
    "A user's stop: ends the fit in after_epoch once `epoch` is done, at the default order (before SaveModelCB's 20)."
    def __init__(self, epoch: int, order: int = 0): self.epoch, self.order = epoch, order
    def after_epoch(self, learn):
        if not learn.training and learn.epoch == self.epoch: raise CancelFitException()


@pytest.mark.parametrize('order', [0, -100, 20, 100])
def test_a_stop_in_after_epoch_keeps_that_epochs_checkpoint_and_log_row(order, tmp_path):
    learn = learner([SaveModelCB(tmp_path, every_epoch=True), CSVLoggerCB(tmp_path / 'm.csv')])
    learn.fit(4, cbs=[StopAfterEpoch(1, order)])
    assert read_checkpoint(tmp_path / 'last.ckpt')['epoch'] == 1, 'the finished epoch 1 was saved'
    rows = list(csv.DictReader(open(tmp_path / 'm.csv')))
    assert [(r['epoch'], r['train']) for r in rows] == [('0', 'train'), ('0', 'eval'), ('1', 'train'), ('1', 'eval')]
    # and the run goes on from there
    resumed = learner([SaveModelCB(tmp_path, every_epoch=True)])
    resumed.fit(4, resume=tmp_path / 'last.ckpt')
    assert [r['epoch'] for r in resumed.metrics.history] == [2, 2, 3, 3]


def test_an_error_in_after_epoch_is_not_held_back():
    ran = []
    class Boom(Callback):
        def after_epoch(self, learn): raise ValueError('boom')
    class Later(Callback):
        order = 50
        def after_epoch(self, learn): ran.append(learn.epoch)
    with pytest.raises(ValueError, match='boom'): learner([Boom(), Later()]).fit(2)
    assert ran == [], 'only a stop waits for the other callbacks; an error goes on at once'


def test_history_is_kept_across_fits_with_the_fit_it_came_from(capsys, tmp_path):
    learn = learner([ProgressCB(), CSVLoggerCB(tmp_path / 'm.csv')])
    learn.fit(2)
    learn.fit(1)
    h = learn.metrics.history
    assert [(r['fit'], r['epoch'], r['train']) for r in h] == [
        (0, 0, 'train'), (0, 0, 'eval'), (0, 1, 'train'), (0, 1, 'eval'), (1, 0, 'train'), (1, 0, 'eval')]
    assert learn.metrics.rows() == h[4:] and learn.metrics.rows(0) == h[:4]
    table = [l.split() for l in capsys.readouterr().out.splitlines() if l.split() and l.split()[0][0].isdigit()]
    assert [row[1] for row in table] == ['0', '0', '1', '1', '0', '0'], 'the printed table numbers each fit from 0'
    assert next(csv.reader(open(tmp_path / 'm.csv'))) == ['loss', 'epoch', 'train', 'time'], 'CSV columns unchanged'


# -- the table of built-in callbacks (docs/callbacks.md) --------------------------------------------------------------
def shipped_callbacks() -> dict[str, type]:
    for m in pkgutil.walk_packages(miniai.__path__, 'miniai.'):
        if not m.name.endswith('__main__'): importlib.import_module(m.name)
    found, todo = {}, [Callback]
    while todo:
        for c in todo.pop().__subclasses__():
            if c.__module__.startswith('miniai.') and not c.__name__.startswith('_'): found[c.__name__] = c
            todo.append(c)
    return found


#: what callbacks offer to other parts of miniai besides events (see `Callback`'s docstring)
EXTENSIONS = ('state_dict', 'unscale_grads', 'metrics_reducer', 'annotate_metrics', 'show_metrics', 'checkpoint_paths')


def readme_table() -> dict[str, tuple[int, set]]:
    "Each row of the callback table (docs/callbacks.md): name -> (order, the events and extension points it names)."
    lines = TABLE.read_text().split('### Built-in callbacks', 1)[1].splitlines()
    first = next(i for i, l in enumerate(lines) if l.startswith('| callback |'))
    rows = {}
    for line in lines[first + 2:]:
        if not line.startswith('|'): break
        name, order, what = [c.strip() for c in line.strip('|').split('|')]
        events = set(re.findall(r'`(\w+)`', what)) & set(EVENTS + STEPS + EXTENSIONS)
        rows[re.match(r'`(\w+)`', name).group(1)] = (int(order), events)
    return rows


def test_the_readme_table_lists_every_callback_with_its_real_order_and_events():
    rows, shipped = readme_table(), shipped_callbacks()
    assert set(rows) == set(shipped), f'missing: {set(shipped) - set(rows)}, not shipped: {set(rows) - set(shipped)}'
    for name, (order, events) in rows.items():
        cls = shipped[name]
        assert order == cls.order, f'{name}: docs/callbacks.md says order {order}, the class has {cls.order}'
        handled = {e for e in EVENTS + STEPS + EXTENSIONS if callable(getattr(cls, e, None))}
        assert events == handled, \
            f'{name}: docs/callbacks.md names {sorted(events)}, the class handles {sorted(handled)}'
    orders = [o for o, _ in rows.values()]
    assert orders == sorted(orders), 'the table runs in the order the loop calls them'
