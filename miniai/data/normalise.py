"""Normalising images, and undoing it: the one `Normalise` that the loaders, `show_batch`, the interpretation plots and
exported models all use, and `channel_stats`, the exact per-channel statistics it is made from."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .decode import ImageDataError

__all__ = ['Normalise', 'per_channel', 'channel_stats', 'denormalised']


def _floats(v) -> tuple[float, ...]:
    "A number, or a sequence, tensor or array of them, as a tuple of floats."
    return tuple(float(o) for o in (v if isinstance(v, (Sequence, torch.Tensor, np.ndarray)) else [v]))


def per_channel(v: float | Sequence[float] | torch.Tensor, c: int, what: str) -> tuple[float, ...]:
    "`v` (a number, or one per channel) as `c` floats; one value stands for every channel."
    v = _floats(v)
    if len(v) == 1: v = v * c
    if len(v) != c: raise ValueError(f'{what} has {len(v)} values for {c} channels')
    return v


class Normalise:
    """Per-channel normalisation of images whose channels come before their `spatial_dims` last dimensions
    ([N, C, H, W] or [C, H, W] for 2-D images): `encode` turns uint8 pixels (or floats in [0, 1]) into float32
    `(x / 255 - mean) / std`, `decode` turns normalised images back into [0, 1] pixels. `mean` and `std` are those of
    [0, 1] pixels, one per channel (or one for all of them when `channels` is given)."""
    def __init__(self, mean: float | Sequence[float] | torch.Tensor, std: float | Sequence[float] | torch.Tensor, channels: int | None = None, spatial_dims: int = 2) -> None:
        c = channels or max(len(_floats(mean)), len(_floats(std)))
        self.mean, self.std = per_channel(mean, c, 'mean'), per_channel(std, c, 'std')
        if min(self.std) <= 0: raise ValueError(f'std must be > 0, got {self.std}')
        self.channels, self.spatial_dims, self._consts = c, spatial_dims, {}

    def _const(self, kind: str, device) -> torch.Tensor:
        "A float32 [C, 1, ...] tensor on `device`, made once: the multiplier or the shift of `encode`, or `decode`'s."
        key = (kind, torch.device(device))
        if key not in self._consts:
            m, s = self.mean, self.std
            v = {'scale_u8': [1 / (255 * si) for si in s], 'scale': [1 / si for si in s],
                 'shift': [mi / si for mi, si in zip(m, s)], 'mean': m, 'std': s}[kind]
            shape = (self.channels,) + (1,) * self.spatial_dims
            self._consts[key] = torch.tensor(v, dtype=torch.float32, device=device).view(shape)
        return self._consts[key]

    def encode(self, x: torch.Tensor, device: str | torch.device | None = None) -> torch.Tensor:
        """`x` normalised, as float32 on `device` (default: where `x` is). uint8 becomes `x * (1 / (255 std)) - mean /
        std`: one pass that reads the bytes and writes floats, the same arithmetic as normalising a set up front."""
        dev = torch.device(device) if device is not None else x.device
        if x.device != dev: x = x.to(dev, non_blocking=True)  # uint8 crosses the bus: 4x fewer bytes than floats
        scale = self._const('scale_u8' if x.dtype == torch.uint8 else 'scale', dev)
        return torch.mul(x, scale).sub_(self._const('shift', dev))

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        "Normalised images `x` as [0, 1] pixels (float32, clamped), where `x` is."
        return (x.float() * self._const('std', x.device) + self._const('mean', x.device)).clamp(0, 1)

    def __repr__(self): return f'Normalise(mean={self.mean}, std={self.std})'


def channel_stats(x: torch.Tensor, what: str = 'images', chunk: int = 4096) -> tuple[tuple, tuple]:
    """Per-channel mean and std of uint8 images `x` [N, C, ...] as fractions of 255, exact (from value counts, a chunk
    of images at a time, so a memory-mapped set is read once and never copied whole), rounded to float32. The std
    divides by the pixel count (not count - 1), so a set and the same set repeated have the same statistics."""
    if x.dtype != torch.uint8 or x.dim() < 2: raise ValueError(f'channel_stats: uint8 [N, C, ...], got {x.dtype}')
    counts = torch.zeros(x.shape[1], 256, dtype=torch.int64)
    for i in range(0, len(x), chunk):
        part = x[i:i + chunk]
        for c in range(x.shape[1]): counts[c] += torch.bincount(part[:, c].reshape(-1), minlength=256)
    v = torch.arange(256, dtype=torch.int64)
    means, stds = [], []
    for c, h in enumerate(counts):
        n, s1, s2 = int(h.sum()), int((h * v).sum()), int((h * v * v).sum())  # Python ints: no rounding until here
        if n < 2 or s2 * n == s1 * s1:
            raise ImageDataError(f'{what}: every training pixel of channel {c} is the same; the data cannot be '
                                 f'normalised')
        means.append(float(np.float32(s1 / (255 * n))))
        stds.append(float(np.float32(((s2 * n - s1 * s1) / (n * n)) ** 0.5 / 255)))
    return tuple(means), tuple(stds)


def denormalised(xb: torch.Tensor, mean: Any = None, std: Any = None) -> torch.Tensor:
    """A batch of images `xb` [N, C, H, W] as they looked before they were normalised with `mean` and `std`: on the
    CPU, float, [0, 1] pixels (as it is, where the normalisation is not known or `xb` is not a batch of images);
    for showing a batch (`DataLoaders.show_batch`, `learn.show_results`, top losses)."""
    xb = xb.detach().float().cpu()
    if mean is None or std is None or xb.dim() != 4: return xb
    return Normalise(mean, std, channels=xb.shape[1]).decode(xb)
