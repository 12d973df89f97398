"""`DataLoaders` (from a Hugging Face `DatasetDict` or a folder of images), collation of dictionary datasets, and
showing images."""
from __future__ import annotations

import math
from itertools import zip_longest
from operator import itemgetter

import fastcore.all as fc
import matplotlib.pyplot as plt
import numpy as np
import torch
from torch.utils.data import default_collate

from .training import get_dls

__all__ = ['inplace', 'collate_dict', 'DataLoaders', 'show_image', 'subplots', 'get_grid', 'show_images']


def inplace(f):
    "Turn `f`, which changes its argument in place, into a function that also returns it (for `with_transform`)."
    def _f(b):
        f(b)
        return b
    _f.__name__ = getattr(f, '__name__', '_f')
    return _f


def collate_dict(ds):
    "A collate function for a `datasets.Dataset` that returns a tuple of its feature columns."
    get = itemgetter(*ds.features)
    def _collate(b): return get(default_collate(b))
    return _collate


class DataLoaders:
    "A training and a validation data loader, as `.train` and `.valid`."
    def __init__(self, *dls):
        if len(dls) < 2:
            raise ValueError(f'DataLoaders needs a training and a validation loader, got {len(dls)} loader(s)')
        self.train, self.valid = dls[:2]

    # miniai.images and miniai.hf_images build on this module, so the constructors below import them when called

    @classmethod
    def from_dd(cls, dd, batch_size: int, as_tuple: bool = True, **kwargs) -> 'DataLoaders':
        """Data loaders over the splits of a `DatasetDict` `dd`, batches collated to tuples of its features. A `dd` of
        images and labels with no transform (`miniai.hf_images.is_image_dd`) takes the fast path instead: uint8 tensors
        decoded once and cached, normalised per batch (`miniai.hf_images.dd_dls`; DataLoader-only options such as
        `num_workers` are not needed there). A transformed `dd` goes item by item through its transform."""
        from .hf_images import dd_dls, is_image_dd
        if as_tuple and 'collate_fn' not in kwargs and is_image_dd(dd):
            return dd_dls(dd, batch_size, **{k: v for k, v in kwargs.items() if k not in _WORKER_OPTIONS})
        if as_tuple: kwargs.setdefault('collate_fn', collate_dict(next(iter(dd.values()))))
        return cls(*get_dls(*dd.values(), bs=batch_size, **kwargs))

    @classmethod
    def from_folder(cls, path, train: str = 'train', valid: str = 'valid', valid_pct: float | None = None,
                    size=None, bs: int = 64, device=None, seed: int | None = None, **kwargs) -> 'DataLoaders':
        """Data loaders over a folder of images, a folder per class (`path/train/<class>/*.png`, and `path/valid` or
        `path/test`; or `valid_pct` of the images held out by a split seeded with `seed`), decoded once and cached as
        uint8, memory-mapped; `size` resizes (see `miniai.images.folder_images`; `kwargs` go to
        `miniai.data.image_dls`). The result has `.classes`, `.mean`, `.std` and `show_batch()`."""
        from .images import folder_dls
        return folder_dls(path, train, valid, valid_pct, size, bs=bs, device=device, seed=seed, **kwargs)

    vocab = property(lambda self: self.classes, doc="The class names (fastai's name for `classes`).")

    def show_batch(self, max_n: int = 9, ncols: int | None = None, **kwargs):
        "Show up to `max_n` images of a training batch, pixels as stored (before normalising), titled with class names."
        xb, yb = next(iter(self.train))
        xb, yb = xb[:max_n].detach().float().cpu(), yb[:max_n].cpu()
        if xb.dim() == 4 and getattr(self, 'mean', None) is not None:  # undo the loader's normalisation
            c = xb.shape[1]
            mean, std = (torch.tensor(v, dtype=torch.float32).reshape(-1)[:c].expand(c).view(-1, 1, 1)
                         for v in (self.mean, self.std))
            xb = (xb * std + mean).clamp(0, 1)
        names = getattr(self, 'classes', None)
        titles = [names[int(y)] if names is not None else str(int(y)) for y in yb]
        return show_images(xb, ncols=ncols or min(len(xb), 3), titles=titles, **kwargs)

    def __repr__(self): return f'DataLoaders(train={len(self.train)} batches, valid={len(self.valid)} batches)'


#: torch DataLoader options that mean nothing to the tensor loaders of `from_dd`'s fast path
_WORKER_OPTIONS = ('num_workers', 'persistent_workers', 'prefetch_factor', 'worker_init_fn', 'multiprocessing_context',
                   'timeout', 'generator')


@fc.delegates(plt.Axes.imshow)
def show_image(im, ax=None, figsize=None, title=None, noframe=True, **kwargs):
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
def subplots(nrows: int = 1, ncols: int = 1, figsize=None, imsize: int = 3, suptitle=None, **kwargs):
    "A figure and an array of axes, sized `imsize` inches per image unless `figsize` is given."
    if figsize is None: figsize = (ncols * imsize, nrows * imsize)
    fig, ax = plt.subplots(nrows, ncols, figsize=figsize, **kwargs)
    if suptitle is not None: fig.suptitle(suptitle)
    if nrows * ncols == 1: ax = np.array(ax)
    return fig, ax


@fc.delegates(subplots)
def get_grid(n: int, nrows=None, ncols=None, title=None, weight='bold', size=14, **kwargs):
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
def show_images(ims, nrows=None, ncols=None, titles=None, **kwargs):
    "Show the images `ims` in a grid, with optional `titles`; returns the figure."
    fig, axs = get_grid(len(ims), nrows, ncols, **kwargs)
    for im, t, ax in zip_longest(ims, titles or [], axs.flat):
        if im is None: break
        show_image(im, ax=ax, title=t)
    return fig
