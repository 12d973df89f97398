"""Learning-rate schedules: schedulers as callbacks, recording values (such as the learning rate) batch by batch, and
finding a learning rate (`LRFinderCB`, `learn.lr_find`)."""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from torch.optim.lr_scheduler import ExponentialLR

from ..core.events import Callback, CancelEpochException, CancelFitException
from ..core.learner import Learner, learner_method
from ..core.state import looking
from ..core.ranks import world_size
from ..core.state import CheckpointError
from .progress import show_or_save
from .suggest import SuggestedLRs, lr_suggestions, smooth_losses

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from torch import optim

__all__ = ['BaseSchedCB', 'BatchSchedCB', 'EpochSchedCB', 'HasLearnCB', 'RecorderCB', 'LRFinderCB', 'suggest_lr',
           'lr_find']


class BaseSchedCB(Callback):
    """Build `sched(learn.opt)` (a `torch.optim.lr_scheduler` factory) when the fit starts; step it in training. A
    schedule with a fixed length (`OneCycleLR`'s `total_steps`) shorter than the fit is refused there, not when it
    runs out. In a job of several processes the loaders may be sharded after this (DDPCB, AccelerateCB), so the
    length is checked at the first training epoch's start instead, against this process's shard; a schedule built
    for the whole loader, which would stop part-way, is refused then too."""
    skip_in_probes = True
    resume_needs_state = 'required'  # a resumed fit goes on with its schedule or not at all
    unit = 'steps'
    def __init__(self, sched: Callable[[optim.Optimizer], Any] | None) -> None:
        self.sched, self._whole, self._saved, self.schedo = sched, None, None, None

    def before_fit(self, learn: Learner) -> None:
        self.schedo = self.sched(learn.opt)
        if self._saved is not None: self._restore(self._saved)
        self._saved = None
        # several processes: the loaders may be sharded after this, so the check waits for the first training epoch
        self._whole = self._fit_steps(learn)[0] if world_size() > 1 else None
        if self._whole is None: self._check(learn)

    def before_epoch(self, learn: Learner) -> None:
        if self._whole is None or not learn.training: return
        whole, self._whole = self._whole, None
        self._check(learn, whole)

    def _check(self, learn, whole: int | None = None) -> None:
        "Refuse a schedule shorter than the fit, or (`whole`: the count before sharding) one built for the whole data."
        total, (steps, how) = getattr(self.schedo, 'total_steps', None), self._fit_steps(learn)
        if total is None or steps is None: return
        sharded = whole is not None and whole != steps
        if total < steps or (sharded and total == whole):
            if sharded: how += f" of this process's shard of the data ({whole} unsharded)"
            raise ValueError(f'{type(self).__name__}: {type(self.schedo).__name__} is built for {total} {self.unit} '
                             f'(total_steps), but this fit takes {steps} ({how}): build it with total_steps={steps}')

    def _fit_steps(self, learn) -> tuple[int | None, str]:
        "How many times this fit steps the scheduler, and how that count comes about (None when it cannot be known)."
        return None, ''

    def _step(self, learn):
        if learn.training: self.schedo.step()

    def cleanup_fit(self, learn: Learner) -> None: self._saved = None  # a state handed over for a fit that failed before it was used

    def state_dict(self) -> dict | None:
        "The scheduler's state (None before the first fit has built it)."
        return None if self.schedo is None else self.schedo.state_dict()

    def load_state_dict(self, state: dict) -> None:
        "Keep `state` for the scheduler that the next fit builds (a resume calls this before that)."
        self._saved = state

    def _restore(self, state: dict) -> None:
        now, then = getattr(self.schedo, 'total_steps', None), state.get('total_steps')
        if now != then:
            raise CheckpointError(f'{type(self).__name__}: the checkpoint was saved by a run scheduled for {then} '
                                  f'steps, this fit is scheduled for {now}: resume with the same epochs and batch size')
        self.schedo.load_state_dict(state)


class BatchSchedCB(BaseSchedCB):
    "Step the scheduler after every training batch (e.g. `OneCycleLR`)."
    def after_batch(self, learn: Learner) -> None: self._step(learn)

    def _fit_steps(self, learn):
        n = len(learn.dls.train) if learn.phases[0] and hasattr(learn.dls.train, '__len__') else None
        return (None, '') if n is None else (learn.n_epochs * n, f'{learn.n_epochs} epochs x {n} training batches')


class EpochSchedCB(BaseSchedCB):
    "Step the scheduler after every training epoch (e.g. `StepLR`)."
    unit = 'epochs'
    def after_epoch(self, learn: Learner) -> None: self._step(learn)
    def _fit_steps(self, learn): return (learn.n_epochs, 'epochs') if learn.phases[0] else (None, '')


class HasLearnCB(Callback):
    "Keep `self.learn` during a fit, for callbacks whose helpers need the Learner."
    def before_fit(self, learn: Learner) -> None: self.learn = learn
    def cleanup_fit(self, learn: Learner) -> None: self.learn = None


