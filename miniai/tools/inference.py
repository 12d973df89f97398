"""Using a trained model: `learn.get_preds(dl)` over any data loader, `learn.predict(x)` for one item or a batch,
test-time augmentation (`tta`) and `learn.show_image_batch()`, the batch as the model gets it.

Both run through the Learner's own loop and callbacks (so `DeviceCB`, mixed precision, channels-last and any batch
transform apply as in validation), and both are looks: the model's parameters, buffers and train/eval modes, the
optimizer, the data loaders' order and the random generators are as they were afterwards, and the callbacks that
report, record or save (`skip_in_probes`) sit out.
"""
from __future__ import annotations

from copy import copy
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from ..callbacks.preds import CapturePreds
from ..callbacks.transform import BatchTransformCB
from ..core.checks import is_nll_loss
from ..core.devices import model_device, to_device
from ..core.events import Callback, CancelFitException
from ..core.learner import Learner, learner_method
from ..core.state import looking, rng_state, set_rng_state
from ..data.items import Preprocess, data_preprocess, item_shape
from ..data.targets import Targets

from typing import TYPE_CHECKING
if TYPE_CHECKING:  # names for the annotations only
    from collections.abc import Callable, Iterable, Sequence
    from typing import Any

__all__ = ['Prediction', 'predictions', 'kind_predictions', 'targets_of', 'batch_of', 'get_preds', 'predict', 'per_item_loss', 'input_shape',
           'learner_preprocess', 'tta', 'show_image_batch']


def per_item_loss(loss_func: Callable, preds: torch.Tensor, targs: torch.Tensor) -> torch.Tensor:
    "`loss_func` for each item of `preds` against `targs` (reduction='none', averaged over any other dimension)."
    if isinstance(loss_func, nn.Module) and hasattr(loss_func, 'reduction'):
        old, loss_func.reduction = loss_func.reduction, 'none'  # pyright: ignore[reportArgumentType]  (a loss module's reduction is a str)
        try: res = loss_func(preds, targs)
        finally: loss_func.reduction = old
    else:
        try: res = loss_func(preds, targs, reduction='none')
        except TypeError:  # a loss without `reduction`: one item at a time
            res = torch.stack([loss_func(p[None], t[None]) for p, t in zip(preds, targs)])
    return res.reshape(len(preds), -1).mean(1) if res.dim() > 1 else res


@learner_method
def get_preds(self: Learner, dl: Any = None, with_input: bool = False, with_loss: bool = False,
              act: Callable[[torch.Tensor], torch.Tensor] | None = None, cbs: Iterable[Callback] | None = None) -> tuple:
    """Predictions over `dl` (default: the validation loader), on the CPU: `(preds, targets)`, then the inputs if
    `with_input` and each item's loss if `with_loss`. `act` (e.g. `lambda p: p.softmax(-1)`) is applied to the
    predictions; the loss is taken on them before; `act=learn.dls.targets.activate` gives what the outputs mean for
    any kind of target (class or label probabilities, values, [0, 1] images). A loader whose batches have no targets gives targets None.
    A look, not a change (see this module's docstring); `cbs` are added for this pass only."""
    col = CapturePreds(with_input, skip_loss=True)
    dls = self.dls
    if dl is not None:
        self.dls = copy(dls)  # keeps `classes`, `mean`, `std`
        self.dls.valid = dl
    try:
        with looking(self): self.fit(1, train=False, cbs=[col, *(cbs or [])])
    finally: self.dls = dls
    preds, targs = col.all_preds, col.all_targs
    if preds is None: raise ValueError('get_preds: the data loader yielded no batch')
    res = [preds if act is None else act(preds), targs]
    if with_input: res.append(col.all_inps)
    if with_loss:
        if targs is None: raise ValueError('get_preds(with_loss=True): the batches have no targets to take a loss on')
        with torch.no_grad(): res.append(per_item_loss(self.loss_func, preds, targs))
    return tuple(res)


def input_shape(learn: Learner) -> tuple:
    "The shape of one input item, from the Learner's validation data (whose order is left as it was)."
    return item_shape(learn.dls.valid)


def learner_preprocess(learn: Learner, what: str = 'learn.predict') -> Preprocess:
    "How the Learner's inputs were made from images (shape, normalisation, resize rule), from its data."
    return data_preprocess(learn.dls, what)


class Prediction(NamedTuple):
    """What `predict` gives: the class (its name when the data has `classes`), its probability, all probabilities.
    For other targets (`dls.targets.kind`): the labels above the threshold, their probabilities, every label's
    (multi-label); the value (a float; a list for several columns), None, the outputs (regression); the image, None,
    the image (image-to-image)."""
    label: object
    prob: object
    probs: torch.Tensor


def predictions(probs: torch.Tensor, classes: Sequence[str] | None, how: str) -> Prediction | list[Prediction]:
    """`probs` [N, classes] as `predict` gives them, `how` the items came: 'one' (one `Prediction`), 'list' (a list
    of them) or 'batch' (one `Prediction` of lists: classes, a tensor of probabilities, a row of probabilities each)."""
    if probs.dim() != 2:
        raise ValueError(f'predict gives classes, but the model outputs shape {tuple(probs.shape)} per batch, not '
                         f'(items, classes): use learn.get_preds(dl=...) for other outputs')
    prob, idx = probs.max(1)
    labels = [classes[i] if classes else i for i in idx.tolist()]
    if how == 'batch': return Prediction(labels, prob, probs)
    res = [Prediction(lab, p.item(), ps) for lab, p, ps in zip(labels, prob, probs)]
    return res[0] if how == 'one' else res


