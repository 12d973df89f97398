"""Diffusion: the cosine noise schedule, noisy training batches, and DDIM sampling (the course's `miniai.diffusion`).

Time runs over [0, 1): at time `t` an image `x0` has become `x_t = √ᾱ(t)·x0 + √(1-ᾱ(t))·ε` with `ε ~ N(0, 1)` and
`ᾱ(t) = cos²(tπ/2)`, so `t = 0` is the image and `t → 1` pure noise. A model learns to predict `ε` from `(x_t, t)`
(`noisify` makes its training pairs); `sample` starts from noise and takes `steps` DDIM steps down to `t = 0`. Images
live in [-1, 1] (`ddim_step` clamps its estimates there). The U-Net (`EmbUNetModel` and its parts) is in
`miniai.models.unet` and exported from `miniai.diffusion` too, as in the course.

Unlike the course's version, sampling runs wherever the model is and in its precision (wrap it in `torch.autocast`
for mixed precision), shows one progress bar, and does not wait for the device between steps: the schedule is
computed once up front, the DDIM step has no data-dependent branch, and the estimates stay on the device until the
end. `collate_ddpm` and `dl_ddpm` take the image key and batch size as arguments.
"""
from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import fastcore.all as fc
import torch
from torch.utils.data import DataLoader, default_collate

from ..core.devices import HostCopies, model_device, model_dtype
from ..core.ranks import is_main_process
__all__ = ['abar', 'inv_abar', 'noisify', 'collate_ddpm', 'dl_ddpm', 'ddim_step', 'sample', 'cond_sample']

_Sched = float | torch.Tensor  # a value of the schedule: a number, or a 0-d tensor on the images' device


def abar(t: torch.Tensor) -> torch.Tensor:
    "ᾱ(t) = cos²(tπ/2): how much of the image is left at time `t` in [0, 1] (1 at t = 0, 0 at t = 1)."
    return (t * math.pi / 2).cos() ** 2


def inv_abar(x: torch.Tensor) -> torch.Tensor:
    "The time `t` at which ᾱ(t) = `x`: the inverse of `abar` on [0, 1]."
    return x.sqrt().acos() * 2 / math.pi


