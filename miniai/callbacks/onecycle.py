"""One-line fits whose schedules come from the loaders: `fit_one_cycle`, `fit_flat_cos`, and `fine_tune` (a frozen
fit of the head, then the whole model at learning rates growing from the first layers to the last)."""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import fastcore.all as fc
from torch.optim.lr_scheduler import LambdaLR, OneCycleLR

from ..core.freezing import freeze, unfreeze
from ..core.learner import Learner, learner_method
from ..core.ranks import world_size
from .schedule import BatchSchedCB

if TYPE_CHECKING:
    import os

    from torch import optim
    from torch.optim.lr_scheduler import LRScheduler

    from ..core.events import Callback
    from ..core.groups import LR

    #: a `make` for `LoaderSchedCB`: (optimizer, the fit's training batches, each group's rate) -> its scheduler
    MakeSched = Callable[[optim.Optimizer, int, list[float]], LRScheduler]

__all__ = ['LoaderSchedCB', 'one_cycle', 'flat_cos', 'fit_one_cycle', 'fit_flat_cos', 'fine_tune']


class LoaderSchedCB(BatchSchedCB):
    """A per-batch schedule as long as this fit: `make(opt, total_steps, base_lrs)` builds it, `total_steps` being the
    fit's epochs times this process's training batches and `base_lrs` the fit's learning rates, one a parameter group.
    Alone in one process it is built as the fit starts; in several, at the first training epoch, once `DDPCB` has
    sharded the loaders. A resumed fit goes on with the saved schedule (the same epochs and batches are required)."""
    def __init__(self, make: MakeSched) -> None:
        super().__init__(None)
        self.make = make

    def before_fit(self, learn: Learner) -> None:
        self._base, self.schedo = [g['lr'] for g in learn.opt.param_groups], None
        if world_size() == 1: self._start(learn)

    def before_epoch(self, learn: Learner) -> None:
        if self.schedo is None and learn.training: self._start(learn)

    def _start(self, learn):
        opt, resuming = learn.opt, self._saved is not None
        keep = [{k: v for k, v in g.items() if k != 'params'} for g in opt.param_groups]
        self.schedo = self.make(opt, max(1, self._fit_steps(learn)[0] or 1), self._base)
        if resuming:
            self._restore(self._saved)  # pyright: ignore[reportArgumentType]  (not None when resuming)
            # a schedule built after the optimizer's state was loaded (several processes) must not reset its values
            if world_size() > 1:
                for g, k in zip(opt.param_groups, keep): g.update(k)
            for g, lr in zip(opt.param_groups, self.schedo.get_last_lr()): g['lr'] = lr
        self._saved = None


def _momentum_kw(opt) -> dict:
    "Cycle momentum only where the optimizer has some (Adam's betas, SGD with momentum): never switch it on."
    d = opt.defaults
    return {} if 'betas' in d or d.get('momentum', 0) else {'cycle_momentum': False}


def one_cycle(pct_start: float = 0.25, div: float = 25., div_final: float = 1e5) -> MakeSched:
    "A `make` for `LoaderSchedCB`: `OneCycleLR` peaking at each group's rate after `pct_start` of the fit."
    def make(opt, total, base):
        # OneCycleLR divides by its warm-up's length, pct_start * total - 1: zero for e.g. 4 steps at 0.25
        pct = pct_start if abs(pct_start * total - 1) > 1e-6 else 1.5 / total
        return OneCycleLR(opt, max_lr=base, total_steps=total, pct_start=pct, div_factor=div,
                          final_div_factor=div_final, **_momentum_kw(opt))
    return make


def flat_cos(pct_start: float = 0.75) -> MakeSched:
    "A `make` for `LoaderSchedCB`: each group's rate held for `pct_start` of the fit, then annealed to 0 by a cosine."
    def make(opt, total, base):
        flat = int(total * pct_start)
        def f(i): return 1. if i < flat else 0.5 * (1 + math.cos(math.pi * min(1., (i - flat) / max(1, total - flat))))
        for g, lr in zip(opt.param_groups, base): g['lr'] = g['initial_lr'] = lr
        s = LambdaLR(opt, f)
        s.total_steps = total  # saved with its state: a resume with another length is refused  # pyright: ignore[reportAttributeAccessIssue]  (our own mark on the scheduler)
        return s
    return make


@learner_method
def fit_one_cycle(self: Learner, n_epochs: int, lr_max: LR | None = None,
                  div: float = 25., div_final: float = 1e5, pct_start: float = 0.25,
                  cbs: Callback | Iterable[Callback] | None = None, **kwargs: Any) -> None:
    """`fit(n_epochs)` under a one-cycle schedule to `lr_max` (a number or `slice(lo, hi)`; default `learn.lr`),
    its length counted from the loaders; `kwargs` go to `fit` (`resume=`...)."""
    sched = LoaderSchedCB(one_cycle(pct_start, div, div_final))
    self.fit(n_epochs, lr=self.lr if lr_max is None else lr_max, cbs=[sched, *fc.L(cbs)], **kwargs)


@learner_method
def fit_flat_cos(self: Learner, n_epochs: int, lr: LR | None = None,
                 pct_start: float = 0.75, cbs: Callback | Iterable[Callback] | None = None, **kwargs: Any) -> None:
    "`fit(n_epochs)` at `lr` (a number or a slice) for `pct_start` of the batches, then annealed to 0 by a cosine."
    self.fit(n_epochs, lr=self.lr if lr is None else lr, cbs=[LoaderSchedCB(flat_cos(pct_start)), *fc.L(cbs)],
             **kwargs)


@learner_method
def fine_tune(self: Learner, epochs: int, base_lr: float = 2e-3, freeze_epochs: int = 1, lr_mult: float = 100,
              pct_start: float = 0.3, div: float = 5., cbs: Callback | Iterable[Callback] | None = None,
              resume: str | os.PathLike | None = None) -> None:
    """Train a pretrained model on new data: `freeze_epochs` one-cycle epochs of the head alone (`freeze`), then
    `epochs` of everything (`unfreeze`) at rates from `base_lr / 2 / lr_mult` (first group) to `base_lr / 2` (head).
    `resume` (a checkpoint) goes to the first fit that runs: a checkpoint saved in the frozen fit goes on there; one
    of the unfrozen fit goes on with `freeze_epochs=0`, which skips the frozen fit (its weights are the checkpoint's)."""
    if freeze_epochs:
        freeze(self)
        fit_one_cycle(self, freeze_epochs, slice(base_lr), pct_start=0.99, cbs=cbs, resume=resume)
        resume = None
    unfreeze(self)
    if epochs: fit_one_cycle(self, epochs, slice(base_lr / 2 / lr_mult, base_lr / 2), pct_start=pct_start, div=div,
                             cbs=cbs, resume=resume)
