"""`DataLoaders`, where the sources come together: torch datasets (`get_dls`), Hugging Face `DatasetDict`s (`from_dd`,
item by item or, for images with no transform, through the image cache), folders of images (`from_folder`) and any
cached `ImageSet` (`image_dls`), each ready for a Learner; collation of dictionary datasets."""
from __future__ import annotations

from operator import itemgetter
from pathlib import Path

import torch
from torch.utils.data import DataLoader, default_collate

from ..core.devices import pins_by_default, resolve_device
from .folders import folder_images
from .hf import dd_images, is_image_dd
from .imagecache import ImageSet
from .items import ItemsDataLoader, data_preprocess, items_dl
from .loader import TensorDataLoader, subset
from .masks import mask_images
from .normalise import Normalise, denormalised
from .show import overlay_masks, show_images
from .targets import Targets

from typing import TYPE_CHECKING
if TYPE_CHECKING:  # names for the annotations only
    import os
    from collections.abc import Callable, Sequence
    from typing import Any

__all__ = ['inplace', 'collate_dict', 'Dataset', 'get_dls', 'DataLoaders', 'image_dls', 'table_dls', 'folder_dls',
           'dd_dls', 'mask_dls']


def inplace(f: Callable[[Any], None]) -> Callable[[Any], Any]:
    "Turn `f`, which changes its argument in place, into a function that also returns it (for `with_transform`)."
    def _f(b):
        f(b)
        return b
    _f.__name__ = getattr(f, '__name__', '_f')
    return _f


def collate_dict(ds: Any) -> Callable[[list], tuple]:
    "A collate function for a `datasets.Dataset` that returns a tuple of its feature columns."
    get = itemgetter(*ds.features)
    def _collate(b): return get(default_collate(b))
    return _collate


class Dataset:
    "Pairs of (x, y) taken from two sequences of the same length."
    def __init__(self, x: Sequence, y: Sequence) -> None:
        if len(x) != len(y): raise ValueError(f'Dataset: x has {len(x)} items but y has {len(y)}')
        self.x, self.y = x, y
    def __len__(self) -> int: return len(self.x)
    def __getitem__(self, i): return self.x[i], self.y[i]




def get_dls(train_ds: Any, valid_ds: Any, bs: int, **kwargs: Any) -> tuple[DataLoader, DataLoader]:
    "A shuffled training `DataLoader` and a validation one with twice the batch size."
    return (DataLoader(train_ds, batch_size=bs, shuffle=True, **kwargs),
            DataLoader(valid_ds, batch_size=bs * 2, **kwargs))


