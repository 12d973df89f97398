"""Experiment trackers: what a run records of its settings (`run_settings`), and `TrackerCB`, the part every tracker
shares (W&B's `WandBCB` and MLflow's `MLflowCB` in `miniai.callbacks.clients` fill in how to send): the settings once,
the training loss every `loss_every` batches (kept on the device and sent once an epoch, so no batch waits for it),
every metric of each epoch and stage, the best values, the time to a target, and files. The run's id and step are kept
in checkpoints, so a resumed fit goes on in the same run at the next step. Only global rank 0 logs, and a tracker that
fails (no network, a full disk) warns once and stops sending: training goes on untouched."""
from __future__ import annotations

import importlib
import importlib.metadata
import os
import subprocess
import sys
import warnings
from collections.abc import Iterable
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import torch

from ..core.devices import model_dtype
from ..core.events import Callback
from ..core.ranks import is_main_process, world_size
from .metrics import improved, monitor_mode

if TYPE_CHECKING:
    from ..core.learner import Learner

__all__ = ['run_settings', 'git_commit', 'TrackerCB', 'MissingClient', 'import_client']


class MissingClient(ImportError):
    "A tracker's client package is not installed: the message names the extra that installs it."


def import_client(module: str, extra: str) -> ModuleType:
    "Import the tracker client `module`, or raise `MissingClient` naming `pip install 'miniai-learner[extra]'`."
    try: return importlib.import_module(module)
    except ImportError as e:
        raise MissingClient(f"logging to {extra} needs the {module} package: pip install 'miniai-learner[{extra}]'") from e


def git_commit(folder: str | os.PathLike = '.') -> str | None:
    "The commit checked out in `folder` (with '+dirty' when files changed), or None outside a git checkout."
    try:
        run = partial(subprocess.run, cwd=folder, capture_output=True, text=True, timeout=5)
        head = run(['git', 'rev-parse', 'HEAD'])
        if head.returncode: return None
        dirty = run(['git', 'status', '--porcelain', '--untracked-files=no']).stdout.strip()
        return head.stdout.strip() + ('+dirty' if dirty else '')
    except (OSError, subprocess.SubprocessError): return None


def _version() -> str | None:
    "miniai's version as installed (None when it runs from a checkout that was never installed)."
    try: return importlib.metadata.version('miniai')
    except importlib.metadata.PackageNotFoundError: return None


def _describe(f) -> str:
    "A factory (a class, a function, a partial of one) as text: `AdamW(eps=1e-05, weight_decay=0.05)`."
    if isinstance(f, partial):
        kw = ', '.join(f'{k}={v!r}' for k, v in f.keywords.items() if not callable(v))
        return f'{_describe(f.func)}({kw})'
    return getattr(f, '__name__', type(f).__name__)


def run_settings(learn: Learner, extra: dict | None = None) -> dict:
    """What a fit is run with, as plain JSON values: learning rate, epochs, batch size, optimizer, schedule, precision,
    the model (class, parameters), the data (loader sizes), the callbacks, miniai's and torch's versions and the git
    commit; `extra` (the recipe's seed, data name, FLOPs...) is added on top."""
    model, dls = learn.model, learn.dls
    s = {'lr': learn.lr, 'epochs': getattr(learn, 'n_epochs', None), 'optimizer': _describe(learn.opt_func),
         'loss_func': _describe(learn.loss_func), 'model': type(model).__name__,
         'params': sum(p.numel() for p in model.parameters()),
         'trainable_params': sum(p.numel() for p in model.parameters() if p.requires_grad),
         'processes': world_size(), 'miniai': _version(), 'torch': torch.__version__, 'git_commit': git_commit()}
    train = getattr(dls, 'train', None)
    s['bs'] = getattr(train, 'bs', getattr(train, 'batch_size', None))
    for split in ('train', 'valid'):
        dl = getattr(dls, split, None)
        ds = getattr(dl, 'x', getattr(dl, 'dataset', None))
        try: s[f'n_{split}'] = len(ds)  # pyright: ignore[reportArgumentType]  (a TypeError is caught)
        except TypeError: pass
    if (pgs := getattr(getattr(learn, 'opt', None), 'param_groups', None)) and len(pgs) > 1:
        s['lrs'] = [pg['lr'] for pg in pgs]
    for cb in learn.cbs:
        if (sched := getattr(cb, 'sched', None)) is not None and type(cb).__name__.endswith('SchedCB'):
            s['schedule'] = _describe(sched)
        if (dtype := getattr(cb, 'dtype', None)) is not None and isinstance(dtype, torch.dtype):
            s['precision'] = str(dtype).replace('torch.', '')
    s.setdefault('precision', str(model_dtype(model)).replace('torch.', ''))
    s['callbacks'] = sorted(type(cb).__name__ for cb in learn.cbs)
    return {**s, **(extra or {})}


