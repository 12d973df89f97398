"""Segmentation models: a U-Net whose encoder is a backbone's body (a torchvision network found by name, pretrained or
not, or any `nn.Sequential` of stages), and `unet_learner`, a Learner for it on `DataLoaders.from_masks` data.

The decoder takes the encoder's output back up, stage by stage: at each resolution the body went down through, it
upsamples to that stage's size, joins the stage's features (the skip connection) and convolves; at last it joins the
input image itself and gives one score per code for every pixel, at the input's size."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn, optim

from ..callbacks.metrics import MetricsCB
from ..core.learner import DeviceCB, TrainLearner
from ..data.masks import mask_loss
from .backbones import adapt_first_conv, channel_stats_for, load_backbone
from .layers import conv, init_weights
from .vision import data_channels

from typing import TYPE_CHECKING
if TYPE_CHECKING:  # names for the annotations only
    from collections.abc import Callable, Iterable
    from typing import Any

    from ..core.events import Callback

__all__ = ['UpBlock', 'BodyUNet', 'unet_splitter', 'unet_learner']


def _cbr(ni: int, nf: int) -> nn.Sequential:
    "A 3x3 convolution keeping the size, BatchNorm, ReLU."
    return conv(ni, nf, stride=1, norm=nn.BatchNorm2d, bias=False)


class UpBlock(nn.Module):
    "Upsample `x` to the skip's size, join the skip's channels and convolve twice: `ni + n_skip` -> `nf`."
    def __init__(self, ni: int, n_skip: int, nf: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(_cbr(ni + n_skip, nf), _cbr(nf, nf))

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode='bilinear', align_corners=False)
        return self.convs(torch.cat([x, skip], 1))


def _stages(body: nn.Sequential, n_in: int, size: int = 64) -> tuple[list[int], list[int], int]:
    """Which of `body`'s children end a resolution (the skip connections, shallow first: their indices and channels),
    and the body's output channels; found by passing a small image through it."""
    if not isinstance(body, nn.Sequential) or len(body) < 2:
        raise TypeError(f'BodyUNet: the encoder must be an nn.Sequential of stages (a torchvision body, or your own); '
                        f'got {type(body).__name__}')
    was = body.training
    body.eval()
    shapes, h = [], torch.zeros(1, n_in, size, size)
    with torch.no_grad():
        for m in body:
            h = m(h)
            shapes.append(tuple(h.shape[1:]))
    body.train(was)
    ends = [i for i in range(len(shapes) - 1) if shapes[i][1:] != shapes[i + 1][1:] and shapes[i][1:] != (size, size)]
    return ends, [shapes[i][0] for i in ends], shapes[-1][0]


class BodyUNet(nn.Module):
    """A U-Net on the encoder `body` (an `nn.Sequential` of stages) for `n_in`-channel images: `n_out` scores a pixel,
    at the input's size. `nf` caps the decoder's widths (each stage's own width, at most `nf`)."""
    def __init__(self, body: nn.Sequential, n_out: int, n_in: int = 3, nf: int = 256) -> None:
        super().__init__()
        self.body = body
        self.skips, widths, ni = _stages(body, n_in)
        ups = []
        for w in reversed(widths):
            out = min(w, nf)
            ups.append(UpBlock(ni, w, out))
            ni = out
        self.ups = nn.ModuleList(ups)
        last = max(ni // 2, 16)
        self.final = nn.Sequential(_cbr(ni + n_in, last), nn.Conv2d(last, n_out, 1))
        for m in (self.ups, self.final): m.apply(init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats, h = [], x
        for i, m in enumerate(self.body):
            h = m(h)
            if i in self.skips: feats.append(h)
        for up, f in zip(self.ups, reversed(feats)): h = up(h, f)
        h = F.interpolate(h, size=x.shape[-2:], mode='bilinear', align_corners=False)
        return self.final(torch.cat([h, x.to(h.dtype)], 1))


def unet_splitter(model: BodyUNet) -> list:
    "The groups of a `BodyUNet`: its body's first three quarters, the rest, and the decoder (the part `freeze` trains)."
    body = list(model.body)
    cut = max(1, len(body) * 3 // 4)
    return [body[:cut], body[cut:], [model.ups, model.final]]


def unet_learner(dls: Any, arch: str | Callable[..., nn.Module] | nn.Module, pretrained: bool = True,
                 n_out: int | None = None, n_in: int | None = None, loss_func: Callable = mask_loss, lr: float = 2e-3,
                 opt_func: Callable = optim.AdamW, metrics: dict[str, Any] | None = None,
                 cbs: Iterable[Callback] | None = None, normalize: bool = True, nf: int = 256) -> TrainLearner:
    """A `TrainLearner` for segmentation: a `BodyUNet` on `arch`'s body (a torchvision builder or name, with its
    pretrained weights unless `pretrained=False`; or your own `nn.Sequential` of stages), one score a pixel for each of
    `len(dls.codes)` codes (or `n_out`), the first convolution taking the data's channels. With pretrained weights the
    loaders are told to normalise with their statistics. Metrics: pixel accuracy and mean IoU unless `metrics` (a
    dict) says otherwise. `learn.fine_tune(...)` trains the decoder first, then everything."""
    from ..data.segmetrics import MeanIoU, PixelAccuracy  # imports torcheval: only when a learner is made
    n_in = data_channels(dls) if n_in is None else n_in
    if n_out is None:
        codes = getattr(dls, 'codes', None) or getattr(dls, 'classes', None)
        if not codes: raise ValueError('unet_learner: dls has no .codes (DataLoaders.from_masks gives them): give n_out')
        n_out = len(codes)
    stats = None
    if isinstance(arch, nn.Module): body = arch
    else:
        body, stats = load_backbone(arch, pretrained, n_in)
        adapt_first_conv(body, n_in)
    model = BodyUNet(body, n_out, n_in, nf)  # pyright: ignore[reportArgumentType]  (torchvision's body: an nn.Sequential)
    if stats is not None and normalize and hasattr(dls, 'normalize_with'):
        dls.normalize_with(*channel_stats_for(stats, n_in))
    ms = metrics if metrics is not None else {'pixel_accuracy': PixelAccuracy(n_out), 'mean_iou': MeanIoU(n_out)}
    learn = TrainLearner(model, dls, loss_func, lr=lr, opt_func=opt_func, cbs=[DeviceCB(), MetricsCB(**ms),
                                                                              *(cbs or [])],
                         splitter=unet_splitter)  # pyright: ignore[reportArgumentType]  (called with this model only)
    learn.pretrained_stats = stats
    return learn
