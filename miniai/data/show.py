"""Showing images: one (`show_image`), a grid of them (`show_images`, `get_grid`, `subplots`)."""
from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import zip_longest
from typing import TYPE_CHECKING, Any

import fastcore.all as fc
import matplotlib.pyplot as plt
import numpy as np
import torch

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ['overlay_masks', 'show_image', 'subplots', 'get_grid', 'show_images']


@fc.delegates(plt.Axes.imshow)  # pyright: ignore[reportPrivateImportUsage]
def show_image(im: Any, ax: Axes | None = None, figsize: tuple[float, float] | None = None, title: str | None = None,
               noframe: bool = True, **kwargs: Any) -> Axes:
    "Show an image (a tensor CHW/HW, or an array HWC/HW) on `ax`, creating one if needed; returns `ax`."
    if fc.hasattrs(im, ('cpu', 'permute', 'detach')):
        im = im.detach().cpu()
        if len(im.shape) == 3 and im.shape[0] < 5: im = im.permute(1, 2, 0)
        im = im.float().numpy() if im.dtype in (torch.bfloat16, torch.float16) else im.numpy()
    elif not isinstance(im, np.ndarray): im = np.array(im)
    if im.shape[-1] == 1: im = im[..., 0]
    if ax is None: _, ax = plt.subplots(figsize=figsize)
    ax.imshow(im, **kwargs)
    if title is not None: ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    if noframe: ax.axis('off')
    return ax


@fc.delegates(plt.subplots, keep=True)
def subplots(nrows: int = 1, ncols: int = 1, figsize: tuple[float, float] | None = None, imsize: int = 3,
             suptitle: str | None = None, **kwargs: Any) -> tuple[Figure, np.ndarray]:
    "A figure and an array of axes, sized `imsize` inches per image unless `figsize` is given."
    if figsize is None: figsize = (ncols * imsize, nrows * imsize)
    fig, ax = plt.subplots(nrows, ncols, figsize=figsize, **kwargs)
    if suptitle is not None: fig.suptitle(suptitle)
    if nrows * ncols == 1: ax = np.array(ax)
    return fig, ax


@fc.delegates(subplots)
def get_grid(n: int, nrows: int | None = None, ncols: int | None = None, title: str | None = None, weight: str = 'bold',
             size: int = 14, **kwargs: Any) -> tuple[Figure, np.ndarray]:
    "A grid of at least `n` axes (extra ones switched off); returns the figure and the flat axes."
    if nrows: ncols = ncols or int(math.ceil(n / nrows))
    elif ncols: nrows = int(math.ceil(n / ncols))
    else:
        nrows = int(math.sqrt(n))
        ncols = int(math.ceil(n / nrows))
    fig, axs = subplots(nrows, ncols, **kwargs)
    for i in range(n, nrows * ncols): axs.flat[i].set_axis_off()
    if title is not None: fig.suptitle(title, weight=weight, size=size)
    return fig, axs


@fc.delegates(subplots)
def show_images(ims: Sequence | torch.Tensor, nrows: int | None = None, ncols: int | None = None, titles: Sequence[str] | None = None,
                **kwargs: Any) -> None:
    """Show the images `ims` in a grid, with optional `titles`. Returns nothing, as the course's does: a Figure
    returned at the end of a Jupyter cell would show twice (`plt.gcf()` is the figure drawn)."""
    _, axs = get_grid(len(ims), nrows, ncols, **kwargs)
    for im, t, ax in zip_longest(ims, titles or [], axs.flat):
        if im is None: break
        show_image(im, ax=ax, title=t)


def overlay_masks(ims: torch.Tensor, masks: torch.Tensor, n_codes: int, alpha: float = 0.5) -> torch.Tensor:
    """Images `ims` [N, C, H, W] (floats in [0, 1], grey or colour) with their masks [N, H, W] laid over them: each
    code a colour of matplotlib's 'tab20' (one colour per code, the same in every picture), blended by `alpha`.
    Returns colour images [N, 3, H, W] for `show_images`."""
    import matplotlib
    if masks.shape[-2:] != ims.shape[-2:]:
        raise ValueError(f'overlay_masks: masks of size {tuple(masks.shape[-2:])} for images of size '
                         f'{tuple(ims.shape[-2:])}')
    cmap = matplotlib.colormaps['tab20'].resampled(max(n_codes, 2))
    palette = torch.tensor([cmap(i)[:3] for i in range(max(n_codes, 2))], dtype=torch.float32)
    colours = palette[masks.long().cpu().clamp(0, len(palette) - 1)].permute(0, 3, 1, 2)
    ims = ims.float().cpu().clamp(0, 1)
    if ims.shape[1] == 1: ims = ims.expand(-1, 3, -1, -1)
    return (1 - alpha) * ims + alpha * colours
