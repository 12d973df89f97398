"""The course's `miniai.conv`: devices (`def_device`, `to_device`) and its first `conv`. A front: devices live in
miniai.core.devices, layers in miniai.models.layers."""
from __future__ import annotations

from torch import nn

from .core.devices import (collate_device, default_device, pinned_rows, pins_by_default, resolve_device,
                           to_device)  # noqa: F401
from .core import devices as _devices
from .models import layers as _layers

__all__ = ['def_device', 'default_device', 'resolve_device', 'to_device', 'collate_device', 'pins_by_default',
           'pinned_rows', 'conv']


def conv(ni: int, nf: int, ks: int = 3, stride: int = 2, act: bool = True) -> nn.Module:
    """The course's first `conv` (lesson 13): a `ks`x`ks` convolution with 'same'-style padding, then a ReLU when
    `act`; without `act` the bare `nn.Conv2d`, as the course has it. Built by the one `miniai.models.layers.conv`."""
    layers = _layers.conv(ni, nf, ks, stride, act=nn.ReLU if act else None)
    return layers if act else layers[0]


def __getattr__(name: str):
    # `def_device` is worked out when it is read (see `miniai.core.devices`): importing this never picks a device
    if name == 'def_device': return _devices.default_device()
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__(): return sorted([*globals(), 'def_device'])  # so tab completion in notebooks offers it
