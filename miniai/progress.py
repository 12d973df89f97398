"""Watching a fit: `MetricsCB` (metrics computed on the model's device, read once per epoch) and `ProgressCB`."""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from copy import copy

import fastcore.all as fc
import torch
import warnings

from .callback import Callback
from .ranks import is_main_process

__all__ = ['MetricsCB', 'ProgressCB', 'format_time', 'quiet_torcheval']


@contextmanager
def quiet_torcheval():
    "Inside, importing torcheval does not print the FutureWarning about `torch.jit.script` that it raises (not ours)."
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='`torch.jit.script` is deprecated', category=FutureWarning)
        yield


def _mean_metric():
    """A fresh torcheval `Mean`, imported here rather than at the top: any `torcheval.metrics` import runs that
    package's `__init__`, which imports torchvision's models for its FID metric (about 1.3 s), so `import
    miniai.learner` would pay that even where no metric is tracked."""
    with quiet_torcheval(): from torcheval.metrics.aggregation.mean import Mean
    return Mean()


def format_time(t: float) -> str:
    "Seconds as m:ss (or h:mm:ss)."
    t = int(round(t))
    h, m, s = t // 3600, t // 60 % 60, t % 60
    return f'{h}:{m:02d}:{s:02d}' if h else f'{m}:{s:02d}'


class MetricsCB(Callback):
    """Track torcheval metrics and the mean loss over each epoch; log a row per epoch (train and eval).

    Metric state stays on the device of the model's output and is read once per epoch, so the per-batch path
    never waits for the device. Batches are handed to the metrics `flush_every` at a time (concatenated), which
    gives the same result as one update per batch at a fraction of the cost. Every epoch's values are kept, as
    numbers, in `history`."""
    skip_in_probes = True
    def __init__(self, *ms, flush_every: int = 32, **metrics):
        for o in ms: metrics[type(o).__name__] = o
        self.metrics, self.flush_every = metrics, flush_every
        self.all_metrics = copy(metrics)
        self.all_metrics['loss'] = self.loss = _mean_metric()
        self.history, self._device = [], None

    def _log(self, d: dict) -> None:
        if is_main_process(): print(d)

    #: how a metric's value is read at the end of an epoch; `DDPCB` swaps in one that merges all ranks' states
    compute = staticmethod(lambda m: m.compute())
    #: whether the epoch measured any batch, given this process's loss weight; `DDPCB` swaps in one that asks every
    #: rank, so that all of them enter the merging `compute` or none does (one returning early would hang the others)
    measured = staticmethod(lambda weight: weight > 0)

    def before_fit(self, learn):
        learn.metrics = self
        self.history = []

    def before_epoch(self, learn):
        for m in self.all_metrics.values(): m.reset()
        self._preds, self._ys, self._losses, self._ns = [], [], [], []
        self._start = time.perf_counter()

    def after_batch(self, learn):
        y, preds = learn.batch[1], learn.preds
        if isinstance(preds, torch.Tensor): preds = preds.detach()
        self._preds.append(preds)
        self._ys.append(y)
        self._losses.append(learn.loss.detach())
        self._ns.append(len(y))
        # flush early when outputs are large (segmentation maps, say), so the buffer never holds much memory
        if len(self._ns) >= self.flush_every or getattr(preds, 'numel', int)() * len(self._ns) > 1 << 24: self._flush()

    def _flush(self):
        "Hand the buffered batches to the metrics in one update each."
        if not self._ns: return
        loss = self._losses[0]
        if loss.device != self._device:
            self._device = loss.device
            for m in self.all_metrics.values(): m.to(loss.device)
        ns = torch.tensor(self._ns, device=loss.device, dtype=torch.float32)
        self.loss.update((torch.stack(self._losses).float() * ns).sum() / ns.sum(), weight=float(sum(self._ns)))
        if self.metrics:
            if all(isinstance(p, torch.Tensor) for p in self._preds):
                preds, ys = torch.cat(self._preds), torch.cat(self._ys)
                for m in self.metrics.values(): m.update(preds, ys)
            else:  # outputs that are not plain tensors cannot be concatenated: update batch by batch
                for p, y in zip(self._preds, self._ys):
                    for m in self.metrics.values(): m.update(p, y)
        self._preds, self._ys, self._losses, self._ns = [], [], [], []

    def after_epoch(self, learn):
        self._flush()
        if not self.measured(float(self.loss.weights)): return  # nothing was measured (cancelled before a batch ended)
        values = {k: self.compute(m).item() for k, m in self.all_metrics.items()}
        secs = time.perf_counter() - self._start
        stage = 'train' if learn.training else 'eval'
        self.history.append({**values, 'epoch': learn.epoch, 'train': stage, 'time': secs})
        self._log({**{k: f'{v:.3f}' for k, v in values.items()}, 'epoch': learn.epoch, 'train': stage,
                   'time': format_time(secs)})


