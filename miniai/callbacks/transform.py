"""Changing batches before the model sees them: `BatchTransformCB`, and `augment_cb` for augmentations."""
from __future__ import annotations

from torch import nn

from ..core.events import Callback

from typing import TYPE_CHECKING
if TYPE_CHECKING:  # names for the annotations only
    from collections.abc import Callable
    from typing import Any

    from ..core.learner import Learner

__all__ = ['BatchTransformCB', 'augment_cb']


class BatchTransformCB(Callback):
    "Replace each batch by `tfm(batch)` before it is used, in training (`on_train`) and/or validation (`on_val`)."
    def __init__(self, tfm: Callable[[Any], Any], on_train: bool = True, on_val: bool = True) -> None:
        self.tfm, self.on_train, self.on_val = tfm, on_train, on_val

    def before_batch(self, learn: Learner) -> None:
        if (self.on_train and learn.training) or (self.on_val and not learn.training):
            learn.batch = self.tfm(learn.batch)


def augment_cb(*tfms: nn.Module, on_val: bool = False, targets: str | None = None) -> BatchTransformCB:
    """A `BatchTransformCB` applying `tfms` in turn to the inputs (`batch[0]`) of training batches. With `targets`
    ('mask' or 'image'), the targets (`batch[1]`) are masks or images that must move with their images: each of
    `tfms` then takes and returns both (`tfm(x, y, target=targets) -> (x, y)`, as `miniai.data.warp.Augment` does),
    and a transform that changes the input alone is refused, since it would part an image from its target."""
    if targets is None:
        seq = nn.Sequential(*tfms)
        return BatchTransformCB(lambda b: (seq(b[0]), *b[1:]), on_train=True, on_val=on_val)
    if targets not in ('mask', 'image'): raise ValueError(f"augment_cb: targets is 'mask', 'image' or None; got "
                                                          f"{targets!r}")
    alone = [type(t).__name__ for t in tfms if not getattr(t, 'pairs_targets', False)]
    if alone: raise ValueError(f'augment_cb(targets={targets!r}): {", ".join(alone)} transform(s) the images alone, '
                               f'which would part them from their {targets}s; use transforms that take both '
                               f'(miniai.data.warp.Augment)')
    def both(b):
        x, y = b[0], b[1]
        for t in tfms: x, y = t(x, y, target=targets)
        return (x, y, *b[2:])
    return BatchTransformCB(both, on_train=True, on_val=on_val)
