"""Augmentation for photos, per image and on the device: random resized crops, flips, rotation, zoom and perspective
warps composed into ONE sampling of the batch, then brightness, contrast and saturation.

Each geometric transform is a 3x3 matrix per image (in `grid_sample`'s coordinates, -1..1 across the image) mapping a
point of the output to the point of the input it is read from; the matrices are multiplied together, and the grid made
from the product is sampled by `grid_sample` on the batch's device (whole on a GPU; an image at a time on the CPU, in
the cache). Each choice is drawn per image from torch's global generator (on the batch's device): `set_seed` makes
it repeatable and checkpoints keep it, so a resumed fit draws what the uninterrupted one drew.

`Augment(...)(x)` takes images [N, C, H, W], uint8 (returned uint8) or float (normalised images: returned normalised;
lighting needs the `stats` they were normalised with). `Augment(...)(x, y)` also transforms a paired target with the
same geometry and returns `(x, y)`: a mask (integers [N, H, W] or [N, 1, H, W] of the image's size, sampled nearest)
or a target image (sampled like the input, at its own size, e.g. the larger one of super-resolution, with the same
lighting). `aug_transforms(...)` builds one with fastai's defaults; `augment_cb(aug, targets=...)` trains with it.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .normalise import Normalise

if TYPE_CHECKING:  # names for the annotations only
    from typing import Any

__all__ = ['Augment', 'aug_transforms']

_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601 weights of red, green and blue in grey


def _images(x, what: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        got = f'shape {tuple(x.shape)}' if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f'{what} takes a batch of images [N, C, H, W]; got {got}')


def _pair(v, what: str) -> tuple[int, int] | None:
    if v is None: return None
    h, w = (v, v) if isinstance(v, int) else tuple(v)
    if h < 1 or w < 1: raise ValueError(f'Augment: {what} must be positive (height, width); got {v}')
    return int(h), int(w)


def _stats(stats) -> tuple | None:
    "`stats`: None, a (mean, std) pair or anything with `.mean` and `.std` (DataLoaders, a loader) of [0, 1] pixels."
    if stats is None: return None
    mean, std = (stats.mean, stats.std) if hasattr(stats, 'mean') and hasattr(stats, 'std') else stats
    if mean is None or std is None: raise ValueError(f'Augment: stats {stats!r} holds no mean and std')
    try: Normalise(mean, std)
    except ValueError as e: raise ValueError(f'Augment: stats: {e}') from None
    return mean, std


def _uniform(n: int, lo: float, hi: float, dev) -> torch.Tensor: return torch.rand(n, device=dev) * (hi - lo) + lo
def _chance(n: int, p: float, dev) -> torch.Tensor: return torch.rand(n, device=dev) < p
def _eye(n: int, dev) -> torch.Tensor: return torch.eye(3, device=dev).repeat(n, 1, 1)


def _homographies(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    "The [N, 3, 3] matrices taking each of the 4 points `src` [N, 4, 2] to `dst` [N, 4, 2] (projectively)."
    x, y, u, v = src[..., 0], src[..., 1], dst[..., 0], dst[..., 1]
    one, zero = torch.ones_like(x), torch.zeros_like(x)
    rows_u = torch.stack([x, y, one, zero, zero, zero, -u * x, -u * y], -1)
    rows_v = torch.stack([zero, zero, zero, x, y, one, -v * x, -v * y], -1)
    a = torch.cat([rows_u, rows_v], 1)                       # [N, 8, 8]
    h = torch.linalg.solve_ex(a, torch.cat([u, v], 1))[0]    # [N, 8]; _ex: no check, so no wait for a GPU
    return torch.cat([h, torch.ones_like(h[:, :1])], 1).view(-1, 3, 3)


class Augment(nn.Module):
    """Per-image photo augmentation, composed into one sampling per batch (see this module's docstring).

    Geometry, drawn per image: `size` (height, width, or one int) of the output (default: the input's); `min_scale`:
    a random resized crop of between `min_scale` and all of the image's area, with width/height `ratio` drawn
    log-uniformly (None: the largest centred crop with the output's shape); `do_flip` left-right and `flip_vert`
    top-bottom, each with probability 1/2; with probability `p_affine` each: a rotation of up to `max_rotate` degrees,
    a zoom into a random part by `min_zoom`..`max_zoom`, and a perspective warp of up to `max_warp`. `pad_mode`
    ('reflection', 'border' or 'zeros') fills what comes from outside the image.
    Lighting, with probability `p_lighting` each, on [0, 1] pixels: brightness (a shift of up to `max_lighting`),
    contrast (a factor from 1 - `max_lighting` to its inverse, about mid-grey) and saturation (a factor likewise from
    `max_saturation`, colour images only); linear, as torchvision's ColorJitter (not fastai's logit space): one
    multiply-add per pixel.
    `stats`: the mean and std float batches were normalised with (a pair, or DataLoaders/a loader with `.mean` and
    `.std`), which lighting needs for floats; uint8 batches need none."""
    pairs_targets = True  # `augment_cb(..., targets=...)` may hand it (images, targets)

    def __init__(self, size: int | tuple[int, int] | None = None, min_scale: float | None = None, ratio: tuple = (3 / 4, 4 / 3), do_flip: bool = True,
                 flip_vert: bool = False, max_rotate: float = 0., min_zoom: float = 1., max_zoom: float = 1.,
                 max_warp: float = 0., p_affine: float = 0.75, max_lighting: float = 0., max_saturation: float = 0.,
                 p_lighting: float = 0.75, pad_mode: str = 'reflection', stats: Any = None) -> None:
        super().__init__()
        if min_scale is not None and not 0 < min_scale <= 1:
            raise ValueError(f'Augment: min_scale is a fraction of the image area in (0, 1]; got {min_scale}')
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f'Augment: ratio must be (low, high) with 0 < low <= high; got {ratio}')
        if not 0 < min_zoom <= max_zoom: raise ValueError(f'Augment: zoom must satisfy 0 < min_zoom <= max_zoom; got '
                                                          f'{min_zoom}, {max_zoom}')
        if not 0 <= max_warp < 1: raise ValueError(f'Augment: max_warp must be in [0, 1); got {max_warp}')
        for name, v in (('max_lighting', max_lighting), ('max_saturation', max_saturation)):
            if not 0 <= v < 1: raise ValueError(f'Augment: {name} must be in [0, 1); got {v}')
        for name, v in (('p_affine', p_affine), ('p_lighting', p_lighting)):
            if not 0 <= v <= 1: raise ValueError(f'Augment: {name} is a probability in [0, 1]; got {v}')
        if pad_mode not in ('reflection', 'border', 'zeros'):
            raise ValueError(f"Augment: pad_mode is 'reflection', 'border' or 'zeros'; got {pad_mode!r}")
        self.size, self.min_scale, self.ratio = _pair(size, 'size'), min_scale, tuple(ratio)
        self.do_flip, self.flip_vert, self.max_rotate, self.max_warp = do_flip, flip_vert, max_rotate, max_warp
        self.zoom, self.p_affine, self.pad_mode = (min_zoom, max_zoom), p_affine, pad_mode
        self.max_lighting, self.max_saturation, self.p_lighting = max_lighting, max_saturation, p_lighting
        self.stats = _stats(stats)

    def _crop(self, n: int, dev, hw_in, hw_out) -> torch.Tensor:
        "Output square -> the crop's place in the input: a random resized crop, or the largest centred one."
        (hi, wi), (ho, wo) = hw_in, hw_out
        if self.min_scale is None:  # the output's shape, as large as fits, centred (the image cache's resize rule)
            r = (wo / ho) / (wi / hi)
            fw, fh = (torch.full((n,), v, device=dev) for v in ((1., 1 / r) if r > 1 else (r, 1.)))
            cx = cy = torch.zeros(n, device=dev)
        else:
            area = _uniform(n, self.min_scale, 1., dev)
            logr = _uniform(n, math.log(self.ratio[0]), math.log(self.ratio[1]), dev)
            fw = (area * logr.exp() * hi / wi).sqrt().clamp(max=1.)  # crop width / image width
            fh = (area / logr.exp() * wi / hi).sqrt().clamp(max=1.)
            cx, cy = (1 - fw) * _uniform(n, -1., 1., dev), (1 - fh) * _uniform(n, -1., 1., dev)
        m = _eye(n, dev)
        m[:, 0, 0], m[:, 1, 1], m[:, 0, 2], m[:, 1, 2] = fw, fh, cx, cy
        return m

    def _affine(self, n: int, dev, hw_out) -> torch.Tensor:
        "Flips, rotation and zoom, drawn per image, as one matrix each."
        m = _eye(n, dev)
        if self.do_flip: m[:, 0, 0] = torch.where(_chance(n, 0.5, dev), -1., 1.)
        if self.flip_vert: m[:, 1, 1] = torch.where(_chance(n, 0.5, dev), -1., 1.)
        if self.max_rotate:
            deg = _uniform(n, -self.max_rotate, self.max_rotate, dev) * _chance(n, self.p_affine, dev)
            t, (ho, wo) = deg * (math.pi / 180), hw_out
            c, s, k = t.cos(), t.sin(), wo / ho  # rotate in pixels, not in -1..1 units (which stretch non-squares)
            rot = _eye(n, dev)
            rot[:, 0, 0], rot[:, 0, 1], rot[:, 1, 0], rot[:, 1, 1] = c, -s / k, s * k, c
            m = rot @ m
        if self.zoom != (1., 1.):
            z = torch.where(_chance(n, self.p_affine, dev), _uniform(n, *self.zoom, dev), 1.)
            zm = _eye(n, dev)
            zm[:, 0, 0] = zm[:, 1, 1] = 1 / z
            zm[:, 0, 2], zm[:, 1, 2] = ((1 - 1 / z) * _uniform(n, -1., 1., dev) for _ in range(2))
            m = zm @ m
        return m

    def _warp(self, n: int, dev) -> torch.Tensor:
        "A perspective tilt per image: each edge's length changed by up to `max_warp`, about both axes."
        mx, my = ((_uniform(n, -self.max_warp, self.max_warp, dev) * _chance(n, self.p_affine, dev))[:, None]
                  for _ in range(2))
        corners = torch.tensor([[-1., -1.], [1., -1.], [-1., 1.], [1., 1.]], device=dev).expand(n, 4, 2)
        cx, cy = corners[..., 0], corners[..., 1]
        src = torch.stack([cx * (1 + mx * cy), cy * (1 + my * cx)], -1)
        return _homographies(corners, src)

    def matrices(self, n: int, dev: torch.device, hw_in: tuple, hw_out: tuple) -> torch.Tensor:
        "The [N, 3, 3] matrices taking output points to input points (-1..1 coordinates), one per image, composed."
        m = self._crop(n, dev, hw_in, hw_out) @ self._affine(n, dev, hw_out)
        return m @ self._warp(n, dev) if self.max_warp else m

    def _sample(self, x: torch.Tensor, m: torch.Tensor, hw: tuple, mode: str, pad: str | None = None) -> torch.Tensor:
        "One `grid_sample` of float images `x` through the matrices `m`, `hw` the output's size (`pad`: pad_mode's)."
        h, w = hw
        ys = (torch.arange(h, device=x.device, dtype=torch.float32) * 2 + 1) / h - 1  # pixel centres
        xs = (torch.arange(w, device=x.device, dtype=torch.float32) * 2 + 1) / w - 1
        # M (x, y, 1) as a term per column plus one per row, made channels-first, then laid out as grid_sample wants:
        # 3x faster than the same sum made [N, H, W, 2] directly, 7x a matmul of every pixel's (x, y, 1)
        line = lambda r: m[:, r, 0, None, None] * xs + m[:, r, 2, None, None] + m[:, r, 1, None, None] * ys[:, None]
        grid = line(slice(0, 2))                                                        # [N, 2, H, W]
        if self.max_warp: grid.div_(line(slice(2, 3)))                                  # projective: over z
        grid = grid.permute(0, 2, 3, 1).contiguous()
        return F.grid_sample(x, grid, mode=mode, padding_mode=pad or self.pad_mode, align_corners=False)

    # -- lighting ---------------------------------------------------------------------------------------------------
    def lighting_draws(self, n: int, dev: torch.device) -> dict | None:
        """Per image: the brightness shift (in [0, 1] pixels), the contrast and the saturation factors (1: unchanged);
        None if there is no lighting. Drawn whether applied or not, so the number of draws never depends on them."""
        if not (self.max_lighting or self.max_saturation): return None
        ml, ms = self.max_lighting, self.max_saturation
        b = _uniform(n, -ml, ml, dev) * _chance(n, self.p_lighting, dev)
        c = _uniform(n, math.log(1 - ml), -math.log(1 - ml), dev).exp() if ml else torch.ones(n, device=dev)
        c = torch.where(_chance(n, self.p_lighting, dev), c, 1.)
        s = _uniform(n, math.log(1 - ms), -math.log(1 - ms), dev).exp() if ms else torch.ones(n, device=dev)
        return {'shift': b, 'contrast': c, 'saturation': torch.where(_chance(n, self.p_lighting, dev), s, 1.)}

    def _light_plan(self, d: dict | None, n_c: int, was_uint8: bool, what: str, dev) -> dict | None:
        """The lighting `d` in the batch's units, once per batch. On pixels p in [0, 1] saturation blends with their
        grey, then `c (p - 1/2) + 1/2 + b` (contrast about mid-grey, plus brightness), clamped to [0, 1]: linear, so
        x' = c x + bias in the batch's units, and an image drawn unchanged comes back exactly. uint8: +1/2 rounds."""
        if d is None: return None
        norm = self._normalise(n_c, was_uint8, what)
        lo, hi = (norm.encode(torch.full((1, n_c, 1, 1), v)) for v in (0., 1.))  # [0, 1] pixels in the batch's units
        lo, hi = ((v.min().item() if v.min() == v.max() else v.to(dev)) + was_uint8 / 2 for v in (lo, hi))
        c, b = (d[k].view(-1, 1, 1, 1) for k in ('contrast', 'shift'))
        bias = norm.encode(c * torch.tensor(norm.mean, device=dev).view(1, n_c, 1, 1) + (0.5 - c / 2 + b))
        sat = d['saturation'].view(-1, 1, 1, 1) if self.max_saturation and n_c == 3 else None  # grey has none
        return {'norm': norm, 'c': c, 'bias': bias + was_uint8 / 2, 'lo': lo, 'hi': hi, 'sat': sat}

    def _normalise(self, channels: int, was_uint8: bool, what: str) -> Normalise:
        "How pixels in [0, 1] became the batch's values: 0..255 for uint8, else `stats`' normalisation."
        if was_uint8: return Normalise(0., 1 / 255, channels=channels)
        if self.stats is None:
            raise ValueError(f'Augment: lighting float {what} needs the mean and std they were normalised with: '
                             f'Augment(..., stats=dls) or stats=(mean, std) (0 and 1 for [0, 1] pixels)')
        try: return Normalise(*self.stats, channels=channels)
        except ValueError as e: raise ValueError(f'Augment: stats for the {what}: {e}') from None

    def _target_kind(self, x: torch.Tensor, y: torch.Tensor, target: str | None) -> str:
        if not isinstance(y, torch.Tensor):
            raise ValueError(f'Augment: a target must be a tensor; got {type(y).__name__}')
        if target is None:
            if y.is_floating_point(): target = 'image'
            elif y.dim() == 3: target = 'mask'
            else: raise ValueError(f"Augment: an integer target {tuple(y.shape)} may be a mask or a uint8 image: say "
                                   f"which with target='mask' or target='image'")
        if target not in ('mask', 'image'): raise ValueError(f"Augment: target is 'mask' or 'image'; got {target!r}")
        if len(y) != len(x): raise ValueError(f'Augment: {len(x)} images but {len(y)} targets')
        if target == 'mask':
            if y.is_floating_point() or not (y.dim() == 3 or (y.dim() == 4 and y.shape[1] == 1)):
                raise ValueError(f'Augment: a mask is integers [N, H, W] or [N, 1, H, W]; got {y.dtype} '
                                 f'{tuple(y.shape)}')
            if y.shape[-2:] != x.shape[-2:]:
                raise ValueError(f'Augment: the masks are {tuple(y.shape[-2:])} but their images '
                                 f'{tuple(x.shape[-2:])}: a mask must have its image\'s size')
        else: _images(y, 'Augment (a target image)')
        return target

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None,
                target: str | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Augmented images `x` [N, C, H, W]; with `y`, `(x, y)` with the target given the same geometry. `target`:
        'mask' or 'image' (default: float targets are images, integer [N, H, W] masks)."""
        _images(x, 'Augment')
        if not (x.dtype == torch.uint8 or x.is_floating_point()):
            raise ValueError(f'Augment takes uint8 or float images; got {x.dtype}')
        kind = None if y is None else self._target_kind(x, y, target)
        n, dev, hw_in = len(x), x.device, tuple(x.shape[-2:])
        hw_out = self.size or hw_in
        m = self.matrices(n, dev, hw_in, hw_out)
        light = self.lighting_draws(n, dev)
        out = self._resample(x, m, hw_out, light, 'images')
        if y is None: return out
        if kind == 'mask':
            ym = y if y.dim() == 4 else y[:, None]
            ym = self._sample(ym.float(), m, hw_out, 'nearest').round().to(y.dtype)
            return out, (ym if y.dim() == 4 else ym[:, 0])
        scale = (y.shape[-2] / hw_in[0], y.shape[-1] / hw_in[1])  # a larger target stays larger, by as much
        hw_y = (max(1, round(hw_out[0] * scale[0])), max(1, round(hw_out[1] * scale[1])))
        return out, self._resample(y, m, hw_y, light, 'target images')

    def _resample(self, x: torch.Tensor, m: torch.Tensor, hw: tuple, light: dict | None, what: str) -> torch.Tensor:
        """Sampled, lit images of `x`'s dtype. CPU: one image at a time, on one thread, its floats and grid in the cache
        (2.3x the whole batch's speed; threads would meet at every op of every image: 10x slower on a busy machine);
        flips only: no sampling; all samples inside: padding 'zeros' (20% faster, the same pixels)."""
        u8, (n, n_c), hw_in = x.dtype == torch.uint8, x.shape[:2], x.shape[-2:]
        plan, out = self._light_plan(light, n_c, u8, what, x.device), x.new_empty((n, n_c, *hw))
        cpu, threads = x.device.type == 'cpu', torch.get_num_threads()  # shortcuts read the matrices: on the host only
        k, (flips, inside) = (1, _shortcuts(m, hw_in, hw)) if cpu else (n, ([0] * n,) * 2)
        torch.set_num_threads(1 if cpu else threads)
        try:
            for s in (slice(i, i + k) for i in range(0, n, k)):
                if all(flips[s]): res = x[s].flip([d for d, v in zip((-1, -2), m[s][0].diagonal().tolist()) if v < 0])
                else: res = self._sample(x[s].float(), m[s], hw, 'bilinear', 'zeros' if all(inside[s]) else None)
                res = _lit(res.float(), plan, s)
                out[s] = (res if plan else res.add_(0.5)).short() if u8 else res  # +1/2 truncated: rounded (int16: 4x)
        finally: torch.set_num_threads(threads)
        return out

    def extra_repr(self) -> str:
        return (f'size={self.size}, min_scale={self.min_scale}, do_flip={self.do_flip}, flip_vert={self.flip_vert}, '
                f'max_rotate={self.max_rotate}, zoom={self.zoom}, max_warp={self.max_warp}, '
                f'max_lighting={self.max_lighting}, max_saturation={self.max_saturation}')


def _shortcuts(m: torch.Tensor, hw_in, hw_out) -> tuple[list, list]:
    """Per image: is its matrix only flips, the size kept (the image is itself, flipped)? Does every output pixel read
    the input within its edge pixels' centres (no padding needed)? Its corners tell: a map with z > 0 keeps lines."""
    (hi, wi), (ho, wo) = hw_in, hw_out
    flips = ((m.abs() - torch.eye(3)).abs() < 1e-6).all(2).all(1) & (tuple(hw_in) == tuple(hw_out))
    corners = torch.tensor([[-1 + 1 / wo, 1 - 1 / wo] * 2, [-1 + 1 / ho] * 2 + [1 - 1 / ho] * 2, [1.] * 4])
    p = m @ corners                                                      # where the corner pixels read: [N, 3, 4]
    inside = ((p[:, 0] / p[:, 2]).abs() <= 1 - 1 / wi) & ((p[:, 1] / p[:, 2]).abs() <= 1 - 1 / hi) & (p[:, 2] > 0)
    return flips.tolist(), inside.all(1).tolist()


def _lit(x: torch.Tensor, p: dict | None, s: slice) -> torch.Tensor:
    "Sampled floats `x`, the images `s` of the batch, lit by the plan `p` (`_light_plan`), in place."
    if p is None: return x
    if p['sat'] is not None:
        q = p['norm'].decode(x)
        grey = (q * torch.tensor(_LUMA, device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
        x = p['norm'].encode(torch.lerp(grey, q, p['sat'][s]))
    return x.mul_(p['c'][s]).add_(p['bias'][s]).clamp_(p['lo'], p['hi'])


def aug_transforms(size: int | tuple[int, int] | None = None, min_scale: float | None = None, do_flip: bool = True, flip_vert: bool = False,
                   max_rotate: float = 10., min_zoom: float = 1., max_zoom: float = 1.1, max_lighting: float = 0.2,
                   max_warp: float = 0.2, p_affine: float = 0.75, p_lighting: float = 0.75,
                   max_saturation: float = 0., ratio: tuple = (3 / 4, 4 / 3), pad_mode: str = 'reflection',
                   stats: Any = None) -> Augment:
    """An `Augment` with fastai's `aug_transforms` defaults (flips, rotation up to 10 degrees, zoom up to 1.1, warp
    0.2, lighting 0.2, each with probability 0.75); `size` and `min_scale` add a random resized crop. For float
    (normalised) batches give `stats` (e.g. `stats=dls`) so lighting works on pixels; uint8 batches need none."""
    return Augment(size, min_scale, ratio, do_flip, flip_vert, max_rotate, min_zoom, max_zoom, max_warp, p_affine,
                   max_lighting, max_saturation, p_lighting, pad_mode, stats)
