"""Parameter groups: how a model splits into groups trained at their own learning rates (a splitter), and the
optimizer's groups for a learning rate given as a number, a `slice(lo, hi)` or one number a group."""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

__all__ = ['default_splitter', 'split_params', 'spread_lrs', 'optimizer_params', 'BATCHNORMS']

#: what an `lr` argument takes: one rate, `slice(lo, hi)` (spread over the groups) or one rate a group
LR = float | slice | list[float] | tuple[float, ...]
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _has_conv(m: nn.Module) -> bool:
    return any(isinstance(c, nn.modules.conv._ConvNd) for c in m.modules())


def default_splitter(model: nn.Module) -> list:
    """The groups of a model the library builds: for `Sequential(body, head)` (`vision_learner`) and for the ResNets
    (a `Sequential` whose last children hold no convolution: the head), the body in two (its first three quarters, its last) and the head; any other
    model is one group (give `Learner(splitter=...)` to split it)."""
    if not isinstance(model, nn.Sequential) or len(model) < 2: return [model]
    kids = list(model)
    if len(kids) == 2 and isinstance(kids[0], nn.Sequential) and _has_conv(kids[0]) and not _has_conv(kids[1]):
        body, head = list(kids[0]), [kids[1]]
    else:
        cut = len(kids)
        while cut > 0 and not _has_conv(kids[cut - 1]): cut -= 1
        if cut in (0, len(kids)): return [model]
        body, head = kids[:cut], kids[cut:]
    while len(body) == 1 and len(list(body[0].children())) > 1: body = list(body[0].children())  # a body in one
    cut = max(1, len(body) * 3 // 4)  # the last quarter (a ResNet's last stages) is nearest the new task
    return [g for g in (body[:cut], body[cut:], head) if g]


def split_params(model: nn.Module, splitter: Callable[[nn.Module], Iterable] | None = None) -> list[list[nn.Parameter]]:
    """`splitter(model)`'s groups as lists of parameters (a group may be a module, a list of modules or of
    parameters); parameters that no group names join the last group, so every parameter is trained."""
    groups, seen, out = (splitter or default_splitter)(model), set(), []
    for g in groups:
        items = [g] if isinstance(g, (nn.Module, nn.Parameter)) else list(g)
        ps = []
        for it in items:
            for p in ([it] if isinstance(it, nn.Parameter) else it.parameters()):
                if id(p) not in seen: seen.add(id(p)); ps.append(p)
        if ps: out.append(ps)
    rest = [p for p in model.parameters() if id(p) not in seen]
    if rest:
        if out: out[-1].extend(rest)
        else: out.append(rest)
    return out


def spread_lrs(lr: LR | None, n: int) -> list[float]:
    """One learning rate per group: a number for all; `slice(lo, hi)` from `lo` (the first group) to `hi` (the last),
    geometrically; `slice(hi)` `hi / 10` for all groups but the last; a list, one each."""
    if isinstance(lr, slice):
        lo, hi = lr.start, lr.stop
        if hi is None: raise ValueError(f'lr={lr}: a slice needs its end, the last group\'s learning rate')
        if n < 2:
            raise ValueError(f'lr={lr} spreads learning rates over parameter groups, but this model has {n} group: '
                             f'give a number, or a splitter (Learner(..., splitter=...)) that makes several groups')
        if lo is None: return [hi / 10] * (n - 1) + [hi]
        if not (lo > 0 and hi > 0) or lo > hi:
            raise ValueError(f'lr={lr}: a slice(lo, hi) needs 0 < lo <= hi (lo for the first group, hi for the last)')
        return [lo * (hi / lo) ** (i / (n - 1)) for i in range(n)]
    if isinstance(lr, (list, tuple)):
        if len(lr) != n:
            raise ValueError(f'{len(lr)} learning rates given for a model with {n} parameter groups: give one a group')
        return [float(x) for x in lr]
    if lr is None or not math.isfinite(float(lr)): raise ValueError(f'lr must be a finite number, got {lr!r}')
    return [float(lr)] * n


def optimizer_params(model: nn.Module, lr: LR | None,
                     splitter: Callable[[nn.Module], Iterable] | None = None) -> tuple[Any, float | None]:
    """What `fit` gives the optimizer, and the learning rate to build it with: the model's parameters and `lr` for a
    number (one group, as before groups existed), a group a splitter group with its own rate for a slice or a list."""
    if not isinstance(lr, (slice, list, tuple)): return model.parameters(), lr
    groups = split_params(model, splitter)
    lrs = spread_lrs(lr, len(groups))
    return [{'params': ps, 'lr': r} for ps, r in zip(groups, lrs)], lrs[-1]
