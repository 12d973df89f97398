"""New items for a trained model, made into its input the way the training data was made: `Preprocess` takes what a
user has (a file's path, a PIL image, a numpy array or uint8 tensor as decoded, or an already-normalised float tensor),
decodes it, matches its channels, resizes it with `resize_cover` (the image cache's rule: scale to cover, crop the
centre) and normalises it with the training statistics (`Normalise`). `items_dl` makes a loader of many new items
(files, a folder, tensors) through the same path; `DataLoaders.test_dl` (fastai's name) is it with the training data's
facts."""
from __future__ import annotations

import os
from dataclasses import dataclass
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.messages import warn_user
from ..core.state import unchanged
from .decode import IMAGE_SUFFIXES, ImageDataError, as_chw, load_image, quiet_decoders, resize_cover
from .loader import TensorDataLoader
from .normalise import Normalise, per_channel

__all__ = ['RESIZE_RULE', 'Preprocess', 'item_shape', 'data_preprocess', 'is_path', 'image_files', 'ItemsDataLoader',
           'items_dl']

RESIZE_RULE = 'cover'  # resize_cover: scale (antialiased) to cover the size, crop the centre; what the cache does


def is_path(item: object) -> bool:
    "Whether `item` names a file or folder (a str or a path), not pixels."
    return isinstance(item, (str, os.PathLike))


def _is_pil(item) -> bool: return type(item).__module__.startswith('PIL.')


def _is_float(item) -> bool:
    "Whether `item` is a float tensor or array (taken as already normalised)."
    if isinstance(item, np.ndarray): return item.dtype.kind == 'f'
    return isinstance(item, torch.Tensor) and item.is_floating_point()


def _pil_pixels(img) -> torch.Tensor:
    "A PIL image as uint8 [C, H, W], C 1 or 3 (palettes expanded, alpha dropped, 16 bits scaled as files are)."
    if img.mode not in ('L', 'RGB'):
        img = img.convert('L' if img.mode in ('1', 'LA', 'I', 'I;16', 'I;16B', 'I;16L', 'F') else 'RGB')
    return as_chw(torch.from_numpy(np.array(img)))


def image_files(folder: Path) -> list[Path]:
    "Every image file below `folder`, in name order (hidden files and folders skipped)."
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
        found += [Path(root) / f for f in sorted(files)
                  if not f.startswith('.') and f.lower().endswith(IMAGE_SUFFIXES)]
    return found