class TrackerCB(Callback):
    """What every tracker does (see the module's docstring); a subclass says how to `open` a run (returning its id),
    `send` metrics at a step, `set_summary`, `upload` files and `close` it with a status ('finished', 'interrupted',
    'failed'). `config` adds to the settings recorded; `files` are uploaded when the fit ends (those that exist).
    With `finish=False` the run stays open after a fit that finished, for `finish(files=..., summary=...)` to add what
    is written afterwards (the main job's `result.json`, plots) and close it; a fit that fails or is interrupted
    closes the run at once, marked so."""
    order = 18  # after MetricsCB's row, before SaveModelCB (20) and InterruptCB (90) save: checkpoints hold our step
    skip_in_probes = True
    client: str | None = None  # the package and the miniai extra that installs it
    extra: str | None = None

    def __init__(self, config: dict | None = None, run_name: str | None = None, loss_every: int = 10,
                 files: Iterable[str | os.PathLike] = (), finish: bool = True) -> None:
        if loss_every < 1: raise ValueError(f'loss_every must be >= 1, got {loss_every}')
        self.config, self.run_name, self.loss_every, self.files = dict(config or {}), run_name, loss_every, files
        self.finish_at_end, self.run_id, self.batches, self.best = finish, None, 0, {}
        self.failed, self.is_open, self._losses, self._resume, self._done = False, False, [], None, False

    # -- what a subclass provides ------------------------------------------------------------------------------
    def open(self, name: str | None, run_id: str | None, settings: dict) -> str: raise NotImplementedError
    def send(self, values: dict, step: int) -> None: raise NotImplementedError
    def set_summary(self, values: dict) -> None: raise NotImplementedError
    def upload(self, paths: list[Path]) -> None: raise NotImplementedError
    def close(self, status: str) -> None: raise NotImplementedError

    # -- failing quietly -----------------------------------------------------------------------------------------
    def _try(self, f, *args):
        "Call `f`; the first failure warns (once) and ends this tracker's logging, never the training."
        if self.failed or not self.is_open: return None
        try: return f(*args)
        except Exception as e:
            self.failed = True
            warnings.warn(f'{type(self).__name__}: logging failed ({type(e).__name__}: {e}); training goes on '
                          f'without it', RuntimeWarning, stacklevel=2)
            return None

    # -- events ------------------------------------------------------------------------------------------------
    def before_fit(self, learn: Learner) -> None:
        self._losses, self._done, self.best = [], False, {}
        if not is_main_process() or self.is_open or self.failed: return  # a run kept open: the next fit goes on in it
        # a missing client is the user's to fix: say so, before training
        import_client(self.client, self.extra)  # pyright: ignore[reportArgumentType]  (each subclass names its client)
        self.is_open, resume, self._resume = True, self._resume, None
        if resume is not None:
            self.run_id, self.batches, self.best = resume['run_id'], resume['batches'], dict(resume.get('best', {}))
        self.run_id = self._try(self.open, self.run_name, self.run_id, run_settings(learn, self.config)) or self.run_id

    def after_batch(self, learn: Learner) -> None:
        if not learn.training: return
        self.batches += 1
        if self.is_open and self.batches % self.loss_every == 0: self._losses.append((self.batches, learn.loss.detach()))

    def _flush_losses(self):
        if not self._losses: return
        steps, losses = zip(*self._losses)
        self._losses = []
        for s, v in zip(steps, torch.stack(losses).float().tolist()): self._try(self.send, {'train/batch_loss': v}, s)

    def after_epoch(self, learn: Learner) -> None:
        if not self.is_open: return
        self._flush_losses()  # the one read of the losses this epoch
        history = getattr(getattr(learn, 'metrics', None), 'history', None)
        if not history: return
        row = history[-1]
        stage = 'train' if row['train'] == 'train' else 'valid'
        values = {f'{stage}/{k}': v for k, v in row.items() if k not in ('epoch', 'train', 'fit')
                  and isinstance(v, (int, float))}
        for k, v in values.items():
            if k.endswith('/time'): continue
            if improved(v, self.best.get(f'best_{k}'), monitor_mode(k)): self.best[f'best_{k}'] = v
        self._try(self.send, {**values, 'epoch': row['epoch']}, self.batches)

    def after_fit(self, learn: Learner) -> None:
        self._done = True
        if not self.is_open: return
        clock = getattr(learn, 'time_to_accuracy', None)
        summary = dict(self.best)
        if clock is not None and clock.reached is not None:
            summary.update(time_to_target=clock.reached['seconds'], epoch_reached=clock.reached['epoch'],
                           target=clock.target)
        self._try(self.set_summary, summary)
        self._try(self.upload, [Path(p) for p in self.files if Path(p).is_file()])

    def cleanup_fit(self, learn: Learner) -> None:
        if not self.is_open: return
        self._flush_losses()
        exc = sys.exc_info()[1]  # what is ending the fit, if anything (a CancelFitException is over by now)
        if not self._done and exc is None: self.after_fit(learn)  # a callback ended it (early stopping): it finished
        if not self._done: self.finish('interrupted' if isinstance(exc, KeyboardInterrupt) else 'failed')
        elif self.finish_at_end: self.finish()

    def finish(self, status: str = 'finished', files: Iterable[str | os.PathLike] = (), summary: dict | None = None) -> None:
        "Add `summary` values and `files` (those that exist) to the run and close it with `status`."
        if summary: self._try(self.set_summary, summary)
        if files: self._try(self.upload, [Path(p) for p in files if Path(p).is_file()])
        self._try(self.close, status)
        self.is_open = False

    # -- checkpoints -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        "The run's id, the training batches logged and the best values: a resumed fit goes on in that run."
        return {'run_id': self.run_id, 'batches': self.batches, 'best': dict(self.best)}

    def load_state_dict(self, state: dict) -> None:
        if state.get('run_id') is not None: self._resume = dict(state)
