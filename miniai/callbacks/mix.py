"""MixUp and CutMix: training batches made of two images each, with the loss taken against both labels.

Each training batch is mixed with a shuffled copy of itself (`perm`), by a weight `lam` drawn from Beta(alpha,
alpha): MixUp blends the whole images (`lam x + (1 - lam) x[perm]`), CutMix pastes a box of `x[perm]` covering
`1 - lam` of the image into `x` (`lam` then being the share the box left). The batch's targets stay the hard labels,
so `MetricsCB` (which reads `learn.batch[1]`) measures accuracy against the true classes; the loss becomes
`lam loss(preds, y) + (1 - lam) loss(preds, y[perm])` (for cross-entropy, the loss on the soft targets
`lam onehot(y) + (1 - lam) onehot(y[perm])`): the loss the Learner computed, reweighted in `after_loss` with one more
call of its loss function, so any loss taking hard labels works. Validation batches are left alone.

The draws (`lam`, `perm`, CutMix's box) come from torch's global CPU generator, so they never wait for a GPU;
`set_seed` seeds it and checkpoints keep it: a fit resumed mid-epoch draws what the uninterrupted fit drew.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from ..core.events import Callback
from ..core.learner import compute_loss

if TYPE_CHECKING:
    from ..core.learner import Learner

__all__ = ['MixCB', 'MixUpCB', 'CutMixCB']


class MixCB(Callback):
    """What MixUp and CutMix share: the draws, the loss against both labels, training batches only. Subclasses
    define `mix(x, x2, lam)`, returning the mixed batch and the `lam` it really used. `p`: the chance that a batch
    is mixed at all (the draws are made whatever happens, so the sequence of random numbers does not depend on it)."""
    order = 2  # after DeviceCB (0) and batch transforms (0); before MixedPrecision (10) leaves autocast in after_loss

    def __init__(self, alpha: float = 0.4, p: float = 1.0) -> None:
        if not alpha > 0: raise ValueError(f'{type(self).__name__}: alpha (of the Beta distribution) must be > 0; '
                                           f'got {alpha}')
        if not 0 <= p <= 1: raise ValueError(f'{type(self).__name__}: p is a probability in [0, 1]; got {p}')
        self.alpha, self.p = alpha, p
        self.lam, self.perm = None, None

    def draw(self, n: int) -> tuple[float, torch.Tensor, bool]:
        "The weight `lam`, the permutation of the batch, and whether to mix this batch; all on the CPU."
        a = torch.tensor(float(self.alpha))
        lam = torch.distributions.Beta(a, a).sample().item()
        perm = torch.randperm(n)
        return lam, perm, torch.rand(()).item() < self.p

    def mix(self, x: torch.Tensor, x2: torch.Tensor, lam: float) -> tuple[torch.Tensor, float]:
        raise NotImplementedError

    def before_batch(self, learn: Learner) -> None:
        self.lam, self.perm = None, None
        if not learn.training: return
        x, y = learn.batch[0], learn.batch[1]
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor) or y.dim() != 1 \
                or y.is_floating_point():
            raise ValueError(f'{type(self).__name__} mixes batches (images, class indices); this batch has '
                             f'{_describe(x)} and {_describe(y)}')
        lam, perm, go = self.draw(len(x))
        if not go: return
        perm = perm.to(x.device, non_blocking=True)
        xm, self.lam = self.mix(x, x[perm], lam)
        self.perm = perm
        learn.batch = (xm, *learn.batch[1:])

    def after_loss(self, learn: Learner) -> None:
        if self.lam is None: return
        y = learn.batch[1]
        learn.loss = learn.loss * self.lam + compute_loss(learn.loss_func, learn.preds, y[self.perm]) * (1 - self.lam)


def _describe(t) -> str:
    return f'{t.dtype} {tuple(t.shape)}' if isinstance(t, torch.Tensor) else type(t).__name__


class MixUpCB(MixCB):
    "MixUp: each training image blended with another of its batch, `lam x + (1 - lam) x[perm]` (see this module)."
    def mix(self, x: torch.Tensor, x2: torch.Tensor, lam: float) -> tuple[torch.Tensor, float]:
        if not x.is_floating_point():
            raise ValueError(f'MixUpCB blends float images; the batch is {x.dtype} (mix after normalising)')
        return torch.lerp(x2, x, lam), lam


class CutMixCB(MixCB):
    """CutMix: into each training image, a box of another image of its batch, the same box for the batch, covering
    about `1 - lam` of the area; `lam` is then the share the box really left (the box is clipped at the edges)."""
    def __init__(self, alpha: float = 1.0, p: float = 1.0) -> None: super().__init__(alpha, p)

    def draw(self, n: int) -> tuple[float, torch.Tensor, bool]:
        lam, perm, go = super().draw(n)
        self._centre = torch.rand(2).tolist()  # drawn with the others, used by `mix`
        return lam, perm, go

    def mix(self, x: torch.Tensor, x2: torch.Tensor, lam: float) -> tuple[torch.Tensor, float]:
        if x.dim() < 3: raise ValueError(f'CutMixCB cuts boxes out of images [N, C, H, W]; the batch is {_describe(x)}')
        h, w = x.shape[-2:]
        cut = math.sqrt(1 - lam)
        cy, cx = int(self._centre[0] * h), int(self._centre[1] * w)
        y0, y1 = max(cy - int(h * cut) // 2, 0), min(cy + int(h * cut) // 2, h)
        x0, x1 = max(cx - int(w * cut) // 2, 0), min(cx + int(w * cut) // 2, w)
        out = x.clone()
        out[..., y0:y1, x0:x1] = x2[..., y0:y1, x0:x1]
        return out, 1 - (y1 - y0) * (x1 - x0) / (h * w)