class DataLoaders:
    "A training and a validation data loader, as `.train` and `.valid`."
    #: set where the data is known (`image_dls`, `fashion_dls`, a run's loaders): class names, pixel statistics, source
    classes: list[str]
    codes: list[str]  # a segmentation's (`from_masks`)
    mean: Any  # per-channel floats (None: not normalised)
    std: Any
    source: str

    def __init__(self, *dls: Any) -> None:
        if len(dls) < 2:
            raise ValueError(f'DataLoaders needs a training and a validation loader, got {len(dls)} loader(s)')
        self.train, self.valid = dls[:2]

    @classmethod
    def from_dd(cls, dd: Any, batch_size: int, as_tuple: bool = True, **kwargs: Any) -> 'DataLoaders':
        """Data loaders over the splits of a `DatasetDict` `dd`, batches collated to tuples of its features. A `dd` of
        images and labels with no transform (`miniai.data.hf.is_image_dd`) takes the fast path instead: uint8 tensors
        decoded once and cached, normalised per batch (`dd_dls`; DataLoader-only options such as
        `num_workers` are not needed there). A transformed `dd` goes item by item through its transform."""
        if as_tuple and 'collate_fn' not in kwargs and is_image_dd(dd):
            return dd_dls(dd, batch_size, **{k: v for k, v in kwargs.items() if k not in _WORKER_OPTIONS})
        if as_tuple: kwargs.setdefault('collate_fn', collate_dict(next(iter(dd.values()))))
        return cls(*get_dls(*dd.values(), bs=batch_size, **kwargs))

    @classmethod
    def from_folder(cls, path: str | os.PathLike, train: str = 'train', valid: str = 'valid',
                    valid_pct: float | None = None, size: int | tuple[int, int] | None = None, bs: int = 64,
                    device: str | torch.device | None = None, seed: int | None = None, **kwargs: Any) -> 'DataLoaders':
        """Data loaders over a folder of images, a folder per class (`path/train/<class>/*.png`, and `path/valid` or
        `path/test`; or `valid_pct` of the images held out by a split seeded with `seed`), decoded once and cached as
        uint8, memory-mapped; `size` resizes (see `miniai.data.folders.folder_images`; `kwargs` go to `image_dls`).
        The result has `.classes`, `.mean`, `.std` and `show_batch()`."""
        return folder_dls(path, train, valid, valid_pct, size, bs=bs, device=device, seed=seed, **kwargs)

    @classmethod
    def from_masks(cls, path: str | os.PathLike, bs: int = 64, size: int | tuple[int, int] | None = None, device: str | torch.device | None = None,
                   seed: int | None = None, valid_pct: float = 0.2, **kwargs: Any) -> 'DataLoaders':
        """Data loaders for segmentation: `path/images/*`, a mask for each in `path/labels/` (found by `label_fn`:
        the same name by default, or a pattern such as CamVid's '{stem}_P{suffix}') and the codes in
        `path/codes.txt`; validation = the images named in `path/valid.txt`, else `valid_pct` of them. Images and masks
        are cached as uint8, masks resized nearest (see `miniai.data.masks.mask_dls`). `.codes` on the result."""
        return mask_dls(path, bs=bs, size=size, device=device, seed=seed, valid_pct=valid_pct, **kwargs)

    @classmethod
    def from_csv(cls, path: str | os.PathLike, csv: str = 'labels.csv', fn_col: int | str = 0, label_col: int | str | Sequence[int | str] = 1,
                 label_delim: str | None = None, valid_col: int | str | None = None, valid_pct: float = 0.2,
                 seed: int | None = None, size: int | tuple[int, int] | None = None, bs: int = 64, y_block: str | None = None,
                 vocab: Sequence[str] | None = None, folder: str | None = None, threshold: float = 0.5, device: str | torch.device | None = None,
                 cache_dir: str | os.PathLike | None = None, **kwargs: Any) -> 'DataLoaders':
        """Data loaders over the images listed in `path/csv`: file names in column `fn_col` (relative to `path`, or
        `path/folder`), targets in `label_col` (a name or a position): one class, labels separated by `label_delim`
        (multi-label, multi-hot targets), or numbers (regression; `label_col` may list several columns). The kind is
        `y_block`, else inferred (see `miniai.data.tables`); `dls.targets` says it. `valid_col` marks the validation
        rows (true/1/yes/valid), else a `valid_pct` of them is held out by a split seeded with `seed`; `vocab` fixes
        the classes (a label outside it is an error). `kwargs` go to `image_dls`."""
        from .tables import read_csv_table
        file = Path(path).expanduser() / csv
        columns, rows = read_csv_table(file)
        return table_dls(columns, rows, path, str(file), fn_col, label_col, label_delim, valid_col, valid_pct, seed,
                         size, bs, y_block, vocab, folder, threshold, device, cache_dir, **kwargs)

    @classmethod
    def from_df(cls, df: Any, path: str | os.PathLike = '.', fn_col: int | str = 0, label_col: int | str | Sequence[int | str] = 1,
                label_delim: str | None = None, valid_col: int | str | None = None, valid_pct: float = 0.2,
                seed: int | None = None, size: int | tuple[int, int] | None = None, bs: int = 64, y_block: str | None = None,
                vocab: Sequence[str] | None = None, folder: str | None = None, threshold: float = 0.5, device: str | torch.device | None = None,
                cache_dir: str | os.PathLike | None = None, **kwargs: Any) -> 'DataLoaders':
        "`from_csv` for a pandas DataFrame `df` already in memory (file names relative to `path`)."
        return table_dls([str(c) for c in df.columns], df.values.tolist(), path, 'the DataFrame', fn_col, label_col,
                         label_delim, valid_col, valid_pct, seed, size, bs, y_block, vocab, folder, threshold, device,
                         cache_dir, **kwargs)

    @classmethod
    def from_image_pairs(cls, path: str | os.PathLike, inputs: str = 'inputs', targets: str = 'targets',
                         valid_pct: float = 0.2, seed: int | None = None, size: int | tuple[int, int] | None = None,
                         target_size: int | tuple[int, int] | None = None, bs: int = 64, device: str | torch.device | None = None,
                         cache_dir: str | os.PathLike | None = None, **kwargs: Any) -> 'DataLoaders':
        """Image-to-image loaders (denoising, super-resolution): inputs in `path/inputs`, targets of the same names
        in `path/targets`, the targets as float32 images in [0, 1] (`dls.targets.kind` is 'image': MSE, and
        predictions are images). `size`/`target_size` resize either side. `kwargs` go to `image_dls`."""
        from .tables import pair_images
        images = pair_images(path, inputs, targets, valid_pct, seed, size, target_size, cache_dir)
        dls = image_dls(images, 'train', 'valid', bs=bs, device=device, seed=seed, **kwargs)
        dls.targets, dls.classes = Targets('image'), None  # pyright: ignore[reportAttributeAccessIssue]  (image targets: no classes)
        return dls

    vocab = property(lambda self: self.classes, doc="The class names (fastai's name for `classes`).")

    @property
    def targets(self) -> Targets:
        "What the targets are (`miniai.data.targets.Targets`): 'class' (with `classes`) unless the loaders say."
        own = self.__dict__.get('_targets')
        return own if own is not None else Targets('class', getattr(self, 'classes', None))

    @targets.setter
    def targets(self, t: Targets) -> None: self._targets = t

    def normalise(self, xb: torch.Tensor) -> torch.Tensor:
        "uint8 images `xb` as the loaders give them to the model: normalised float32 with the training statistics."
        if getattr(self, 'mean', None) is None: raise ValueError('dls.normalise: these loaders have no mean/std')
        return Normalise(self.mean, self.std, channels=xb.shape[-3]).encode(xb)

    def normalize_with(self, mean: float | Sequence[float], std: float | Sequence[float]) -> 'DataLoaders':
        """Normalise the batches of both loaders with `mean` and `std` (of [0, 1] pixels, per channel) instead of the
        data's own statistics: a pretrained network's (`vision_learner` asks for it). Still per batch, from uint8."""
        for dl in (self.train, self.valid):
            if not hasattr(dl, 'set_normalisation'):
                raise TypeError(f'normalize_with: {type(dl).__name__} cannot change its normalisation; normalise the '
                                f'data with mean={mean}, std={std} where it is made')
            dl.set_normalisation(mean, std)
        self.mean, self.std = self.train.mean, self.train.std
        return self

    def test_dl(self, items: Any, labels: Any = None, bs: int | None = None,
                device: str | torch.device | None = None) -> ItemsDataLoader:
        """A loader of new items made as the training data was (decoded, resized, normalised; see
        `miniai.data.items.items_dl`): a folder, files, PIL images or tensors, for `learn.get_preds(dl=...)` and
        `ClassificationInterpretation.from_learner(learn, dl)` (which needs labels: class folders, or `labels`)."""
        bs = bs or getattr(self.valid, 'bs', None) or 64
        return items_dl(data_preprocess(self, 'test_dl'), items, labels, getattr(self, 'classes', None), bs, device)  # pyright: ignore[reportArgumentType]  (never None: 64 at worst)

    def show_batch(self, max_n: int = 9, ncols: int | None = None, **kwargs: Any) -> None:
        """Show up to `max_n` images of a training batch, pixels as stored (before normalising), titled with class
        names; like `show_images`, returns nothing (`plt.gcf()` is the figure)."""
        xb, yb = next(iter(self.train))
        xb, yb = self.shown(xb[:max_n]), yb[:max_n].cpu()
        t = self.targets
        if t.kind == 'image':  # input | target, a pair a row
            pairs = [im for pair in zip(xb, yb.float()) for im in pair]
            return show_images(pairs, ncols=2, titles=['input', 'target'] * len(xb), **kwargs)
        if t.kind == 'mask':  # each image with its mask laid over it, a colour a code
            return show_images(overlay_masks(xb, yb, len(t.classes or ())), ncols=ncols or min(len(xb), 3), **kwargs)
        show_images(xb, ncols=ncols or min(len(xb), 3), titles=[t.title(y) for y in yb], **kwargs)

    def shown(self, xb: torch.Tensor) -> torch.Tensor:
        "Inputs `xb` as they look: on the CPU, float, the loader's normalisation undone where it is known."
        return denormalised(xb, getattr(self, 'mean', None), getattr(self, 'std', None))

    def __repr__(self): return f'DataLoaders(train={len(self.train)} batches, valid={len(self.valid)} batches)'


