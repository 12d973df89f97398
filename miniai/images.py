"""Your own images into the fast loader: a folder per class (ImageFolder layout) decoded once (torchvision's
decoders, in threads), cached as one uint8 file and read memory-mapped; and writing tensors as such a folder.

`DataLoaders.from_folder` (miniai.datasets) comes here; `folder_images` gives the cached `ImageSet` itself. The cache
lives in `$MINIAI_CACHE` (default ~/.cache/miniai), under images/. Hugging Face datasets: `miniai.hf_images`.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import struct
import sys
import threading
import warnings
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from .data import ImageDataError, ImageSet, cache_root, image_dls, read_images, write_images

__all__ = ['IMAGE_SUFFIXES', 'folder_images', 'folder_dls', 'png_bytes', 'write_image_folder']

IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.gif', '.webp')  # what torchvision's decode_image reads
_KEY_FORMAT = 'images-v1'
_BATCH = 512  # images per task handed to a decoding thread


class _NeedsColour(Exception): "A colour image turned up in a set begun as grey: start again with three channels."


def _read(path) -> torch.Tensor:
    try: return torch.from_numpy(np.fromfile(path, np.uint8))
    except OSError as e: raise ImageDataError(f'{path}: cannot be read ({e.strerror or e})') from None


def _decode(data: torch.Tensor, name) -> torch.Tensor:
    "Encoded bytes -> uint8 [C, H, W] with C 1 or 3 (alpha dropped, palettes expanded, 16 bits scaled to 8)."
    from torchvision.io import ImageReadMode, decode_image
    # a palette PNG (colour type 3 in IHDR) decodes to its indices unless RGB is asked for
    palette = len(data) > 25 and bytes(data[:4].tolist()) == b'\x89PNG' and int(data[25]) == 3
    try: img = decode_image(data, mode=ImageReadMode.RGB if palette else ImageReadMode.UNCHANGED)
    except RuntimeError as e:
        why = re.sub(r'^.*?\.cpp:\d+, ', '', str(e).splitlines()[0] if str(e) else type(e).__name__)
        raise ImageDataError(f'{name}: cannot be decoded ({why}); the file is truncated, damaged or not the image '
                             f'its name says') from None
    if img.dim() == 4: img = img[0]  # an animated GIF: its first frame
    if img.dtype == torch.uint16: img = ((img.int() + 128) // 257).to(torch.uint8)
    return img[:1] if img.shape[0] == 2 else img[:3] if img.shape[0] == 4 else img


def _as_chw(a: torch.Tensor) -> torch.Tensor:
    "A decoded array [H, W], [H, W, C] or [C, H, W] as [C, H, W]."
    if a.dim() == 2: return a[None]
    return a.permute(2, 0, 1) if a.shape[-1] in (1, 3, 4) and a.shape[0] not in (1, 3, 4) else a


def _resized(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    "Scale `img` (antialiased) so it covers `size`, then crop its centre to `size`."
    if tuple(img.shape[-2:]) == size: return img
    import torchvision.transforms.v2.functional as TF
    h, w = img.shape[-2:]
    s = max(size[0] / h, size[1] / w)
    img = TF.resize(img, [max(size[0], round(h * s)), max(size[1], round(w * s))], antialias=True)
    return TF.center_crop(img, list(size))


def _fill(pixels: np.ndarray, batches, size, first: str) -> None:
    """Decode every batch `(start, items, names)` into `pixels` [N, C, H, W] in threads. An item is a file's path,
    encoded bytes (1-D uint8) or decoded pixels. Images must all be `pixels`' size unless `size` resizes them."""
    n_chan, hw = pixels.shape[1], tuple(pixels.shape[2:])
    failed = threading.Event()

    def work(start, items, names):
        if failed.is_set(): return
        try:
            for i, (item, name) in enumerate(zip(items, names)):
                img = _read(item) if isinstance(item, (str, Path)) else item
                img = _decode(img, name) if img.dim() == 1 else _as_chw(img)[:3]
                if size is not None: img = _resized(img, hw)
                elif tuple(img.shape[1:]) != hw:
                    raise ImageDataError(f'{name} is {img.shape[2]}x{img.shape[1]} (WxH) but {first} is '
                                         f'{hw[1]}x{hw[0]}: images of different sizes need size= (--size on the '
                                         f'command line) to be resized to one size')
                if img.shape[0] != n_chan:
                    if n_chan == 1: raise _NeedsColour()
                    img = img.expand(n_chan, -1, -1)
                pixels[start + i] = img.numpy()
        except BaseException:
            failed.set()
            raise

    threads = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(threads) as pool, _quiet_decoders():
        pending = deque()
        for b in batches:  # a bounded window of tasks: the items waiting in memory stay few
            pending.append(pool.submit(work, *b))
            if len(pending) > 2 * threads: pending.popleft().result()
        while pending: pending.popleft().result()  # the first error, in file order