@dataclass
class Preprocess:
    """How the model's inputs were made: `shape` of one input (C, H, W for images), the `mean` and `std` of [0, 1]
    pixels it was normalised with (None: the data was not normalised by miniai), and the resize rule
    (`RESIZE_RULE`). `batch(items)` turns new items into a batch the model takes; `what` names the caller in
    messages."""
    shape: tuple
    mean: tuple | None = None
    std: tuple | None = None
    resize: str = RESIZE_RULE
    what: str = 'predict'

    def __post_init__(self):
        self.shape = tuple(int(s) for s in self.shape)
        if self.resize != RESIZE_RULE: raise ValueError(f'unknown resize rule {self.resize!r}; miniai knows '
                                                        f'{RESIZE_RULE!r}')

    images = property(lambda self: len(self.shape) == 3 and self.shape[0] in (1, 3),
                      doc='Whether the inputs are images, [C, H, W] with C 1 or 3.')
    size = property(lambda self: self.shape[1:], doc='(H, W) of the images.')

    def to_json(self) -> dict:
        "The facts, as JSON (for an export's or a run's record)."
        plain = lambda v, what: None if v is None else list(per_channel(v, self.shape[0], what))
        return {'input_shape': list(self.shape), 'mean': plain(self.mean, 'mean'), 'std': plain(self.std, 'std'),
                'resize': self.resize}

    @classmethod
    def from_json(cls, d: dict, what: str = 'predict') -> 'Preprocess':
        return cls(tuple(d['input_shape']), d.get('mean'), d.get('std'), d.get('resize', RESIZE_RULE), what)

    def is_one(self, x: Any) -> bool:
        "Whether `x` is one item (a path, an image, a tensor of one input), not a list or a batch."
        if is_path(x) or _is_pil(x): return True
        if isinstance(x, (np.ndarray, torch.Tensor)):
            n = len(self.shape)
            if self.images and x.ndim == n and x.shape[0] not in (1, 3, 4) and x.shape[-1] not in (1, 3, 4):
                return False  # [N, H, W]: grey images without their channel
            return x.ndim == n or (x.ndim == n - 1 and self.images)  # [H, W]: one grey image
        return False

    def _not_images(self, item):
        got = repr(str(item)) if is_path(item) else f'a {type(item).__name__} of {getattr(item, "dtype", "pixels")}'
        raise TypeError(f'{self.what}: got {got}, an image, but the model takes inputs of shape {self.shape}, not '
                        f'images: pass a float tensor of that shape')

    def pixels(self, item: Any, name: object = None) -> torch.Tensor:
        """A file's path, a PIL image or uint8 pixels ([H, W], [H, W, C] or [C, H, W]) as the training images were:
        uint8 [C, H, W] of the training channels (colour made grey by luminance, grey repeated) and size."""
        if not self.images: self._not_images(item)
        name = name or (str(item) if is_path(item) else type(item).__name__)
        if _is_pil(item): img = _pil_pixels(item)
        else:
            if isinstance(item, np.ndarray): item = torch.from_numpy(np.ascontiguousarray(item))
            if is_path(item) and Path(item).is_dir(): raise ImageDataError(f'{item} is a folder, not an image: '
                                                                          f'use dls.test_dl({str(item)!r})')
            with quiet_decoders(): img = load_image(item, name)
        c = self.shape[0]
        if img.shape[0] == 4: img = img[:3]
        if img.shape[0] != c:
            import torchvision.transforms.v2.functional as TF
            img = TF.rgb_to_grayscale(img) if c == 1 else img.expand(c, -1, -1)
        return resize_cover(img, self.size).contiguous()

    def _float(self, x: torch.Tensor) -> torch.Tensor:
        "An already-normalised float item, [C, H, W] (or [H, W] if grey), resized with a warning if not the size."
        x = x.float()
        if not self.images: return x
        if x.dim() == 2: x = x[None]
        if x.shape[0] != self.shape[0]:
            if x.shape[0] != 1:
                raise ValueError(f'{self.what}: a float tensor of {x.shape[0]} channels, shape {tuple(x.shape)}, but '
                                 f'the model takes {self.shape[0]}: pass the image as uint8 pixels or a file, which '
                                 f'are converted, or normalised floats of shape {self.shape}')
            x = x.expand(self.shape[0], -1, -1)
        if tuple(x.shape[1:]) != self.size:
            warn_user(f'{self.what}: the float tensor is {x.shape[1]}x{x.shape[2]} (HxW) but the model was trained on '
                      f'{self.size[0]}x{self.size[1]} images: resized to cover {self.size[0]}x{self.size[1]} and '
                      f'centre-cropped, as the training images were (pass files, PIL images or uint8 pixels to have '
                      f'them resized without this warning)')
            x = resize_cover(x, self.size)
        return x

    def _normaliser(self) -> Normalise | None:
        return None if self.mean is None else Normalise(self.mean, self.std, channels=self.shape[0],  # pyright: ignore[reportArgumentType]  (mean and std come together)
                                                        spatial_dims=len(self.shape) - 1)

    def one(self, item: Any, name: object = None) -> torch.Tensor:
        "One item as the model's input: float32 of `shape`, normalised where the training data was."
        if _is_float(item): return self._float(torch.as_tensor(item))
        if isinstance(item, (torch.Tensor, np.ndarray)) and item.dtype not in (torch.uint8, np.uint8):
            raise TypeError(f'{self.what}: got a {item.dtype} tensor; it takes uint8 pixels (0-255, as decoded, which '
                            f'it normalises) or already-normalised floats: convert pixels with x.to(torch.uint8)')
        px = self.pixels(item, name)
        norm = self._normaliser()
        if norm is None:
            raise ValueError(f'{self.what}: got uint8 pixels, but the training data was not normalised by miniai '
                             f'(its loaders have no mean/std), so how to make them the model\'s floats is not known: '
                             f'pass float tensors made as the training inputs were')
        return norm.encode(px)

    def split(self, items: Any) -> list:
        "`items` (a list, or a batch tensor) as a list of single items."
        return [items] if self.is_one(items) else list(items)

    def batch(self, items: Any) -> torch.Tensor:
        "A list of items (or a batch tensor) as one float32 batch the model takes."
        if isinstance(items, torch.Tensor) and items.is_floating_point() and items.dim() == len(self.shape) + 1 \
                and tuple(items.shape[1:]) == self.shape:
            return items.float()  # already the model's input: nothing to do item by item
        xs = [self.one(o) for o in self.split(items)]
        if not xs: raise ValueError(f'{self.what}: no items')
        return torch.stack(xs)


