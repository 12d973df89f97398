"""Layers and their initialisation: `conv` (convolution, norm, activation), `GeneralRelu`, `init_weights`, `lsuv_init`;
the course's small CNN, `get_model`."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import nn

from ..callbacks.hooks import Hook
from ..core.devices import default_device

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ['GeneralRelu', 'plot_func', 'init_weights', 'lsuv_init', 'conv', 'get_model']

#: what an `act` argument takes: a module class (or any callable) that makes the activation; None or False: none
Act = Callable[[], nn.Module] | None | Literal[False]
#: what a `norm` argument takes: a module class (or any callable) that makes a norm for `nf` channels; None or False: none
Norm = Callable[[int], nn.Module] | None | Literal[False]


class GeneralRelu(nn.Module):
    "A ReLU with a `leak` slope below zero, shifted down by `sub`, and capped at `maxv`."
    def __init__(self, leak: float | None = None, sub: float | None = None, maxv: float | None = None) -> None:
        super().__init__()
        self.leak, self.sub, self.maxv = leak, sub, maxv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.leaky_relu(x, self.leak) if self.leak is not None else F.relu(x)
        if self.sub is not None: x = x - self.sub
        if self.maxv is not None: x = x.clamp_max(self.maxv)
        return x


def plot_func(f: Callable[[torch.Tensor], torch.Tensor], start: float = -5., end: float = 5.,
              steps: int = 100) -> Axes:
    "Plot `f` over [start, end] with axes through the origin; returns the axes."
    x = torch.linspace(start, end, steps)
    fig, ax = plt.subplots()
    ax.plot(x, f(x))
    ax.grid(True, which='both', ls='--')
    ax.axhline(y=0, color='k', linewidth=0.7)
    ax.axvline(x=0, color='k', linewidth=0.7)
    return ax


def init_weights(m: nn.Module, leaky: float = 0.) -> None:
    "Kaiming-normal weights for conv and linear layers (use with `model.apply`), for a ReLU with slope `leaky`."
    if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)): nn.init.kaiming_normal_(m.weight, a=leaky)


def lsuv_init(model: nn.Module, m: nn.Module, m_in: nn.Module, xb: torch.Tensor, max_iters: int = 100,
              tol: float = 1e-3) -> None:
    """Layer-sequential unit-variance init: rescale `m_in`'s weight and shift its bias until the output of `m` on
    batch `xb` has mean 0 and std 1. Raises if that is not reached in `max_iters` rounds (a constant output, say)."""
    stats = {}
    def record(hook, mod, inp, outp): stats['mean'], stats['std'] = outp.mean().item(), outp.std().item()
    h = Hook(m, record)
    try:
        with torch.no_grad():
            for _ in range(max_iters):
                model(xb)
                mean, std = stats['mean'], stats['std']
                if abs(mean) < tol and abs(std - 1) < tol: return
                if not std > 1e-8 or not torch.isfinite(torch.tensor(std)):
                    raise ValueError(f'lsuv_init: the output of {type(m).__name__} has std {std:.3g} on this batch; '
                                     f'it cannot be scaled to 1 (a constant or dead layer?)')
                if m_in.bias is not None: m_in.bias -= mean
                m_in.weight.data /= std
        raise ValueError(f'lsuv_init: {type(m).__name__} did not reach mean 0 / std 1 in {max_iters} rounds '
                         f'(last mean {mean:.3g}, std {std:.3g})')  # pyright: ignore[reportPossiblyUnboundVariable]  (the loop runs at least once)
    finally: h.remove()


def conv(ni: int, nf: int, ks: int = 3, stride: int = 2, act: Act = nn.ReLU, norm: Norm = None,
         bias: bool | None = None) -> nn.Sequential:
    """Convolution, then `norm(nf)` if given, then `act()` if given (`act=None`/`False` for none). The convolution has
    a bias unless `bias=False`, also before a BatchNorm, as in the course (whose test for a BatchNorm is given the
    class, so its bias stays): the course's parameter counts and state_dicts are ours. Before a BatchNorm the bias is
    redundant (the norm's shift takes its place); `bias=False` leaves it out."""
    if bias is None: bias = True
    layers: list[nn.Module] = [nn.Conv2d(ni, nf, stride=stride, kernel_size=ks, padding=ks // 2, bias=bias)]
    if norm: layers.append(norm(nf))
    if act: layers.append(act())
    return nn.Sequential(*layers)


def get_model(act: Act = nn.ReLU, nfs: Sequence[int] | None = None, norm: Norm = None) -> nn.Sequential:
    """The course's small CNN for 28x28 images, on `def_device`: a stride-2 `conv` with `act` and `norm` for each
    step of the widths `nfs` (default [1, 8, 16, 32, 64]), then a stride-2 convolution to 10 channels (bias, no
    norm, no activation) and `nn.Flatten()`. With the default widths a [N, 1, 28, 28] batch gives [N, 10] logits."""
    if nfs is None: nfs = [1, 8, 16, 32, 64]
    layers = [conv(ni, nf, act=act, norm=norm) for ni, nf in zip(nfs, nfs[1:])]
    head = conv(nfs[-1], 10, act=False, norm=False, bias=True)
    return nn.Sequential(*layers, head, nn.Flatten()).to(default_device())