class RecorderCB(Callback):
    """Record `fn(self)` for each keyword `fn` after every training batch: `self.pg` is the optimizer's last parameter
    group (the head's; the only one with a plain learning rate), `self.pgs` all of them (`lr=slice(...)`)."""
    skip_in_probes = True
    def __init__(self, **d: Callable[[RecorderCB], Any]) -> None: self.d, self.recs = d, {k: [] for k in d}
    def before_fit(self, learn: Learner) -> None:
        self.recs = {k: [] for k in self.d}
        self.pgs = learn.opt.param_groups
        self.pg = self.pgs[-1]
    def after_batch(self, learn: Learner) -> None:
        if not learn.training: return
        for k, fn in self.d.items(): self.recs[k].append(fn(self))

    def plot(self) -> None:
        "One small plot per recorded value, side by side (shown once in Jupyter: nothing is returned)."
        import matplotlib.pyplot as plt  # imported when a plot is drawn: it costs 0.4 s
        _, axs = plt.subplots(1, len(self.recs), figsize=(4 * len(self.recs), 3), squeeze=False)
        for ax, (k, v) in zip(axs.flat, self.recs.items()):
            ax.plot(v)
            ax.set_title(k)
            ax.set_xlabel('batch')


def suggest_lr(lrs: Sequence[float], losses: Sequence[float], beta: float = 0.98) -> float:
    "One tenth of the learning rate at which the (bias-corrected exponentially smoothed) loss was lowest."
    if not lrs: raise ValueError('suggest_lr: no learning rate was recorded')
    s = smooth_losses(losses, beta)
    return lrs[min(range(len(s)), key=s.__getitem__) if s else 0] / 10


class LRFinderCB(Callback):
    """Multiply the learning rate by `gamma` after each training batch; stop when the loss exceeds `max_mult` times
    its minimum or stops being finite. Skips validation. Reads the loss every batch: it is a probe, not training.
    `plot`: draw loss against learning rate at the end (True), also save it to a file (a path), or not (False)."""
    def __init__(self, gamma: float = 1.3, max_mult: float = 3, plot: bool | str | os.PathLike = True) -> None:
        self.gamma, self.max_mult, self.show = gamma, max_mult, plot
        self.lrs, self.losses = [], []

    def before_fit(self, learn: Learner) -> None:
        self.sched = ExponentialLR(learn.opt, self.gamma)
        self.lrs, self.losses, self.min = [], [], math.inf

    def after_batch(self, learn: Learner) -> None:
        if not learn.training: raise CancelEpochException()
        self.lrs.append(learn.opt.param_groups[-1]['lr'])  # the head's, when there are several groups
        loss = learn.loss.item()
        self.losses.append(loss)
        if loss < self.min: self.min = loss
        if not math.isfinite(loss) or loss > self.min * self.max_mult: raise CancelFitException()
        self.sched.step()

    @property
    def suggestion(self) -> SuggestedLRs: return lr_suggestions(self.lrs, self.losses)

    def plot(self, ax: Axes | None = None) -> Axes:
        "Loss against learning rate on a log axis, the suggested learning rates (valley, minimum, steep) marked."
        import matplotlib.pyplot as plt
        if ax is None: _, ax = plt.subplots(figsize=(5, 3.5))
        keep = [(lr, l) for lr, l in zip(self.lrs, self.losses) if math.isfinite(l)]
        ax.plot([lr for lr, _ in keep], [l for _, l in keep])
        ax.set_xscale('log')
        ax.set_xlabel('learning rate')
        ax.set_ylabel('loss')
        if self.lrs:
            for c, (k, v) in zip(('C1', 'C2', 'C3'), self.suggestion.as_dict().items()):
                ax.axvline(v, color=c, ls='--', label=f'{k} {v:.2e}')
            ax.legend()
        return ax

    def cleanup_fit(self, learn: Learner) -> None:
        if not (self.show and self.lrs): return
        import matplotlib.pyplot as plt
        self.plot()
        show_or_save(plt.gcf(), self.show, 'lr_find', "pass lr_find(plot='lr_find.png') to save it to a file, or "
                     "plt.savefig('lr_find.png') now (it is the current figure); lr_find(plot=False) draws none")


@learner_method
def lr_find(self: Learner, gamma: float = 1.3, max_mult: float = 3, start_lr: float = 1e-5, max_epochs: int = 10,
            plot: bool | str | os.PathLike = True) -> SuggestedLRs:
    """Train from `start_lr`, multiplying it by `gamma` each batch, until the loss exceeds `max_mult` times its
    minimum; plot loss against learning rate (`plot` may be a path to save it to) and return the suggestions: a
    `SuggestedLRs`, which as a number is `minimum` (a tenth of the rate at the smoothed loss's lowest point) and also
    holds `valley` and `steep` (see `miniai.callbacks.suggest`), all three drawn on the plot. Afterwards the model,
    the optimizer, the data order and the RNGs are as they were before."""
    cb = LRFinderCB(gamma=gamma, max_mult=max_mult, plot=plot)
    with looking(self): self.fit(max_epochs, lr=start_lr, cbs=cb)
    return cb.suggestion
