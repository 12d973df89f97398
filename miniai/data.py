"""The fast in-memory loader, `TensorDataLoader`, and image sets held as uint8: normalised per batch on the device,
cached on disk as one file that is read memory-mapped.

An image set costs its pixel bytes once: the loader holds the uint8 images and turns each batch into normalised
floats where the data lives (per-channel mean and std of the training split), instead of holding float32 copies
(4x the bytes). `miniai.images` fills the cache from a folder of images or a Hugging Face dataset.
"""
from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import TensorDataset

from .conv import pinned_rows, pins_by_default, resolve_device
from .datasets import DataLoaders

__all__ = ['TensorDataLoader', 'ImageDataError', 'channel_stats', 'subset', 'cache_root', 'ImageSet', 'write_images',
           'read_images', 'image_dls']


class ImageDataError(ValueError):
    "Images that cannot be used as they are (unreadable, missing, inconsistent); the message names the file or folder."


def _per_channel(v, c: int, what: str) -> tuple[float, ...]:
    v = tuple(float(o) for o in (v if isinstance(v, (Sequence, torch.Tensor, np.ndarray)) else [v]))
    if len(v) == 1: v = v * c
    if len(v) != c: raise ValueError(f'TensorDataLoader: {what} has {len(v)} values for {c} channels')
    return v


class TensorDataLoader:
    """Batches `(x[idx], y[idx])` of tensors held in memory, taken by indexing, not item by item.

    Every batch is a fresh tensor, so changing it in place never changes the data. With `mean` and `std` (of [0, 1]
    pixels, one per channel or one for all), `x` holds uint8 images [N, C, ...] and each batch becomes normalised
    float32, `(x / 255 - mean) / std`, where the data lives: the set costs its pixel bytes, not 4x. When shuffled,
    each epoch gets a new order from the loader's own generator (`seed`, or drawn once from torch's global RNG at
    construction, so `set_seed` makes it reproducible); `state_dict` holds that generator and the epochs drawn, to
    repeat the coming orders. `device` keeps the whole set there ('cuda' means this process's GPU under torchrun).
    With `world_size` > 1, every rank (all given the same seed) draws the same permutation and takes its interleaved
    slice `rank::world_size` of the first `world_size * (n // world_size)` items: disjoint parts, equally many batches
    on every rank, the last `n % world_size` items of each epoch's order left out. `pin_memory` (CPU-held data, CUDA
    model) gathers batches into pinned memory; normalised batches are then copied as uint8 and normalised on the GPU."""
    def __init__(self, x: torch.Tensor, y: torch.Tensor, bs: int = 1024, shuffle: bool = False,
                 drop_last: bool = False, seed: int | None = None, device=None, rank: int = 0, world_size: int = 1,
                 pin_memory: bool = False, mean=None, std=None):
        if len(x) != len(y): raise ValueError(f'TensorDataLoader: {len(x)} inputs but {len(y)} targets')
        if bs < 1: raise ValueError(f'TensorDataLoader: bs must be >= 1, got {bs}')
        if not 0 <= rank < world_size: raise ValueError(f'TensorDataLoader: rank {rank} not in [0, {world_size})')
        if device is not None:
            device = resolve_device(device)  # 'cuda' under torchrun is this rank's GPU, not cuda:0
            x, y = x.to(device), y.to(device)
        if pin_memory and (x.device.type != 'cpu' or not torch.cuda.is_available()):
            raise ValueError(f'TensorDataLoader: pin_memory=True is for CPU-held data trained on a CUDA GPU; the data '
                             f'is on {x.device} and torch sees {"a" if torch.cuda.is_available() else "no"} CUDA GPU')
        self.x, self.y, self.bs, self.shuffle, self.drop_last = x, y, bs, shuffle, drop_last
        self.pin_memory = pin_memory
        self.rank, self.world_size = rank, world_size
        self.dataset = TensorDataset(x, y)
        self._set_normalisation(mean, std)
        if seed is None and shuffle: seed = int(torch.randint(0, 2 ** 62, (1,)).item())
        self.seed, self.epochs_drawn = seed, 0
        self.gen = torch.Generator().manual_seed(seed or 0)
        self._epoch_gen = None  # the generator's state before the latest epoch's order was drawn

    def _set_normalisation(self, mean, std):
        self.mean = self.std = self._scale = self._shift = None
        if mean is None and std is None: return
        if mean is None or std is None: raise ValueError('TensorDataLoader: give both mean and std, or neither')
        if self.x.dtype != torch.uint8 or self.x.dim() < 2:
            raise ValueError(f'TensorDataLoader: mean/std normalise uint8 images [N, C, ...]; x is {self.x.dtype} '
                             f'{tuple(self.x.shape)} (normalise float data once, beforehand)')
        c = self.x.shape[1]
        self.mean, self.std = _per_channel(mean, c, 'mean'), _per_channel(std, c, 'std')
        if min(self.std) <= 0: raise ValueError(f'TensorDataLoader: std must be > 0, got {self.std}')
        # where batches are normalised: with pinned batches, on the GPU they are copied to (4x fewer bytes to copy)
        self._norm_device = resolve_device('cuda') if self.pin_memory else self.x.device
        shape = (c,) + (1,) * (self.x.dim() - 2)
        const = lambda v: torch.tensor(v, dtype=torch.float32, device=self._norm_device).view(shape)
        # x * (1 / (255 std)) - mean / std: two float32 passes, the same arithmetic as normalising the set up front
        self._scale = const([1 / (255 * s) for s in self.std])
        self._shift = const([m / s for m, s in zip(self.mean, self.std)])

    batch_size = property(lambda self: self.bs)
    device = property(lambda self: self.x.device)

    def normalise(self, xb: torch.Tensor) -> torch.Tensor:
        "The uint8 images `xb` as this loader's batches hold them: normalised float32 (unchanged without mean/std)."
        if self._scale is None: return xb
        if xb.device != self._scale.device: xb = xb.to(self._scale.device, non_blocking=True)
        return torch.mul(xb, self._scale).sub_(self._shift)  # the multiply reads uint8 and writes float: one pass

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
        take = pinned_rows if self.pin_memory else _rows
        return ((self.normalise(take(self.x, b)), take(self.y, b)) for b in idx.split(self.bs)[:len(self)])

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


