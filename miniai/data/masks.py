"""Segmentation data: images with a mask each (one code per pixel), laid out as the course's CamVid notebook reads
them: `path/images/*`, `path/labels/*` matched to each image by a name rule, and `path/codes.txt` naming the codes
in order. Images and masks are decoded once and cached as uint8 (the image cache); the masks are resized with the
images' geometry, sampling the nearest pixel, so a code never blends with its neighbour. `mask_images` reads the
layout (`DataLoaders.from_masks` builds loaders on it); `mask_loss` is cross-entropy on uint8 masks (the metrics:
`miniai.data.segmetrics`)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from .decode import IMAGE_SUFFIXES, ImageDataError, quiet_decoders, read_file
from .imagecache import DECODE_BATCH, ImageSet, cache_key, cached_images, digest, image_size

from typing import TYPE_CHECKING
if TYPE_CHECKING:  # names for the annotations only
    import os

__all__ = ['read_codes', 'mask_files', 'load_mask', 'resize_mask', 'mask_images', 'mask_loss']


def read_codes(file: str | os.PathLike) -> list[str]:
    "The codes' names, one a line of `file` (codes.txt), blank lines skipped: code k is the k-th name."
    file = Path(file)
    if not file.is_file():
        raise ImageDataError(f'{file}: no such file; a segmentation folder names its codes in codes.txt, one a line, '
                             f'in the order of the values in the masks (0 first)')
    codes = [ln.strip() for ln in file.read_text().splitlines() if ln.strip()]
    if len(codes) < 2: raise ImageDataError(f'{file} names {len(codes)} code(s): masks need at least two')
    if len(codes) > 256: raise ImageDataError(f'{file} names {len(codes)} codes; uint8 masks hold at most 256')
    return codes


def _images_in(folder: Path) -> list[Path]:
    if not folder.is_dir(): raise ImageDataError(f'{folder}: no such folder')
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith('.'))


def mask_files(path: str | os.PathLike, images: str = 'images', labels: str = 'labels',
               label_fn: Callable[[Path], Path] | str | None = None) -> list[tuple[Path, Path]]:
    """(image, mask) file pairs of `path`: every image of `path/images` with its mask in `path/labels`, found by
    `label_fn`: a function of the image's path, a pattern with `{stem}` and `{suffix}` (CamVid's
    '{stem}_P{suffix}'), or None: the mask with the image's stem and any image suffix."""
    path = Path(path).expanduser()
    imgs, ldir = _images_in(path / images), path / labels
    if not imgs: raise ImageDataError(f'{path / images} has no images ({", ".join(IMAGE_SUFFIXES)})')
    if not ldir.is_dir(): raise ImageDataError(f'{ldir}: no such folder (the masks, one for each image of {images}/)')
    by_stem = {p.stem: p for p in _images_in(ldir)}
    pairs, missing = [], []
    for im in imgs:
        if callable(label_fn): m = Path(label_fn(im))
        elif isinstance(label_fn, str): m = ldir / label_fn.format(stem=im.stem, suffix=im.suffix, name=im.name)
        else: m = by_stem.get(im.stem, ldir / f'{im.stem}.png')
        (pairs if m.is_file() else missing).append((im, m))
    if missing:
        im, m = missing[0]
        rule = 'the same name' if label_fn is None else f'label_fn={label_fn!r}'
        raise ImageDataError(f'{len(missing)} image(s) have no mask by {rule}: e.g. {im} -> {m} (no such file)')
    return pairs


def load_mask(file: str | os.PathLike, n_codes: int | None = None) -> torch.Tensor:
    """A mask file as uint8 [H, W] of codes: a grey or palette PNG holds one code per pixel (a palette's indices, not
    its colours). A colour mask, or a code beyond the `n_codes` of codes.txt, is refused naming the file."""
    from torchvision.io import ImageReadMode, decode_image
    with quiet_decoders():
        try: m = decode_image(read_file(file), mode=ImageReadMode.UNCHANGED)
        except RuntimeError as e: raise ImageDataError(f'{file}: cannot be decoded as a mask ({e})') from None
    if m.dim() == 4: m = m[0]
    if m.shape[0] != 1:
        raise ImageDataError(f'{file}: a mask holds one code per pixel (a grey or palette PNG), but this one has '
                             f'{m.shape[0]} channels (colours?); map its colours to codes 0..{(n_codes or 256) - 1}')
    if m.dtype != torch.uint8: raise ImageDataError(f'{file}: masks are 8-bit codes; this one is {m.dtype}')
    m = m[0]
    if n_codes is not None and (top := int(m.max())) >= n_codes:
        raise ImageDataError(f'{file}: holds code {top}, but codes.txt names {n_codes} codes (0..{n_codes - 1})')
    return m


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """`mask` [H, W] resized as `resize_cover` resizes its image (scale to cover `size`, crop the centre), each pixel
    the nearest one's code."""
    if tuple(mask.shape[-2:]) == size: return mask
    import torchvision.transforms.v2.functional as TF
    from torchvision.transforms import InterpolationMode
    h, w = mask.shape[-2:]
    s = max(size[0] / h, size[1] / w)
    m = TF.resize(mask[None], [max(size[0], round(h * s)), max(size[1], round(w * s))],
                  interpolation=InterpolationMode.NEAREST_EXACT, antialias=False)
    return TF.center_crop(m, list(size))[0]


