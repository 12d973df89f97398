"""The image cache: every split's uint8 images in one file, read memory-mapped (`ImageSet`). This module owns the file's
format and its building: `cached_images`, its one entry, decodes the images a source lists (in threads), writes the
file once (a lock keeps processes started together from building it twice) and reads it back; a damaged file is
rebuilt. Sources that feed it: `miniai.data.folders` (a folder per class) and `miniai.data.hf` (Hugging Face sets).
The cache lives in `$MINIAI_CACHE` (default ~/.cache/miniai), under images/."""
from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
import threading
import warnings
import zlib
from collections import deque
from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.files import atomic_path, locked
from .decode import ImageDataError, load_image, quiet_decoders, resize_cover
from .normalise import channel_stats

__all__ = ['DECODE_BATCH', 'ImageSet', 'cache_root', 'image_size', 'digest', 'cache_key', 'write_images', 'read_images',
           'cached_images']

_KEY_FORMAT = 'images-v1'
DECODE_BATCH = 512  # images per task handed to a decoding thread: sources list their items in batches of this size


class _NeedsColour(Exception): "A colour image turned up in a set begun as grey: start again with three channels."


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


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    "Where miniai caches data: `cache_dir`, else `$MINIAI_CACHE`, else ~/.cache/miniai."
    return Path(cache_dir or os.environ.get('MINIAI_CACHE') or Path.home() / '.cache' / 'miniai').expanduser()


