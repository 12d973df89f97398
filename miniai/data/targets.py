"""What a batch's targets are, in one place: `Targets`, a kind and what follows from it. Every loader of miniai says
which kind its targets are (`dls.targets`; loaders that do not say are 'class'), and the rest asks it: the default
loss, the default metrics, how outputs become predictions, how a target is titled when shown.

| kind | a target | the model outputs | loss | metrics | a prediction |
|---|---|---|---|---|---|
| 'class' | a class index (int64) | a score per class | cross-entropy | accuracy | class, probability |
| 'multilabel' | multi-hot floats | a score per class | BCE with logits | accuracy, F1 | labels, probabilities |
| 'regression' | floats [values] | one value per target column | MSE | MSE, MAE | the value(s) |
| 'image' | an image (C, H, W), floats in [0, 1] | an image | MSE | MSE, MAE | the image |
| 'mask' | a code per pixel (H, W), uint8 | a score per code per pixel | cross-entropy | pixel accuracy, mean IoU | the mask, each pixel's probability |

Multi-label accuracy and F1 count a label as predicted where its sigmoid is above `threshold`; a prediction is the
labels above it with their probabilities. A mask's `classes` are its codes (codes.txt). A new kind is a new row: its
name in `KINDS`, a branch in each method here, its own facts in `extra`; then `miniai.tools.results._panels` for its pictures and
`miniai.core.checks._SAME_SHAPE` if its outputs and targets have one shape.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from typing import TYPE_CHECKING
if TYPE_CHECKING:  # names for the annotations only
    from collections.abc import Callable
    from typing import Any

__all__ = ['KINDS', 'Targets']

KINDS = ('class', 'multilabel', 'regression', 'image', 'mask')


@dataclass
class Targets:
    """The kind of a loader's targets (`KINDS`) and its facts: `classes` (the class or label names; for 'regression'
    the names of the target columns), `threshold` (a multi-label prediction's probability cut-off). Asked for the
    default `loss` and `metrics()`, for turning outputs into predictions (`activate`, `decode`) and for titles."""
    kind: str = 'class'
    classes: list | None = None
    threshold: float = 0.5
    extra: dict = field(default_factory=dict)  # room for a kind's own facts (a mask's codes)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f'unknown target kind {self.kind!r}; miniai knows {", ".join(KINDS)}')
        if not 0 < self.threshold < 1: raise ValueError(f'threshold must be in (0, 1), got {self.threshold}')
        if self.classes is not None: self.classes = list(self.classes)

    @property
    def n_out(self) -> int | None:
        "How many values the model outputs per item (None for images: as many as the target image has)."
        return None if self.kind == 'image' or self.classes is None else len(self.classes)

    @property
    def loss(self) -> Callable[..., torch.Tensor]:
        "The default loss: cross-entropy, BCE with logits (multi-label), MSE (regression, images)."
        if self.kind == 'mask':
            from .masks import mask_loss
            return mask_loss
        return {'class': F.cross_entropy, 'multilabel': F.binary_cross_entropy_with_logits}.get(self.kind, F.mse_loss)

    def metrics(self) -> dict:
        "Fresh torcheval metrics for `MetricsCB(**dls.targets.metrics())`, by name."
        from . import targetmetrics as tm  # imported when asked: torcheval's import costs about 1.3 s
        if self.kind == 'class':
            from torcheval.metrics import MulticlassAccuracy  # torcheval's import warning is quieted by `tm`'s
            return {'accuracy': MulticlassAccuracy()}
        if self.kind == 'mask':
            from .segmetrics import MeanIoU, PixelAccuracy
            n = len(self.classes or ())
            return {'pixel_accuracy': PixelAccuracy(n), 'mean_iou': MeanIoU(n)}
        if self.kind == 'multilabel':
            return {'accuracy_multi': tm.MultilabelThresholdAccuracy(self.threshold),
                    'f1_multi': tm.MultilabelF1(self.threshold)}
        return {'mse': tm.FlatMSE(), 'mae': tm.MeanAbsoluteError()}

    @property
    def monitor(self) -> str:
        "The metric that says a model is better (for checkpoints and early stopping): the first of `metrics()`."
        return {'class': 'accuracy', 'multilabel': 'f1_multi', 'mask': 'mean_iou'}.get(self.kind, 'mse')

    def activate(self, out: torch.Tensor) -> torch.Tensor:
        "The model's outputs as what they mean: probabilities (softmax; sigmoid for labels), values, [0, 1] images."
        out = out.float()
        if self.kind in ('class', 'mask'): return out.softmax(1)
        if self.kind == 'multilabel': return out.sigmoid()
        if self.kind == 'image': return out.clamp(0, 1)
        return out

    def decode(self, act: torch.Tensor) -> tuple[Any, Any]:
        """One item's activated output as (label, prob): the class and its probability; the labels above the
        threshold and their probabilities (most likely first); the value (a float, or a list for several columns)
        and None; the image and None."""
        name = lambda i: self.classes[i] if self.classes else i
        if self.kind == 'class':
            p, i = act.max(0)
            return name(int(i)), p.item()
        if self.kind == 'multilabel':
            idx = [i for i in act.argsort(descending=True).tolist() if act[i] > self.threshold]
            return [name(i) for i in idx], [act[i].item() for i in idx]
        if self.kind == 'regression': return (act.item() if act.numel() == 1 else act.tolist()), None
        if self.kind == 'mask':  # [codes, H, W] probabilities: each pixel's code and its probability
            p, code = act.max(0)
            return code.to(torch.uint8), p
        return act, None

    def title(self, y: torch.Tensor) -> str:
        "A target (or a decoded prediction's label) as a short title: class names, labels, values; '' for images."
        if self.kind == 'class':
            return str(self.classes[int(y)]) if self.classes is not None else str(int(y))
        if self.kind == 'multilabel':
            names = self.classes or list(range(len(y)))
            return ';'.join(str(names[i]) for i in torch.nonzero(y > 0.5).flatten().tolist()) or '(none)'
        if self.kind == 'regression': return ', '.join(f'{v:.3g}' for v in torch.as_tensor(y).flatten().tolist())
        return ''

    def label_title(self, label: Any) -> str:
        "A `decode`d label as a title."
        if self.kind == 'multilabel': return ';'.join(map(str, label)) or '(none)'
        if self.kind == 'regression':
            return ', '.join(f'{v:.3g}' for v in (label if isinstance(label, list) else [label]))
        return '' if self.kind in ('image', 'mask') else str(label)

    def to_json(self) -> dict:
        "The facts, as JSON (for an export's or a run's record)."
        return {'kind': self.kind, 'classes': self.classes, 'threshold': self.threshold, **self.extra}

    @classmethod
    def from_json(cls, d: dict | None) -> 'Targets':
        d = dict(d or {})
        return cls(d.pop('kind', 'class'), d.pop('classes', None), d.pop('threshold', 0.5), d)


