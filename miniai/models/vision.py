"""`vision_learner`: a Learner for a pretrained (or fresh) torchvision or timm backbone with a new head, ready for
`fine_tune`."""
from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn, optim

from ..callbacks.metrics import MetricsCB
from ..core.learner import DeviceCB, TrainLearner
from .backbones import adapt_first_conv, channel_stats_for, create_head, load_backbone

if TYPE_CHECKING:
    from ..core.events import Callback

__all__ = ['vision_model', 'vision_learner', 'data_channels', 'fused_adamw']

FUSED_DEVICES = ('cpu', 'cuda')  # where torch has a fused AdamW kernel


def fused_adamw(params: Iterable, lr: float = 1e-3, **kwargs: Any) -> optim.AdamW:
    """`optim.AdamW` with torch's fused kernel (one pass over all the parameters instead of a Python loop of small
    operations each: 3-6x less optimizer time on a CPU, where it was a fifth of a resnet18 step at batch 64, see
    bench/results/fine_tune_peers.md), when every parameter is a float on a CPU or CUDA device; else the plain one.
    `params` may be parameters or groups (dicts), as for any optimizer."""
    params = [{**g, 'params': list(g['params'])} if isinstance(g, dict) else g for g in params]
    flat = [p for g in params for p in (g['params'] if isinstance(g, dict) else [g])]
    ok = 'fused' not in kwargs and 'foreach' not in kwargs and all(
        p.is_floating_point() and p.device.type in FUSED_DEVICES for p in flat)
    return optim.AdamW(params, lr=lr, **({'fused': True} if ok else {}), **kwargs)


def data_channels(dls: Any) -> int:
    "The number of channels of the images `dls` gives (its tensors' second dimension, or a first batch's)."
    x = getattr(dls.train, 'x', None)
    if x is None: x = next(iter(dls.train))[0]
    return int(x.shape[1])


def vision_model(arch: str | Callable[..., nn.Module], n_out: int, n_in: int = 3, pretrained: bool = True,
                 weights_file: str | os.PathLike | None = None, hidden: int = 512, p: float = 0.5) -> tuple[nn.Sequential, tuple | None]:
    """`Sequential(body, head)`: `arch`'s body cut where it pools (with its pretrained weights), its first convolution
    taking `n_in` channels (adapted from the pretrained ones), and a new head for `n_out` outputs; and the
    normalisation statistics for `n_in` channels that the weights expect (None when not pretrained)."""
    body, stats = load_backbone(arch, pretrained, n_in, weights_file)
    if not hasattr(body, 'num_features'): adapt_first_conv(body, n_in)  # timm adapts its own (in_chans)
    was = body.training
    body.eval()
    with torch.no_grad(): nf = body(torch.zeros(1, n_in, 64, 64)).shape[1]
    body.train(was)
    model = nn.Sequential(body, create_head(nf, n_out, hidden, p))
    return model, (channel_stats_for(stats, n_in) if stats is not None else None)


def vision_learner(dls: Any, arch: str | Callable[..., nn.Module], pretrained: bool = True, n_out: int | None = None,
                   n_in: int | None = None, loss_func: Callable = F.cross_entropy, lr: float = 2e-3,
                   opt_func: Callable = fused_adamw, metrics: Any = None, cbs: Iterable[Callback] | None = None,
                   splitter: Callable[[nn.Module], Iterable] | None = None, weights_file: str | os.PathLike | None = None,
                   normalize: bool = True, **head_kw: Any) -> TrainLearner:
    """A `TrainLearner` for `arch` (a torchvision builder or name, or a timm name) with a new head for
    `len(dls.classes)` classes (or `n_out`) and the data's channels (or `n_in`); with `pretrained`, the loaders are
    told to normalise with the weights' statistics (`normalize=False`: leave them). `metrics`: a dict of torcheval
    metrics, or one (shown as 'accuracy'), for a `MetricsCB`. Its groups: the body's first three quarters, the rest,
    the head; `learn.fine_tune(...)` freezes the body for its first epoch."""
    n_in = data_channels(dls) if n_in is None else n_in
    if n_out is None:
        if getattr(dls, 'classes', None) is None: raise ValueError('vision_learner: dls has no .classes: give n_out')
        n_out = len(dls.classes)
    model, stats = vision_model(arch, n_out, n_in, pretrained, weights_file, **head_kw)
    if stats is not None and normalize:
        if hasattr(dls, 'normalize_with'): dls.normalize_with(*stats)
        else: warnings.warn(f'vision_learner: normalise the images with the weights\' mean={stats[0]}, '
                            f'std={stats[1]} (these loaders cannot be told to)', stacklevel=2)
    extra = [] if metrics is None else [MetricsCB(**(metrics if isinstance(metrics, dict) else {'accuracy': metrics}))]
    learn = TrainLearner(model, dls, loss_func, lr=lr, opt_func=opt_func, cbs=[DeviceCB(), *extra, *(cbs or [])],
                         splitter=splitter)
    learn.pretrained_stats = stats
    return learn