def noisify(x0: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A training pair for the batch of images `x0` [N, ...]: ((x_t, t), ε), with t ~ U[0, 0.999) and ε ~ N(0, 1)
    drawn per image on `x0`'s device, and x_t = √ᾱ(t)·x0 + √(1-ᾱ(t))·ε."""
    if not isinstance(x0, torch.Tensor) or not x0.is_floating_point() or x0.dim() < 1:
        got = f'a {x0.dtype} tensor of shape {tuple(x0.shape)}' if isinstance(x0, torch.Tensor) else type(x0).__name__
        raise TypeError(f'noisify takes a batch of float images (scaled to [-1, 1]); got {got}')
    t = torch.rand(len(x0), device=x0.device, dtype=x0.dtype) * 0.999
    eps = torch.randn_like(x0)
    a = abar(t).reshape(-1, *([1] * (x0.dim() - 1)))
    return (a.sqrt() * x0 + (1 - a).sqrt() * eps, t), eps


def collate_ddpm(b: list, xl: str | int = 'image') -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    "Collate the items `b` and `noisify` their images, found under key (or index) `xl`: ((x_t, t), ε)."
    return noisify(default_collate(b)[xl])


def dl_ddpm(ds: Any, bs: int = 128, xl: str | int = 'image', **kwargs: Any) -> DataLoader:
    "A `DataLoader` of batches of `bs` noisified images (`collate_ddpm` with key `xl`); `kwargs` go to `DataLoader`."
    return DataLoader(ds, batch_size=bs, collate_fn=partial(collate_ddpm, xl=xl), **kwargs)


def ddim_step(x_t: torch.Tensor, noise: torch.Tensor, abar_t: _Sched, abar_t1: _Sched, bbar_t: _Sched, bbar_t1: _Sched,
              eta: float, sig: float, clamp: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step from time t to the next time t1 < t, given the predicted noise: returns (x̂0, x_t1).
    x̂0 = (x_t - √(1-ᾱ_t)·noise)/√ᾱ_t (clamped to [-1, 1] if `clamp`); x_t1 = √ᾱ_t1·x̂0 + √(β̄_t1-σ²)·noise + σ·z with
    σ = eta·√(β̄_t1/β̄_t)·√(1-ᾱ_t/ᾱ_t1), set to 0 where β̄_t1 <= σ² + 0.01 (the last steps). `bbar` is 1 - `abar`;
    `sig`, which the course passes, is not used: σ comes from `eta`. Any of the schedule values may be a float or a
    0-d tensor; none is read back to the host."""
    abar_t, abar_t1, bbar_t, bbar_t1 = (torch.as_tensor(v, dtype=x_t.dtype, device=x_t.device)
                                        for v in (abar_t, abar_t1, bbar_t, bbar_t1))
    x0_hat = (x_t - bbar_t.sqrt() * noise) / abar_t.sqrt()
    if clamp: x0_hat = x0_hat.clamp(-1, 1)
    sigma = eta * (bbar_t1 / bbar_t).sqrt() * (1 - abar_t / abar_t1).sqrt()
    sigma = torch.where(bbar_t1 <= sigma ** 2 + 0.01, torch.zeros_like(sigma), sigma)
    x_t1 = abar_t1.sqrt() * x0_hat + (bbar_t1 - sigma ** 2).clamp(min=0).sqrt() * noise
    return x0_hat, x_t1 + sigma * torch.randn_like(x_t)


def _steps(steps: int, progress: bool):
    bars = progress and (fc.IN_NOTEBOOK or sys.stdout.isatty()) and is_main_process()
    if not bars: return range(steps)
    from fastprogress.fastprogress import progress_bar
    return progress_bar(range(steps), leave=False)


def _ddim_loop(f, model, predict, sz, steps: int, eta: float, progress: bool, host: HostCopies, **f_kwargs) -> list:
    """The sampling loop shared by `sample` and `cond_sample`, on the model's device: `predict(x, t)` calls the
    model. Returns the estimates x̂0 of each step, on the CPU: each is copied there by `host` as it comes (from a GPU
    without waiting: `host.wait()` before reading them), so the device holds one step's tensors, not every step's."""
    if not isinstance(steps, int) or steps < 1: raise ValueError(f'sampling needs steps >= 1; got {steps!r}')
    device, mdtype = model_device(model), model_dtype(model)
    dtype = torch.float64 if mdtype == torch.float64 else torch.float32  # the DDIM arithmetic: float32 at least
    # made on the device, not copied there: a copy from the host would make the host wait for the device
    ts = torch.linspace(1 - 1 / steps, 0, steps, device=device, dtype=dtype)  # each 1/steps below the one before
    ab = abar(ts)
    ab1 = torch.cat([ab[1:], ab.new_ones(1)])  # after the last step, t = 0: ᾱ = 1
    x = torch.randn(tuple(sz), device=device, dtype=dtype)
    preds, training = [], model.training
    model.eval()
    try:
        with torch.no_grad():
            for i in _steps(steps, progress):
                noise = predict(x.to(mdtype), ts[i].expand(len(x)).to(mdtype)).to(dtype)
                x0_hat, x = f(x, noise, ab[i], ab1[i], 1 - ab[i], 1 - ab1[i], eta, 1 - (i + 1) / 100, **f_kwargs)
                preds.append(host(x0_hat))
    finally: model.train(training)
    return preds


def sample(f: Callable, model: torch.nn.Module, sz: Sequence[int], steps: int, eta: float = 1., clamp: bool = True,
           progress: bool = True) -> list[torch.Tensor]:
    """Generate images of shape `sz` from noise with `model((x, t))` predicting the noise, taking `steps` steps of
    `f` (e.g. `ddim_step`; `eta=0` is deterministic DDIM, 1 adds DDPM-like noise). Runs on the model's device, in
    its dtype, in eval mode (its mode is restored after). Returns x̂0 after each step, on the CPU: the last is the
    sample."""
    host = HostCopies()
    preds = _ddim_loop(f, model, lambda x, t: model((x, t)), sz, steps, eta, progress, host, clamp=clamp)
    host.wait()
    return preds


def cond_sample(c: int | torch.Tensor, f: Callable, model: torch.nn.Module, sz: Sequence[int], steps: int,
                eta: float = 1., progress: bool = True) -> list[torch.Tensor]:
    """`sample` for a class-conditional model, `model((x, t, c))`: `c` is a class index for every image, or a tensor
    of one per image."""
    n = tuple(sz)[0]
    device = model_device(model)
    c = torch.as_tensor(c, dtype=torch.long, device=device)
    if c.dim() == 0: c = c.expand(n)
    elif c.shape != (n,): raise ValueError(f'cond_sample: c is one class, or one per image ({n}); got shape '
                                           f'{tuple(c.shape)}')
    host = HostCopies()
    preds = _ddim_loop(f, model, lambda x, t: model((x, t, c)), sz, steps, eta, progress, host)
    host.wait()
    return preds
