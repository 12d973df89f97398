"""Metrics of segmentation, for `MetricsCB`: pixel accuracy and mean IoU, both read from one confusion matrix of codes
accumulated on the model's device (torcheval's confusion matrix per update, no read from the device until the epoch ends). They are
torcheval metrics, so their states merge over processes like the others' (`DDPCB`, `AccelerateCB`).
Imported when a mask's metrics are first asked for (`Targets('mask').metrics()`, `unet_learner`): torcheval's import
costs about 1.3 s, and `import miniai.learner` never pays it."""
from __future__ import annotations

from typing import Iterable

import warnings

import torch

with warnings.catch_warnings():  # torcheval's import warns of torch.jit.script's deprecation (not ours)
    warnings.filterwarnings('ignore', message='`torch.jit.script` is deprecated', category=FutureWarning)
    from torcheval.metrics.functional import multiclass_confusion_matrix
    from torcheval.metrics.metric import Metric

__all__ = ['MaskConfusion', 'PixelAccuracy', 'MeanIoU', 'mask_confusion']


def mask_confusion(preds: torch.Tensor, target: torch.Tensor, n: int, ignore: int | None = None) -> torch.Tensor:
    """Counts [n, n] of (actual code, predicted code) over every pixel of logits `preds` [N, n, H, W] against masks
    `target` [N, H, W]; pixels whose code is `ignore` (CamVid's 'Void', say) are left out."""
    if preds.dim() != 4 or tuple(target.shape) != (preds.shape[0], *preds.shape[2:]):
        raise ValueError(f'mask metrics take logits [N, codes, H, W] and masks [N, H, W]; got {tuple(preds.shape)} '
                         f'and {tuple(target.shape)}')
    if preds.shape[1] != n:
        raise ValueError(f'mask metrics: the model gives {preds.shape[1]} scores a pixel, but the metric counts {n} '
                         f'codes')
    t, p = target.long().flatten(), preds.argmax(1).flatten()
    if ignore is None: return multiclass_confusion_matrix(p, t, num_classes=n)  # the library's one confusion matrix
    # ignored pixels counted as an extra code n and that row dropped: no boolean indexing, whose size a GPU would
    # have to report to the host at every update
    t = torch.where(t == ignore, n, t)
    return multiclass_confusion_matrix(p, t, num_classes=n + 1)[:n, :n]


class MaskConfusion(Metric):
    "The confusion matrix of `n` codes over every pixel seen (see `mask_confusion`); subclasses compute from it."
    counts: torch.Tensor  # [n, n] int64, a torcheval state (`_add_state`)

    def __init__(self, n: int, ignore: int | None = None, device: torch.device | None = None) -> None:
        super().__init__(device=device)
        if n < 2: raise ValueError(f'{type(self).__name__}: n is the number of codes, at least 2; got {n}')
        self.n, self.ignore = n, ignore
        self._add_state('counts', torch.zeros(n, n, dtype=torch.int64, device=self.device))

    @torch.inference_mode()
    def update(self, preds: torch.Tensor, target: torch.Tensor) -> MaskConfusion:
        self.counts += mask_confusion(preds, target.to(preds.device), self.n, self.ignore)
        return self

    @torch.inference_mode()
    def merge_state(self, metrics: Iterable[MaskConfusion]) -> MaskConfusion:  # pyright: ignore[reportIncompatibleMethodOverride]  (torcheval merges metrics of self's class)
        for m in metrics: self.counts += m.counts.to(self.device)
        return self

    def compute(self) -> torch.Tensor:
        "The counts: row = actual code, column = predicted."
        return self.counts


class PixelAccuracy(MaskConfusion):
    "The fraction of pixels (not `ignore`d) whose predicted code is their mask's."
    def compute(self) -> torch.Tensor:
        c = self.counts.double()
        return (c.diagonal().sum() / c.sum().clamp(min=1)).float()


class MeanIoU(MaskConfusion):
    """The mean over codes of intersection over union (pixels both predicted and actually of the code, over pixels
    either is), counting only the codes that were present or predicted."""
    def compute(self) -> torch.Tensor:
        c = self.counts.double()
        inter, union = c.diagonal(), c.sum(0) + c.sum(1) - c.diagonal()
        seen = union > 0
        if not seen.any(): return torch.tensor(0.)
        return (inter[seen] / union[seen]).mean().float()
