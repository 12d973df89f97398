"""Weight averaging as a callback: an exponential moving average of the weights (EMA) or an equal-weight average over
the end of training (SWA). Validation runs on the averaged weights, and at the end of the fit they become the model's.

The average is kept as a flat list of tensors updated with one fused `torch._foreach_lerp_` after every optimizer
step (no copy of the module, so hooks, `torch.compile` and DDP wrappers are never duplicated). BatchNorm's running
statistics are averaged with the weights, which stands in for `torch.optim.swa_utils.update_bn`'s extra pass over the
data. Checkpoints keep the training weights and the average, so `fit(resume=...)` goes on exactly."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..core.events import Callback
from ..core.state import plain_keys

if TYPE_CHECKING:
    from ..core.learner import Learner

__all__ = ['WeightAverageCB']


class WeightAverageCB(Callback):
    """Average the weights while training: `mode='ema'` keeps an exponential moving average with `decay` (warmed up
    as `min(decay, (1 + n) / (10 + n))` after n steps, so the first epochs are not dominated by the random init);
    `mode='swa'` averages every step equally from the fraction `start` of the fit's steps on (before that the
    average follows the weights). Each validation epoch runs on the average, the training weights coming back after
    it; with `keep=True` the average becomes the model's weights at the end of the fit (for TTA, export, `final.ckpt`).
    """
    resume_needs_state = True  # a resumed fit without it would go on without the average: warned of
    skip_in_probes = True  # lr_find or TTA must not restart the average (after the fit the model holds it anyway)
    order = 25  # swaps back after SaveModelCB (20): a checkpoint holds the weights its metrics were measured on

    def __init__(self, mode: str = 'ema', decay: float = 0.999, start: float = 0.75, keep: bool = True) -> None:
        if mode not in ('ema', 'swa'): raise ValueError(f"WeightAverageCB: mode must be 'ema' or 'swa', got {mode!r}")
        if not 0 < decay < 1: raise ValueError(f'WeightAverageCB: decay must be in (0, 1), got {decay}')
        if not 0 <= start < 1: raise ValueError(f'WeightAverageCB: start must be in [0, 1), got {start}')
        self.mode, self.decay, self.start, self.keep = mode, decay, start, keep
        self.avg, self.n, self._backup, self._pending, self._live = None, 0, None, None, None

    # -- the average ----------------------------------------------------------------------------------------
    def _state(self, learn) -> dict:
        """The model's parameters and buffers themselves under plain names, looked up once a fit (after DeviceCB and
        ChannelsLastCB have placed them), so that a training step costs one fused op and no state_dict."""
        if self._live is None:
            keys = plain_keys(learn.model)
            self._live = {keys[k]: v for k, v in learn.model.state_dict(keep_vars=True).items()}
        return self._live

    def before_fit(self, learn: Learner) -> None:
        self._live = None
        st = self._state(learn)
        self._keys = [k for k, v in st.items() if v.is_floating_point()]
        self.avg = [st[k].detach().clone() for k in self._keys]
        self._cur = [st[k] for k in self._keys]  # the live tensors the average follows
        self.n, self._backup = 0, None
        steps = len(learn.dls.train) * max(1, learn.n_epochs) if hasattr(learn.dls.train, '__len__') else None
        self._swa_from = int(self.start * steps) if steps else 0
        if self._pending is not None: self._restore(learn, self._pending)
        self._pending = None

    def weight(self) -> float:
        "How much of the current weights goes into the average at this step."
        if self.mode == 'ema': return 1 - min(self.decay, (1 + self.n) / (10 + self.n))
        return 1.0 if self.n < self._swa_from else 1 / (self.n - self._swa_from + 1)

    @torch.no_grad()
    def after_step(self, learn: Learner) -> None:
        if not learn.training or self.avg is None: return
        torch._foreach_lerp_(self.avg, self._cur, self.weight())  # pyright: ignore[reportPrivateImportUsage]
        self.n += 1

    # -- validation on the average --------------------------------------------------------------------------
    @torch.no_grad()
    def _swap_in(self, learn):
        st = self._state(learn)
        self._backup = [st[k].detach().clone() for k in self._keys]
        for k, a in zip(self._keys, self.avg): st[k].copy_(a)  # pyright: ignore[reportArgumentType]  (set by before_fit)

    @torch.no_grad()
    def _swap_out(self, learn):
        if self._backup is None: return
        st = self._state(learn)
        for k, b in zip(self._keys, self._backup): st[k].copy_(b)
        self._backup = None

    def before_epoch(self, learn: Learner) -> None:
        if not learn.training and self.avg is not None and self.n > 0: self._swap_in(learn)

    def after_epoch(self, learn: Learner) -> None:
        if not learn.training: self._swap_out(learn)

    def cleanup_epoch(self, learn: Learner) -> None:  # an error or a cancel during validation: the training weights come back
        if self._backup is not None: self._swap_out(learn)

    @torch.no_grad()
    def after_fit(self, learn: Learner) -> None:
        if self.keep and self.avg is not None and self.n > 0:
            st = self._state(learn)
            for k, a in zip(self._keys, self.avg): st[k].copy_(a)

    # -- checkpoints ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict | None:
        "What a checkpoint keeps of this callback: the training weights (if swapped out), the average and the count."
        if self.avg is None: return None
        return {'n': self.n, 'avg': dict(zip(self._keys, self.avg)),
                'training': None if self._backup is None else dict(zip(self._keys, self._backup))}

    def load_state_dict(self, state: dict | None) -> None:
        "Take a state from `state_dict`; applied at the next `before_fit` (the average is made there)."
        self._pending = state

    @torch.no_grad()
    def _restore(self, learn, state: dict):
        if set(state['avg']) != set(self._keys):
            raise ValueError(f'WeightAverageCB: the checkpoint averages {len(state["avg"])} tensors, this model has '
                             f'{len(self._keys)} (another model?)')
        for a, k in zip(self.avg, self._keys): a.copy_(state['avg'][k])  # pyright: ignore[reportArgumentType]  (set by before_fit)
        self.n = int(state['n'])
        if state.get('training') is not None:  # saved while validating on the average: train on from the real weights
            st = self._state(learn)
            for k in self._keys: st[k].copy_(state['training'][k])
