"""Fashion-MNIST: finding, checking, caching and loading it, and the fast in-memory loader for training.

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
import tempfile
import warnings
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from .conv import default_device, pinned_rows, pins_by_default
from .datasets import DataLoaders

__all__ = ['CLASSES', 'DEBIAN_DIR', 'FILES', 'FashionMNISTNotFound', 'IDXError', 'find_fashion_mnist', 'read_idx',
           'fashion_arrays', 'load_fashion_mnist', 'TensorDataLoader', 'fashion_dls']

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


def find_fashion_mnist(path=None) -> Path | None:
    "The folder with the four IDX files: `path`, else `$MINIAI_DATA`, else Debian's; None means only the hub is left."
    # a source the user named explicitly is never skipped silently: it is used or it is an error
    if path is not None: return _checked_folder(path, 'path')
    if os.environ.get('MINIAI_DATA'): return _checked_folder(os.environ['MINIAI_DATA'], '$MINIAI_DATA =')
    return DEBIAN_DIR.resolve() if DEBIAN_DIR.is_dir() and not _missing(DEBIAN_DIR) else None


def read_idx(path, ndim: int) -> torch.Tensor:
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
    return _check_split(split, read_idx(xp, 3), read_idx(yp, 1), xp, yp)


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


def fashion_arrays(path=None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    "For 'train' and 'test', the pair (uint8 images [N,28,28], int64 labels [N]); decoded once per process, read-only."
    return dict(_arrays(_source(path)))


@lru_cache(maxsize=2)
def _content_key(source) -> str:
    h = hashlib.sha256(_CACHE_FORMAT.encode())
    for n in _NAMES: h.update(_file(source[0], n).read_bytes())  # same bytes, same cache, wherever they live
    return h.hexdigest()[:16]


_PNG_HEAD = b'\x89PNG\r\n\x1a\n'


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack('>I', len(data)) + tag + data + struct.pack('>I', zlib.crc32(tag + data))


def _pngs(x: torch.Tensor) -> list[bytes]:
    "Grey PNGs of `x` [N,H,W] uint8, written directly: about twice as fast as PIL for 70000 tiny images."
    n, h, w = x.shape
    rows = np.zeros((n, h, w + 1), np.uint8)  # each PNG row starts with its filter type, 0 = none
    rows[:, :, 1:] = x.numpy()
    head = _PNG_HEAD + _png_chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, 8, 0, 0, 0, 0))
    tail = _png_chunk(b'IEND', b'')
    return [head + _png_chunk(b'IDAT', zlib.compress(r.tobytes(), 6)) + tail for r in rows]


def _build(arrays: dict):
    import datasets as hf
    feats = hf.Features({'image': hf.Image(), 'label': hf.ClassLabel(names=CLASSES)})
    return hf.DatasetDict({s: hf.Dataset.from_dict({'image': [{'bytes': b, 'path': None} for b in _pngs(x)],
                                                    'label': y.tolist()}, features=feats)
                           for s, (x, y) in arrays.items()})


def _cache_root(cache_dir=None) -> Path:
    return Path(cache_dir or os.environ.get('MINIAI_CACHE') or Path.home() / '.cache' / 'miniai').expanduser()


def load_fashion_mnist(path=None, cache_dir=None):
    "Fashion-MNIST as the hub's `datasets.DatasetDict` (train 60000, test 10000; `image`, `label`), cached as arrow."
    import datasets as hf
    source = _source(path)
    if source == 'hub': return _hub()
    cache = _cache_root(cache_dir) / f'fashion_mnist-{_CACHE_FORMAT}-{_content_key(source)}'
    if cache.exists():
        try: return hf.load_from_disk(str(cache))
        except Exception as e:  # damaged after it was written (a cleaner removed files): build it again
            warnings.warn(f'miniai: rebuilding the unreadable Fashion-MNIST cache {cache} ({e})')
            shutil.rmtree(cache, ignore_errors=True)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache.parent, prefix='.building-'))
    bars = hf.is_progress_bar_enabled()
    try:
        hf.disable_progress_bars()
        _build(_arrays(source)).save_to_disk(str(tmp / 'dd'))
        try: os.rename(tmp / 'dd', cache)  # atomic: a crash before it leaves no half-written cache
        except OSError:
            if not cache.exists(): raise  # otherwise another process finished first: use its copy
    finally:
        if bars: hf.enable_progress_bars()
        shutil.rmtree(tmp, ignore_errors=True)
    return hf.load_from_disk(str(cache))


class TensorDataLoader:
    """Batches `(x[idx], y[idx])` of tensors held in memory, taken by indexing, not item by item.

    Every batch is a fresh tensor, so changing it in place never changes the data. When shuffled, each epoch gets a
    new order from the loader's own generator (`seed`, or drawn once from torch's global RNG at construction, so
    `set_seed` makes it reproducible); `state_dict` holds that generator and the epochs drawn, to repeat the coming
    orders. `device` keeps the whole set there. With `world_size` > 1, every rank (all given the same seed) draws the
    same permutation and takes its interleaved slice `rank::world_size` of the first `world_size * (n //
    world_size)` items: disjoint parts, equally many batches on every rank, the last `n % world_size` items of
    each epoch's order left out. `pin_memory` (CPU-held data, CUDA model) gathers batches into pinned memory."""
    def __init__(self, x: torch.Tensor, y: torch.Tensor, bs: int = 1024, shuffle: bool = False,
                 drop_last: bool = False, seed: int | None = None, device=None, rank: int = 0, world_size: int = 1,
                 pin_memory: bool = False):
        if len(x) != len(y): raise ValueError(f'TensorDataLoader: {len(x)} inputs but {len(y)} targets')
        if bs < 1: raise ValueError(f'TensorDataLoader: bs must be >= 1, got {bs}')
        if not 0 <= rank < world_size: raise ValueError(f'TensorDataLoader: rank {rank} not in [0, {world_size})')
        if device is not None: x, y = x.to(device), y.to(device)
        if pin_memory and (x.device.type != 'cpu' or not torch.cuda.is_available()):
            raise ValueError(f'TensorDataLoader: pin_memory=True is for CPU-held data trained on a CUDA GPU; the data '
                             f'is on {x.device} and torch sees {"a" if torch.cuda.is_available() else "no"} CUDA GPU')
        self.x, self.y, self.bs, self.shuffle, self.drop_last = x, y, bs, shuffle, drop_last
        self.pin_memory = pin_memory
        self.rank, self.world_size = rank, world_size
        self.dataset = TensorDataset(x, y)
        if seed is None and shuffle: seed = int(torch.randint(0, 2 ** 62, (1,)).item())
        self.seed, self.epochs_drawn = seed, 0
        self.gen = torch.Generator().manual_seed(seed or 0)
        self._epoch_gen = None  # the generator's state before the latest epoch's order was drawn

    batch_size = property(lambda self: self.bs)
    device = property(lambda self: self.x.device)

    def _n_items(self) -> int: return len(self.x) // self.world_size

    def __len__(self) -> int:
        n = self._n_items()
        return n // self.bs if self.drop_last else -(-n // self.bs)

    def _order(self) -> torch.Tensor:
        if self.shuffle: self._epoch_gen = self.gen.get_state()  # to draw this epoch's order again after a stop
        idx = torch.randperm(len(self.x), generator=self.gen) if self.shuffle else torch.arange(len(self.x))
        self.epochs_drawn += 1
        if self.world_size > 1: idx = idx[:self._n_items() * self.world_size][self.rank::self.world_size]
        return idx.to(self.x.device)

    def __iter__(self):
        idx = self._order()  # drawn here, not at the first batch, so `iter()` alone counts as an epoch
        take = pinned_rows if self.pin_memory else lambda t, b: t[b]
        return ((take(self.x, b), take(self.y, b)) for b in idx.split(self.bs)[:len(self)])

    def state_dict(self) -> dict:
        """The generator's state and how many epochs were drawn: enough to repeat the coming epochs' order; and its
        state before the latest epoch was drawn (`epoch_gen`), to repeat that epoch's order too."""
        return {'gen': self.gen.get_state(), 'epochs_drawn': self.epochs_drawn, 'seed': self.seed,
                'epoch_gen': self._epoch_gen}

    def load_state_dict(self, sd: dict, repeat_epoch: bool = False) -> None:
        """Restore what `state_dict` returned, so the next epochs come in the same order as they did then; with
        `repeat_epoch`, the next epoch is the one under way when it was taken, in the same order (to go on with an
        epoch that was stopped part-way)."""
        self.seed, self._epoch_gen = sd.get('seed', self.seed), sd.get('epoch_gen')
        if not repeat_epoch:
            self.gen.set_state(sd['gen'])
            self.epochs_drawn = sd['epochs_drawn']
            return
        if self.shuffle:
            if self._epoch_gen is None:
                raise ValueError('TensorDataLoader.load_state_dict: this state holds no epoch under way to repeat')
            self.gen.set_state(self._epoch_gen)
        self.epochs_drawn = max(0, sd['epochs_drawn'] - 1)

    def __repr__(self): return (f'TensorDataLoader({len(self.x)} items, bs={self.bs}, {len(self)} batches, '
                                f'shuffle={self.shuffle}, device={self.x.device})')


