"""Training tricks: early stopping, stopping on NaN, gradient clipping and gradient accumulation."""
from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING

import torch

from ..core.events import Callback, CancelFitException
from .metrics import improved, monitor_mode, monitor_value

if TYPE_CHECKING:
    from ..core.learner import Learner

__all__ = ['EarlyStoppingCB', 'TerminateOnNaNCB', 'GradClipCB', 'GradAccumCB']


class EarlyStoppingCB(Callback):
    """End the fit when `monitor` (e.g. 'valid loss', 'accuracy') has not improved by more than `min_delta` for
    `patience` epochs; `stopped_epoch` says when."""
    skip_in_probes = True
    order = 25  # after MetricsCB logged the epoch and SaveModelCB saved it

    def __init__(self, monitor: str = 'valid loss', patience: int = 3, min_delta: float = 0., mode: str | None = None) -> None:
        self.monitor, self.patience, self.min_delta = monitor, patience, min_delta
        self.mode = monitor_mode(monitor, mode)

    def before_fit(self, learn: Learner) -> None: self.best, self.wait, self.stopped_epoch = None, 0, None

    def after_epoch(self, learn: Learner) -> None:
        if learn.training and learn.phases[1]: return
        v = monitor_value(learn, self.monitor)
        if v is None: return
        if improved(v, self.best, self.mode, self.min_delta): self.best, self.wait = v, 0
        else:
            self.wait += 1
            if self.wait >= self.patience:
                self.stopped_epoch = learn.epoch
                print(f'Early stopping after epoch {learn.epoch}: {self.monitor} has not improved on {self.best:.4f} '
                      f'for {self.patience} epochs')
                raise CancelFitException()


class TerminateOnNaNCB(Callback):
    """Stop at the first loss that is not finite, before its backward pass and step, so the weights (and the last
    checkpoint) stay good; `nan_at` holds (epoch, batch). This reads the loss every batch: on a GPU that is one
    synchronisation per batch, the price of never taking a bad step."""
    def before_fit(self, learn: Learner) -> None: self.nan_at = None

    def after_loss(self, learn: Learner) -> None:
        if not math.isfinite(learn.loss.item()):
            self.nan_at = (learn.epoch, learn.iter)
            warnings.warn(f'loss is {learn.loss.item()} at epoch {learn.epoch}, batch {learn.iter} '
                          f'({"training" if learn.training else "validation"}); stopping before that step',
                          RuntimeWarning, stacklevel=2)
            raise CancelFitException()


class GradClipCB(Callback):
    """Clip the gradients' global norm to `max_norm` after each backward pass. Loss-scaled (fp16) gradients are
    unscaled first, by every callback that scales the loss (`MixedPrecision`, `AccelerateCB`: those with an
    `unscale_grads` method), looked up at each step, since they make this fit's scaler in their own `before_fit`."""
    def __init__(self, max_norm: float, norm_type: float = 2.) -> None: self.max_norm, self.norm_type = max_norm, norm_type

    def after_backward(self, learn: Learner) -> None:
        for cb in learn.cbs:
            if callable(getattr(cb, 'unscale_grads', None)): cb.unscale_grads(learn)
        self.last_norm = torch.nn.utils.clip_grad_norm_(learn.model.parameters(), self.max_norm, self.norm_type)


class _AccumulatingOpt:
    "Stands in for the optimizer: `step` only every `n` calls, with the summed gradients divided by their count."
    def __init__(self, opt, n: int): self.opt, self.n, self.pending = opt, n, 0
    def __getattr__(self, name): return getattr(self.opt, name)

    def step(self):
        self.pending += 1
        if self.pending == self.n: self.flush()

    def zero_grad(self, set_to_none: bool = True): pass  # gradients are cleared after each real step instead

    def flush(self):
        if not self.pending: return
        with torch.no_grad():
            for g in self.opt.param_groups:
                for p in g['params']:
                    if p.grad is not None: p.grad /= self.pending  # the mean over batches, as one big batch gives
        self.opt.step()
        self.opt.zero_grad()
        self.pending = 0


class GradAccumCB(Callback):
    """Accumulate gradients over `n` batches before each optimizer step, as one batch `n` times larger would give
    (for models without BatchNorm). A shorter group at the end of an epoch is stepped too. Use bf16 or fp32 (an fp16
    `GradScaler` steps the optimizer itself)."""
    order = 50  # after schedulers (order 0) were built on the real optimizer

    def __init__(self, n: int) -> None:
        if n < 1: raise ValueError(f'GradAccumCB: n must be >= 1, got {n}')
        self.n = n

    def before_fit(self, learn: Learner) -> None: learn.opt = self.acc = _AccumulatingOpt(learn.opt, self.n)

    def after_epoch(self, learn: Learner) -> None:
        if learn.training: self.acc.flush()

    def cleanup_fit(self, learn: Learner) -> None:
        opt = getattr(learn, 'opt', None)  # a fit may fail before its optimizer is made
        if isinstance(opt, _AccumulatingOpt): learn.opt = opt.opt
