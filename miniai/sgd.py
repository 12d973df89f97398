"""Schedulers as callbacks, and recording values (such as the learning rate) batch by batch."""
from __future__ import annotations

import matplotlib.pyplot as plt

from .callback import Callback
from .ranks import world_size

__all__ = ['BaseSchedCB', 'BatchSchedCB', 'EpochSchedCB', 'HasLearnCB', 'RecorderCB']


class BaseSchedCB(Callback):
    """Build `sched(learn.opt)` (a `torch.optim.lr_scheduler` factory) when the fit starts; step it in training. A
    schedule with a fixed length (`OneCycleLR`'s `total_steps`) shorter than the fit is refused there, not when it
    runs out. In a job of several processes the loaders may be sharded after this (DDPCB, AccelerateCB), so the
    length is checked at the first training epoch's start instead, against this process's shard; a schedule built
    for the whole loader, which would stop part-way, is refused then too."""
    skip_in_probes = True
    unit = 'steps'
    def __init__(self, sched): self.sched, self._whole = sched, None

    def before_fit(self, learn):
        self.schedo = self.sched(learn.opt)
        # several processes: the loaders may be sharded after this, so the check waits for the first training epoch
        self._whole = self._fit_steps(learn)[0] if world_size() > 1 else None
        if self._whole is None: self._check(learn)

    def before_epoch(self, learn):
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


class BatchSchedCB(BaseSchedCB):
    "Step the scheduler after every training batch (e.g. `OneCycleLR`)."
    def after_batch(self, learn): self._step(learn)

    def _fit_steps(self, learn):
        n = len(learn.dls.train) if learn.phases[0] and hasattr(learn.dls.train, '__len__') else None
        return (None, '') if n is None else (learn.n_epochs * n, f'{learn.n_epochs} epochs x {n} training batches')


class EpochSchedCB(BaseSchedCB):
    "Step the scheduler after every training epoch (e.g. `StepLR`)."
    unit = 'epochs'
    def after_epoch(self, learn): self._step(learn)
    def _fit_steps(self, learn): return (learn.n_epochs, 'epochs') if learn.phases[0] else (None, '')


class HasLearnCB(Callback):
    "Keep `self.learn` during a fit, for callbacks whose helpers need the Learner."
    def before_fit(self, learn): self.learn = learn
    def cleanup_fit(self, learn): self.learn = None


class RecorderCB(Callback):
    "Record `fn(self)` for each keyword `fn` after every training batch (`self.pg` is the first param group)."
    skip_in_probes = True
    def __init__(self, **d): self.d, self.recs = d, {k: [] for k in d}
    def before_fit(self, learn):
        self.recs = {k: [] for k in self.d}
        self.pg = learn.opt.param_groups[0]
    def after_batch(self, learn):
        if not learn.training: return
        for k, fn in self.d.items(): self.recs[k].append(fn(self))

    def plot(self) -> None:
        "One small plot per recorded value, side by side (shown once in Jupyter: nothing is returned)."
        _, axs = plt.subplots(1, len(self.recs), figsize=(4 * len(self.recs), 3), squeeze=False)
        for ax, (k, v) in zip(axs.flat, self.recs.items()):
            ax.plot(v)
            ax.set_title(k)
            ax.set_xlabel('batch')
