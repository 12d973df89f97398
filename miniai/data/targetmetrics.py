"""The torcheval metrics of the target kinds beyond one class (see `miniai.data.targets`): thresholded multi-label
accuracy and F1 (from logits), mean absolute error, and MSE over outputs of any shape (images). Each sums its counts
over batches and ranks (`merge_state` adds them), so `MetricsCB` reads it once per epoch, as it does torcheval's own.
Imported when `Targets.metrics()` is first asked: torcheval's import costs about 1.3 s."""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch

with warnings.catch_warnings():
    warnings.filterwarnings('ignore', message='`torch.jit.script` is deprecated', category=FutureWarning)
    from torcheval.metrics import MeanSquaredError, MulticlassAccuracy
    from torcheval.metrics.metric import Metric

if TYPE_CHECKING:  # names for the annotations only
    from typing import Any

__all__ = ['MultilabelThresholdAccuracy', 'MultilabelF1', 'MeanAbsoluteError', 'FlatMSE']


def _count(t: torch.Tensor) -> torch.Tensor:
    "How many values `t` holds, as a tensor where `t` is: filled there, not copied from the host (no wait on a GPU)."
    return t.new_full((), float(t.numel()), dtype=torch.float32)


class _Sums(Metric):
    "Sums of per-batch counts (`states`, from `count(input, target)`), reported by `result(*sums)`."
    states: tuple = ()

    def __init__(self, device=None):
        super().__init__(device=device)
        for s in self.states: self._add_state(s, torch.tensor(0., device=self.device))

    def count(self, input: torch.Tensor, target: torch.Tensor, /) -> tuple: raise NotImplementedError
    def result(self, *sums: torch.Tensor) -> torch.Tensor: raise NotImplementedError

    @torch.inference_mode()
    def update(self, input: torch.Tensor, target: torch.Tensor) -> '_Sums':
        if input.numel() != target.numel():
            raise ValueError(f'{type(self).__name__}: outputs of shape {tuple(input.shape)} but targets of shape '
                             f'{tuple(target.shape)}')
        counts = self.count(input.detach().float().reshape(target.shape), target.float())
        for s, v in zip(self.states, counts): setattr(self, s, getattr(self, s) + v)
        return self

    @torch.inference_mode()
    def compute(self) -> torch.Tensor: return self.result(*[getattr(self, s) for s in self.states])

    @torch.inference_mode()
    def merge_state(self, metrics) -> '_Sums':
        for m in metrics:
            for s in self.states: setattr(self, s, getattr(self, s) + getattr(m, s).to(self.device))
        return self


class _Thresholded(_Sums):
    "Multi-label counts from logits: a label is predicted where its sigmoid is above `threshold`."
    states = ('tp', 'fp', 'fn', 'right', 'n')

    def __init__(self, threshold: float = 0.5, device=None):
        super().__init__(device)
        self.threshold = threshold

    def count(self, logits: torch.Tensor, target: torch.Tensor) -> tuple:
        pred, true = logits.sigmoid() > self.threshold, target > 0.5
        return ((pred & true).sum(), (pred & ~true).sum(), (~pred & true).sum(), (pred == true).sum(),
                _count(target))


class MultilabelThresholdAccuracy(_Thresholded):
    "The fraction of label decisions that are right, over every label of every item (from logits, thresholded)."
    def result(self, tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor, right: torch.Tensor,  # pyright: ignore[reportIncompatibleMethodOverride]  (a sum a state: `compute` passes `states`)
               n: torch.Tensor) -> torch.Tensor: return right / n.clamp(min=1)


class MultilabelF1(_Thresholded):
    """Micro-averaged F1 over every label of every item (from logits, thresholded): 2TP / (2TP + FP + FN); 0 where
    nothing is predicted and nothing is true."""
    def result(self, tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor, right: torch.Tensor,  # pyright: ignore[reportIncompatibleMethodOverride]  (as above)
               n: torch.Tensor) -> torch.Tensor: return 2 * tp / (2 * tp + fp + fn).clamp(min=1)


class MeanAbsoluteError(_Sums):
    "The mean absolute difference of outputs and targets, over every value."
    states = ('sum_abs', 'n')
    def count(self, input: torch.Tensor, target: torch.Tensor) -> tuple: return (input - target).abs().sum(), _count(target)
    def result(self, sum_abs: torch.Tensor, n: torch.Tensor) -> torch.Tensor: return sum_abs / n.clamp(min=1)  # pyright: ignore[reportIncompatibleMethodOverride]  (as above)


class FlatMSE(MeanSquaredError):
    "torcheval's MSE over outputs of any shape (an image per item, a value per item): each item flattened."
    def update(self, input: torch.Tensor, target: torch.Tensor, **kwargs: Any) -> 'FlatMSE':
        return super().update(input.detach().float().reshape(len(target), -1),
                              target.float().reshape(len(target), -1), **kwargs)