def item_shape(dl: Any) -> tuple:
    "The shape of one input of the loader `dl` (whose order is left as it was)."
    if isinstance(getattr(dl, 'x', None), torch.Tensor): return tuple(dl.x.shape[1:])  # TensorDataLoader: no batch
    with unchanged(torch.nn.Module(), dl):  # drawing a batch may move the loader's (and the global) generator on
        b = next(iter(dl))
    return tuple((b[0] if isinstance(b, (tuple, list)) else b).shape[1:])


def data_preprocess(dls: Any, what: str = 'predict') -> Preprocess:
    "How the inputs of `dls` (a `DataLoaders`) were made: its validation items' shape, its `mean` and `std`."
    mean, std = getattr(dls, 'mean', None), getattr(dls, 'std', None)
    return Preprocess(item_shape(dls.valid), mean, std, what=what)


class ItemsDataLoader(TensorDataLoader):
    """A `TensorDataLoader` over new items, in order: batches `(x,)`, or `(x, y)` where the items have labels.
    `.items` names each item (its file, or its index)."""
    def __init__(self, x: torch.Tensor, y: torch.Tensor, items: list, labelled: bool, **kwargs: Any) -> None:
        super().__init__(x, y, **kwargs)
        self.items, self.labelled = items, labelled

    def __iter__(self):  # pyright: ignore[reportIncompatibleMethodOverride]
        for xb, yb in super().__iter__(): yield (xb, yb) if self.labelled else (xb,)


def _folder_items(folder: Path, classes) -> tuple[list, list | None]:
    "The image files below `folder`; labelled by their class folder where every sub-folder is a class name."
    files = image_files(folder)
    if not files: raise ImageDataError(f'{folder}: no images ({", ".join(IMAGE_SUFFIXES)}) in it or below it')
    subs = {f.relative_to(folder).parts[0] for f in files if len(f.relative_to(folder).parts) > 1}
    loose = any(len(f.relative_to(folder).parts) == 1 for f in files)
    if classes and subs and not loose and subs <= set(map(str, classes)):
        index = {str(c): i for i, c in enumerate(classes)}
        return files, [index[f.relative_to(folder).parts[0]] for f in files]
    return files, None


def items_dl(prep: Preprocess, items: Any, labels: Any = None, classes: Sequence[str] | None = None, bs: int = 64,
             device: str | torch.device | None = None) -> ItemsDataLoader:
    """A loader of new `items`, made as the training data was (`prep`): a folder (every image below it; labelled by
    class folders named as `classes`), a list of files, PIL images or tensors, or a batch tensor. `labels` (class
    indices or names) gives batches their targets, for `ClassificationInterpretation`. uint8 items are kept as
    bytes and normalised per batch; float items are taken as already normalised."""
    if is_path(items) and Path(items).is_dir():
        items, found = _folder_items(Path(items), classes)
        labels = found if labels is None else labels
    else: items = prep.split(items)
    names = [str(o) if is_path(o) else i for i, o in enumerate(items)]
    floats = [_is_float(o) for o in items]
    if any(floats) and not all(floats):
        raise TypeError('test_dl: the items mix float tensors (taken as normalised) with pixels; give one kind')
    if not items: raise ValueError('test_dl: no items')
    if all(floats) or prep.mean is None: x, norm = torch.stack([prep.one(o) for o in items]), {}
    else: x, norm = torch.stack([prep.pixels(o, n) for o, n in zip(items, names)]), dict(mean=prep.mean, std=prep.std)
    if labels is not None:
        index = {str(c): i for i, c in enumerate(classes or [])}
        y = torch.tensor([index[str(v)] if isinstance(v, str) else int(v) for v in labels], dtype=torch.int64)
        if len(y) != len(x): raise ValueError(f'test_dl: {len(x)} items but {len(y)} labels')
    else: y = torch.zeros(len(x), dtype=torch.int64)
    return ItemsDataLoader(x, y, names, labels is not None, bs=bs, device=device, **norm)
