"""Backbones made by others: a torchvision or timm network found by name (or builder), with or without its pretrained
weights, cut where it pools, its first convolution adapted to the data's channels, and a new head."""
from __future__ import annotations

import difflib
import importlib.util
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .layers import init_weights

__all__ = ['TIMM_MISSING', 'resolve_arch', 'create_body', 'create_head', 'adapt_first_conv', 'channel_stats_for',
           'load_backbone', 'weights_stats']

TIMM_MISSING = "timm is not installed: pip install 'miniai-learner[timm]' (or pip install timm)"


def _torchvision_names() -> list[str]:
    import torchvision.models as tvm
    return tvm.list_models(module=tvm)  # the classification networks


def _timm_names() -> list[str]:
    import timm
    return timm.list_models()


def resolve_arch(arch: str | Callable[..., nn.Module]) -> tuple[str, str, Any]:
    """('torchvision' or 'timm', name, builder or None) for `arch`: a torchvision builder (`resnet18`), a torchvision
    name, or a timm name ('timm/...' forces timm). An unknown name is refused with the closest names."""
    if callable(arch): return 'torchvision', arch.__name__, arch
    if not isinstance(arch, str): raise TypeError(f'arch: a model builder or a name, got {type(arch).__name__}')
    import torchvision.models as tvm
    tv, name = _torchvision_names(), arch.removeprefix('timm/')
    if arch in tv: return 'torchvision', arch, tvm.get_model_builder(arch)
    has_timm = importlib.util.find_spec('timm') is not None
    if has_timm and name in _timm_names(): return 'timm', name, None
    pool = tv + (_timm_names() if has_timm else [])
    close = list(dict.fromkeys(difflib.get_close_matches(name, pool, n=8, cutoff=0.5)))[:5]
    hint = f'; the closest names: {", ".join(close)}' if close else ''
    extra = '' if has_timm else f' (timm models are not searched: {TIMM_MISSING})'
    raise ValueError(f'unknown architecture {arch!r}{hint}{extra}')


def load_backbone(arch: str | Callable[..., nn.Module], pretrained: bool, n_in: int,
                  weights_file: str | os.PathLike | None = None) -> tuple[nn.Module, tuple | None]:
    """The network for `arch` without its classifier, with its pretrained weights through the library's own loading
    (torchvision's `weights=`, looked for in `$TORCH_HOME/hub/checkpoints` before downloading; timm's `pretrained=True`,
    `weights_file` going to its `pretrained_cfg_overlay`), and the weights' (mean, std) or None."""
    kind, name, builder = resolve_arch(arch)
    if kind == 'timm':
        if importlib.util.find_spec('timm') is None: raise ImportError(TIMM_MISSING)
        import timm
        kw: dict[str, Any] = {'pretrained_cfg_overlay': dict(file=str(weights_file))} if weights_file else {}
        m = timm.create_model(name, pretrained=pretrained, num_classes=0, global_pool='', in_chans=n_in, **kw)
        cfg = m.pretrained_cfg
        return m, ((cfg['mean'], cfg['std']) if pretrained else None)  # pyright: ignore[reportIndexIssue, reportArgumentType]  (timm's pretrained_cfg is a dict)
    from torchvision.models import get_model_weights
    weights = get_model_weights(builder).DEFAULT if pretrained else None  # pyright: ignore[reportAttributeAccessIssue]  (an enum of weights)
    m = builder(weights=weights)
    if weights_file is not None:
        raise ValueError(f'weights_file is for timm models; torchvision loads {name} weights from '
                         f'$TORCH_HOME/hub/checkpoints/{weights.url.rsplit("/", 1)[-1] if weights else "..."}')
    stats = None
    if weights is not None:
        t = weights.transforms()
        stats = (tuple(t.mean), tuple(t.std))
    return create_body(m), stats


