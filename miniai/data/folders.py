"""A folder per class (ImageFolder layout) as a source of the image cache: its layout read and checked (train/ and
valid/ or test/, or a seeded `valid_pct` held out), the files listed for `cached_images`; and writing tensors as such a
folder. `DataLoaders.from_folder` (miniai.data.dataloaders) builds loaders on it."""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import torch

from .decode import IMAGE_SUFFIXES, ImageDataError, png_bytes
from .imagecache import DECODE_BATCH, ImageSet, cache_key, cached_images, digest, image_size

from typing import TYPE_CHECKING
if TYPE_CHECKING:  # names for the annotations only
    from collections.abc import Callable, Iterator

__all__ = ['file_batches', 'folder_images', 'write_image_folder']


def file_batches(files: list) -> Callable[[int, int], Iterator[tuple[int, list, list]]]:
    "`batches(lo, hi)` over a list of image files: (start, paths, names)."
    return lambda lo, hi: ((s, files[s:min(s + DECODE_BATCH, hi)], files[s:min(s + DECODE_BATCH, hi)])
                           for s in range(lo, hi, DECODE_BATCH))


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


def _valid_dir(path: Path, valid: str) -> Path | None:
    "The validation folder of `path`: `valid`, else valid/ or test/; None if there is none."
    return next((path / v for v in dict.fromkeys((valid, 'valid', 'test')) if (path / v).is_dir()), None)


def _layout(path: Path, train: str, valid: str, valid_pct, seed) -> tuple[dict, list, list]:
    "The training and validation files with their labels, the class names, and the files skipped."
    if not path.exists(): raise ImageDataError(f'{path}: no such folder')
    if not path.is_dir(): raise ImageDataError(f'{path} is a file, not a folder of images')
    skipped = []
    if valid_pct is not None:
        if not 0 < valid_pct < 1: raise ValueError(f'valid_pct must be in (0, 1), got {valid_pct}')
        tdir = path / train if (path / train).is_dir() else path  # a folder of class folders, with no split
        if tdir != path and (held := _valid_dir(path, valid)) is not None:
            raise ImageDataError(f'{path} has a {held.name}/ folder, but valid_pct={valid_pct} (--valid-pct) would '
                                 f'hold out part of {train}/ and leave {held.name}/ unused: drop valid_pct to validate '
                                 f'on {held.name}/, or give valid_pct the folder of class folders itself ({tdir})')
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
    vdir = _valid_dir(path, valid)
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


def folder_images(path: str | os.PathLike, train: str = 'train', valid: str = 'valid', valid_pct: float | None = None,
                  size: int | tuple[int, int] | None = None, seed: int | None = None,
                  cache_dir: str | os.PathLike | None = None) -> ImageSet:
    """The images of an ImageFolder layout (`path/train/<class>/*`, `path/valid` or `path/test` alike, or
    `valid_pct` of them held out by a split seeded with `seed`) as a cached, memory-mapped `ImageSet`. Decoded once;
    the cache is keyed by the files' names, sizes and modification times, and rebuilt when any changes. `size`
    (an int, or (height, width)) resizes each image to cover it and crops the centre."""
    path, size = Path(path).expanduser(), image_size(size)
    splits, classes, skipped = _layout(path, train, valid, valid_pct, seed)
    if skipped:
        shown = ', '.join(os.path.relpath(p, path) for p in skipped[:3]) + (', ...' if len(skipped) > 3 else '')
        print(f'miniai: skipped {len(skipped)} file(s) that are not images (by their names) in {path}: {shown}',
              file=sys.stderr)
    everything = [o for part in splits.values() for o in part]
    files = [f for (f, *_), _ in everything]
    start = len(str(path)) + 1  # names relative to `path`: the same files elsewhere share the key
    key = cache_key(size, valid_pct, seed, {k: len(v) for k, v in splits.items()}, classes,
                 [(f[start:], n, t, c) for (f, n, t), c in everything])
    where = digest(str(path.resolve()), train, valid, valid_pct, seed, size)
    stem = f'{re.sub(r"[^A-Za-z0-9_.-]", "_", path.resolve().name)}-{where}'
    labels = torch.tensor([c for _, c in everything], dtype=torch.int64)
    counts = {k: len(v) for k, v in splits.items()}
    return cached_images(stem, key, file_batches(files), labels, counts, classes, size, str(path), cache_dir)


def write_image_folder(path: str | os.PathLike, x: torch.Tensor, y: torch.Tensor, classes: list[str], split: str = 'train') -> list[Path]:
    """Write uint8 images `x` with labels `y` as PNGs in the ImageFolder layout, `path/split/<class>/<index>.png`
    (`/` in a class name becomes `_`), for trying `from_folder` or exporting a data set; returns the files in order.
    The one set of files miniai writes without `atomic_path`: syncing each small file costs many times the write
    (bench/results/files.md), minutes for a data set of tens of thousands of images; a file cut short by a crash is
    named by the cache's decoding error ("cannot be decoded ... truncated"), and writing the folder again mends it."""
    folders = [Path(path) / split / c.replace('/', '_') for c in classes]
    for d in folders: d.mkdir(parents=True, exist_ok=True)
    digits = len(str(max(len(x) - 1, 0)))
    files = [folders[int(c)] / f'{i:0{digits}d}.png' for i, c in enumerate(y.tolist())]
    for f, b in zip(files, png_bytes(x)): f.write_bytes(b)
    return files
