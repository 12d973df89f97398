"""Hugging Face datasets of images and labels as a source of the image cache: one pass over arrow batches (images
decoded in threads, arrays copied as they are), keyed by the splits' fingerprints. `DataLoaders.from_dd` takes this
path for a `DatasetDict` with no transform (`is_image_dd`)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .decode import ImageDataError
from .imagecache import DECODE_BATCH, ImageSet, cache_key, cached_images, image_size

__all__ = ['is_image_dd', 'dd_images']


def _columns(ds) -> tuple[str, str] | None:
    "The image column (an `Image`, or uint8 `Array2D`/`Array3D`) and the label column of `ds`, if it has them."
    import datasets as hf
    feats = ds.features
    img = next((k for k, f in feats.items() if isinstance(f, hf.Image) or
                (isinstance(f, (hf.Array2D, hf.Array3D)) and f.dtype == 'uint8')), None)
    lab = next((k for k, f in feats.items() if isinstance(f, hf.ClassLabel)), None)
    if lab is None:
        lab = next((k for k in ('label', 'labels') if k in feats and isinstance(feats[k], hf.Value)
                    and feats[k].dtype.startswith(('int', 'uint'))), None)
    return None if img is None or lab is None else (img, lab)


def is_image_dd(dd: Any) -> bool:
    """Whether `dd` is a `DatasetDict` of images and labels with no transform or format set: what `dd_images` turns
    into uint8 tensors (a transformed one goes item by item, through the transform, as the course's does)."""
    splits = list(dd.values()) if hasattr(dd, 'values') else []
    return (len(splits) >= 2 and all(hasattr(ds, 'features') and ds.format.get('type') is None
                                     and not ds.format.get('format_kwargs') for ds in splits)
            and all(_columns(ds) == _columns(splits[0]) is not None for ds in splits))


def _arrow_batches(parts: list, img: str, what: str):
    "`batches(lo, hi)` over the splits `parts` [(name, ds)] in turn: (start, items, names), images encoded or decoded."
    import datasets as hf
    def batches(lo, hi):
        start = 0
        for name, ds in parts:
            arrow, array = ds.with_format('arrow'), not isinstance(ds.features[img], hf.Image)
            for s in range(max(lo - start, 0), min(hi - start, len(ds)), DECODE_BATCH):
                e = min(s + DECODE_BATCH, hi - start, len(ds))
                names = [f'{what}[{name!r}][{i}]' for i in range(s, e)]
                if array: items = list(torch.from_numpy(ds.with_format('numpy', columns=[img])[s:e][img]))
                else: items = _encoded(arrow[s:e].column(img).combine_chunks())
                yield start + s, items, names
            start += len(ds)
    return batches


def _encoded(col) -> list:
    "The images of an arrow `Image` column as 1-D uint8 tensors of their encoded bytes (a Path where only a path is)."
    import pyarrow as pa
    b, paths = col.field('bytes'), col.field('path')
    offs = np.frombuffer(b.buffers()[1], np.int64 if pa.types.is_large_binary(b.type) else np.int32)
    offs = offs[b.offset:b.offset + len(b) + 1]
    data = torch.from_numpy(np.frombuffer(b.buffers()[2], np.uint8).copy()) if b.buffers()[2] else None
    return [Path(paths[k].as_py()) if not b[k].is_valid else data[offs[k]:offs[k + 1]] for k in range(len(b))]


def dd_images(dd: Any, size: int | tuple[int, int] | None = None, cache_dir: str | os.PathLike | None = None) -> ImageSet:
    """The images and labels of every split of the `DatasetDict` `dd` (see `is_image_dd`) as a cached, memory-mapped
    `ImageSet`, in one pass over arrow batches (images decoded in threads, arrays copied as they are); cached by the
    splits' fingerprints, so the same data is decoded once."""
    if not is_image_dd(dd):
        raise ImageDataError('dd_images takes a DatasetDict of images (an Image or uint8 Array column) and labels (a '
                         'ClassLabel or an integer label column) with no transform or format set')
    parts, size = list(dd.items()), image_size(size)
    img, lab = _columns(parts[0][1])  # pyright: ignore[reportGeneralTypeIssues]  (is_image_dd checked the columns)
    feat = parts[0][1].features[lab]
    labels = torch.cat([torch.from_numpy(np.asarray(ds.with_format('numpy', columns=[lab])[:][lab])).long()
                        for _, ds in parts])
    classes = list(feat.names) if hasattr(feat, 'names') else [str(i) for i in range(int(labels.max()) + 1)]
    splits = {name: len(ds) for name, ds in parts}
    key = cache_key(size, img, lab, [(name, ds._fingerprint, len(ds)) for name, ds in parts])
    what = f'DatasetDict {key}'
    return cached_images(f'dd-{key}', key, _arrow_batches(parts, img, what), labels, splits, classes, size, what,
                         cache_dir)
