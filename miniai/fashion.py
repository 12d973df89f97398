"""Fashion-MNIST: finding, checking, caching and loading it, and the fast in-memory loader for training.

Sources, in order: the `path` argument, `$MINIAI_DATA`, Debian's `dataset-fashion-mnist` folder, then the Hugging
Face hub (for users who are online). The IDX files are checked (magic number, sizes, counts, label range) before
anything is built from them.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import struct
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

from .datasets import DataLoaders

__all__ = ['CLASSES', 'DEBIAN_DIR', 'FILES', 'FashionMNISTNotFound', 'find_fashion_mnist', 'read_idx',
           'fashion_arrays', 'load_fashion_mnist', 'TensorDataLoader', 'fashion_dls']

CLASSES = ['T - shirt / top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag',
           'Ankle boot']
DEBIAN_DIR = Path('/usr/share/datasets/fashion-mnist')
#: split -> (images file, labels file, expected count), file names without the optional .gz
FILES = {'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte', 60000),
         'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte', 10000)}
_MAGIC = {3: 0x00000803, 1: 0x00000801}  # unsigned-byte IDX with 3 (images) or 1 (labels) dimensions


class FashionMNISTNotFound(FileNotFoundError):
    "Raised when no source of Fashion-MNIST works; the message says how to get it."


def _file(folder: Path, name: str) -> Path | None:
    for p in (folder / name, folder / f'{name}.gz'):
        if p.is_file(): return p
    return None


def _has_all(folder: Path) -> bool:
    return all(_file(folder, n) for imgs, labels, _ in FILES.values() for n in (imgs, labels))


def _help() -> str:
    names = ', '.join(n for imgs, labels, _ in FILES.values() for n in (imgs, labels))
    return (f"Fashion-MNIST not found. Install Debian's package with `apt-get install dataset-fashion-mnist` (files "
            f"in {DEBIAN_DIR}), or set MINIAI_DATA to a folder holding {names} (each may end in .gz).")


def find_fashion_mnist(path=None) -> Path | None:
    "The folder with the four IDX files: `path`, else `$MINIAI_DATA`, else Debian's; None if none has them."
    if path is not None:
        path = Path(path)
        if not _has_all(path): raise FashionMNISTNotFound(f'{path} does not hold the Fashion-MNIST IDX files. '
                                                          + _help())
        return path
    for cand in (os.environ.get('MINIAI_DATA'), DEBIAN_DIR):
        if cand and _has_all(Path(cand)): return Path(cand)
    return None


def read_idx(path, ndim: int) -> torch.Tensor:
    "Read an unsigned-byte IDX file with `ndim` dimensions (gzip or not), checking its header against its size."
    path = Path(path)
    opener = gzip.open if path.suffix == '.gz' else open
    try:
        with opener(path, 'rb') as f: data = f.read()
    except (OSError, EOFError) as e: raise ValueError(f'{path}: cannot be read ({e}); is it truncated?') from e
    head = 4 + 4 * ndim
    if len(data) < head: raise ValueError(f'{path}: {len(data)} bytes is too short for an IDX header')
    magic = struct.unpack('>I', data[:4])[0]
    if magic != _MAGIC[ndim]:
        raise ValueError(f'{path}: magic number {magic:#010x}, expected {_MAGIC[ndim]:#010x} (unsigned bytes, '
                         f'{ndim} dimension(s)); not a Fashion-MNIST {"image" if ndim == 3 else "label"} file')
    dims = struct.unpack(f'>{ndim}I', data[4:head])
    expected = head + int(torch.tensor(dims).prod())
    if len(data) != expected:
        raise ValueError(f'{path}: header says {dims} ({expected} bytes) but the file has {len(data)} bytes; '
                         f'truncated or corrupted')
    return torch.frombuffer(bytearray(data[head:]), dtype=torch.uint8).reshape(dims)


def _read_split(folder: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    imgs_name, labels_name, count = FILES[split]
    ip, lp = _file(folder, imgs_name), _file(folder, labels_name)
    x, y = read_idx(ip, 3), read_idx(lp, 1)
    if tuple(x.shape[1:]) != (28, 28): raise ValueError(f'{ip}: images are {tuple(x.shape[1:])}, expected 28x28')
    if len(x) != len(y): raise ValueError(f'{ip} has {len(x)} images but {lp} has {len(y)} labels')
    if len(x) != count: raise ValueError(f'{ip}: {len(x)} images, expected {count} for the {split} split')
    if int(y.max()) > 9: raise ValueError(f'{lp}: label {int(y.max())} is outside 0..9')
    return x, y.long()


@lru_cache(maxsize=4)
def _arrays_from(folder: Path | None) -> dict:
    if folder is not None: return {s: _read_split(folder, s) for s in FILES}
    dd = _from_hub()
    import numpy as np
    return {s: (torch.from_numpy(np.stack([np.asarray(im) for im in dd[hs]['image']])),
                torch.tensor(dd[hs]['label'])) for s, hs in (('train', 'train'), ('test', 'test'))}


def fashion_arrays(path=None) -> dict:
    "For 'train' and 'test', the pair (uint8 images [N,28,28], int64 labels [N]); decoded once per process."
    return _arrays_from(find_fashion_mnist(path))


def _from_hub():
    from datasets import load_dataset
    try: return load_dataset('fashion_mnist')
    except Exception as e: raise FashionMNISTNotFound(_help() + f' (the Hugging Face hub failed too: {e})') from e


def _cache_dir() -> Path:
    return Path(os.environ.get('MINIAI_CACHE', Path.home() / '.cache' / 'miniai'))


def _build(arrays: dict):
    import datasets as hf
    from PIL import Image
    feats = hf.Features({'image': hf.Image(), 'label': hf.ClassLabel(names=CLASSES)})
    def png(a):
        buf = io.BytesIO()
        Image.fromarray(a.numpy(), mode='L').save(buf, format='PNG', compress_level=1)
        return {'bytes': buf.getvalue(), 'path': None}
    return hf.DatasetDict({s: hf.Dataset.from_dict({'image': [png(a) for a in x], 'label': y.tolist()},
                                                   features=feats) for s, (x, y) in arrays.items()})


def load_fashion_mnist(path=None):
    "Fashion-MNIST as a `datasets.DatasetDict` (train 60000, test 10000; `image`, `label`), cached on disk as arrow."
    import datasets as hf
    folder = find_fashion_mnist(path)
    if folder is None: return _from_hub()
    st = {n: _file(folder, n).stat() for imgs, labels, _ in FILES.values() for n in (imgs, labels)}
    ident = repr((str(folder.resolve()), [(s.st_size, int(s.st_mtime)) for s in st.values()]))
    key = hashlib.sha1(ident.encode()).hexdigest()[:12]  # a different source never reuses a wrong cache
    cache = _cache_dir() / f'fashion_mnist-{key}'
    if not cache.exists():
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache.parent, prefix='.building-'))
        try:
            _build(fashion_arrays(folder)).save_to_disk(str(tmp))
            os.replace(tmp, cache)  # a crash before this line leaves no half-written cache behind
        finally: shutil.rmtree(tmp, ignore_errors=True)
    return hf.load_from_disk(str(cache))


class _Sized:
    def __init__(self, n): self.n = n
    def __len__(self): return self.n


class TensorDataLoader:
    """Batches `(x[idx], y[idx])` of tensors held in memory, taken by indexing, not item by item.

    A new order each epoch from its own generator (`seed`, or drawn once from torch's global RNG, so `set_seed`
    makes it reproducible). With `world_size` > 1, every rank draws the same permutation and takes the slice
    `rank::world_size` of it, so ranks see disjoint parts and equally many batches (the tail that does not divide
    evenly is dropped on every rank)."""
    def __init__(self, x: torch.Tensor, y: torch.Tensor, bs: int = 1024, shuffle: bool = False,
                 drop_last: bool = False, seed: int | None = None, device=None, rank: int = 0, world_size: int = 1):
        if len(x) != len(y): raise ValueError(f'TensorDataLoader: {len(x)} inputs but {len(y)} targets')
        if bs < 1: raise ValueError(f'TensorDataLoader: bs must be >= 1, got {bs}')
        if not 0 <= rank < world_size: raise ValueError(f'TensorDataLoader: rank {rank} not in [0, {world_size})')
        if device is not None: x, y = x.to(device), y.to(device)
        self.x, self.y, self.bs, self.shuffle, self.drop_last = x, y, bs, shuffle, drop_last
        self.rank, self.world_size = rank, world_size
        if seed is None: seed = int(torch.randint(0, 2 ** 62, (1,)).item())
        self.seed, self.epochs_drawn = seed, 0
        self.gen = torch.Generator().manual_seed(seed)

    batch_size = property(lambda self: self.bs)
    dataset = property(lambda self: _Sized(self._n_items()))

    def _n_items(self) -> int: return len(self.x) // self.world_size

    def __len__(self) -> int:
        n = self._n_items()
        return n // self.bs if self.drop_last else -(-n // self.bs)

    def _order(self):
        n = self._n_items() * self.world_size
        idx = torch.randperm(len(self.x), generator=self.gen) if self.shuffle else torch.arange(len(self.x))
        self.epochs_drawn += 1
        if self.world_size == 1: return idx if self.shuffle else None
        return idx[:n][self.rank::self.world_size]

    def __iter__(self):
        idx = self._order()
        if idx is not None and idx.device != self.x.device: idx = idx.to(self.x.device)
        for i in range(len(self)):
            sl = slice(i * self.bs, (i + 1) * self.bs)
            if idx is None: yield self.x[sl], self.y[sl]
            else:
                b = idx[sl]
                yield self.x[b], self.y[b]

    def state_dict(self) -> dict:
        "The generator's state and how many epochs were drawn: enough to repeat the coming epochs' order."
        return {'gen': self.gen.get_state(), 'epochs_drawn': self.epochs_drawn, 'seed': self.seed}

    def load_state_dict(self, sd: dict) -> None:
        self.gen.set_state(sd['gen'])
        self.epochs_drawn = sd['epochs_drawn']

    def __repr__(self): return (f'TensorDataLoader({self._n_items()} items, bs={self.bs}, shuffle={self.shuffle}, '
                                f'device={self.x.device})')


def _subset(x, y, n, gen):
    "The first `n` items of a seeded permutation: a random subset with every class present in proportion."
    if n is None or n >= len(x): return x, y
    idx = torch.randperm(len(x), generator=gen)[:n]
    return x[idx], y[idx]


def fashion_dls(bs: int = 1024, path=None, device=None, shuffle: bool = True, drop_last: bool = False,
                seed: int | None = None, n_train: int | None = None, n_valid: int | None = None,
                rank: int = 0, world_size: int = 1) -> DataLoaders:
    """Training and test loaders of normalised float images [N,1,28,28] and int64 labels, ready for a Learner.

    Both splits are normalised with the training set's mean and std (kept as `.mean`/`.std` on the result).
    `n_train`/`n_valid` take a seeded random subset (for quick runs); `device` keeps the data there."""
    arrays = fashion_arrays(path)
    (xt, yt), (xv, yv) = arrays['train'], arrays['test']
    gen = torch.Generator().manual_seed(0 if seed is None else seed)
    xt, yt = _subset(xt, yt, n_train, gen)
    xv, yv = _subset(xv, yv, n_valid, gen)
    mean, std = _stats(path)
    norm = lambda x: x.float().mul_(1 / (255 * std)).sub_(mean / std).unsqueeze(1)
    train = TensorDataLoader(norm(xt), yt, bs, shuffle=shuffle, drop_last=drop_last, seed=seed, device=device,
                             rank=rank, world_size=world_size)
    valid = TensorDataLoader(norm(xv), yv, bs, device=device, rank=rank, world_size=world_size)
    dls = DataLoaders(train, valid)
    dls.mean, dls.std = mean, std
    return dls


@lru_cache(maxsize=4)
def _stats(path) -> tuple[float, float]:
    x = fashion_arrays(path)['train'][0].float() / 255
    return x.mean().item(), x.std().item()
