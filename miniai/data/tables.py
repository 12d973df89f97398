"""Images listed in a table (a CSV file or a pandas DataFrame: a file-name column and a label column) and pairs of
images (a folder of inputs, a folder of targets of the same names), as loaders whose targets go beyond one class per
image (see `miniai.data.targets`): one class, several labels (multi-hot), numbers (regression), or images. The inputs
go through the image cache as every image does (uint8, decoded once); the targets are made here from the table, or
from the target images (as floats in [0, 1]).

The kind of a table's targets is `y_block` ('class', 'multilabel', 'regression'), else inferred: 'multilabel' when
`label_delim` is given, 'regression' when every value of the label column is a number, 'class' otherwise (a column of
class numbers is read as classes with `y_block='class'`). The inferred kind is printed, with how to change it."""
from __future__ import annotations

import csv
import os
import re
import sys
from pathlib import Path

import torch

from .decode import IMAGE_SUFFIXES, ImageDataError
from .folders import file_batches
from .imagecache import ImageSet, cache_key, cached_images, digest, image_size
from .targets import Targets

from typing import TYPE_CHECKING
if TYPE_CHECKING:  # names for the annotations only
    from collections.abc import Sequence
    from typing import Any

__all__ = ['read_csv_table', 'is_number', 'numbers_only', 'table_images', 'pair_images']


def read_csv_table(file: Path) -> tuple[list[str], list[list[str]]]:
    "The header and rows of the CSV file `file` (one clear error if it is missing or has no rows)."
    if not file.is_file(): raise ImageDataError(f'{file}: no such CSV file')
    with open(file, newline='', encoding='utf-8-sig') as f: rows = [r for r in csv.reader(f) if r]
    if len(rows) < 2: raise ImageDataError(f'{file}: a header row and at least one row of data are needed')
    return rows[0], rows[1:]


def _column(columns: list, col, what: str, where: str) -> int:
    "The position of column `col` (a name or a position) among `columns`."
    if isinstance(col, int) and not isinstance(col, bool):
        if -len(columns) <= col < len(columns): return col % len(columns)
    elif col in columns: return columns.index(col)
    raise ImageDataError(f'{where} has no column {col!r} ({what}); its columns are {", ".join(map(repr, columns))}')


def _number(v) -> float | None:
    "`v` as a float, or None where it is not a number."
    if isinstance(v, (int, float)) and not isinstance(v, bool): return float(v)
    try: return float(str(v).strip())
    except ValueError: return None


def is_number(v: Any) -> bool:
    "Whether a table's cell `v` is a number (as a regression target must be)."
    return _number(v) is not None


def numbers_only(cells: list) -> bool:
    """Whether a label column reads as numbers: every cell that is not blank is one (a blank one then fails as 'not
    a number', named, rather than making the column classes)."""
    filled = [v for v in cells if str(v).strip()]
    return bool(filled) and all(is_number(v) for v in filled)


def _is_valid(v) -> bool:
    "Whether a value of the validation column marks an item for validation."
    return v is True or str(v).strip().lower() in ('1', 'true', 'yes', 'valid', '1.0')


def _targets(values: list, names: list, kind: str, label_delim, vocab, where: str, names_of: list):
    "The target tensor of every row and the class names, for `kind` (the values are the label columns' cells)."
    if kind == 'regression':
        ys = []
        for i, row in enumerate(values):
            nums = [_number(v) for v in row]
            if None in nums:
                j = nums.index(None)
                raise ImageDataError(f'{where}, row {i + 1} ({names_of[i]}): {row[j]!r} in column {names[j]!r} is not '
                                     f'a number, but the target is a regression (y_block=\'regression\')')
            ys.append(nums)
        return torch.tensor(ys, dtype=torch.float32), list(names)
    if len(names) != 1: raise ValueError(f'{where}: several label columns ({names}) are for y_block=\'regression\'')
    cells = [str(row[0]).strip() for row in values]
    split = ([[p.strip() for p in c.split(label_delim) if p.strip()] for c in cells] if kind == 'multilabel'
             else [[c] for c in cells])
    seen = sorted({lab for labs in split for lab in labs})
    classes = list(vocab) if vocab is not None else seen
    index = {str(c): i for i, c in enumerate(classes)}
    for i, labs in enumerate(split):
        if bad := [lab for lab in labs if lab not in index]:
            raise ImageDataError(f'{where}, row {i + 1} ({names_of[i]}): label {bad[0]!r} is not in the vocab '
                                 f'({", ".join(map(str, classes))})')
    if kind == 'class':
        if vocab is None and len(classes) < 2:
            raise ImageDataError(f'{where}: every row has the label {classes[0]!r}: a classifier needs two or more')
        return torch.tensor([index[labs[0]] for labs in split], dtype=torch.int64), classes
    y = torch.zeros(len(split), len(classes))
    for i, labs in enumerate(split): y[i, [index[lab] for lab in labs]] = 1.
    return y, classes


def _kind(y_block, label_delim, values: list, where: str, name: str) -> str:
    "The kind of target asked for, or inferred (and said) from the label column."
    if y_block is not None:
        if y_block not in ('class', 'multilabel', 'regression'):
            raise ValueError(f"y_block must be 'class', 'multilabel' or 'regression', got {y_block!r}")
        return y_block
    if label_delim is not None: return 'multilabel'
    if numbers_only([v for row in values for v in row]):
        print(f"miniai: {where}: column {name!r} holds numbers: read as a regression target (y_block='class' reads "
              f"them as class names)", file=sys.stderr)
        return 'regression'
    return 'class'