def create_body(model: nn.Module) -> nn.Sequential:
    "`model`'s children up to where it pools (its first adaptive pooling child; else its last child with a conv)."
    kids = list(model.children())
    pools = [i for i, c in enumerate(kids) if isinstance(c, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d))]
    if pools: cut = pools[0]
    else:
        convs = [i for i, c in enumerate(kids) if any(isinstance(m, nn.Conv2d) for m in c.modules())]
        if not convs: raise ValueError(f'create_body: {type(model).__name__} has no convolution to cut after')
        cut = convs[-1] + 1
    return nn.Sequential(*kids[:cut])


def adapt_first_conv(body: nn.Module, n_in: int) -> None:
    """Give `body`'s first convolution `n_in` input channels, keeping what its weights learnt: one channel gets their
    sum (a grey image is its colours' sum), more channels repeat them in turn, scaled to keep the output's size."""
    conv = next((m for m in body.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None or conv.groups != 1:
        raise ValueError(f'cannot adapt the first layer to {n_in} channels: '
                         f'{"no Conv2d found" if conv is None else f"its convolution is grouped ({conv.groups})"}; '
                         f'use pretrained=False or data with {getattr(conv, "in_channels", "its")} channels')
    c = conv.in_channels
    if c == n_in: return
    w = conv.weight.detach()
    new = w.sum(1, keepdim=True) if n_in == 1 else w[:, [i % c for i in range(n_in)]] * (c / n_in)
    conv.weight = nn.Parameter(new.contiguous())
    conv.in_channels = n_in


def channel_stats_for(stats: Sequence[Sequence[float]], n_in: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    "The weights' (mean, std) for `n_in` channels: their averages for one (a grey image), repeated in turn for more."
    mean, std = (list(map(float, v)) for v in stats)
    if n_in == len(mean): return tuple(mean), tuple(std)
    if n_in == 1: return (sum(mean) / len(mean),), (sum(std) / len(std),)
    return tuple(mean[i % len(mean)] for i in range(n_in)), tuple(std[i % len(std)] for i in range(n_in))


def weights_stats(arch: str | Callable[..., nn.Module], n_in: int) -> tuple:
    """The (mean, std) for `n_in` channels that `arch`'s pretrained weights expect, read from the weights' description
    without loading (or downloading) them: what a resumed fine-tune normalises with, its weights coming from the
    checkpoint."""
    kind, name, builder = resolve_arch(arch)
    if kind == 'timm':
        if importlib.util.find_spec('timm') is None: raise ImportError(TIMM_MISSING)
        import timm
        cfg = timm.create_model(name, pretrained=False, num_classes=0).pretrained_cfg
        return channel_stats_for((cfg['mean'], cfg['std']), n_in)  # pyright: ignore[reportArgumentType, reportIndexIssue]  (timm's pretrained_cfg is a dict)
    from torchvision.models import get_model_weights
    t = get_model_weights(builder).DEFAULT.transforms()  # pyright: ignore[reportAttributeAccessIssue]  (an enum of weights)
    return channel_stats_for((t.mean, t.std), n_in)


class ConcatPool(nn.Module):
    "Average and max pooling to one pixel, side by side: [N, 2C]."
    def forward(self, x: torch.Tensor) -> torch.Tensor: return torch.cat([x.mean((-2, -1)), x.amax((-2, -1))], 1)


def create_head(nf: int, n_out: int, hidden: int = 512, p: float = 0.5) -> nn.Sequential:
    """A head for a body of `nf` output channels: pooled (average and max), BatchNorm, dropout `p / 2`, a hidden
    linear layer and ReLU, BatchNorm, dropout `p`, a linear layer to `n_out`; linear layers Kaiming-initialised."""
    head = nn.Sequential(ConcatPool(), nn.BatchNorm1d(2 * nf), nn.Dropout(p / 2), nn.Linear(2 * nf, hidden), nn.ReLU(),
                         nn.BatchNorm1d(hidden), nn.Dropout(p), nn.Linear(hidden, n_out))
    head.apply(init_weights)
    return head