@contextlib.contextmanager
def _quiet_decoders():
    with warnings.catch_warnings():
        # torchvision 0.29 announces its decoders' future move to TorchCodec on every call; they work as before
        warnings.filterwarnings('ignore', message='The image decoding and encoding capabilities of TorchVision')
        yield


def _first_image(item, name) -> torch.Tensor:
    with _quiet_decoders():
        img = _read(item) if isinstance(item, (str, Path)) else item
        return _decode(img, name) if img.dim() == 1 else _as_chw(img)[:3]


@contextlib.contextmanager
def _locked(path: Path):
    "Hold an exclusive lock on `path` (POSIX), so processes started together (torchrun) build a cache once."
    try: import fcntl
    except ImportError: fcntl = None  # Windows: no lock; concurrent builds are still safe, only wasteful
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, 'a')
    except OSError as e:
        raise ImageDataError(f'cannot write in the image cache\'s folder {path.parent} ({e.strerror or e}); set '
                             f'MINIAI_CACHE to a writable folder') from None
    with f:
        if fcntl: fcntl.flock(f, fcntl.LOCK_EX)
        try: yield
        finally:
            if fcntl: fcntl.flock(f, fcntl.LOCK_UN)


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
    first = _first_image(items[0], names[0])
    hw = tuple(first.shape[1:]) if size is None else size
    meta = dict(key=key, splits=splits, classes=classes, source=source)
    for n_chan in dict.fromkeys((first.shape[0], 3)):  # grey first if the first image is; colour if one is not
        fill = lambda px: _fill(px, batches(0, len(labels)), size, names[0])
        try: return write_images(file, (len(labels), n_chan, *hw), fill, labels, meta, next(iter(splits.values())))
        except _NeedsColour: continue


def _file_batches(files: list):
    "`batches(lo, hi)` over a list of image files: (start, paths, names)."
    return lambda lo, hi: ((s, files[s:min(s + _BATCH, hi)], files[s:min(s + _BATCH, hi)])
                           for s in range(lo, hi, _BATCH))


def _size(size) -> tuple[int, int] | None:
    if size is None: return None
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if min(h, w) < 1: raise ValueError(f'size must be >= 1, got {size}')
    return int(h), int(w)


def _digest(*parts) -> str: return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


# --- folders ------------------------------------------------------------------------------------------------

def _images_under(folder: str, skipped: list) -> list[tuple[str, int, int]]:
    "(path, size, mtime_ns) of every image below `folder`, in name order; other files go to `skipped`."
    found = []
    with os.scandir(folder) as it: entries = sorted(it, key=lambda e: e.name)
    for e in entries:  # os.scandir and strings, not pathlib: a cached start lists 60,000 files in under a second
        if e.name.startswith('.'): continue  # hidden files and folders (.DS_Store, .ipynb_checkpoints)
        if e.is_dir(): found += _images_under(e.path, skipped)
        elif not e.name.lower().endswith(IMAGE_SUFFIXES): skipped.append(e.path)
        else:
            st = e.stat()
            found.append((e.path, st.st_size, st.st_mtime_ns))
    return found