def image_size(size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    "`size` (an int, or (height, width)) as (height, width); None stays None."
    if size is None: return None
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if min(h, w) < 1: raise ValueError(f'size must be >= 1, got {size}')
    return int(h), int(w)


def digest(*parts: object) -> str:
    "A short hash of `parts` (their repr), to name a cache file."
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def cache_key(*parts: object) -> str:
    "The key a cache file holds for images identified by `parts`: their `digest` with this file format's version."
    return digest(_KEY_FORMAT, *parts)


# The cache: pixels [N, C, H, W] uint8 at offset 0 (page-aligned, so they map straight into a tensor), labels as
# int64, a JSON header, then the header's length and a magic number. The header is written last, when the pixels'
# checksum and statistics are known, and the file is renamed into place only when complete.
_MAGIC, _FORMAT = b'MINIAIu8', 1


def _crc(arr: np.ndarray, step: int = 1 << 26) -> int:
    flat, crc = arr.reshape(-1), 0
    for i in range(0, len(flat), step): crc = zlib.crc32(memoryview(flat[i:i + step]), crc)  # pyright: ignore[reportArgumentType]  (a contiguous array is a buffer)
    return crc


def write_images(path: Path, shape: tuple, fill: Callable[[np.ndarray], None], labels: torch.Tensor, meta: dict, stats_of: int) -> None:
    """Write the cache file `path`: `fill(pixels)` writes the uint8 images into the memory-mapped array `pixels` of
    `shape`; `meta` (key, splits, classes, source) goes in the header, with the mean and std of the first `stats_of`
    images. Written through `atomic_path`, so a crash never leaves a half-written cache."""
    with atomic_path(path) as tmp:
        n_pix = int(np.prod(shape))
        with open(tmp, 'wb') as f: f.truncate(n_pix)
        pixels = np.memmap(tmp, np.uint8, 'r+', shape=shape) if n_pix else np.zeros(shape, np.uint8)
        fill(pixels)
        mean, std = channel_stats(torch.from_numpy(pixels[:stats_of]), meta.get('source', 'images'))
        pixels.flush()  # pyright: ignore[reportAttributeAccessIssue]  (a memmap)
        lab = labels.to(torch.int64).numpy().astype('<i8')
        head = json.dumps({**meta, 'format': _FORMAT, 'shape': list(shape), 'mean': mean, 'std': std,
                           'crc': _crc(pixels), 'crc_labels': zlib.crc32(lab.tobytes())}).encode()
        del pixels
        with open(tmp, 'ab') as f:
            f.write(lab.tobytes())
            f.write(head)
            f.write(struct.pack('<Q', len(head)) + _MAGIC)


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


def _fill(pixels: np.ndarray, batches, size, first: str, grey: list) -> None:
    """Decode every batch `(start, items, names)` into `pixels` [N, C, H, W] in threads. An item is a file's path,
    encoded bytes (1-D uint8) or decoded pixels. Images must all be `pixels`' size unless `size` resizes them. The
    names of grey images made colour (their value in each channel) are added to `grey`."""
    n_chan, hw = pixels.shape[1], tuple(pixels.shape[2:])
    failed = threading.Event()

    def work(start, items, names):
        if failed.is_set(): return
        try:
            for i, (item, name) in enumerate(zip(items, names)):
                img = load_image(item, name)
                if size is not None: img = resize_cover(img, hw)
                elif tuple(img.shape[1:]) != hw:
                    raise ImageDataError(f'{name} is {img.shape[2]}x{img.shape[1]} (WxH) but {first} is '
                                         f'{hw[1]}x{hw[0]}: images of different sizes need size= (--size on the '
                                         f'command line) to be resized to one size')
                if img.shape[0] != n_chan:
                    if n_chan == 1: raise _NeedsColour(name)
                    grey.append(name)  # list.append holds the GIL: safe from the decoding threads
                    img = img.expand(n_chan, -1, -1)
                pixels[start + i] = img.numpy()
        except BaseException:
            failed.set()
            raise

    threads = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(threads) as pool, quiet_decoders():
        pending = deque()
        for b in batches:  # a bounded window of tasks: the items waiting in memory stay few
            pending.append(pool.submit(work, *b))
            if len(pending) > 2 * threads: pending.popleft().result()
        while pending: pending.popleft().result()  # the first error, in file order


@contextmanager
def _locked(path: Path):
    "`locked(path)`, with a clear error where the cache's folder cannot be written."
    with ExitStack() as stack:
        try: stack.enter_context(locked(path))
        except OSError as e:
            raise ImageDataError(f'cannot write in the image cache\'s folder {path.parent} ({e.strerror or e}); set '
                                 f'MINIAI_CACHE to a writable folder') from None
        yield


def _cached(file: Path, key: str, build) -> ImageSet:
    "The image set in cache `file` if it holds `key` and is intact; else `build(file)` it first."
    with _locked(file.with_suffix('.lock')):
        images, why = read_images(file, key)
        if images is not None: return images
        if why not in ('missing', 'stale'):
            warnings.warn(f'miniai: rebuilding the damaged image cache {file} ({why})', stacklevel=4)
        try: build(file)
        except OSError as e:  # the images were read: this is the cache's folder (not writable, or full)
            raise ImageDataError(f'cannot write the image cache {file} ({e.strerror or e}); set MINIAI_CACHE to a '
                                 f'folder with room for it') from None
        images, why = read_images(file, key)
    if images is None: raise RuntimeError(f'the image cache {file} just written does not read back ({why})')
    return images


def _build(file: Path, key: str, batches, labels: torch.Tensor, splits: dict, classes: list, size,
           source: str) -> None:
    "Decode every image of `batches(lo, hi)` (see `_fill`) into the cache `file`, training split first."
    _, items, names = next(batches(0, 1))
    with quiet_decoders(): first = load_image(items[0], names[0])
    hw = tuple(first.shape[1:]) if size is None else size
    meta = dict(key=key, splits=splits, classes=classes, source=source)
    colour = names[0] if first.shape[0] == 3 else None  # a colour image, to name in the message on a mixed set
    for n_chan in dict.fromkeys((first.shape[0], 3)):  # grey first if the first image is; colour if one is not
        grey = []
        fill = lambda px: _fill(px, batches(0, len(labels)), size, names[0], grey)
        try: write_images(file, (len(labels), n_chan, *hw), fill, labels, meta, next(iter(splits.values())))
        except _NeedsColour as e:
            colour = e.args[0]
            continue
        if grey:
            n, k = len(labels), len(labels) - len(grey)
            print(f'miniai: {source}: {k:,} of the {n:,} images {"is" if k == 1 else "are"} colour (e.g. {colour}) and '
                  f'{len(grey):,} grey (e.g. {sorted(grey)[0]}), so all are read as colour, 3 channels, the grey ones '
                  f'repeated in each (one set, one channel count); make the colour ones grey to train on 1 channel',
                  file=sys.stderr)
        return


def cached_images(stem: str, key: str, batches: Callable[[int, int], Any], labels: torch.Tensor, splits: dict,
                  classes: list, size: tuple[int, int] | None, source: str, cache_dir: str | os.PathLike | None = None) -> ImageSet:
    """The images a source lists, from the cache file `<cache>/images/<stem>.u8` if it holds `key` (`cache_key` of
    what identifies them), else decoded into it first. `batches(lo, hi)`
    yields `(start, items, names)` for the items lo..hi (at most `DECODE_BATCH` a time): an item is a file's path,
    encoded bytes (1-D uint8) or decoded pixels, a name says where it came from in errors. `labels` are every item's,
    `splits` the count of each split in the items' order (the first is the training split, whose statistics the
    set keeps), `size` (height, width) resizes, `source` says where the images came from."""
    file = cache_root(cache_dir) / 'images' / f'{stem}.u8'
    return _cached(file, key, lambda f: _build(f, key, batches, labels, splits, classes, size, source))


