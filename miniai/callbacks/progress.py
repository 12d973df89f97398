"""Watching a fit: `ProgressCB` (bars, the metrics table, a live loss plot; progress lines in a log), and showing or
saving a plot where it can be seen."""
from __future__ import annotations

import os
import sys
import time
from typing import TYPE_CHECKING

import fastcore.all as fc
import torch

from ..core.events import Callback
from ..core.files import atomic_path
from ..core.messages import warn_once
from ..core.ranks import is_main_process
from .metrics import MetricsCB, format_time

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from ..core.learner import Learner

__all__ = ['ProgressCB', 'plots_show', 'show_or_save']


def _progress():
    from fastprogress.fastprogress import master_bar, progress_bar
    return master_bar, progress_bar


_NON_INTERACTIVE = {'agg', 'cairo', 'pdf', 'pgf', 'ps', 'svg', 'template'}


def plots_show() -> bool:
    "Whether a figure drawn now can be seen: in Jupyter, or where matplotlib's backend opens windows."
    if fc.IN_NOTEBOOK: return True
    import matplotlib
    return matplotlib.get_backend().lower() not in _NON_INTERACTIVE


def show_or_save(fig: Figure, plot: bool | str | os.PathLike, what: str, hint: str) -> None:
    """Save `fig` to `plot` when it is a path; else, where no figure can be seen (a script with a non-interactive
    backend), say so once, with `hint` on how to keep it, rather than drop it silently."""
    if isinstance(plot, (str, os.PathLike)):
        with atomic_path(plot) as tmp: fig.savefig(tmp, dpi=80, bbox_inches='tight')
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

    def __init__(self, plot: bool | str | os.PathLike = False, refresh: float = 0.3, log_every: float = 10.) -> None:
        self.plot, self.refresh, self.log_every = plot, refresh, log_every
        # made here too, not only in before_fit: cleanup_fit runs even when a fit failed before ours began
        self.losses, self.val_losses, self._pending, self._header, self._last = [], [], [], None, 0.

    def before_fit(self, learn: Learner) -> None:
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

    def show_metrics(self, d: dict) -> None:
        "Show a metrics row in the table (`MetricsCB` hands each row here): the header first, then the row."
        if self._header is None:
            self._header = list(d)
            self._write(self._header)
        self._write([str(v) for v in d.values()])

    def _write(self, cells):
        if self.silent: return
        if self.bars: self.mbar.write(cells, table=True)
        else: print('  '.join(f'{c:<8}' for c in cells).rstrip(), flush=True)

    def before_epoch(self, learn: Learner) -> None:
        self._epoch_start = self._line_at = time.perf_counter()
        if self.bars:
            _, progress_bar = _progress()
            learn.dl = progress_bar(learn.dl, leave=False, parent=self.mbar)
            # fastprogress counts epochs from 1 ('Epoch 2/3'); the table, the logs and the stop messages from 0
            learn.dl.prefix = f'epoch {learn.epoch} {"train" if learn.training else "eval"} :'

    def after_batch(self, learn: Learner) -> None:
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

    def after_epoch(self, learn: Learner) -> None:
        if self.plot and not learn.training and hasattr(learn, 'metrics') and learn.metrics.history:
            self._flush()
            self.val_losses.append((len(self.losses), learn.metrics.history[-1]['loss']))
            self._update_graph()

    def plot_losses(self, ax: Axes | None = None) -> None:
        "Training loss per batch and validation loss per epoch of the latest fit, on `ax` (a new figure if None)."
        import matplotlib.pyplot as plt
        self._flush()
        if ax is None: _, ax = plt.subplots(figsize=(6, 4))
        ax.plot(self.losses, label='train (per batch)', alpha=0.7)
        if self.val_losses: ax.plot(*zip(*self.val_losses), 'o-', label='valid (per epoch)')
        ax.set_xlabel('batch')
        ax.set_ylabel('loss')
        ax.legend()

    def after_fit(self, learn: Learner) -> None:
        if isinstance(self.plot, (str, os.PathLike)) and not self.silent:
            import matplotlib.pyplot as plt
            self.plot_losses()
            show_or_save(plt.gcf(), self.plot, 'ProgressCB', '')
            plt.close(plt.gcf())

    def cleanup_fit(self, learn: Learner) -> None: self._flush()