def _classes(folder: Path, skipped: list) -> dict[str, list[tuple[str, int, int]]]:
    "Each class folder of `folder` and its images (see `_images_under`); every other file is added to `skipped`."
    if not folder.is_dir(): raise ImageDataError(f'{folder}: no such folder')
    found = {}
    with os.scandir(folder) as it: entries = sorted(it, key=lambda e: e.name)
    for d in entries:
        if d.name.startswith('.'): continue
        if not d.is_dir():
            skipped.append(d.path)
            continue
        files = _images_under(d.path, skipped)
        if not files: raise ImageDataError(f'class folder {d.path} has no images ({", ".join(IMAGE_SUFFIXES)})')
        found[d.name] = files
    if not found:
        raise ImageDataError(f'{folder} has no class folders: put each class\'s images in a folder named after it '
                             f'({folder}/<class>/<image>.png)')
    if len(found) == 1:
        raise ImageDataError(f'{folder} has one class folder ({next(iter(found))}): a classifier needs at least two')
    return found


def _layout(path: Path, train: str, valid: str, valid_pct, seed) -> tuple[dict, list, list]:
    "The training and validation files with their labels, the class names, and the files skipped."
    if not path.exists(): raise ImageDataError(f'{path}: no such folder')
    if not path.is_dir(): raise ImageDataError(f'{path} is a file, not a folder of images')
    skipped = []
    if valid_pct is not None:
        if not 0 < valid_pct < 1: raise ValueError(f'valid_pct must be in (0, 1), got {valid_pct}')
        tdir = path / train if (path / train).is_dir() else path  # a folder of class folders, with no split
        per_class = _classes(tdir, skipped)
        classes = list(per_class)
        files = [(f, c) for c, name in enumerate(classes) for f in per_class[name]]
        n_valid = round(len(files) * valid_pct)
        if not 0 < n_valid < len(files):
            raise ImageDataError(f'{tdir}: valid_pct={valid_pct} of {len(files)} images leaves an empty split')
        order = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed or 0)).tolist()
        held = set(order[:n_valid])
        return ({'train': [o for i, o in enumerate(files) if i not in held],
                 'valid': [o for i, o in enumerate(files) if i in held]}, classes, skipped)
    if not (path / train).is_dir():
        raise ImageDataError(f'{path} has no {train!r} folder: lay images out as {path}/{train}/<class>/<image> '
                             f'and {path}/{valid}/<class>/<image>, or give valid_pct (--valid-pct) to hold out part '
                             f'of {path}/<class>/ folders')
    vdir = next((path / v for v in dict.fromkeys((valid, 'valid', 'test')) if (path / v).is_dir()), None)
    if vdir is None:
        raise ImageDataError(f'{path} has no {valid!r} or \'test\' folder: add one with the same class folders as '
                             f'{path / train}, or hold out part of the training images with valid_pct=0.2 '
                             f'(--valid-pct 0.2)')
    per_train, per_valid = _classes(path / train, skipped), _classes(vdir, skipped)
    if set(per_train) != set(per_valid):
        only_v, only_t = sorted(set(per_valid) - set(per_train)), sorted(set(per_train) - set(per_valid))
        raise ImageDataError(f'{vdir} has other classes than {path / train}: ' + '; '.join(
            p for p in (f'only in {vdir.name}: {", ".join(only_v)}' if only_v else '',
                        f'only in {train}: {", ".join(only_t)}' if only_t else '') if p))
    classes = list(per_train)
    split = lambda per: [(f, c) for c, name in enumerate(classes) for f in per[name]]
    return {'train': split(per_train), 'valid': split(per_valid)}, classes, skipped


