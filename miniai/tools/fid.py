"""FID and KID: how far a set of generated images is from real ones, measured on the features a trained model gives.

FID fits a Gaussian to each set of features and takes the Fréchet distance between them,
`|m1 - m2|² + tr(c1) + tr(c2) - 2 tr((c1^½ c2 c1^½)^½)`. The course took `scipy.linalg.sqrtm(c1 @ c2)`, the square
root of a non-symmetric product, and dropped its imaginary part; here everything is float64 and symmetric: the
square root of `c1` and the eigenvalues of `c1^½ c2 c1^½` both come from `eigh`, whose eigenvalues are real, and the
tiny negative ones that round-off gives a rank-deficient covariance (fewer images than features) are clamped to 0.
So the result is never complex or NaN, needs no scipy, and is computed wherever the features are.

KID is the unbiased squared maximum mean discrepancy with the cubic polynomial kernel `(a·b/d + 1)³`, averaged over
blocks of the two sets (at least 4), as the course defines it; unlike FID it is unbiased for small samples.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from ..callbacks.preds import capture_preds
from ..core.events import Callback
from ..core.learner import TrainLearner
from ..data.dataloaders import DataLoaders

__all__ = ['ImageEval', 'calc_stats', 'calc_fid', 'calc_kid', 'squared_mmd', 'sqrtm_newton_schulz']


def _matrix(feats: torch.Tensor, what: str) -> torch.Tensor:
    "`feats` as a float64 matrix [N, D] (trailing dimensions flattened), checked to be finite."
    if not isinstance(feats, torch.Tensor) or feats.dim() < 2:
        got = f'shape {tuple(feats.shape)}' if isinstance(feats, torch.Tensor) else type(feats).__name__
        raise ValueError(f'{what}: features are a tensor [N images, D features]; got {got}')
    f = feats.reshape(len(feats), -1).double()
    if not torch.isfinite(f).all(): raise ValueError(f'{what}: the features contain NaN or infinite values')
    return f


def calc_stats(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    "The mean [D] and covariance [D, D] (unbiased, float64) of features [N, D], on their device."
    f = _matrix(feats, 'FID statistics')
    if len(f) < 2:
        raise ValueError(f'FID statistics: a covariance needs at least 2 images; got {len(f)} (use many more: below '
                         f'the feature width, {f.shape[1]}, the covariance is rank-deficient and the FID biased)')
    mean = f.mean(0)
    d = f - mean
    return mean, d.T @ d / (len(f) - 1)


def _psd_sqrt(c: torch.Tensor) -> torch.Tensor:
    "The symmetric square root of a symmetric positive semi-definite matrix (negative round-off eigenvalues -> 0)."
    w, v = torch.linalg.eigh(c)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def _trace_sqrt_product(c1: torch.Tensor, c2: torch.Tensor) -> torch.Tensor:
    "tr((c1 c2)^½), as tr((c1^½ c2 c1^½)^½): the same eigenvalues, from a symmetric matrix."
    s1 = _psd_sqrt(c1)
    m = s1 @ c2 @ s1
    return torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()


def _check_widths(what: str, a: int, b: int):
    if a != b:
        raise ValueError(f'{what}: the two sets of features have different widths, {a} and {b}; both must come '
                         f'from the same layer of the same model')


def calc_fid(m1: torch.Tensor, c1: torch.Tensor, m2: torch.Tensor, c2: torch.Tensor) -> float:
    "The Fréchet distance between the Gaussians (m1, c1) and (m2, c2), in float64 (see the module's docstring)."
    for m, c, k in ((m1, c1, 1), (m2, c2, 2)):
        if m.dim() != 1 or c.shape != (len(m), len(m)):
            raise ValueError(f'FID: mean {k} must be [D] and covariance {k} [D, D]; got {tuple(m.shape)} and '
                             f'{tuple(c.shape)}')
    _check_widths('FID', len(m1), len(m2))
    dev = c1.device
    m1, c1, m2, c2 = (t.to(dev, torch.float64) for t in (m1, c1, m2, c2))
    fid = (m1 - m2).square().sum() + c1.trace() + c2.trace() - 2 * _trace_sqrt_product(c1, c2)
    return max(fid.item(), 0.)  # a squared distance: below 0 only by round-off


def sqrtm_newton_schulz(mat: torch.Tensor, num_iters: int = 100) -> torch.Tensor:
    """A square root of `mat` (float64) by the coupled Newton-Schulz iteration on `mat / |mat|`, stopping once
    `|mat - root²| <= 1e-6 |mat|` (Frobenius norms) or after `num_iters` steps. Converges for matrices whose
    eigenvalues are real and non-negative, such as a product of two covariances."""
    if mat.dim() != 2 or mat.shape[0] != mat.shape[1]:
        raise ValueError(f'_sqrtm_newton_schulz: takes a square matrix; got shape {tuple(mat.shape)}')
    a = mat.double()
    norm = a.norm()
    if norm == 0: return torch.zeros_like(a)
    eye = torch.eye(len(a), dtype=a.dtype, device=a.device)
    y, z, root = a / norm, eye, a
    for _ in range(num_iters):
        half_step = (3 * eye - z @ y) / 2
        y, z = y @ half_step, half_step @ z
        root = y * norm.sqrt()
        if (a - root @ root).norm() <= 1e-6 * norm: break
    return root


def squared_mmd(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The unbiased squared MMD between features x [..., m, d] and y [..., n, d] with the kernel `(a·b/d + 1)³`
    (float64): the kernel's mean within x and within y (without the diagonals) less twice its mean across."""
    m, n, d = x.shape[-2], y.shape[-2], x.shape[-1]
    if m < 2 or n < 2: raise ValueError(f'KID: each block needs at least 2 images of each set; got {m} and {n}')
    _check_widths('KID', d, y.shape[-1])
    x, y = x.double(), y.double()
    k = lambda a, b: (a @ b.transpose(-2, -1) / d + 1) ** 3
    kxx, kyy = k(x, x), k(y, y)
    within = lambda kk, s: (kk.sum((-2, -1)) - kk.diagonal(0, -2, -1).sum(-1)) / (s * (s - 1))
    return within(kxx, m) + within(kyy, n) - 2 * k(x, y).mean((-2, -1))


