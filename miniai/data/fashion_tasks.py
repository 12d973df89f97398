"""Problems beyond one class per image, made from Fashion-MNIST with no download, as files a user would have: for the
tests, the tutorial notebook and trying `DataLoaders.from_csv` / `from_image_pairs`.

- `write_pairs_multilabel`: two garments side by side (28x56), labelled with both classes (`labels.csv`, labels
  separated by ';'; one label when both are of the same class).
- `write_ink_regression`: a garment and its ink fraction, the mean of its pixels in [0, 1] (`labels.csv`, a number).
- `write_upscale_pairs`: a garment shrunk to 14x14 (`inputs/`) and as it is, 28x28 (`targets/`), for
  super-resolution.
- `write_garment_masks`: a garment (`images/`) and its mask (`labels/<stem>_P.png`): each inked pixel coded with its
  garment's class + 1, the rest 0 (background); `codes.txt`, and `valid.txt` naming the last fifth, for segmentation.
"""
from __future__ import annotations

import csv
from pathlib import Path

import torch
import torch.nn.functional as F

from .decode import png_bytes

from typing import TYPE_CHECKING
if TYPE_CHECKING:  # names for the annotations only
    import os
from .fashion import CLASSES, fashion_arrays

__all__ = ['fashion_subset', 'write_pairs_multilabel', 'write_ink_regression', 'write_upscale_pairs',
           'write_garment_masks', 'MASK_CODES']

#: the codes of `write_garment_masks`' masks: 0 background, then the garments' classes
MASK_CODES = ['background', *CLASSES]


def fashion_subset(n: int, seed: int = 0, split: str = 'train') -> tuple[torch.Tensor, torch.Tensor]:
    "`n` Fashion-MNIST images [n, 28, 28] uint8 and their classes, drawn by a seeded permutation of `split`."
    x, y = fashion_arrays()[split]
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
    return x[idx], y[idx]


def _write(folder: Path, names: list[str], x: torch.Tensor) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, b in zip(names, png_bytes(x)): (folder / name).write_bytes(b)


def _write_csv(file: Path, header: list, rows: list) -> Path:
    with open(file, 'w', newline='') as f: csv.writer(f).writerows([header, *rows])
    return file


def write_pairs_multilabel(path: str | os.PathLike, n: int = 400, seed: int = 0, delim: str = ';') -> Path:
    """`n` images of two garments side by side under `path/images/`, and `path/labels.csv` (fname, labels: both
    classes' names joined by `delim`). Returns `path`."""
    path = Path(path)
    x, y = fashion_subset(2 * n, seed)
    pics = torch.cat([x[:n], x[n:]], dim=2)  # [n, 28, 56]
    names = [f'{i:05d}.png' for i in range(n)]
    _write(path / 'images', names, pics)
    labels = [delim.join(sorted({CLASSES[int(a)], CLASSES[int(b)]})) for a, b in zip(y[:n], y[n:])]
    _write_csv(path / 'labels.csv', ['fname', 'labels'], [[f'images/{f}', l] for f, l in zip(names, labels)])
    return path


def write_ink_regression(path: str | os.PathLike, n: int = 400, seed: int = 0) -> Path:
    """`n` garments under `path/images/` and `path/labels.csv` (fname, ink: the mean pixel in [0, 1], rounded to 4
    places). Returns `path`."""
    path = Path(path)
    x, _ = fashion_subset(n, seed)
    names = [f'{i:05d}.png' for i in range(n)]
    _write(path / 'images', names, x)
    ink = (x.float() / 255).mean((1, 2)).tolist()
    _write_csv(path / 'labels.csv', ['fname', 'ink'], [[f'images/{f}', f'{v:.4f}'] for f, v in zip(names, ink)])
    return path


def write_upscale_pairs(path: str | os.PathLike, n: int = 400, seed: int = 0, small: int = 14) -> Path:
    """`n` garments shrunk to `small`x`small` (antialiased) under `path/inputs/` and as they are under
    `path/targets/`, of the same names. Returns `path`."""
    path = Path(path)
    x, _ = fashion_subset(n, seed)
    low = F.interpolate(x[:, None].float(), size=(small, small), mode='bilinear', antialias=True)
    names = [f'{i:05d}.png' for i in range(n)]
    _write(path / 'inputs', names, low.round().clamp(0, 255).to(torch.uint8))
    _write(path / 'targets', names, x)
    return path


def write_garment_masks(path: str | os.PathLike, n: int = 400, seed: int = 0, ink: int = 40) -> Path:
    """`n` garments under `path/images/` and their masks under `path/labels/` ('<stem>_P.png', as CamVid names them):
    a pixel brighter than `ink` is coded with its garment's class + 1, the rest 0; `path/codes.txt` (`MASK_CODES`)
    and `path/valid.txt` naming the last fifth of the images. Returns `path`."""
    path = Path(path)
    x, y = fashion_subset(n, seed)
    masks = torch.where(x > ink, y[:, None, None] + 1, 0).to(torch.uint8)
    _write(path / 'images', [f'{i:05d}.png' for i in range(n)], x)
    _write(path / 'labels', [f'{i:05d}_P.png' for i in range(n)], masks)
    (path / 'codes.txt').write_text('\n'.join(MASK_CODES) + '\n')
    (path / 'valid.txt').write_text(''.join(f'{i:05d}.png\n' for i in range(n - n // 5, n)))
    return path
