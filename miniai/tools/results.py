"""Looking at a model's results for targets of any kind (`miniai.data.targets`): `learn.show_results()` (input,
target and prediction side by side) and `TargetInterpretation` (the items with the highest loss), both from one pass
of `learn.get_preds`, a look that changes nothing. For one class per image, `ClassificationInterpretation` adds the
confusion matrix.

    learn.show_results(max_n=6)
    TargetInterpretation.from_learner(learn).plot_top_losses(9)
"""
from __future__ import annotations

import torch

from ..core.learner import Learner, learner_method
from ..data.normalise import denormalised
from ..data.targets import Targets
from .inference import get_preds, targets_of

from typing import TYPE_CHECKING
if TYPE_CHECKING:  # names for the annotations only
    from typing import Any

__all__ = ['show_results', 'TargetInterpretation']


def _as_shown(dls: Any, xb: torch.Tensor) -> torch.Tensor:
    "Inputs as they looked before `dls` normalised them."
    return denormalised(xb, getattr(dls, 'mean', None), getattr(dls, 'std', None))


def _panels(targets: Targets, xs, ys, acts, notes=None) -> tuple[list, list, int]:
    """The images, titles and columns of a figure of items: for image targets three panels an item (input | target |
    prediction), else one, titled with the target and the prediction (and `notes`, e.g. losses)."""
    notes = notes or [''] * len(xs)
    if targets.kind == 'image':
        ims = [im for x, y, a in zip(xs, ys, acts) for im in (x, y.float(), a)]
        titles = [t for n in notes for t in ('input', 'target', f'prediction{n}')]
        return ims, titles, 3
    if targets.kind == 'mask':  # input | target mask | predicted mask, the masks laid over the input
        from ..data.show import overlay_masks  # imported when shown: matplotlib costs 0.4 s
        n = len(targets.classes or ())
        preds = torch.stack([targets.decode(a)[0] for a in acts]) if len(acts) else torch.zeros(0)
        over_t, over_p = overlay_masks(xs, ys, n), overlay_masks(xs, preds, n)
        ims = [im for x, t, p in zip(xs, over_t, over_p) for im in (x, t, p)]
        titles = [t for n in notes for t in ('input', 'target', f'prediction{n}')]
        return ims, titles, 3
    titles = [f'{targets.title(y)}\n{targets.label_title(targets.decode(a)[0])}{n}'
              for y, a, n in zip(ys, acts, notes)]
    return list(xs), titles, min(len(xs), 3)


@learner_method
def show_results(self: Learner, max_n: int = 6, dl: Any = None, **kwargs: Any) -> None:
    """Show up to `max_n` items of `dl` (default: the validation loader) with their target and the model's
    prediction: one panel an item, titled target (first line) and prediction (second); for image targets three
    panels an item, input | target | prediction. Like `show_images`, returns nothing (`plt.gcf()` is the figure)."""
    from ..data.show import show_images  # imported when shown: matplotlib costs 0.4 s
    out, targs, inps = get_preds(self, dl, with_input=True)
    if targs is None: raise ValueError('show_results needs targets: this loader\'s batches have none')
    t, n = targets_of(self), min(max_n, len(out))
    ims, titles, ncols = _panels(t, _as_shown(self.dls, inps[:n]), targs[:n], t.activate(out[:n]))
    show_images(ims, ncols=ncols, titles=titles, **kwargs)


class TargetInterpretation:
    """The outputs, targets, inputs and per-item losses of a model over one loader, for targets of any kind: which
    items it gets most wrong (`top_losses`, `plot_top_losses`)."""
    def __init__(self, out: torch.Tensor, targs: torch.Tensor, inputs: torch.Tensor, losses: torch.Tensor,
                 targets: Targets, dls: Any = None) -> None:
        if not len(out) == len(targs) == len(losses):
            raise ValueError(f'TargetInterpretation: {len(out)} outputs, {len(targs)} targets, {len(losses)} losses')
        self.out, self.targs, self.inputs, self.losses = out, targs, inputs, losses
        self.targets, self.dls = targets, dls
        self.acts = targets.activate(out)

    @classmethod
    def from_learner(cls, learn: Learner, dl: Any = None) -> 'TargetInterpretation':
        "One pass of `learn.get_preds` over `dl` (default: the validation loader), with inputs and losses."
        if getattr(dl, 'labelled', True) is False:
            raise ValueError('TargetInterpretation needs each item\'s target, and this test_dl has none')
        out, targs, inputs, losses = get_preds(learn, dl, with_input=True, with_loss=True)
        return cls(out, targs, inputs, losses, targets_of(learn), learn.dls)

    def top_losses(self, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        "The `k` highest losses (all, if None) and the indices of their items, highest first."
        return self.losses.topk(len(self.losses) if k is None else min(k, len(self.losses)))

    def plot_top_losses(self, k: int = 9, **kwargs: Any) -> None:
        """The `k` items with the highest loss, titled target / prediction / loss (for image targets: input | target
        | prediction, the loss with the prediction)."""
        from ..data.show import show_images
        losses, idx = self.top_losses(k)
        ims, titles, ncols = _panels(self.targets, _as_shown(self.dls, self.inputs[idx]), self.targs[idx],
                                     self.acts[idx], [f'\nloss {v:.3g}' for v in losses.tolist()])
        show_images(ims, ncols=ncols, titles=titles, **kwargs)