def _rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    # index_select copies whole rows; `t[idx]` gathers element by element, about twice as slow on a CPU
    return torch.index_select(t, 0, idx)


def channel_stats(x: torch.Tensor, what: str = 'images', chunk: int = 4096) -> tuple[tuple, tuple]:
    """Per-channel mean and std of uint8 images `x` [N, C, ...] as fractions of 255, exact (from value counts, a chunk
    of images at a time, so a memory-mapped set is read once and never copied whole), rounded to float32. The std
    divides by the pixel count (not count - 1), so a set and the same set repeated have the same statistics."""
    if x.dtype != torch.uint8 or x.dim() < 2: raise ValueError(f'channel_stats: uint8 [N, C, ...], got {x.dtype}')
    counts = torch.zeros(x.shape[1], 256, dtype=torch.int64)
    for i in range(0, len(x), chunk):
        part = x[i:i + chunk]
        for c in range(x.shape[1]): counts[c] += torch.bincount(part[:, c].reshape(-1), minlength=256)
    v = torch.arange(256, dtype=torch.int64)
    means, stds = [], []
    for c, h in enumerate(counts):
        n, s1, s2 = int(h.sum()), int((h * v).sum()), int((h * v * v).sum())  # Python ints: no rounding until here
        if n < 2 or s2 * n == s1 * s1:
            raise ImageDataError(f'{what}: every training pixel of channel {c} is the same; the data cannot be '
                                 f'normalised')
        means.append(float(np.float32(s1 / (255 * n))))
        stds.append(float(np.float32(((s2 * n - s1 * s1) / (n * n)) ** 0.5 / 255)))
    return tuple(means), tuple(stds)


def subset(x: torch.Tensor, y: torch.Tensor, n: int | None, gen: torch.Generator, what: str):
    "The first `n` items of a seeded permutation: a random subset with every class present in proportion."
    if n is None or n >= len(x): return x, y
    if n < 1: raise ValueError(f'{what} must be >= 1, got {n}')
    idx = torch.randperm(len(x), generator=gen)[:n]
    return x[idx], y[idx]


def cache_root(cache_dir=None) -> Path:
    "Where miniai caches data: `cache_dir`, else `$MINIAI_CACHE`, else ~/.cache/miniai."
    return Path(cache_dir or os.environ.get('MINIAI_CACHE') or Path.home() / '.cache' / 'miniai').expanduser()


@dataclass
class ImageSet:
    "Every split's uint8 images [N, C, H, W] in one tensor (split after split), their labels, classes and statistics."
    x: torch.Tensor
    y: torch.Tensor
    splits: dict          # split name -> count, in the order the items are held
    classes: list
    mean: tuple
    std: tuple
    source: str = ''

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        "The images and labels of split `name`: views, never copies."
        start = 0
        for k, n in self.splits.items():
            if k == name: return self.x[start:start + n], self.y[start:start + n]
            start += n
        raise KeyError(f'no split {name!r}; this set has {", ".join(self.splits)}')


# The cache: pixels [N, C, H, W] uint8 at offset 0 (page-aligned, so they map straight into a tensor), labels as
# int64, a JSON header, then the header's length and a magic number. The header is written last, when the pixels'
# checksum and statistics are known, and the file is renamed into place only when complete.
_MAGIC, _FORMAT = b'MINIAIu8', 1


def _crc(arr: np.ndarray, step: int = 1 << 26) -> int:
    flat, crc = arr.reshape(-1), 0
    for i in range(0, len(flat), step): crc = zlib.crc32(memoryview(flat[i:i + step]), crc)
    return crc