def kind_predictions(targets: Targets, acts: torch.Tensor, how: str) -> Prediction | list[Prediction]:
    """Activated outputs `acts` (`targets.activate`) as `predict` gives them for targets of any kind, `how` the items
    came (see `predictions`)."""
    res = [Prediction(*targets.decode(a), a) for a in acts]
    if how == 'batch': return Prediction([r.label for r in res], [r.prob for r in res], acts)
    return res[0] if how == 'one' else res


def targets_of(learn: Learner) -> Targets:
    "What the Learner's targets are: its loaders' `targets`, else one class per item (with their `classes`)."
    t = getattr(learn.dls, 'targets', None)
    return t if isinstance(t, Targets) else Targets('class', getattr(learn.dls, 'classes', None))


def batch_of(prep: Preprocess, x: Any) -> tuple[torch.Tensor, str]:
    "New items `x` as one model batch, and how they came ('one', 'list' or 'batch'; see `predictions`)."
    if prep.is_one(x): return prep.batch([x]), 'one'
    if isinstance(x, (torch.Tensor, np.ndarray)): return prep.batch(x), 'batch'
    return prep.batch(list(x)), 'list'


@learner_method(name='predict_item')
def predict(self: Learner, x: Any, act: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Prediction | list[Prediction]:
    """The class of `x`, its probability and all probabilities (for other targets, see `Prediction`). `x` is what a user has: a file's path, a PIL image,
    uint8 pixels as decoded, or an already-normalised float tensor (see `miniai.data.items.Preprocess`: decoded,
    resized as the training images were, normalised with their statistics); one item gives one `Prediction`, a list
    of them a list, a batch tensor one `Prediction` of lists (classes, a tensor of probabilities, one row each).
    `act` turns the model's outputs into probabilities: softmax by default, `exp` for a model trained with nll_loss."""
    xb, how = batch_of(learner_preprocess(self), x)
    xb = to_device(xb, model_device(self.model))  # DeviceCB, if there is one, keeps it there
    if (t := targets_of(self)).kind != 'class':
        out = get_preds(self, dl=[(xb,)])[0]
        return kind_predictions(t, t.activate(out) if act is None else act(out), how)
    if act is None: act = torch.exp if is_nll_loss(self.loss_func) else (lambda o: o.float().softmax(1))
    out = get_preds(self, dl=[(xb,)])[0]
    return predictions(act(out) if out.dim() == 2 else out, getattr(self.dls, 'classes', None), how)


class _GrabBatch(Callback):
    order = 100  # after every transform of the batch
    def before_batch(self, learn):
        self.batch = learn.batch
        raise CancelFitException()


@learner_method
def show_image_batch(self: Learner, max_n: int = 9, cbs: Iterable[Callback] | None = None, **kwargs: Any) -> None:
    """Show up to `max_n` images of a training batch as the model would get it (after `cbs`, e.g. augmentation);
    like `show_images`, returns nothing (`plt.gcf()` is the figure)."""
    from ..data.show import show_images  # imported when shown: matplotlib costs 0.4 s
    grab = _GrabBatch()
    with looking(self): self.fit(1, valid=False, cbs=[grab] + list(cbs or []))
    show_images(grab.batch[0][:max_n].float().cpu(), **kwargs)


def tta(learn: Learner, tfm: Callable[[torch.Tensor], torch.Tensor] = lambda x: x.flip(-1), n: int = 1,
        beta: float = 0.5) -> dict:
    """Test-time augmentation: the predicted probabilities over the validation set as it is, and averaged over `n`
    passes with `tfm` applied to the inputs (default: a left-right flip); the result is `beta` of the plain pass plus
    `1 - beta` of the augmented ones (fastai uses 4 passes of its training augmentation and beta 0.25, e.g.
    `tta(learn, aug_transforms(stats=learn.dls), n=4, beta=0.25)`). A random `tfm` (a `miniai.data.warp.Augment`)
    draws anew in each pass, from seeds drawn from torch's generator, which is then left as it was: the same call
    gives the same result. Returns both accuracies, the combined probabilities and the targets."""
    if n < 1: raise ValueError(f'tta: n is the number of augmented passes, at least 1; got {n}')
    if not 0 <= beta <= 1: raise ValueError(f'tta: beta is the plain pass\'s weight, in [0, 1]; got {beta}')
    preds, targs = learn.capture_preds()
    aug = BatchTransformCB(lambda b: (tfm(b[0]), *b[1:]), on_train=False, on_val=True)
    rngs = rng_state()
    try:
        seeds = torch.randint(0, 2 ** 62, (n,)).tolist()
        aug_probs = 0
        for s in seeds:
            torch.manual_seed(s)  # what this pass draws (its look puts this state back, not the one before)
            aug_probs = aug_probs + learn.capture_preds(cbs=[aug])[0].softmax(-1) / n
    finally: set_rng_state(rngs)
    avg = preds.softmax(-1) * beta + aug_probs * (1 - beta)
    acc = lambda p: (p.argmax(-1) == targs).float().mean().item()
    return {'accuracy': acc(preds), 'tta_accuracy': acc(avg), 'probs': avg, 'targets': targs}