@lru_cache(maxsize=1)
def _normalised(source) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    "Both splits as float [N,1,28,28], normalised with the training set's mean and std: once per process."
    arr = _arrays(source)
    mean, std = (v.item() for v in torch.std_mean(arr['train'][0].float().div_(255))[::-1])
    if std == 0: raise ValueError('fashion_dls: every training pixel is the same; the data cannot be normalised')
    norm = lambda x: x.float().mul_(1 / (255 * std)).sub_(mean / std).unsqueeze(1)
    return norm(arr['train'][0]), norm(arr['test'][0]), mean, std


def _subset(x, y, n, gen, what):
    "The first `n` items of a seeded permutation: a random subset with every class present in proportion."
    if n is None or n >= len(x): return x, y
    if n < 1: raise ValueError(f'fashion_dls: {what} must be >= 1, got {n}')
    idx = torch.randperm(len(x), generator=gen)[:n]
    return x[idx], y[idx]


def fashion_dls(bs: int = 1024, path=None, device=None, shuffle: bool = True, drop_last: bool = False,
                seed: int | None = None, n_train: int | None = None, n_valid: int | None = None,
                rank: int = 0, world_size: int = 1, pin_memory: bool | None = None) -> DataLoaders:
    """Training and test loaders of normalised float images [N,1,28,28] and int64 labels, ready for a Learner.

    Both splits are normalised with the full training set's mean and std (as `.mean`/`.std` of [0,1] pixels on the
    result; `.classes` holds the names). `n_train`/`n_valid` take a random subset chosen by `seed` (0 when None),
    for quick runs; `rank`/`world_size` shard both loaders (see `TensorDataLoader`). The data lives on `device`,
    default `default_device()` (where `DeviceCB()` and `def_device` put the model: no copy per batch). With
    `device='cpu'` on a CUDA machine, batches come in pinned memory (`pin_memory`) so that copying them is async."""
    device = default_device() if device is None else device
    pin_memory = pins_by_default(device) if pin_memory is None else pin_memory
    source = _source(path)
    xt, xv, mean, std = _normalised(source)
    yt, yv = _arrays(source)['train'][1], _arrays(source)['test'][1]
    gen = torch.Generator().manual_seed(0 if seed is None else seed)
    xt, yt = _subset(xt, yt, n_train, gen, 'n_train')
    xv, yv = _subset(xv, yv, n_valid, gen, 'n_valid')
    train = TensorDataLoader(xt, yt, bs, shuffle=shuffle, drop_last=drop_last, seed=seed, device=device,
                             rank=rank, world_size=world_size, pin_memory=pin_memory)
    valid = TensorDataLoader(xv, yv, bs, device=device, rank=rank, world_size=world_size, pin_memory=pin_memory)
    dls = DataLoaders(train, valid)
    dls.mean, dls.std, dls.classes = mean, std, CLASSES
    return dls