def write_images(path: Path, shape: tuple, fill, labels: torch.Tensor, meta: dict, stats_of: int) -> None:
    """Write the cache file `path`: `fill(pixels)` writes the uint8 images into the memory-mapped array `pixels` of
    `shape`; `meta` (key, splits, classes, source) goes in the header, with the mean and std of the first `stats_of`
    images. Written to a temporary file and renamed into place, so a crash never leaves a half-written cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f'.{path.name}.{os.getpid()}.tmp')
    try:
        n_pix = int(np.prod(shape))
        with open(tmp, 'wb') as f: f.truncate(n_pix)
        pixels = np.memmap(tmp, np.uint8, 'r+', shape=shape) if n_pix else np.zeros(shape, np.uint8)
        fill(pixels)
        mean, std = channel_stats(torch.from_numpy(pixels[:stats_of]), meta.get('source', 'images'))
        pixels.flush()
        lab = labels.to(torch.int64).numpy().astype('<i8')
        head = json.dumps({**meta, 'format': _FORMAT, 'shape': list(shape), 'mean': mean, 'std': std,
                           'crc': _crc(pixels), 'crc_labels': zlib.crc32(lab.tobytes())}).encode()
        del pixels
        with open(tmp, 'ab') as f:
            f.write(lab.tobytes())
            f.write(head)
            f.write(struct.pack('<Q', len(head)) + _MAGIC)
        os.replace(tmp, path)
    finally:
        if tmp.exists(): tmp.unlink()


def read_images(path: Path, key: str, verify: bool = True) -> tuple[ImageSet | None, str]:
    """The image set cached in `path` if it is complete and holds `key`, memory-mapped (pages are read when a batch
    touches them); else None and why ('missing', 'stale' or what is damaged). `verify` checks the pixels' checksum
    (one sequential read of the file)."""
    if not path.is_file(): return None, 'missing'
    try:
        size = path.stat().st_size
        with open(path, 'rb') as f:
            f.seek(max(0, size - 16))
            tail = f.read(16)
            if len(tail) < 16 or tail[8:] != _MAGIC: return None, 'no end marker (truncated or not a miniai cache)'
            n_head = struct.unpack('<Q', tail[:8])[0]
            if n_head > size - 16: return None, 'header length past the start of the file'
            f.seek(size - 16 - n_head)
            head = json.loads(f.read(n_head))
            if head.get('format') != _FORMAT: return None, f'format {head.get("format")}, expected {_FORMAT}'
            if head.get('key') != key: return None, 'stale'
            shape = tuple(head['shape'])
            n_pix, n = int(np.prod(shape)), shape[0]
            if n_pix + 8 * n + n_head + 16 != size:
                return None, f'{size} bytes, the header says {n_pix + 8 * n + n_head + 16}'
            f.seek(n_pix)
            lab = f.read(8 * n)
        if zlib.crc32(lab) != head['crc_labels']: return None, 'labels checksum mismatch'
        pixels = np.memmap(path, np.uint8, 'c', shape=shape) if n_pix else np.zeros(shape, np.uint8)
        if verify and _crc(pixels) != head['crc']: return None, 'pixels checksum mismatch'
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:  # unreadable header: damaged, not a bug
        return None, f'unreadable ({type(e).__name__}: {e})'
    # a copy-on-write mapping: writable for torch, yet writes never reach the file
    y = torch.from_numpy(np.frombuffer(bytearray(lab), '<i8').astype(np.int64))
    return ImageSet(torch.from_numpy(pixels), y, dict(head['splits']), list(head['classes']), tuple(head['mean']),
                    tuple(head['std']), head.get('source', '')), ''


def image_dls(images: ImageSet, train: str, valid: str, bs: int = 64, device=None, shuffle: bool = True,
              drop_last: bool = False, seed: int | None = None, n_train: int | None = None,
              n_valid: int | None = None, rank: int = 0, world_size: int = 1, pin_memory: bool | None = None):
    """Training and validation loaders over the splits `train` and `valid` of `images`, normalised per batch with the
    training split's statistics; `.classes` (and `.vocab`), `.mean` and `.std` (per channel) on the result.
    `n_train`/`n_valid` take seeded random subsets (copied out of the mapping); `device` as in `fashion_dls`."""
    device = resolve_device(device)
    pin_memory = pins_by_default(device) if pin_memory is None else pin_memory
    gen = torch.Generator().manual_seed(0 if seed is None else seed)
    xt, yt = subset(*images.split(train), n_train, gen, 'n_train')
    xv, yv = subset(*images.split(valid), n_valid, gen, 'n_valid')
    norm = dict(mean=images.mean, std=images.std, device=device, rank=rank, world_size=world_size,
                pin_memory=pin_memory)
    dls = DataLoaders(TensorDataLoader(xt, yt, bs, shuffle=shuffle, drop_last=drop_last, seed=seed, **norm),
                      TensorDataLoader(xv, yv, bs, **norm))
    dls.mean, dls.std, dls.classes, dls.source = images.mean, images.std, images.classes, images.source
    return dls
