"""Stopping a run on Ctrl-C or SIGTERM without losing it.

During a fit with `InterruptCB`, SIGINT (Ctrl-C) and SIGTERM (what a cluster's scheduler sends before it kills a
job) only set a flag; after the batch under way is complete, the callback saves a checkpoint of that exact point
(weights, optimizer, schedulers, RNGs, the data order of the epoch and the batch within it) and raises
`Interrupted`. `fit(n, resume=path)` then goes on to the very weights an uninterrupted run ends with. A second
signal while the checkpoint is written waits for it (the file is never left half-written); a second Ctrl-C at any
other time stops at once, without saving, while a repeated SIGTERM is only noted (a launcher may pass on a
scheduler's notice that reached the process already; SIGKILL is the way to stop without the save). Under `torchrun`
every rank stops after the same batch, wherever the signal arrived (`miniai.engines.cluster.StopAgreement`), and one
checkpoint holds them all. `SignalGuard` keeps the handlers for a whole script (the command line uses it), so that a
signal before or after the fit stops the script with `Interrupted` too, not with a traceback or without a word.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from ..core.events import Callback
from ..core.ranks import rank, world_size
from ..core.state import note_epoch_start
from ..engines.cluster import StopAgreement
from .checkpoint import mid_epoch_position, rng_snapshot, save_mid_epoch

if TYPE_CHECKING:
    from ..core.learner import Learner

__all__ = ['Interrupted', 'SignalGuard', 'InterruptCB', 'DrillCB', 'drills_from_env', 'active_guard', 'signal_name']

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def signal_name(signum: int) -> str:
    "'SIGINT', 'SIGTERM'... for a signal number."
    try: return signal.Signals(signum).name
    except ValueError: return f'signal {signum}'


class Interrupted(KeyboardInterrupt):
    """A run stopped by signal `signum`. `where`: 'training' (stopped at a batch boundary and saved to `checkpoint`;
    `position` says where), 'at once' (a second signal: nothing saved), 'before training' or 'after training'.
    A `KeyboardInterrupt`, so `except Exception` does not swallow it; `exit_code` is 128 + the signal's number."""
    def __init__(self, signum: int, where: str, checkpoint: Path | None = None, position: dict | None = None) -> None:
        self.signum, self.where, self.checkpoint, self.position = signum, where, checkpoint, position
        super().__init__(self.describe())

    @property
    def exit_code(self) -> int: return 128 + self.signum

    def describe(self) -> str:
        "Where the run stopped and what was saved, in words."
        name, pos = signal_name(self.signum), self.position
        if self.where == 'at once': return f'stopped at once by a second {name}; nothing was saved'
        if pos is None: return f'stopped by {name} {self.where}'
        at = (f'after {pos["batch"]} of its {pos["n_batches"]} training batches' if pos['phase'] == 'train'
              else 'during its validation (its training was done)')
        return f'stopped by {name} in epoch {pos["epoch"]}, {at}; saved to {self.checkpoint}'


def _say(msg: str) -> None:
    "Print from a signal handler: through sys.stderr (so notebooks show it), or the raw fd if that write is busy."
    line = f'miniai: {f"rank {rank()}: " if world_size() > 1 else ""}{msg}\n'
    try:
        sys.stderr.write(line)
        sys.stderr.flush()
    except (RuntimeError, OSError, ValueError):  # a reentrant write into the buffer the signal interrupted
        os.write(2, line.encode())


_guards: list = []  # the guards in force, innermost last


def active_guard() -> SignalGuard | None:
    "The innermost `SignalGuard` in force, or None."
    return _guards[-1] if _guards else None


class SignalGuard:
    """A context manager: while in force, SIGINT and SIGTERM ask a fit with `InterruptCB` to stop at the next batch
    boundary and save; outside such a fit (or at a second signal) they raise `Interrupted` at once. The previous
    handlers are put back on exit. Signals can only be caught in the main thread: elsewhere it does nothing. Once a
    stop with a checkpoint is on its way (`stopping`), later signals are only noted."""
    def __init__(self, signals: Iterable[int] = SIGNALS) -> None:
        self.signals, self._old = tuple(signals), {}
        self.requested, self.saving, self.training, self.trained, self.stopping = None, False, False, False, False

    def __enter__(self) -> SignalGuard:
        if threading.current_thread() is not threading.main_thread():
            warnings.warn('miniai: signals can only be caught in the main thread; Ctrl-C and SIGTERM will not save '
                          'a checkpoint here', RuntimeWarning, stacklevel=2)
            return self
        for s in self.signals: self._old[s] = signal.signal(s, self._handle)
        _guards.append(self)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items(): signal.signal(s, signal.SIG_DFL if h is None else h)
        self._old = {}
        if self in _guards: _guards.remove(self)

    def _handle(self, signum, frame):
        name = signal_name(signum)
        if self.saving or self.stopping:
            _say(f'{name} received while the checkpoint is being written: stopping as soon as it is complete'
                 if self.saving else f'{name} received: already stopping, with the checkpoint saved')
            return
        if self.training and self.requested is None:
            self.requested = signum
            _say(f'{name} received: stopping after this batch and saving a checkpoint' +
                 (' (press Ctrl-C again to stop at once, without saving)' if signum == signal.SIGINT else ''))
            return
        if self.training and signum != signal.SIGINT:
            _say(f'{name} received again: still stopping after this batch (SIGKILL stops without saving)')
            return
        raise Interrupted(signum, 'at once' if self.training else 'after training' if self.trained
                          else 'before training')

    @contextmanager
    def writing(self) -> Iterator[None]:
        "Inside, signals wait: what is being written is finished first."
        self.saving = True
        try: yield
        finally: self.saving = False