#: torch DataLoader options that mean nothing to the tensor loaders of `from_dd`'s fast path
_WORKER_OPTIONS = ('num_workers', 'persistent_workers', 'prefetch_factor', 'worker_init_fn', 'multiprocessing_context',
                   'timeout', 'generator')


def image_dls(images: ImageSet, train: str, valid: str, bs: int = 64, device: str | torch.device | None = None,
              shuffle: bool = True, drop_last: bool = False, seed: int | None = None, n_train: int | None = None,
              n_valid: int | None = None, rank: int = 0, world_size: int = 1, pin_memory: bool | None = None,
              normalize: tuple[float | Sequence[float], float | Sequence[float]] | None = None) -> DataLoaders:
    """Training and validation loaders over the splits `train` and `valid` of `images`, normalised per batch with the
    training split's statistics (or `normalize=(mean, std)`, e.g. a pretrained network's); `.classes` (and
    `.vocab`), `.mean` and `.std` (per channel) on the result.
    `n_train`/`n_valid` take seeded random subsets (copied out of the mapping); `device` as in `fashion_dls`."""
    device = resolve_device(device)
    pin_memory = pins_by_default(device) if pin_memory is None else pin_memory
    gen = torch.Generator().manual_seed(0 if seed is None else seed)
    xt, yt = subset(*images.split(train), n_train, gen, 'n_train')
    xv, yv = subset(*images.split(valid), n_valid, gen, 'n_valid')
    mean, std = (images.mean, images.std) if normalize is None else normalize
    norm = dict(mean=mean, std=std, device=device, rank=rank, world_size=world_size,
                pin_memory=pin_memory)
    dls = DataLoaders(TensorDataLoader(xt, yt, bs, shuffle=shuffle, drop_last=drop_last, seed=seed, **norm),  # pyright: ignore[reportArgumentType]  (norm: keyword arguments of both loaders)
                      TensorDataLoader(xv, yv, bs, **norm))  # pyright: ignore[reportArgumentType]
    dls.mean, dls.std, dls.classes, dls.source = dls.train.mean, dls.train.std, images.classes, images.source
    return dls


