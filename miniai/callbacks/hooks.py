"""Looking inside a model as it runs: hooks, and activation statistics with their plots."""
from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial
from typing import TYPE_CHECKING, Any

import fastcore.all as fc
import matplotlib.pyplot as plt
import torch
from torch import nn

from ..core.events import Callback
from ..data.show import get_grid, show_image

if TYPE_CHECKING:
    from ..core.learner import Learner

__all__ = ['Hook', 'Hooks', 'HooksCallback', 'append_stats', 'get_hist', 'get_min', 'ActivationStats']


class Hook:
    "A forward hook on module `m` that calls `f(hook, module, inputs, output)`; `remove()` takes it off."
    stats: tuple[list, list, list]  # what `append_stats` records, once it has

    def __init__(self, m: nn.Module, f: Callable[..., None]) -> None:
        self.module = m
        self.hook = m.register_forward_hook(partial(f, self))

    def remove(self) -> None:
        if self.hook is not None: self.hook.remove()
        self.hook = None

    def __del__(self): self.remove()


def _modules(ms) -> list:
    "Modules given as a model (its children) or as an iterable of modules."
    return list(ms.children()) if isinstance(ms, nn.Module) else list(ms)


class Hooks(list):
    "A `Hook` with `f` on each of `ms` (a model's children or a list of modules); a context manager that removes them."
    def __init__(self, ms: nn.Module | Iterable[nn.Module], f: Callable[..., None]) -> None: super().__init__([Hook(m, f) for m in _modules(ms)])
    def __enter__(self, *args): return self
    def __exit__(self, *args): self.remove()
    def __del__(self): self.remove()

    def __delitem__(self, i):
        self[i].remove()
        super().__delitem__(i)

    def remove(self) -> None:  # pyright: ignore[reportIncompatibleMethodOverride]  (the course's API: remove() takes the hooks off)
        for h in self: h.remove()


class HooksCallback(Callback):
    """Hook `hookfunc` onto the modules of `learn.model` that pass `mod_filter` (or onto `mods`) while fitting, in
    training (`on_train`) and/or validation (`on_valid`); the hooks are removed when the fit ends, however it ends."""
    skip_in_probes = True
    def __init__(self, hookfunc: Callable[..., None], mod_filter: Callable[[nn.Module], Any] = fc.noop,
                 on_train: bool = True, on_valid: bool = False, mods: Iterable[nn.Module] | None = None) -> None:
        self.hookfunc, self.mod_filter, self.on_train, self.on_valid = hookfunc, mod_filter, on_train, on_valid
        self.mods, self.hooks = mods, []
        super().__init__()

    def before_fit(self, learn: Learner) -> None:
        mods = self.mods if self.mods is not None else fc.filter_ex(learn.model.modules(), self.mod_filter)
        self.learn = learn
        self.hooks = Hooks(mods, self._hookfunc)

    def _hookfunc(self, *args, **kwargs):
        if (self.on_train and self.learn.training) or (self.on_valid and not self.learn.training):
            self.hookfunc(*args, **kwargs)

    def cleanup_fit(self, learn: Learner) -> None:  # `hooks` is [] until before_fit ran, so iterate rather than call Hooks.remove
        for h in self.hooks: h.remove()
    def __iter__(self): return iter(self.hooks)
    def __len__(self): return len(self.hooks)


def append_stats(hook: Hook, mod: nn.Module, inp: Any, outp: torch.Tensor) -> None:
    "Append the output's mean, std and a 40-bin histogram of |output| in [0, 10] to `hook.stats` (kept on device)."
    if not hasattr(hook, 'stats'): hook.stats = ([], [], [])
    acts = outp.detach().float()
    hook.stats[0].append(acts.mean())
    hook.stats[1].append(acts.std())
    hook.stats[2].append(acts.abs().histc(40, 0, 10))


def _stacked(h, i) -> torch.Tensor: return torch.stack(h.stats[i]).cpu()


def get_hist(h: Hook) -> torch.Tensor:
    "The hook's histograms as a (bins, batches) image, log1p-scaled for display."
    return _stacked(h, 2).t().float().log1p()


def get_min(h: Hook) -> torch.Tensor:
    "Per batch, the fraction of activations in the lowest two bins (near zero): how 'dead' the layer is."
    h1 = _stacked(h, 2).t().float()
    return h1[:2].sum(0) / h1.sum(0)


class ActivationStats(HooksCallback):
    "Record mean, std and histogram of the outputs of the modules passing `mod_filter`, for the plots below."
    def __init__(self, mod_filter: Callable[[nn.Module], Any] = fc.noop) -> None: super().__init__(append_stats, mod_filter)

    # the plots return nothing, as the course's do: a Figure returned at the end of a Jupyter cell would show twice
    def color_dim(self, figsize: tuple[float, float] = (11, 5)) -> None:
        "Histogram of each layer's activations over the batches, as an image."
        _, axes = get_grid(len(self), figsize=figsize)
        for ax, h in zip(axes.flat, self): show_image(get_hist(h), ax=ax, origin='lower', aspect='auto')

    def dead_chart(self, figsize: tuple[float, float] = (11, 5)) -> None:
        "Fraction of near-zero activations per layer over the batches."
        _, axes = get_grid(len(self), figsize=figsize)
        for ax, h in zip(axes.flat, self):
            ax.plot(get_min(h))
            ax.set_ylim(0, 1)

    def plot_stats(self, figsize: tuple[float, float] = (10, 4)) -> None:
        "Mean and standard deviation of each layer's activations over the batches."
        _, axs = plt.subplots(1, 2, figsize=figsize)
        for h in self:
            for i in (0, 1): axs[i].plot(_stacked(h, i))
        axs[0].set_title('Means')
        axs[1].set_title('Stdevs')
        plt.legend(fc.L.range(self))  # pyright: ignore[reportAttributeAccessIssue]  (fastcore adds it at run time)