def _progress():
    from fastprogress.fastprogress import master_bar, progress_bar
    return master_bar, progress_bar


class ProgressCB(Callback):
    """Progress bars and the metrics table: fastprogress bars in Jupyter (with a live loss plot when `plot`),
    in a terminal a bar per epoch and one line per epoch; in a log file (not a tty) only the lines.
    The loss shown on the bar is read at most every `refresh` seconds."""
    skip_in_probes = True
    order = MetricsCB.order + 1

    def __init__(self, plot: bool = False, refresh: float = 0.3):
        self.plot, self.refresh = plot, refresh
        # made here too, not only in before_fit: cleanup_fit runs even when a fit failed before ours began
        self.losses, self.val_losses, self._pending, self._header, self._last = [], [], [], None, 0.

    def before_fit(self, learn):
        self.silent = not is_main_process()  # with several processes, only rank 0 reports
        self.bars = (fc.IN_NOTEBOOK or sys.stdout.isatty()) and not self.silent
        self.losses, self.val_losses, self._pending, self._header = [], [], [], None
        self._last = 0.
        if self.bars:
            master_bar, _ = _progress()
            learn.epochs = self.mbar = master_bar(learn.epochs)
        if hasattr(learn, 'metrics'): learn.metrics._log = self._log

    def _log(self, d: dict):
        if self._header is None:
            self._header = list(d)
            self._write(self._header)
        self._write([str(v) for v in d.values()])

    def _write(self, cells):
        if self.silent: return
        if self.bars: self.mbar.write(cells, table=True)
        else: print('  '.join(f'{c:<8}' for c in cells).rstrip(), flush=True)

    def before_epoch(self, learn):
        if self.bars:
            _, progress_bar = _progress()
            learn.dl = progress_bar(learn.dl, leave=False, parent=self.mbar)

    def after_batch(self, learn):
        if self.plot and learn.training: self._pending.append(learn.loss.detach())
        now = time.perf_counter()
        if now - self._last < self.refresh: return
        self._last = now
        if self.bars: learn.dl.comment = f'{learn.loss.item():.3f}'
        self._update_graph()

    def _flush(self):
        if self._pending:
            self.losses += torch.stack(self._pending).float().tolist()
            self._pending = []

    def _update_graph(self):
        # the losses are read from the device only to draw them (a read every `refresh` seconds, in notebooks):
        # in a script or a log they wait for the epoch's end
        if not (self.plot and self.bars and fc.IN_NOTEBOOK): return
        self._flush()
        if not self.losses: return
        graphs = [[list(range(len(self.losses))), self.losses]]
        if self.val_losses: graphs.append([[x for x, _ in self.val_losses], [v for _, v in self.val_losses]])
        self.mbar.update_graph(graphs)

    def after_epoch(self, learn):
        if self.plot and not learn.training and hasattr(learn, 'metrics') and learn.metrics.history:
            self._flush()
            self.val_losses.append((len(self.losses), learn.metrics.history[-1]['loss']))
            self._update_graph()

    def cleanup_fit(self, learn): self._flush()