def table_dls(columns: list, rows: list, path: str | os.PathLike, where: str, fn_col: int | str = 0, label_col: int | str | Sequence[int | str] = 1,
              label_delim: str | None = None, valid_col: int | str | None = None, valid_pct: float = 0.2,
              seed: int | None = None, size: int | tuple[int, int] | None = None, bs: int = 64, y_block: str | None = None,
              vocab: Sequence[str] | None = None, folder: str | None = None, threshold: float = 0.5, device: str | torch.device | None = None,
              cache_dir: str | os.PathLike | None = None, **kwargs: Any) -> DataLoaders:
    "`DataLoaders` over the images a table lists, with its targets (see `miniai.data.tables.table_images`)."
    from .tables import table_images
    images, targets = table_images(columns, rows, path, where, fn_col, label_col, label_delim, valid_col, valid_pct,
                                   seed, size, y_block, vocab, folder, threshold, cache_dir)
    dls = image_dls(images, 'train', 'valid', bs=bs, device=device, seed=seed, **kwargs)
    dls.targets = targets
    if targets.kind == 'regression': dls.classes = None  # pyright: ignore[reportAttributeAccessIssue]  (column names are not classes)
    return dls


def folder_dls(path: str | os.PathLike, train: str = 'train', valid: str = 'valid', valid_pct: float | None = None,
               size: int | tuple[int, int] | None = None, bs: int = 64, device: str | torch.device | None = None,
               seed: int | None = None, cache_dir: str | os.PathLike | None = None, **kwargs: Any) -> DataLoaders:
    "`DataLoaders` over a folder of images (see `folder_images`); `kwargs` go to `image_dls`."
    images = folder_images(path, train, valid, valid_pct, size, seed, cache_dir)
    return image_dls(images, *images.splits, bs=bs, device=device, seed=seed, **kwargs)


