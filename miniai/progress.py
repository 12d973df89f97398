"""Watching a fit: `MetricsCB` (metrics computed on the model's device, read once per epoch) and `ProgressCB`."""
from __future__ import annotations

import os
import sys
import time
import warnings
from contextlib import contextmanager
from copy import copy
from pathlib import Path

import fastcore.all as fc
import torch

from .callback import Callback
from .checks import warn_once
from .ranks import is_main_process

__all__ = ['MetricsCB', 'ProgressCB', 'format_time', 'quiet_torcheval', 'plots_show', 'show_or_save']


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
    numbers, in `history`, across fits: each row says which fit it came from (`fit`: 0 for the first), and
    `rows()` gives one fit's."""
    skip_in_probes = True
    def __init__(self, *ms, flush_every: int = 32, **metrics):
        for o in ms: metrics[type(o).__name__] = o
        self.metrics, self.flush_every = metrics, flush_every
        self.all_metrics = copy(metrics)
        self.all_metrics['loss'] = self.loss = _mean_metric()
        self.history, self._device, self.fits = [], None, 0

    def _log(self, d: dict) -> None:
        if is_main_process(): print(d)

    #: how a metric's value is read at the end of an epoch; `DDPCB` swaps in one that merges all ranks' states
    compute = staticmethod(lambda m: m.compute())
    #: whether the epoch measured any batch, given this process's loss weight; `DDPCB` swaps in one that asks every
    #: rank, so that all of them enter the merging `compute` or none does (one returning early would hang the others)
    measured = staticmethod(lambda weight: weight > 0)

    def before_fit(self, learn):
        learn.metrics = self
        self.fits += 1

    def rows(self, fit: int = -1) -> list[dict]:
        "The rows of one fit, counted like a list's items: -1 (the default) the latest, 0 the first."
        n = fit + self.fits if fit < 0 else fit
        return [r for r in self.history if r['fit'] == n]

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
        # the mean loss weighted by batch size, one update per batch size (the last batch may be smaller): the sizes
        # are Python ints and stay so, since a tensor of them would be a blocking host-to-device copy on a GPU
        by_size = {}
        for l, n in zip(self._losses, self._ns): by_size.setdefault(n, []).append(l)
        for n, ls in by_size.items(): self.loss.update(torch.stack(ls).float(), weight=float(n))
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
        self.history.append({**values, 'epoch': learn.epoch, 'train': stage, 'time': secs, 'fit': self.fits - 1})
        self._log({**{k: f'{v:.3f}' for k, v in values.items()}, 'epoch': learn.epoch, 'train': stage,
                   'time': format_time(secs)})


def _progress():
    from fastprogress.fastprogress import master_bar, progress_bar
    return master_bar, progress_bar


_NON_INTERACTIVE = {'agg', 'cairo', 'pdf', 'pgf', 'ps', 'svg', 'template'}


def plots_show() -> bool:
    "Whether a figure drawn now can be seen: in Jupyter, or where matplotlib's backend opens windows."
    if fc.IN_NOTEBOOK: return True
    import matplotlib
    return matplotlib.get_backend().lower() not in _NON_INTERACTIVE


def show_or_save(fig, plot, what: str, hint: str) -> None:
    """Save `fig` to `plot` when it is a path; else, where no figure can be seen (a script with a non-interactive
    backend), say so once, with `hint` on how to keep it, rather than drop it silently."""
    if isinstance(plot, (str, os.PathLike)):
        Path(plot).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(plot, dpi=80, bbox_inches='tight')
    elif not plots_show():
        import matplotlib
        warn_once(what, f'{what}: nothing can show the plot here (not Jupyter; matplotlib backend '
                        f'{matplotlib.get_backend()!r}): {hint}')


class ProgressCB(Callback):
    """Progress bars and the metrics table: fastprogress bars in Jupyter (with a live loss plot when `plot`), in a
    terminal a bar per epoch and one line per epoch. In a log file (not a tty) the table's lines, and a progress line
    every `log_every` seconds (batches done, loss, rate, time left). The loss is read from the device at most every
    `refresh` seconds on a bar and once per progress line. `plot` may be a path: the loss plot is saved there after
    each fit (where there is no Jupyter to draw it live, it is otherwise only kept in `losses` and `val_losses`)."""
    skip_in_probes = True
    order = MetricsCB.order + 1

    def __init__(self, plot: bool | str | os.PathLike = False, refresh: float = 0.3, log_every: float = 10.):
        self.plot, self.refresh, self.log_every = plot, refresh, log_every
        # made here too, not only in before_fit: cleanup_fit runs even when a fit failed before ours began
        self.losses, self.val_losses, self._pending, self._header, self._last = [], [], [], None, 0.

    def before_fit(self, learn):
        self.silent = not is_main_process()  # with several processes, only rank 0 reports
        self.bars = (fc.IN_NOTEBOOK or sys.stdout.isatty()) and not self.silent
        self.losses, self.val_losses, self._pending, self._header = [], [], [], None
        self._last = 0.
        if self.plot is True and not fc.IN_NOTEBOOK and not self.silent:
            warn_once('ProgressCB(plot=True)', "ProgressCB(plot=True): the live loss plot needs Jupyter; here the "
                      "losses are kept in .losses and .val_losses. Pass ProgressCB(plot='loss.png') to save the plot "
                      "after each fit")
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
        self._epoch_start = self._line_at = time.perf_counter()
        if self.bars:
            _, progress_bar = _progress()
            learn.dl = progress_bar(learn.dl, leave=False, parent=self.mbar)

    def after_batch(self, learn):
        if self.plot and learn.training: self._pending.append(learn.loss.detach())
        now = time.perf_counter()
        if now - self._last < self.refresh: return
        self._last = now
        if self.bars: learn.dl.comment = f'{learn.loss.item():.3f}'
        elif not self.silent and now - self._line_at >= self.log_every: self._progress_line(learn, now)
        self._update_graph()

    def _progress_line(self, learn, now: float) -> None:
        "A line for a log: where the epoch is, the latest loss (one read from the device), the rate, the time left."
        self._line_at, done, secs = now, learn.iter + 1, now - self._epoch_start
        n = len(learn.dl) if hasattr(learn.dl, '__len__') else None
        rate = done / secs if secs > 0 else 0.
        left = f', {format_time((n - done) / rate)} left' if n and rate else ''
        print(f'epoch {learn.epoch} {"train" if learn.training else "eval"}: {done}{f"/{n}" if n else ""} batches, '
              f'loss {learn.loss.item():.4f}, {rate:.2f} batches/s{left}', flush=True)

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

    def plot_losses(self, ax=None) -> None:
        "Training loss per batch and validation loss per epoch of the latest fit, on `ax` (a new figure if None)."
        import matplotlib.pyplot as plt
        self._flush()
        if ax is None: _, ax = plt.subplots(figsize=(6, 4))
        ax.plot(self.losses, label='train (per batch)', alpha=0.7)
        if self.val_losses: ax.plot(*zip(*self.val_losses), 'o-', label='valid (per epoch)')
        ax.set_xlabel('batch')
        ax.set_ylabel('loss')
        ax.legend()

    def after_fit(self, learn):
        if isinstance(self.plot, (str, os.PathLike)) and not self.silent:
            import matplotlib.pyplot as plt
            self.plot_losses()
            show_or_save(plt.gcf(), self.plot, 'ProgressCB', '')
            plt.close(plt.gcf())

    def cleanup_fit(self, learn): self._flush()
