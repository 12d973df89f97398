"""What a classifier gets wrong: the confusion matrix, the most confused pairs of classes and the items with the
highest loss, all from one pass of `learn.get_preds` over a loader (the validation set by default).

    interp = ClassificationInterpretation.from_learner(learn)
    interp.plot_confusion_matrix(); interp.most_confused()[:5]; interp.plot_top_losses(9)

The plots return nothing, so a Jupyter cell shows each once; in a script, `plt.savefig` keeps them.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import torch

from ..callbacks.metrics import quiet_torcheval
from ..core.checks import is_nll_loss
from ..core.learner import Learner
from ..data.normalise import Normalise
from ..data.show import get_grid, show_image
from .inference import get_preds, targets_of

from typing import TYPE_CHECKING
if TYPE_CHECKING:  # names for the annotations only
    from collections.abc import Sequence
    from typing import Any

__all__ = ['ClassificationInterpretation']


class ClassificationInterpretation:
    """Predictions, targets, inputs and per-item losses of a classifier over one loader, and what they show. `classes`
    names the classes (else they are numbered); `mean` and `std` (those of `fashion_dls`, for instance) undo the
    inputs' normalisation for showing them."""
    def __init__(self, probs: torch.Tensor, targs: torch.Tensor, inputs: torch.Tensor | None, losses: torch.Tensor,
                 classes: Sequence[str] | None = None, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None) -> None:
        if probs.dim() != 2 or targs.shape != probs.shape[:1]:
            raise ValueError(f'ClassificationInterpretation takes (items, classes) probabilities and one class index '
                             f'per item; got shapes {tuple(probs.shape)} and {tuple(targs.shape)}')
        self.probs, self.targs, self.inputs, self.losses = probs, targs.long(), inputs, losses
        self.preds = probs.argmax(1)
        self.classes = list(classes) if classes is not None else list(range(probs.shape[1]))
        self.mean, self.std = mean, std

    @classmethod
    def from_learner(cls, learn: Learner, dl: Any = None) -> ClassificationInterpretation:
        """One pass of `learn.get_preds` over `dl` (default: the validation loader; or new items, `dls.test_dl(...)`
        with labels), a look that changes nothing."""
        if getattr(dl, 'labelled', True) is False:
            raise ValueError("ClassificationInterpretation needs each item's true class, and this test_dl has none: "
                             "make it from a folder of class folders named as dls.classes (dls.test_dl('new/')), or "
                             "give labels (dls.test_dl(files, labels=[...]))")
        if (kind := targets_of(learn).kind) != 'class':
            raise ValueError(f'ClassificationInterpretation is for one class per item, and these targets are {kind}: '
                             f'use miniai.tools.results.TargetInterpretation.from_learner(learn)')
        out, targs, inputs, losses = get_preds(learn, dl, with_input=True, with_loss=True)
        probs = out.float().exp() if is_nll_loss(learn.loss_func) else out.float().softmax(1)
        dls = learn.dls
        return cls(probs, targs, inputs, losses, getattr(dls, 'classes', None), getattr(dls, 'mean', None),
                   getattr(dls, 'std', None))

    def _name(self, i: int) -> str: return str(self.classes[i])

    def confusion_matrix(self) -> torch.Tensor:
        "Counts (int64): row = actual class, column = predicted class (torcheval's confusion matrix)."
        with quiet_torcheval(): from torcheval.metrics.functional import multiclass_confusion_matrix
        return multiclass_confusion_matrix(self.preds, self.targs, len(self.classes)).long()

    def plot_confusion_matrix(self, normalize: bool = False, figsize: tuple[float, float] = (7, 7), cmap: str = 'Blues') -> None:
        "The confusion matrix with the class names, as counts (or, with `normalize`, fractions of each actual class)."
        cm = self.confusion_matrix().float()
        if normalize: cm = cm / cm.sum(1, keepdim=True).clamp(min=1)
        _, ax = plt.subplots(figsize=figsize)
        ax.imshow(cm.numpy(), cmap=cmap)
        names = [self._name(i) for i in range(len(self.classes))]
        ax.set_xticks(range(len(names)), names, rotation=90)
        ax.set_yticks(range(len(names)), names)
        ax.set_xlabel('predicted')
        ax.set_ylabel('actual')
        top = cm.max().item()
        for i in range(len(names)):
            for j in range(len(names)):
                v = cm[i, j].item()
                ax.text(j, i, f'{v:.2f}' if normalize else f'{int(v)}', ha='center', va='center', fontsize=8,
                        color='white' if v > top / 2 else 'black')
        ax.set_title('Confusion matrix' + (' (fraction of each actual class)' if normalize else ''))
        ax.figure.tight_layout()  # pyright: ignore[reportAttributeAccessIssue]

    def most_confused(self, min_val: int = 1) -> list[tuple[str, str, int]]:
        "(actual, predicted, count) for every pair of different classes confused at least `min_val` times, most first."
        cm = self.confusion_matrix()
        pairs = [(self._name(i), self._name(j), int(cm[i, j])) for i in range(len(cm)) for j in range(len(cm))
                 if i != j and cm[i, j] >= min_val]
        return sorted(pairs, key=lambda t: -t[2])

    def top_losses(self, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        "The `k` highest losses (all, if None) and the indices of their items, highest first."
        return self.losses.topk(len(self.losses) if k is None else min(k, len(self.losses)))

    def _shown(self, x: torch.Tensor) -> torch.Tensor:
        "An input as it looked before normalisation, [0, 1] pixels (as it is, where the normalisation is not known)."
        if self.mean is None or self.std is None: return x
        return Normalise(self.mean, self.std, channels=x.shape[0], spatial_dims=x.dim() - 1).decode(x)

    def plot_top_losses(self, k: int = 9, nrows: int | None = None, imsize: float = 2.2) -> None:
        """The `k` items with the highest loss, un-normalised, each titled with the predicted class and its
        probability, the actual class and the loss."""
        if self.inputs is None: raise ValueError('plot_top_losses needs the inputs: make it with from_learner')
        losses, idxs = self.top_losses(k)
        fig, axs = get_grid(len(idxs), nrows=nrows, imsize=imsize, title='Highest losses: predicted (probability) / '
                            'actual / loss', size=11)
        for ax, i, loss in zip(axs.flat, idxs.tolist(), losses.tolist()):
            p = self.preds[i].item()
            show_image(self._shown(self.inputs[i]), ax=ax, cmap='gray',
                       title=f'{self._name(p)} ({self.probs[i, p]:.2f})\n{self._name(self.targs[i].item())} / '  # pyright: ignore[reportArgumentType]
                             f'{loss:.2f}')
            ax.title.set_fontsize(9)
        fig.tight_layout()
