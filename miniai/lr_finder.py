"""Finding a learning rate: grow it exponentially batch by batch until the loss blows up."""
from __future__ import annotations

import math

import matplotlib.pyplot as plt
from torch.optim.lr_scheduler import ExponentialLR

from .callback import Callback, CancelEpochException, CancelFitException
from .progress import show_or_save

__all__ = ['LRFinderCB', 'suggest_lr']


def suggest_lr(lrs, losses, beta: float = 0.98) -> float:
    "One tenth of the learning rate at which the (bias-corrected exponentially smoothed) loss was lowest."
    if not lrs: raise ValueError('suggest_lr: no learning rate was recorded')
    avg, best, best_i = 0., math.inf, 0
    for i, loss in enumerate(losses):
        if not math.isfinite(loss): break
        avg = beta * avg + (1 - beta) * loss
        smooth = avg / (1 - beta ** (i + 1))
        if smooth < best: best, best_i = smooth, i
    return lrs[best_i] / 10


class LRFinderCB(Callback):
    """Multiply the learning rate by `gamma` after each training batch; stop when the loss exceeds `max_mult` times
    its minimum or stops being finite. Skips validation. Reads the loss every batch: it is a probe, not training.
    `plot`: draw loss against learning rate at the end (True), also save it to a file (a path), or not (False)."""
    def __init__(self, gamma: float = 1.3, max_mult: float = 3, plot=True):
        self.gamma, self.max_mult, self.show = gamma, max_mult, plot
        self.lrs, self.losses = [], []

    def before_fit(self, learn):
        self.sched = ExponentialLR(learn.opt, self.gamma)
        self.lrs, self.losses, self.min = [], [], math.inf

    def after_batch(self, learn):
        if not learn.training: raise CancelEpochException()
        self.lrs.append(learn.opt.param_groups[0]['lr'])
        loss = learn.loss.item()
        self.losses.append(loss)
        if loss < self.min: self.min = loss
        if not math.isfinite(loss) or loss > self.min * self.max_mult: raise CancelFitException()
        self.sched.step()

    @property
    def suggestion(self) -> float: return suggest_lr(self.lrs, self.losses)

    def plot(self, ax=None):
        "Loss against learning rate on a log axis, the suggested learning rate marked."
        if ax is None: _, ax = plt.subplots(figsize=(5, 3.5))
        keep = [(lr, l) for lr, l in zip(self.lrs, self.losses) if math.isfinite(l)]
        ax.plot([lr for lr, _ in keep], [l for _, l in keep])
        ax.set_xscale('log')
        ax.set_xlabel('learning rate')
        ax.set_ylabel('loss')
        if self.lrs:
            ax.axvline(self.suggestion, color='C1', ls='--', label=f'suggested {self.suggestion:.2e}')
            ax.legend()
        return ax

    def cleanup_fit(self, learn):
        if not (self.show and self.lrs): return
        self.plot()
        show_or_save(plt.gcf(), self.show, 'lr_find', "pass lr_find(plot='lr_find.png') to save it to a file, or "
                     "plt.savefig('lr_find.png') now (it is the current figure); lr_find(plot=False) draws none")