def dd_dls(dd: Any, bs: int = 64, size: int | tuple[int, int] | None = None, device: str | torch.device | None = None,
           seed: int | None = None, cache_dir: str | os.PathLike | None = None, **kwargs: Any) -> DataLoaders:
    """`DataLoaders` over the first two splits of `dd` (training, then validation), as uint8 tensors normalised per
    batch (see `dd_images`); `kwargs` go to `image_dls`."""
    images = dd_images(dd, size, cache_dir)
    return image_dls(images, *list(images.splits)[:2], bs=bs, device=device, seed=seed, **kwargs)


def mask_dls(path: str | os.PathLike, bs: int = 64, size: int | tuple[int, int] | None = None, device: str | torch.device | None = None, seed: int | None = None,
             valid_pct: float = 0.2, images: str = 'images', labels: str = 'labels', codes: str = 'codes.txt',
             label_fn: Callable[[Path], Path] | str | None = None, valid: str = 'valid.txt', cache_dir: str | os.PathLike | None = None,
             normalize: tuple[float | Sequence[float], float | Sequence[float]] | None = None,
             pin_memory: bool | None = None) -> DataLoaders:
    """`DataLoaders` of (image, mask) batches over a segmentation folder (see `miniai.data.masks.mask_images`):
    images normalised per batch from uint8 (the training images' statistics, or `normalize=(mean, std)`), masks uint8
    [N, H, W]; `.codes` (also `.classes`), `.mean`, `.std` on the result. `device` as in `fashion_dls`."""
    imgs, masks, names = mask_images(path, images, labels, codes, label_fn, valid, valid_pct, size, seed, cache_dir)
    device = resolve_device(device)
    pin_memory = pins_by_default(device) if pin_memory is None else pin_memory
    (xt, _), (xv, _) = imgs.split('train'), imgs.split('valid')
    mean, std = (imgs.mean, imgs.std) if normalize is None else normalize
    kw: dict[str, Any] = dict(mean=mean, std=std, device=device, pin_memory=pin_memory)
    dls = DataLoaders(TensorDataLoader(xt, masks[:len(xt)], bs, shuffle=True, seed=seed, **kw),
                      TensorDataLoader(xv, masks[len(xt):], bs, **kw))
    dls.mean, dls.std, dls.source = dls.train.mean, dls.train.std, imgs.source
    dls.codes = dls.classes = names
    dls.targets = Targets('mask', names)
    return dls