def folder_images(path, train: str = 'train', valid: str = 'valid', valid_pct: float | None = None, size=None,
                  seed: int | None = None, cache_dir=None) -> ImageSet:
    """The images of an ImageFolder layout (`path/train/<class>/*`, `path/valid` or `path/test` alike, or
    `valid_pct` of them held out by a split seeded with `seed`) as a cached, memory-mapped `ImageSet`. Decoded once;
    the cache is keyed by the files' names, sizes and modification times, and rebuilt when any changes. `size`
    (an int, or (height, width)) resizes each image to cover it and crops the centre."""
    path, size = Path(path).expanduser(), _size(size)
    splits, classes, skipped = _layout(path, train, valid, valid_pct, seed)
    if skipped:
        shown = ', '.join(os.path.relpath(p, path) for p in skipped[:3]) + (', ...' if len(skipped) > 3 else '')
        print(f'miniai: skipped {len(skipped)} file(s) that are not images (by their names) in {path}: {shown}',
              file=sys.stderr)
    everything = [o for part in splits.values() for o in part]
    files = [f for (f, *_), _ in everything]
    start = len(str(path)) + 1  # names relative to `path`: the same files elsewhere share the key
    key = _digest(_KEY_FORMAT, size, valid_pct, seed, {k: len(v) for k, v in splits.items()}, classes,
                  [(f[start:], n, t, c) for (f, n, t), c in everything])
    where = _digest(str(path.resolve()), train, valid, valid_pct, seed, size)
    file = cache_root(cache_dir) / 'images' / f'{re.sub(r"[^A-Za-z0-9_.-]", "_", path.resolve().name)}-{where}.u8'
    labels = torch.tensor([c for _, c in everything], dtype=torch.int64)
    counts = {k: len(v) for k, v in splits.items()}
    return _cached(file, key, lambda f: _build(f, key, _file_batches(files), labels, counts, classes, size, str(path)))


def folder_dls(path, train: str = 'train', valid: str = 'valid', valid_pct: float | None = None, size=None,
               bs: int = 64, device=None, seed: int | None = None, cache_dir=None, **kwargs):
    "`DataLoaders` over a folder of images (see `folder_images`); `kwargs` go to `miniai.data.image_dls`."
    images = folder_images(path, train, valid, valid_pct, size, seed, cache_dir)
    return image_dls(images, *images.splits, bs=bs, device=device, seed=seed, **kwargs)


# --- writing images -----------------------------------------------------------------------------------------

def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack('>I', len(data)) + tag + data + struct.pack('>I', zlib.crc32(tag + data))


def png_bytes(x: torch.Tensor, level: int = 6) -> list[bytes]:
    """uint8 images `x` [N, H, W] (grey) or [N, C, H, W] (C 1 or 3) as PNG files' bytes, written directly: about
    twice as fast as PIL for many small images."""
    if x.dim() == 3: x = x[:, None]
    n, c, h, w = x.shape
    if x.dtype != torch.uint8 or c not in (1, 3): raise ValueError(f'png_bytes: uint8 [N, 1 or 3, H, W], got {x.dtype} '
                                                                   f'{tuple(x.shape)}')
    rows = np.zeros((n, h, w * c + 1), np.uint8)  # each PNG row starts with its filter type, 0 = none
    rows[:, :, 1:] = x.permute(0, 2, 3, 1).reshape(n, h, w * c).numpy()
    head = b'\x89PNG\r\n\x1a\n' + _png_chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, 8, 0 if c == 1 else 2, 0, 0, 0))
    tail = _png_chunk(b'IEND', b'')
    return [head + _png_chunk(b'IDAT', zlib.compress(r.tobytes(), level)) + tail for r in rows]


def write_image_folder(path, x: torch.Tensor, y: torch.Tensor, classes: list[str], split: str = 'train') -> list[Path]:
    """Write uint8 images `x` with labels `y` as PNGs in the ImageFolder layout, `path/split/<class>/<index>.png`
    (`/` in a class name becomes `_`), for trying `from_folder` or exporting a data set; returns the files in order."""
    folders = [Path(path) / split / c.replace('/', '_') for c in classes]
    for d in folders: d.mkdir(parents=True, exist_ok=True)
    digits = len(str(max(len(x) - 1, 0)))
    files = [folders[int(c)] / f'{i:0{digits}d}.png' for i, c in enumerate(y.tolist())]
    for f, b in zip(files, png_bytes(x)): f.write_bytes(b)
    return files