class InterruptCB(Callback):
    """On SIGINT or SIGTERM during the fit, finish the batch under way, save a checkpoint of that point to `path` and
    raise `Interrupted` (see this module's docstring); `fit(n, resume=path)` goes on from there. Uses the `SignalGuard`
    in force, or puts one in force for the duration of the fit. Under `torchrun` the ranks agree on the batch to stop
    after (a signal reaching any rank stops all of them there) and write one checkpoint holding every rank's state."""
    order = 90  # after every other after_batch: the batch is complete (metrics, schedulers, records) when it stops
    skip_in_probes = True  # a probe (lr_find, TTA) is not training: there a signal stops at once, changing nothing

    def __init__(self, path: str | os.PathLike = 'interrupted.ckpt') -> None:
        self.path, self._guard, self._own, self._rng, self._agree = Path(path), None, None, None, None
        self._took, self._outer = False, None

    def before_fit(self, learn: Learner) -> None:
        self._guard = active_guard()
        if self._guard is None: self._guard = self._own = SignalGuard().__enter__()
        self._guard.training, self._rng = True, None
        self._agree = StopAgreement()  # after DDPCB (order 10) has joined the process group
        self._took, self._outer = False, sys.exc_info()[1]  # an exception being handled around the whole fit, if any

    def checkpoint_paths(self) -> tuple[list[Path], list[Path]]:
        "What a run can go on from (`fit(resume='auto')`): the file a stop writes."
        return [self.path], []

    def before_epoch(self, learn: Learner) -> None:
        if not learn.training: return
        self._rng = None
        note_epoch_start(learn.dls.train)  # a torch DataLoader's own generator: to repeat this epoch's order

    def after_epoch(self, learn: Learner) -> None:
        # a stop during this epoch's validation saves the generators as they were when its training ended, so the
        # resumed run repeats the validation from the same state
        if learn.training: self._rng = rng_snapshot()

    def after_batch(self, learn: Learner) -> None: self._take_turn(learn)

    def cleanup_batch(self, learn: Learner) -> None:
        # a batch cancelled here (CancelBatchException) skipped after_batch, perhaps on this rank only: it still takes
        # its turn, since the ranks' rounds are counted per batch. A batch that failed takes none: its error goes on
        took, self._took = self._took, False
        if took or sys.exc_info()[1] not in (None, self._outer): return
        self._take_turn(learn)

    def _take_turn(self, learn):
        self._took = True
        g, agree = self._guard, self._agree
        if g is None or agree is None: return
        signum = agree.poll(g.requested)  # every rank, every batch: the same answer at the same batch on all of them
        if signum is None: return
        if getattr(getattr(learn, 'opt', None), 'pending', 0): return  # GradAccumCB: stop once its step is taken
        with g.writing():  # on every rank: a signal meanwhile waits for the file
            path = save_mid_epoch(learn, self.path, rng=None if learn.training else self._rng)
            g.stopping = True
        raise Interrupted(signum, 'training', path, mid_epoch_position(learn))

    def after_fit(self, learn: Learner) -> None:
        g, agree = self._guard, self._agree
        if g is None or agree is None: return
        signum = agree.settle(g.requested)
        if signum is not None: raise Interrupted(signum, 'after training')  # after the last batch: the fit is complete

    def cleanup_fit(self, learn: Learner) -> None:
        g, own, self._guard, self._own, self._agree = self._guard, self._own, None, None, None
        if g is None: return
        g.training, g.trained, g.requested, g.stopping = False, True, None, False
        if own is not None: own.__exit__(None, None, None)


class DrillCB(Callback):
    """A fire drill for preemption: after training batch `batch` (counted from 0) of epoch `epoch`, global rank `rank`
    sends itself `signum`, as a scheduler would (SIGKILL included), in the first attempt of a job only (torchrun's
    TORCHELASTIC_RESTART_COUNT 0 or unset), so a restarted job goes on undisturbed. See `drills_from_env`."""
    order = InterruptCB.order - 1  # the signal is in before InterruptCB looks at this batch
    skip_in_probes = True

    def __init__(self, signum: int, rank: int, epoch: int, batch: int) -> None:
        self.signum, self.at = signum, (rank, epoch, batch)

    def after_batch(self, learn: Learner) -> None:
        if not learn.training or (rank(), learn.epoch, learn.iter) != self.at: return
        if os.environ.get('TORCHELASTIC_RESTART_COUNT', '0') == '0': os.kill(os.getpid(), self.signum)


def drills_from_env(var: str = 'MINIAI_DRILL') -> list[DrillCB]:
    """The drills `$MINIAI_DRILL` asks for: comma-separated `SIGNAL@RANK:EPOCH:BATCH`, e.g. 'SIGTERM@1:1:2' (global
    rank 1 gets SIGTERM after batch 2 of epoch 1) or 'SIGKILL@0:0:5'. The main job reads it, to rehearse a
    preemption or a lost node and check that the job goes on."""
    drills = []
    for item in filter(None, (x.strip() for x in os.environ.get(var, '').split(','))):
        try:
            name, _, where = item.partition('@')
            r, e, b = (int(v) for v in where.split(':'))
            drills.append(DrillCB(signal.Signals[name.upper()], r, e, b))
        except (KeyError, ValueError):
            raise ValueError(f'{var}={os.environ[var]!r}: {item!r} is not SIGNAL@RANK:EPOCH:BATCH, e.g. '
                             f'SIGTERM@1:1:2') from None
    return drills
