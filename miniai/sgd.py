"""Schedulers as callbacks, and recording values (such as the learning rate) batch by batch."""
from __future__ import annotations

import matplotlib.pyplot as plt

from .callback import Callback

__all__ = ['BaseSchedCB', 'BatchSchedCB', 'EpochSchedCB', 'HasLearnCB', 'RecorderCB']


class BaseSchedCB(Callback):
    "Build `sched(learn.opt)` (a `torch.optim.lr_scheduler` factory) when the fit starts; step it in training."
    skip_in_probes = True
    def __init__(self, sched): self.sched = sched
    def before_fit(self, learn): self.schedo = self.sched(learn.opt)
    def _step(self, learn):
        if learn.training: self.schedo.step()


class BatchSchedCB(BaseSchedCB):
    "Step the scheduler after every training batch (e.g. `OneCycleLR`)."
    def after_batch(self, learn): self._step(learn)


class EpochSchedCB(BaseSchedCB):
    "Step the scheduler after every training epoch (e.g. `StepLR`)."
    def after_epoch(self, learn): self._step(learn)


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

    def plot(self):
        "One small plot per recorded value, side by side; returns the figure."
        fig, axs = plt.subplots(1, len(self.recs), figsize=(4 * len(self.recs), 3), squeeze=False)
        for ax, (k, v) in zip(axs.flat, self.recs.items()):
            ax.plot(v)
            ax.set_title(k)
            ax.set_xlabel('batch')
        return fig
