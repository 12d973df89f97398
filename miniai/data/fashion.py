"""Fashion-MNIST: finding, checking, caching and loading it, and its fast loaders for training (`fashion_dls`).

Sources, in order: the `path` argument, `$MINIAI_DATA`, Debian's `dataset-fashion-mnist` folder, then the Hugging
Face hub (for users who are online). The IDX files are checked (magic number, shape, sizes, counts, label range)
before anything is built from them.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import struct
import warnings
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.devices import pins_by_default, resolve_device
from ..core.files import atomic_path
from .dataloaders import DataLoaders
from .decode import png_bytes
from .imagecache import cache_root
from .loader import TensorDataLoader, subset
from .normalise import channel_stats

__all__ = ['CLASSES', 'DEBIAN_DIR', 'FILES', 'FashionMNISTNotFound', 'IDXError', 'find_fashion_mnist', 'read_idx',
           'fashion_arrays', 'load_fashion_mnist', 'fashion_dls']

CLASSES = ['T - shirt / top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag',
           'Ankle boot']  # the names of the hub's `fashion_mnist`, so code written for it reads the same labels
DEBIAN_DIR = Path('/usr/share/datasets/fashion-mnist')
#: split -> (images file, labels file, expected count); each file may also end in .gz
FILES = {'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte', 60000),
         'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte', 10000)}
_NAMES = [n for imgs, labels, _ in FILES.values() for n in (imgs, labels)]
_CACHE_FORMAT = 'v2'  # bump when the arrow layout changes, so old caches are not read as new ones


class FashionMNISTNotFound(FileNotFoundError):
    "Raised when no source of Fashion-MNIST works; the message says how to get it."


class IDXError(ValueError):
    "A Fashion-MNIST IDX file that is truncated, corrupted or not the file it should be; the message names it."


def _help() -> str:
    return (f"Install Debian's package with `sudo apt-get install dataset-fashion-mnist` (it puts the files in "
            f"{DEBIAN_DIR}), or set MINIAI_DATA to a folder holding {', '.join(_NAMES)} (each may end in .gz).")


def _file(folder: Path, name: str) -> Path | None:
    for p in (folder / name, folder / f'{name}.gz'):  # uncompressed first: it reads faster
        if p.is_file(): return p
    return None


def _missing(folder: Path) -> list[str]:
    return [n for n in _NAMES if _file(folder, n) is None]


def _checked_folder(folder, what: str) -> Path:
    folder = Path(folder).expanduser()
    if not folder.is_dir(): raise FashionMNISTNotFound(f'{what} {folder} is not a folder. ' + _help())
    if missing := _missing(folder):
        raise FashionMNISTNotFound(f'{what} {folder} lacks {", ".join(missing)}. ' + _help())
    return folder.resolve()


def find_fashion_mnist(path: str | os.PathLike | None = None) -> Path | None:
    "The folder with the four IDX files: `path`, else `$MINIAI_DATA`, else Debian's; None means only the hub is left."
    # a source the user named explicitly is never skipped silently: it is used or it is an error
    if path is not None: return _checked_folder(path, 'path')
    if os.environ.get('MINIAI_DATA'): return _checked_folder(os.environ['MINIAI_DATA'], '$MINIAI_DATA =')
    return DEBIAN_DIR.resolve() if DEBIAN_DIR.is_dir() and not _missing(DEBIAN_DIR) else None


def read_idx(path: str | os.PathLike, ndim: int) -> torch.Tensor:
    "Read an unsigned-byte IDX file with `ndim` dimensions (gzip or not), checking its header against its size."
    path = Path(path)
    try:
        if path.suffix == '.gz':
            with gzip.open(path, 'rb') as f: data = f.read()
        else: data = path.read_bytes()
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise IDXError(f'{path}: not a complete gzip file ({e}); truncated or corrupted') from None
    head = 4 + 4 * ndim
    if len(data) < head: raise IDXError(f'{path}: truncated: {len(data)} bytes is too short for an IDX header')
    magic = struct.unpack('>I', data[:4])[0]
    if magic != 0x800 + ndim:  # 0x08 = unsigned bytes; the last byte counts the dimensions
        raise IDXError(f'{path}: magic number {magic:#010x}, expected {0x800 + ndim:#010x} (unsigned bytes, '
                       f'{ndim} dimension(s)); not a Fashion-MNIST {"image" if ndim == 3 else "label"} file')
    dims = struct.unpack(f'>{ndim}I', data[4:head])
    expected = head + int(np.prod(dims, dtype=np.int64))
    if len(data) != expected:
        raise IDXError(f'{path}: header says shape {dims} ({expected} bytes) but the file has {len(data)} bytes; '
                       + ('truncated' if len(data) < expected else 'trailing bytes, corrupted'))
    return torch.from_numpy(np.frombuffer(data, np.uint8, offset=head).reshape(dims).copy())


def _check_split(split: str, x: torch.Tensor, y: torch.Tensor, xname, yname) -> tuple[torch.Tensor, torch.Tensor]:
    count = FILES[split][2]
    if tuple(x.shape[1:]) != (28, 28): raise IDXError(f'{xname}: images are {tuple(x.shape[1:])}, expected 28x28')
    if len(x) != len(y): raise IDXError(f'{xname} has {len(x)} images but {yname} has {len(y)} labels')
    if len(x) != count: raise IDXError(f'{xname}: {len(x)} images, expected {count} for the {split} split')
    if len(y) and not 0 <= int(y.min()) <= int(y.max()) <= 9:
        bad = int(y[(y < 0) | (y > 9)][0])
        raise IDXError(f'{yname}: label {bad} is outside 0..9')
    return x, y.long()


def _read_split(folder: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    xp, yp = _file(folder, FILES[split][0]), _file(folder, FILES[split][1])
    return _check_split(split, read_idx(xp, 3), read_idx(yp, 1), xp, yp)  # pyright: ignore[reportArgumentType]  (_source checked the files are there)


def _source(path=None):
    "A hashable key for where the data comes from: the folder and its files' identity, or 'hub'."
    folder = find_fashion_mnist(path)
    if folder is None: return 'hub'
    # sizes and mtimes make the in-process caches notice files replaced on disk
    return folder, tuple((n, st.st_size, st.st_mtime_ns) for n in _NAMES for st in [_file(folder, n).stat()])


def _hub():
    import datasets as hf
    try: return hf.load_dataset('fashion_mnist')
    except Exception as e:  # offline, missing package data, hub errors: all mean "not available here"
        msg = f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'[:300]
        raise FashionMNISTNotFound(f'Fashion-MNIST not found: no IDX files in {DEBIAN_DIR} and MINIAI_DATA is not '
                                   f'set; the Hugging Face hub failed too ({msg}). ' + _help()) from None


@lru_cache(maxsize=2)
def _arrays(source) -> dict:
    if source != 'hub': return {s: _read_split(source[0], s) for s in FILES}
    dd = _hub()
    return {s: _check_split(s, torch.from_numpy(np.stack([np.asarray(im, dtype=np.uint8) for im in dd[s]['image']])),
                            torch.tensor(dd[s]['label']), f'hub fashion_mnist[{s}] images',
                            f'hub fashion_mnist[{s}] labels') for s in FILES}


def fashion_arrays(path: str | os.PathLike | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    "For 'train' and 'test', the pair (uint8 images [N,28,28], int64 labels [N]); decoded once per process, read-only."
    return dict(_arrays(_source(path)))


@lru_cache(maxsize=2)
def _content_key(source) -> str:
    h = hashlib.sha256(_CACHE_FORMAT.encode())
    for n in _NAMES: h.update(_file(source[0], n).read_bytes())  # same bytes, same cache, wherever they live
    return h.hexdigest()[:16]


def _build(arrays: dict):
    import datasets as hf
    feats = hf.Features({'image': hf.Image(), 'label': hf.ClassLabel(names=CLASSES)})
    return hf.DatasetDict({s: hf.Dataset.from_dict({'image': [{'bytes': b, 'path': None} for b in png_bytes(x)],
                                                    'label': y.tolist()}, features=feats)
                           for s, (x, y) in arrays.items()})


def load_fashion_mnist(path: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None) -> Any:
    "Fashion-MNIST as the hub's `datasets.DatasetDict` (train 60000, test 10000; `image`, `label`), cached as arrow."
    import datasets as hf
    source = _source(path)
    if source == 'hub': return _hub()
    cache = cache_root(cache_dir) / f'fashion_mnist-{_CACHE_FORMAT}-{_content_key(source)}'
    if cache.exists():
        try: return hf.load_from_disk(str(cache))
        except Exception as e:  # damaged after it was written (a cleaner removed files): build it again
            warnings.warn(f'miniai: rebuilding the unreadable Fashion-MNIST cache {cache} ({e})')
            shutil.rmtree(cache, ignore_errors=True)
    bars = hf.is_progress_bar_enabled()
    try:
        hf.disable_progress_bars()
        with atomic_path(cache) as tmp: _build(_arrays(source)).save_to_disk(str(tmp))
    except OSError:
        if not cache.exists(): raise  # otherwise another process finished first: use its copy
    finally:
        if bars: hf.enable_progress_bars()
    return hf.load_from_disk(str(cache))


@lru_cache(maxsize=2)
def _stats(source) -> tuple[float, float]:
    "Mean and std of the training pixels (as fractions of 255): once per process."
    (mean,), (std,) = channel_stats(_arrays(source)['train'][0].unsqueeze(1), 'fashion_dls')
    return mean, std


def fashion_dls(bs: int = 1024, path: str | os.PathLike | None = None, device: str | torch.device | None = None, shuffle: bool = True,
                drop_last: bool = False, seed: int | None = None, n_train: int | None = None, n_valid: int | None = None,
                rank: int = 0, world_size: int = 1, pin_memory: bool | None = None) -> DataLoaders:
    """Training and test loaders of normalised float images [N,1,28,28] and int64 labels, ready for a Learner.

    The loaders hold the uint8 pixels (55 MB for both splits) and normalise each batch where it lives, with the full
    training set's mean and std (as `.mean`/`.std` of [0,1] pixels on the result; `.classes` holds the names).
    `n_train`/`n_valid` take a random subset chosen by `seed` (0 when None), for quick runs; `rank`/`world_size`
    shard both loaders (see `TensorDataLoader`). The data lives on `device`, default `default_device()` (where
    `DeviceCB()` and `def_device` put the model: no copy per batch); 'cuda' means this process's GPU under torchrun.
    With `device='cpu'` batches are CPU tensors; on a CUDA machine they come in pinned memory (`pin_memory`), and
    during a fit `DeviceCB` has them delivered to the GPU, crossing as uint8, normalised there."""
    device = resolve_device(device)
    pin_memory = pins_by_default(device) if pin_memory is None else pin_memory
    source = _source(path)
    mean, std = _stats(source)
    (xt, yt), (xv, yv) = _arrays(source)['train'], _arrays(source)['test']
    gen = torch.Generator().manual_seed(0 if seed is None else seed)
    xt, yt = subset(xt, yt, n_train, gen, 'fashion_dls: n_train')
    xv, yv = subset(xv, yv, n_valid, gen, 'fashion_dls: n_valid')
    kw: dict[str, Any] = dict(device=device, rank=rank, world_size=world_size, pin_memory=pin_memory, mean=mean, std=std)
    train = TensorDataLoader(xt.unsqueeze(1), yt, bs, shuffle=shuffle, drop_last=drop_last, seed=seed, **kw)
    valid = TensorDataLoader(xv.unsqueeze(1), yv, bs, **kw)
    dls = DataLoaders(train, valid)
    dls.mean, dls.std, dls.classes = mean, std, CLASSES
    return dls