def calc_kid(x: torch.Tensor, y: torch.Tensor, maxs: int = 50) -> float:
    """KID between features x [N, D] and y [M, D]: `squared_mmd` averaged over `max(4, ceil(min(N, M) / maxs))`
    blocks, each set cut into that many consecutive, nearly equal parts (block i: rows round(i·N/n) to
    round((i+1)·N/n))."""
    x, y = _matrix(x, 'KID'), _matrix(y.to(x.device), 'KID')
    _check_widths('KID', x.shape[1], y.shape[1])
    xs, ys = len(x), len(y)
    n = max(math.ceil(min(xs, ys) / maxs), 4)
    if min(xs, ys) < 2 * n:
        raise ValueError(f'KID: averages over {n} blocks of at least 2 images from each set, so each set needs at '
                         f'least {2 * n} images; got {xs} and {ys}')
    cut = lambda s, i: s[round(i * len(s) / n):round((i + 1) * len(s) / n)]  # the course's blocks, so its values
    return (sum(squared_mmd(cut(x, i), cut(y, i)) for i in range(n)) / n).item()  # pyright: ignore[reportAttributeAccessIssue]  (a sum of tensors)


def _no_loss(preds, *targets): return preds.new_zeros(())  # ImageEval only looks: no loss is needed


class _InputShape(Callback):
    "Records the shape of one image as the data loader gives it (before any callback transforms the batch)."
    order = -100
    def __init__(self): self.shape = None
    def before_batch(self, learn):
        x = learn.batch[0]
        if self.shape is None and isinstance(x, torch.Tensor): self.shape = tuple(x.shape[1:])


class ImageEval:
    """Scores images by the features `model` gives them (e.g. a classifier without its head): the features of
    `dls.valid` are computed once, through a Learner with `cbs` (e.g. `DeviceCB()`), and kept as `.feats` with their
    mean and covariance as `.stats`; `fid(samp)` and `kid(samp)` compare a batch of images with them."""
    def __init__(self, model: torch.nn.Module, dls: Any, cbs: Iterable[Callback] | None = None) -> None:
        self.learn = TrainLearner(model, dls, loss_func=_no_loss, cbs=cbs, opt_func=None)
        probe = _InputShape()
        self.feats = self._flat(capture_preds(self.learn, cbs=[probe])[0])
        self.image_shape = probe.shape
        self.stats = calc_stats(self.feats)

    @staticmethod
    def _flat(preds: torch.Tensor) -> torch.Tensor: return preds.float().cpu().reshape(len(preds), -1)

    def get_feats(self, samp: torch.Tensor) -> torch.Tensor:
        "The model's features [N, D] (float32, CPU) of the images `samp` [N, C, H, W], in batches as `dls.valid`'s."
        if not isinstance(samp, torch.Tensor) or samp.dim() != 4 or len(samp) == 0:
            got = f'shape {tuple(samp.shape)}' if isinstance(samp, torch.Tensor) else type(samp).__name__
            raise ValueError(f'ImageEval: a sample is a batch of images [N, C, H, W] with N >= 1; got {got}')
        if self.image_shape is not None and tuple(samp.shape[1:]) != self.image_shape:
            raise ValueError(f'ImageEval: the sample\'s images are {"x".join(map(str, samp.shape[1:]))} (C x H x W) '
                             f'but the reference images (dls.valid) are {"x".join(map(str, self.image_shape))}; '
                             f'features of images of another size are not comparable')
        valid = self.learn.dls.valid
        bs = getattr(valid, 'bs', None) or getattr(valid, 'batch_size', None) or len(samp)
        no_targets = torch.zeros(len(samp), dtype=torch.long, device=samp.device)
        batches = list(zip(samp.split(bs), no_targets.split(bs)))
        dls, self.learn.dls = self.learn.dls, DataLoaders([], batches)
        try: return self._flat(capture_preds(self.learn)[0])
        finally: self.learn.dls = dls

    def _sample_feats(self, samp, what: str, least: int) -> torch.Tensor:
        if isinstance(samp, torch.Tensor) and samp.dim() == 4 and len(samp) < least:
            raise ValueError(f'ImageEval.{what}: a sample of {len(samp)} image(s) is too small; {what.upper()} needs '
                             f'at least {least} (and is only reliable with hundreds)')
        return self.get_feats(samp)

    def fid(self, samp: torch.Tensor) -> float:
        "The FID between the images `samp` [N, C, H, W] (N >= 2) and the reference set."
        return calc_fid(*self.stats, *calc_stats(self._sample_feats(samp, 'fid', 2)))

    def kid(self, samp: torch.Tensor) -> float:
        "The KID between the images `samp` [N, C, H, W] (N >= 8: 4 blocks of 2) and the reference set."
        return calc_kid(self.feats, self._sample_feats(samp, 'kid', 8))
