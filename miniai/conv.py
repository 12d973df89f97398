"""Where tensors live (`def_device`, `to_device`) and the plain convolution layer."""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.utils.data import default_collate

__all__ = ['def_device', 'to_device', 'collate_device', 'conv']


def _best_device() -> str:
    if torch.cuda.is_available(): return 'cuda'
    mps = getattr(torch.backends, 'mps', None)
    if mps is not None and mps.is_available(): return 'mps'
    return 'cpu'


def_device = _best_device()


def to_device(x, device=def_device):
    "Move a tensor, or the tensors inside nested dicts, lists and tuples, to `device`."
    if isinstance(x, torch.Tensor): return x.to(device, non_blocking=True)
    if isinstance(x, Mapping): return {k: to_device(v, device) for k, v in x.items()}
    if isinstance(x, (list, tuple)): return type(x)(to_device(o, device) for o in x)
    return x


def collate_device(b):
    "`default_collate` the batch `b`, then move it to `def_device`."
    return to_device(default_collate(b))


def conv(ni: int, nf: int, ks: int = 3, stride: int = 2, act: bool = True) -> nn.Module:
    "A `ks`x`ks` convolution with 'same'-style padding, followed by a ReLU when `act`."
    res = nn.Conv2d(ni, nf, stride=stride, kernel_size=ks, padding=ks // 2)
    return nn.Sequential(res, nn.ReLU()) if act else res
