"""Measuring a fit: `MetricsCB` (torcheval metrics and the mean loss, computed on the model's device and read once per
epoch), how its rows are shown, and what other callbacks monitor in them (`monitor_value`, and which way is better)."""
from __future__ import annotations

import time
import warnings
from contextlib import contextmanager
from copy import copy

import torch

from ..core.devices import model_device
from ..core.events import Callback
from ..core.ranks import is_main_process

from typing import TYPE_CHECKING
if TYPE_CHECKING:  # names for the annotations only
    from collections.abc import Iterator
    from typing import Any

    from torcheval.metrics.metric import Metric

    from ..core.learner import Learner

__all__ = ['MetricsCB', 'LocalMetrics', 'metrics_reducer', 'format_time', 'quiet_torcheval', 'monitor_value',
           'monitor_mode', 'improved']


@contextmanager
def quiet_torcheval() -> Iterator[None]:
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
    "Seconds as mm:ss (or h:mm:ss): fastprogress's format, which its bars use too."
    from fastprogress.fastprogress import format_time as fmt  # imported when first needed: it costs 0.1 s
    return fmt(t)


class LocalMetrics:
    "How `MetricsCB` reads its metrics in one process; `DDPCB` and `AccelerateCB` offer one that merges the ranks'."
    @staticmethod
    def compute(metric: Metric) -> Any:
        "The metric's value."
        return metric.compute()

    @staticmethod
    def measured(weight: float) -> bool:
        "Whether the epoch measured any batch, given this process's loss weight."
        return weight > 0


def metrics_reducer(learn: Learner) -> Any:
    "How the metrics are read in this fit: the first reducer a callback offers (`metrics_reducer()`), else local."
    for cb in learn.cbs:
        f = getattr(cb, 'metrics_reducer', None)
        if callable(f) and (r := f()) is not None: return r
    return LocalMetrics


class MetricsCB(Callback):
    """Track torcheval metrics and the mean loss over each epoch; log a row per epoch (train and eval).

    Metric state is put on the model's device before each epoch and read once per epoch, so the per-batch path
    never waits for the device. Batches are handed to the metrics `flush_every` at a time (concatenated), which
    gives the same result as one update per batch at a fraction of the cost. Every epoch's values are kept, as
    numbers, in `history`, across fits: each row says which fit it came from (`fit`: 0 for the first), and
    `rows()` gives one fit's. Other callbacks take part through what they offer (see `Callback`): a merge over
    processes (`metrics_reducer`), a change to the row (`annotate_metrics`), a place to show it (`show_metrics`)."""
    skip_in_probes = True
    def __init__(self, *ms: Metric, flush_every: int = 32, **metrics: Metric) -> None:
        for o in ms: metrics[type(o).__name__] = o
        self.metrics, self.flush_every = metrics, flush_every
        self.all_metrics = copy(metrics)
        self.all_metrics['loss'] = self.loss = _mean_metric()
        self.history, self._device, self.fits, self._viewers, self.train = [], None, 0, [], True

    def _log(self, d: Any) -> None:
        """Show an epoch's row: hand it to the callbacks that show rows (`show_metrics`, e.g. `ProgressCB`'s table),
        else print it on the main process. A subclass may send rows elsewhere by overriding this, as the course does."""
        if self._viewers:
            for show in self._viewers: show(d)
        elif is_main_process(): print(d)

    def before_fit(self, learn: Learner) -> None:
        learn.metrics = self
        self.fits += 1

    def rows(self, fit: int = -1) -> list[dict]:
        "The rows of one fit, counted like a list's items: -1 (the default) the latest, 0 the first."
        n = fit + self.fits if fit < 0 else fit
        return [r for r in self.history if r['fit'] == n]

    def before_epoch(self, learn: Learner) -> None:
        # the metrics go where the model is here, outside the batch: torcheval's `to` copies each state from the
        # host, which inside a batch would make the CPU wait for the device
        if isinstance(learn.model, torch.nn.Module): self._to(model_device(learn.model))
        for m in self.all_metrics.values(): m.reset()
        self._preds, self._ys, self._losses, self._ns = [], [], [], []
        self._start = time.perf_counter()

    def after_batch(self, learn: Learner) -> None:
        y, preds = learn.batch[1], learn.preds
        if isinstance(preds, torch.Tensor): preds = preds.detach()
        self._preds.append(preds)
        self._ys.append(y)
        self._losses.append(learn.loss.detach())
        self._ns.append(len(y))
        # flush early when outputs are large (segmentation maps, say), so the buffer never holds much memory
        if len(self._ns) >= self.flush_every or getattr(preds, 'numel', int)() * len(self._ns) > 1 << 24: self._flush()

    def _to(self, device: torch.device) -> None:
        if device == self._device: return
        self._device = device
        for m in self.all_metrics.values(): m.to(device)

    def _flush(self):
        "Hand the buffered batches to the metrics in one update each."
        if not self._ns: return
        self._to(self._losses[0].device)  # where the model is, unless its outputs are elsewhere (rare)
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

    def after_epoch(self, learn: Learner) -> None:
        self._flush()
        reducer = metrics_reducer(learn)  # asked now: DDPCB (order 10) sets up its reducer after our before_fit
        if not reducer.measured(float(self.loss.weights)): return  # nothing was measured (cancelled before a batch)
        values = {k: reducer.compute(m).item() for k, m in self.all_metrics.items()}
        secs = time.perf_counter() - self._start
        stage = 'train' if learn.training else 'eval'
        self.history.append({**values, 'epoch': learn.epoch, 'train': stage, 'time': secs, 'fit': self.fits - 1})
        row = {**{k: f'{v:.3f}' for k, v in values.items()}, 'epoch': learn.epoch, 'train': stage,
               'time': format_time(secs)}
        for cb in learn.cbs:
            if callable(f := getattr(cb, 'annotate_metrics', None)): row = f(row)
        self._viewers = [f for cb in learn.cbs if callable(f := getattr(cb, 'show_metrics', None))]
        self.train = learn.training  # the course's subclasses read it in `_log` (lesson 21's WandBCB)
        self._log(row)


def monitor_value(learn: Learner, monitor: str) -> Any:
    "The latest value of `monitor` ('valid loss', 'train accuracy', or a metric name for validation) from MetricsCB."
    stage, _, name = monitor.partition(' ') if monitor.startswith(('valid ', 'train ')) else ('valid', '', monitor)
    want = 'eval' if stage == 'valid' else 'train'
    metrics = getattr(learn, 'metrics', None)
    if getattr(metrics, 'history', None) is None:
        raise ValueError(f"monitor {monitor!r} needs a MetricsCB among the Learner's callbacks")
    for row in reversed(metrics.rows()):  # this fit's: an earlier fit's values say nothing about this one
        if row['train'] == want:
            if name not in row: raise ValueError(f'monitor {monitor!r}: no metric {name!r}; have {sorted(row)}')
            return row[name]
    return None


def monitor_mode(monitor: str, mode: str | None = None) -> str:
    "'min' or 'max': `mode` if given, else 'min' for a monitored value with 'loss' in its name (lower is better)."
    mode = mode or ('min' if 'loss' in monitor else 'max')
    if mode not in ('min', 'max'): raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    return mode


def improved(value: float, best: float | None, mode: str, min_delta: float = 0.) -> bool:
    "Whether `value` beats `best` (None: nothing yet, so it does) by more than `min_delta` in the direction `mode`."
    if best is None: return True
    return value < best - min_delta if mode == 'min' else value > best + min_delta
