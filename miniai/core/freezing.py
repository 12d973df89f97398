"""Freezing: training only the last parameter groups of a model (`learn.freeze()`, `freeze_to(n)`, `unfreeze()`).

Frozen parameters stop requiring gradients, so the backward pass neither computes nor stores theirs; they stay in the
optimizer (a parameter without a gradient is skipped), so its groups and a checkpoint's optimizer state are the same
frozen or not. BatchNorm layers keep training in frozen groups: their statistics are the data's, not the backbone's.
"""
from __future__ import annotations

from .groups import BATCHNORMS, split_params
from .learner import Learner, learner_method

__all__ = ['freeze_to', 'freeze', 'unfreeze', 'frozen_groups']


def frozen_groups(learn: Learner) -> int:
    "How many of `learn`'s first parameter groups are frozen (0: none)."
    return learn.__dict__.get('frozen_to', 0)


@learner_method
def freeze_to(self: Learner, n: int) -> Learner:
    """Freeze the first `n` parameter groups (negative: all but the last `-n`) and train the others; BatchNorm layers
    keep training everywhere."""
    groups = split_params(self.model, getattr(self, 'splitter', None))
    k = len(groups)
    if k < 2:
        raise ValueError('freeze: this model has one parameter group, so nothing would be left to train; give '
                         'Learner(..., splitter=fn) where fn(model) returns the groups (e.g. [body, head])')
    if not isinstance(n, int) or not -k <= n <= k:
        raise ValueError(f'freeze_to({n!r}): this model has {k} parameter groups, so n is a whole number in '
                         f'[-{k}, {k}]')
    n = n % k if n < 0 else n
    bn = {id(p) for m in self.model.modules() if isinstance(m, BATCHNORMS) for p in m.parameters(recurse=False)}
    for i, ps in enumerate(groups):
        for p in ps: p.requires_grad_(i >= n or id(p) in bn)
    self.frozen_to = n
    return self


@learner_method
def freeze(self: Learner) -> Learner:
    "Train only the last parameter group (the head) and the BatchNorm layers."
    return freeze_to(self, -1)


@learner_method
def unfreeze(self: Learner) -> Learner:
    "Train every parameter."
    for p in self.model.parameters(): p.requires_grad_(True)
    self.frozen_to = 0
    return self
