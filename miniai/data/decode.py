"""One image at a time: reading and decoding a file (torchvision's decoders: PNG, JPEG, GIF, WebP; grey or colour,
alpha dropped, palettes expanded, 16 bits scaled to 8), resizing it to cover a size, and writing PNGs."""
from __future__ import annotations

import contextlib
import os
import re
import struct
import warnings
import zlib
from collections.abc import Iterator

import numpy as np
import torch

__all__ = ['IMAGE_SUFFIXES', 'ImageDataError', 'read_file', 'decode', 'as_chw', 'load_image', 'resize_cover',
           'quiet_decoders', 'png_bytes']

IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.gif', '.webp')  # what torchvision's decode_image reads


class ImageDataError(ValueError):
    "Images that cannot be used as they are (unreadable, missing, inconsistent); the message names the file or folder."


def read_file(path: str | os.PathLike) -> torch.Tensor:
    "The bytes of the file `path`, as a 1-D uint8 tensor."
    try: return torch.from_numpy(np.fromfile(path, np.uint8))
    except OSError as e: raise ImageDataError(f'{path}: cannot be read ({e.strerror or e})') from None


def decode(data: torch.Tensor, name: object) -> torch.Tensor:
    "Encoded bytes (1-D uint8) -> uint8 [C, H, W], C 1 or 3 (alpha dropped, palettes expanded, 16 bits scaled to 8)."
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


def as_chw(a: torch.Tensor) -> torch.Tensor:
    "A decoded array [H, W], [H, W, C] or [C, H, W] as [C, H, W]."
    if a.dim() == 2: return a[None]
    return a.permute(2, 0, 1) if a.shape[-1] in (1, 3, 4) and a.shape[0] not in (1, 3, 4) else a


def resize_cover(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    "Scale `img` (antialiased) so it covers `size`, then crop its centre to `size`."
    if tuple(img.shape[-2:]) == size: return img
    import torchvision.transforms.v2.functional as TF
    h, w = img.shape[-2:]
    s = max(size[0] / h, size[1] / w)
    img = TF.resize(img, [max(size[0], round(h * s)), max(size[1], round(w * s))], antialias=True)
    return TF.center_crop(img, list(size))


def load_image(item: str | os.PathLike | torch.Tensor, name: object) -> torch.Tensor:
    "An image as uint8 [C, H, W], C 1 or 3, from a file's path, its encoded bytes (1-D uint8) or decoded pixels."
    img = read_file(item) if isinstance(item, (str, os.PathLike)) else item
    return decode(img, name) if img.dim() == 1 else as_chw(img)[:3]


@contextlib.contextmanager
def quiet_decoders() -> Iterator[None]:
    "Inside, torchvision's notice about its decoders' future move to TorchCodec is not shown (they work as before)."
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='The image decoding and encoding capabilities of TorchVision')
        yield


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