def _split(pairs: list, path: Path, valid: str, valid_pct: float, seed) -> dict[str, list]:
    "{'train': pairs, 'valid': pairs}: the images named in `path/valid` (a file of names), else `valid_pct` held out."
    vfile = path / valid
    if vfile.is_file():
        names = {ln.strip() for ln in vfile.read_text().splitlines() if ln.strip()}
        held = [p for p in pairs if p[0].name in names]
        unknown = names - {p[0].name for p in pairs}
        if unknown: raise ImageDataError(f'{vfile} names images not in images/: {", ".join(sorted(unknown)[:3])}')
        if not held or len(held) == len(pairs): raise ImageDataError(f'{vfile} leaves an empty split')
        return {'train': [p for p in pairs if p[0].name not in names], 'valid': held}
    if not 0 < valid_pct < 1: raise ValueError(f'valid_pct must be in (0, 1), got {valid_pct}')
    n_valid = round(len(pairs) * valid_pct)
    if not 0 < n_valid < len(pairs):
        raise ImageDataError(f'{path}: valid_pct={valid_pct} of {len(pairs)} images leaves an empty split')
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed or 0)).tolist()
    held = set(order[:n_valid])
    return {'train': [p for i, p in enumerate(pairs) if i not in held],
            'valid': [p for i, p in enumerate(pairs) if i in held]}


def _checked_masks(pairs: list, size, n_codes: int):
    "`batches(lo, hi)` of masks for the cache: decoded, checked against their image's size, resized nearest."
    from torchvision.io import decode_image
    def batches(lo, hi):
        for s in range(lo, hi, DECODE_BATCH):
            part = pairs[s:min(s + DECODE_BATCH, hi)]
            out = []
            for im, mf in part:
                m = load_mask(mf, n_codes)
                with quiet_decoders(): ih, iw = decode_image(read_file(im)).shape[-2:]
                if tuple(m.shape) != (ih, iw):
                    raise ImageDataError(f'{mf} is {m.shape[1]}x{m.shape[0]} (WxH) but its image {im} is {iw}x{ih}: '
                                         f'a mask must be its image\'s size')
                out.append((m if size is None else resize_mask(m, size))[None])
            yield s, out, [str(mf) for _, mf in part]
    return batches


def mask_images(path: str | os.PathLike, images: str = 'images', labels: str = 'labels', codes: str = 'codes.txt',
                label_fn: Callable[[Path], Path] | str | None = None, valid: str = 'valid.txt', valid_pct: float = 0.2,
                size: int | tuple[int, int] | None = None, seed: int | None = None,
                cache_dir: str | os.PathLike | None = None) -> tuple[ImageSet, torch.Tensor, list[str]]:
    """The images of a segmentation folder as a cached `ImageSet` (splits 'train' and 'valid': the images named in
    `path/valid.txt`, else `valid_pct` held out by a split seeded with `seed`), their masks as uint8 [N, H, W] in
    the same order (cached too), and the codes. `size` resizes both (see `resize_cover`, `resize_mask`)."""
    path, size = Path(path).expanduser(), image_size(size)
    names = read_codes(path / codes)
    splits = _split(mask_files(path, images, labels, label_fn), path, valid, valid_pct, seed)
    pairs = [p for part in splits.values() for p in part]
    counts = {k: len(v) for k, v in splits.items()}
    start = len(str(path)) + 1
    stats = [(str(a)[start:], a.stat().st_size, a.stat().st_mtime_ns, str(b)[start:], b.stat().st_size,
              b.stat().st_mtime_ns) for a, b in pairs]
    key = cache_key('masks', size, valid_pct, seed, counts, names, stats)
    stem = f'{re.sub(r"[^A-Za-z0-9_.-]", "_", path.resolve().name)}-{digest(str(path.resolve()), size, seed)}'
    zeros = torch.zeros(len(pairs), dtype=torch.int64)
    masks = cached_images(f'{stem}-masks', key, _checked_masks(pairs, size, len(names)), zeros, counts, names, None,
                          f'{path}/{labels}', cache_dir)
    files = [str(a) for a, _ in pairs]
    img_batches = lambda lo, hi: ((s, files[s:min(s + DECODE_BATCH, hi)], files[s:min(s + DECODE_BATCH, hi)])
                                  for s in range(lo, hi, DECODE_BATCH))
    imgs = cached_images(f'{stem}-images', key, img_batches, zeros, counts, names, size, f'{path}/{images}', cache_dir)
    return imgs, masks.x[:, 0], names


def mask_loss(preds: torch.Tensor, target: torch.Tensor, reduction: str = 'mean') -> torch.Tensor:
    "Cross-entropy of per-pixel logits [N, codes, H, W] against uint8 (or int) masks [N, H, W]."
    return F.cross_entropy(preds, target.long(), reduction=reduction)

