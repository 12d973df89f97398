"""Loggers and trackers: a CSV row per epoch, TensorBoard scalars, and the time until a metric reaches a target."""
from __future__ import annotations

import csv
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..core.events import Callback
from ..core.files import atomic_path
from ..core.ranks import is_main_process
from .metrics import monitor_value

if TYPE_CHECKING:
    from ..core.learner import Learner

__all__ = ['CSVLoggerCB', 'TensorBoardCB', 'TimeToAccuracyCB']


class CSVLoggerCB(Callback):
    """Append a row per epoch (train and eval) with every metric from `MetricsCB` to `path`; the header is written
    once, so a resumed run goes on in the same file, and the rows a crashed run logged after the checkpoint it resumes
    from are dropped (it does those epochs again): one row per epoch and stage. Only the main process writes."""
    skip_in_probes = True
    order = 20

    def __init__(self, path: str | os.PathLike = 'metrics.csv') -> None: self.path, self._resumed = Path(path), False

    def state_dict(self) -> dict:
        "Only where it logs: a fit resumed from the checkpoint is told so (`load_state_dict`)."
        return {'path': str(self.path)}

    def load_state_dict(self, state: dict) -> None: self._resumed = True

    def _drop_redone(self, row: dict) -> None:
        "Drop the rows at or after `row`'s epoch and stage: a run that went back to a checkpoint logs them again."
        if not self.path.exists(): return
        with open(self.path, newline='') as f: rows = list(csv.reader(f))
        if not rows or 'epoch' not in rows[0] or 'train' not in rows[0]: return
        e, t = rows[0].index('epoch'), rows[0].index('train')
        key = lambda epoch, stage: (int(float(epoch)), stage != 'train')
        keep = [r for r in rows[1:] if len(r) == len(rows[0]) and key(r[e], r[t]) < key(row['epoch'], row['train'])]
        if len(keep) == len(rows) - 1: return
        with atomic_path(self.path) as tmp, open(tmp, 'w', newline='') as f: csv.writer(f).writerows([rows[0], *keep])

    def after_epoch(self, learn: Learner) -> None:
        history = getattr(getattr(learn, 'metrics', None), 'history', None)
        if not history or not is_main_process(): return
        row = {k: v for k, v in history[-1].items() if k != 'fit'}  # a file's rows go on across fits and resumes
        if self._resumed: self._drop_redone(row)
        self._resumed = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists() or self.path.stat().st_size == 0
        if not new:
            with open(self.path, newline='') as f: header = next(csv.reader(f), [])
            if header != list(row):
                raise ValueError(f'{self.path} has columns {header}, but this fit logs {list(row)}: '
                                 f'log to another file')
        with open(self.path, 'a', newline='') as f:
            w = csv.writer(f)
            if new: w.writerow(list(row))
            w.writerow([f'{v:.6g}' if isinstance(v, float) else v for v in row.values()])
            f.flush()
            os.fsync(f.fileno())  # a row, once written, survives a crash (rewrites go through atomic_path)

    def cleanup_fit(self, learn: Learner) -> None: self._resumed = False


class TensorBoardCB(Callback):
    """Write per-epoch metrics (`train/loss`, `valid/accuracy`, ...) and every training batch's loss
    (`batch/loss`) as TensorBoard scalars under `log_dir`. Batch losses are kept on the device and written once
    per epoch, so logging adds no per-batch synchronisation."""
    skip_in_probes = True
    order = 20

    def __init__(self, log_dir: str | os.PathLike = 'runs/tb') -> None:
        # not `step`: an attribute named like a step would be taken for one on a plain Learner
        self.log_dir, self.batches_logged, self.writer, self._losses = Path(log_dir), 0, None, []

    def before_fit(self, learn: Learner) -> None:
        try: from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ImportError('TensorBoardCB needs the tensorboard package: pip install tensorboard') from e
        self.writer = SummaryWriter(str(self.log_dir)) if is_main_process() else None
        self._losses = []

    def after_batch(self, learn: Learner) -> None:
        if learn.training and self.writer is not None: self._losses.append(learn.loss.detach())

    def after_epoch(self, learn: Learner) -> None:
        if self.writer is None: return
        if learn.training and self._losses:
            for v in torch.stack(self._losses).float().tolist():
                self.writer.add_scalar('batch/loss', v, self.batches_logged)
                self.batches_logged += 1
            self._losses = []
        history = getattr(getattr(learn, 'metrics', None), 'history', None)
        if history:
            row = history[-1]
            stage = 'train' if row['train'] == 'train' else 'valid'
            for k, v in row.items():
                if k not in ('epoch', 'train', 'fit') and isinstance(v, (int, float)):
                    self.writer.add_scalar(f'{stage}/{k}', v, row['epoch'])
        self.writer.flush()

    def cleanup_fit(self, learn: Learner) -> None:
        if self.writer is not None: self.writer.close()
        self.writer = None


class TimeToAccuracyCB(Callback):
    """After each validation epoch, note the seconds since the fit began and `metric` (a `MetricsCB` metric, e.g.
    'accuracy'); the first time it reaches `target`, say so. `curve` holds every (epoch, seconds, value) row and
    `reached` the first row at or above the target (None until then). The clock covers everything in the fit
    (training, validation, callbacks, checkpoints); a resumed fit goes on from the time its checkpoint was saved at."""
    order = 19  # after MetricsCB has logged the epoch, before SaveModelCB (20) saves it: checkpoints hold its row
    skip_in_probes = True

    def __init__(self, target: float = 0.94, metric: str = 'accuracy', verbose: bool = True) -> None:
        self.target, self.metric, self.verbose = target, metric, verbose
        self.curve, self.reached, self._t0, self._pending = [], None, None, None

    def before_fit(self, learn: Learner) -> None:
        self.curve, self.reached, self._t0 = [], None, time.perf_counter()
        if self._pending is not None:
            st, self._pending = self._pending, None
            self._t0 -= st['seconds']
            self.curve, self.reached = [dict(r) for r in st['curve']], st['reached']

    def elapsed(self) -> float:
        "Seconds since the fit began (including the time before a resume)."
        return 0.0 if self._t0 is None else time.perf_counter() - self._t0

    def after_epoch(self, learn: Learner) -> None:
        if learn.training and learn.phases[1]: return  # wait for this epoch's validation
        v = monitor_value(learn, self.metric)  # a float: reading it waited for the device
        if v is None: return
        row = {'epoch': learn.epoch, 'seconds': self.elapsed(), self.metric: float(v)}
        self.curve.append(row)
        if self.reached is None and v >= self.target:
            self.reached = row
            if self.verbose and is_main_process():
                print(f'Reached {self.metric} {self.target:.2%} in epoch {learn.epoch} (numbered as in the table; '
                      f'{learn.epoch + 1} epoch(s) of training): {row["seconds"]:.1f} s from the start of fit '
                      f'({self.metric} {v:.4f})', flush=True)

    def state_dict(self) -> dict:
        "The time so far, the curve and the first row at the target: a resumed fit goes on with them."
        return {'seconds': self.elapsed(), 'curve': self.curve, 'reached': self.reached}

    def load_state_dict(self, state: dict) -> None: self._pending = state