def _split(n: int, valid_flags: list | None, valid_pct: float, seed) -> list[bool]:
    "For each row, whether it is held out for validation: its flag, else a seeded `valid_pct` of the rows."
    if valid_flags is not None: held = [_is_valid(v) for v in valid_flags]
    else:
        if not 0 < valid_pct < 1: raise ValueError(f'valid_pct must be in (0, 1), got {valid_pct}')
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed or 0)).tolist()
        chosen = set(order[:round(n * valid_pct)])
        held = [i in chosen for i in range(n)]
    if all(held) or not any(held):
        raise ImageDataError(f'{"the validation column" if valid_flags is not None else f"valid_pct={valid_pct}"} '
                             f'leaves an empty split of the {n} rows')
    return held


def _cache(files: list[str], base: Path, size, counts: dict, source: str, cache_dir) -> ImageSet:
    "The images `files` (training ones first) through the image cache, with no labels of their own."
    stats = [(os.path.relpath(f, base), *((st := os.stat(f)).st_size, st.st_mtime_ns)) for f in files]
    key = cache_key('table', size, counts, stats)
    stem = f'{re.sub(r"[^A-Za-z0-9_.-]", "_", base.resolve().name)}-table-{digest(str(base.resolve()), size, stats)}'
    return cached_images(stem, key, file_batches(files), torch.zeros(len(files), dtype=torch.int64), counts, [],
                         size, source, cache_dir)


def table_images(columns: list, rows: list, path: str | os.PathLike, where: str, fn_col: int | str = 0, label_col: int | str | Sequence[int | str] = 1,
                 label_delim: str | None = None, valid_col: int | str | None = None, valid_pct: float = 0.2,
                 seed: int | None = None, size: int | tuple[int, int] | None = None, y_block: str | None = None, vocab: Sequence[str] | None = None,
                 folder: str | None = None, threshold: float = 0.5,
                 cache_dir: str | os.PathLike | None = None) -> tuple[ImageSet, Targets]:
    """The images a table lists (`rows` under `columns`; file names in `fn_col`, relative to `path`/`folder`) with
    their targets from `label_col` (a column, or a list of columns for several regression values) as an `ImageSet`
    (training rows first; `y` the targets) and the `Targets` they are. See this module's docstring for the kinds."""
    path, size = Path(path).expanduser(), image_size(size)
    fi = _column(columns, fn_col, 'file names', where)
    lis = [_column(columns, c, 'labels', where) for c in (label_col if isinstance(label_col, (list, tuple))
                                                         else [label_col])]
    vi = None if valid_col is None else _column(columns, valid_col, 'validation flags', where)
    base = path / folder if folder else path
    names = [str(r[fi]).strip() for r in rows]
    files = [str(base / n) for n in names]
    for i, f in enumerate(files):
        if not os.path.isfile(f): raise ImageDataError(f'{where}, row {i + 1}: the image {f} does not exist')
    values = [[r[j] for j in lis] for r in rows]
    kind = _kind(y_block, label_delim, values, where, columns[lis[0]])
    y, classes = _targets(values, [columns[j] for j in lis], kind, label_delim, vocab, where, names)
    held = _split(len(rows), None if vi is None else [r[vi] for r in rows], valid_pct, seed)
    order = [i for i, h in enumerate(held) if not h] + [i for i, h in enumerate(held) if h]
    counts = {'train': len(order) - sum(held), 'valid': sum(held)}
    images = _cache([files[i] for i in order], base, size, counts, where, cache_dir)
    images.y, images.classes = y[order], classes
    return images, Targets(kind, classes, threshold)


def _by_stem(folder: Path) -> dict[str, str]:
    "The image files directly in `folder`, by their names without the suffix."
    if not folder.is_dir(): raise ImageDataError(f'{folder}: no such folder')
    return {os.path.splitext(e.name)[0]: e.path for e in sorted(os.scandir(folder), key=lambda e: e.name)
            if e.is_file() and not e.name.startswith('.') and e.name.lower().endswith(IMAGE_SUFFIXES)}


def pair_images(path: str | os.PathLike, inputs: str = 'inputs', targets: str = 'targets', valid_pct: float = 0.2,
                seed: int | None = None, size: int | tuple[int, int] | None = None, target_size: int | tuple[int, int] | None = None,
                cache_dir: str | os.PathLike | None = None) -> ImageSet:
    """Input images in `path/inputs` and target images of the same names (the suffix may differ) in `path/targets`,
    as an `ImageSet` whose `y` holds the target images as float32 in [0, 1] (training pairs first, a seeded
    `valid_pct` held out). `size` resizes the inputs, `target_size` the targets (for super-resolution, the targets are
    larger than the inputs)."""
    path = Path(path).expanduser()
    ins, outs = _by_stem(path / inputs), _by_stem(path / targets)
    if not ins: raise ImageDataError(f'{path / inputs}: no images ({", ".join(IMAGE_SUFFIXES)})')
    if missing := [s for s in ins if s not in outs]:
        raise ImageDataError(f'{len(missing)} input image(s) have no target of the same name in {path / targets}, '
                             f'e.g. {ins[missing[0]]}')
    stems = list(ins)
    held = _split(len(stems), None, valid_pct, seed)
    order = [stems[i] for i, h in enumerate(held) if not h] + [stems[i] for i, h in enumerate(held) if h]
    counts = {'train': len(order) - sum(held), 'valid': sum(held)}
    x = _cache([ins[s] for s in order], path / inputs, image_size(size), counts, str(path / inputs), cache_dir)
    y = _cache([outs[s] for s in order], path / targets, image_size(target_size), counts, str(path / targets),
               cache_dir)
    x.y = y.x.float() / 255
    return x
