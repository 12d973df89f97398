"""Schedulers as callbacks, and recording values (such as the learning rate) batch by batch."""
from __future__ import annotations

import matplotlib.pyplot as plt

from .callback import Callback

__all__ = ['BaseSchedCB', 'BatchSchedCB', 'EpochSchedCB', 'HasLearnCB', 'RecorderCB']


class BaseSchedCB(Callback):
    """Build `sched(learn.opt)` (a `torch.optim.lr_scheduler` factory) when the fit starts; step it in training. A
    schedule with a fixed length (`OneCycleLR`'s `total_steps`) shorter than the fit is refused there, not when it
    runs out."""
    skip_in_probes = True
    unit = 'steps'
    def __init__(self, sched): self.sched = sched

    def before_fit(self, learn):
        self.schedo = self.sched(learn.opt)
        total, (steps, how) = getattr(self.schedo, 'total_steps', None), self._fit_steps(learn)
        if total is not None and steps is not None and total < steps:
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
