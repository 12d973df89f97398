"""Batch augmentation (per image, vectorised), capturing predictions, showing batches, and test-time augmentation.

Every transform here draws its random choices per image but works on the whole batch at once with masks and
indexing, so its cost does not grow with a Python loop over images. They take batches [N, C, H, W] of any channel
count and size, uint8 or float, and run where the batch is (on the GPU when the data lives there). (torchvision's
`transforms.v2` also runs on whole batches, through `BatchTransformCB`, but draws one choice for the whole batch.)
"""
from __future__ import annotations

import torch
from torch import nn

from .callback import Callback, CancelFitException
from .datasets import show_images
from .init import BatchTransformCB
from .learner import Learner, looking
from .summary import _learner_summary

__all__ = ['RandFlip', 'RandCropPad', 'rand_erase', 'RandErase', 'rand_copy', 'RandCopy', 'augment_cb',
           'CapturePreds', 'capture_preds', 'show_image_batch', 'tta', 'summary']

#: the course exports `Learner.summary` from this module too, so `summary(learn)` works after `import *` from here
#: (it is `miniai.summary`'s Learner method; `miniai.summary.summary(model, x)` is the one for a bare model)
summary = _learner_summary


def _check_images(x, where: str):
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        got = f'shape {tuple(x.shape)}' if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f'{where} takes a batch of images [N, C, H, W]; got {got}')


class RandFlip(nn.Module):
    "Flip each image left-right with probability `p`."
    def __init__(self, p: float = 0.5):
        super().__init__()
        self.p = p

    def forward(self, x):
        flip = (torch.rand(len(x), device=x.device) < self.p).view(-1, *([1] * (x.dim() - 1)))
        # floats: a lerp with weights 0 and 1 picks exactly one side (a + 0*(b-a) = a, b - 0*(b-a) = b) in one pass,
        # about twice as fast on a CPU as `where` with a mask broadcast over each image
        if x.is_floating_point(): return torch.lerp(x, x.flip(-1), flip.to(x.dtype))
        return torch.where(flip, x.flip(-1), x)


class RandCropPad(nn.Module):
    "Pad each image by `pad` pixels (zeros) and crop back to its size at a random offset per image."
    def __init__(self, pad: int = 1):
        super().__init__()
        self.pad = pad

    def forward(self, x):
        _check_images(x, 'RandCropPad')
        n, c, h, w = x.shape
        p, dev = self.pad, x.device
        dy, dx = (torch.randint(0, 2 * p + 1, (n,), device=dev) for _ in range(2))
        xp = nn.functional.pad(x, (p, p, p, p)).contiguous()
        hp, wp = h + 2 * p, w + 2 * p
        # a view whose row k is the [C, H, W] window starting at flat position k of the padded batch; the crops are
        # the rows at each image's start, copied whole by index_select (no per-element gather, no device sync)
        windows = xp.as_strided(((n - 1) * c * hp * wp + 2 * p * (wp + 1) + 1, c, h, w), (1, hp * wp, wp, 1))
        return torch.index_select(windows, 0, torch.arange(n, device=dev) * (c * hp * wp) + dy * wp + dx)


def _boxes(x, pct: float, max_num: int, where: str):
    """For up to `max_num` boxes per image (a random count each), boxes of `pct` of each side at random places:
    masks (slots, N, 1, H, W) of where each box is, and the boxes' top-left corners."""
    _check_images(x, where)
    if not 0 < pct <= 1: raise ValueError(f'{where}: pct is a fraction of each side in (0, 1]; got {pct}')
    if max_num < 0: raise ValueError(f'{where}: max_num is a count of boxes, at least 0; got {max_num}')
    n, _, h, w = x.shape
    bh, bw = max(1, int(pct * h)), max(1, int(pct * w))
    count = torch.randint(0, max_num + 1, (n,), device=x.device)
    ys = torch.randint(0, h - bh + 1, (max_num, n), device=x.device)
    xs = torch.randint(0, w - bw + 1, (max_num, n), device=x.device)
    r, c = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    in_r = (r >= ys[..., None]) & (r < ys[..., None] + bh)          # (slots, N, H)
    in_c = (c >= xs[..., None]) & (c < xs[..., None] + bw)          # (slots, N, W)
    active = torch.arange(max_num, device=x.device)[:, None] < count  # (slots, N)
    masks = (in_r[..., :, None] & in_c[..., None, :] & active[..., None, None]).unsqueeze(2)
    return masks, ys, xs, (bh, bw)


def rand_erase(x: torch.Tensor, pct: float = 0.2, max_num: int = 4) -> torch.Tensor:
    """Replace up to `max_num` boxes (each `pct` of the image's height and width) per image with noise of the batch's
    mean and std, clamped to the batch's range."""
    masks, *_ = _boxes(x, pct, max_num, 'rand_erase')
    xf = x if x.is_floating_point() else x.float()  # uint8 images get noise rounded back to uint8
    noise = (torch.randn_like(xf) * xf.std() + xf.mean()).clamp(xf.min(), xf.max())
    return torch.where(masks.any(0), noise if x.is_floating_point() else noise.round().to(x.dtype), x)


def rand_copy(x: torch.Tensor, pct: float = 0.2, max_num: int = 4) -> torch.Tensor:
    "Copy up to `max_num` boxes (each `pct` of each side) per image from a random place to another in the same image."
    masks, ys, xs, (bh, bw) = _boxes(x, pct, max_num, 'rand_copy')
    n, c, h, w = x.shape
    sy = torch.randint(0, h - bh + 1, ys.shape, device=x.device)
    sx = torch.randint(0, w - bw + 1, xs.shape, device=x.device)
    r, cc = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    bi = torch.arange(n, device=x.device)[:, None, None, None]
    ci = torch.arange(c, device=x.device)[None, :, None, None]
    for k in range(max_num):  # a loop over box slots (at most max_num), never over images
        src_r = (r[None, :] - ys[k][:, None] + sy[k][:, None])[:, None, :, None].clamp(0, h - 1)
        src_c = (cc[None, :] - xs[k][:, None] + sx[k][:, None])[:, None, None, :].clamp(0, w - 1)
        x = torch.where(masks[k], x[bi, ci, src_r.expand(n, c, h, w), src_c.expand(n, c, h, w)], x)
    return x


class _BoxTransform(nn.Module):
    "A box augmentation (`fn(x, pct, max_num)`) as a module."
    fn = None
    def __init__(self, pct: float = 0.2, max_num: int = 4):
        super().__init__()
        self.pct, self.max_num = pct, max_num

    def forward(self, x): return type(self).fn(x, self.pct, self.max_num)


class RandErase(_BoxTransform):
    "`rand_erase` as a module."
    fn = staticmethod(rand_erase)


class RandCopy(_BoxTransform):
    "`rand_copy` as a module."
    fn = staticmethod(rand_copy)


def augment_cb(*tfms: nn.Module, on_val: bool = False) -> BatchTransformCB:
    "A `BatchTransformCB` applying `tfms` in turn to the inputs (`batch[0]`) of training batches."
    seq = nn.Sequential(*tfms)
    return BatchTransformCB(lambda b: (seq(b[0]), *b[1:]), on_train=True, on_val=on_val)


class CapturePreds(Callback):
    "Collect every batch's predictions and targets (and inputs, if `inps`), concatenated on the CPU when the fit ends."
    def __init__(self, inps: bool = False): self.inps, self.all_preds, self.all_targs, self.all_inps = inps, [], [], []

    def before_fit(self, learn): self.all_preds, self.all_targs, self.all_inps = [], [], []

    def after_batch(self, learn):
        self.all_preds.append(learn.preds.detach())
        self.all_targs.append(learn.batch[1])
        if self.inps: self.all_inps.append(learn.batch[0])

    def cleanup_fit(self, learn):  # not after_fit: a cancelled fit (e.g. `SingleBatchCB`) keeps what it saw
        cat = lambda ts: torch.cat(ts).cpu() if ts else None
        self.all_preds, self.all_targs, self.all_inps = cat(self.all_preds), cat(self.all_targs), cat(self.all_inps)
        if self.all_preds is not None and self.all_preds.dtype in (torch.float16, torch.bfloat16):
            self.all_preds = self.all_preds.float()


def capture_preds(self: Learner, cbs=None, inps: bool = False):
    """Predictions and targets (and inputs, if `inps`) over the validation set, through the Learner's callbacks plus
    `cbs`. A look, not a change: the model, optimizer, data order and RNGs are left as they were."""
    cp = CapturePreds(inps)
    with looking(self): self.fit(1, train=False, cbs=[cp] + list(cbs or []))
    return (cp.all_preds, cp.all_targs) + ((cp.all_inps,) if inps else ())


class _GrabBatch(Callback):
    order = 100  # after every transform of the batch
    def before_batch(self, learn):
        self.batch = learn.batch
        raise CancelFitException()


def show_image_batch(self: Learner, max_n: int = 9, cbs=None, **kwargs):
    "Show up to `max_n` images of a training batch as the model would get it (after `cbs`, e.g. augmentation)."
    grab = _GrabBatch()
    with looking(self): self.fit(1, valid=False, cbs=[grab] + list(cbs or []))
    return show_images(grab.batch[0][:max_n].float().cpu(), **kwargs)


def tta(learn: Learner, tfm=lambda x: x.flip(-1)) -> dict:
    """Test-time augmentation: average the predicted probabilities over the validation set as it is and with `tfm`
    applied (default: a left-right flip). Returns both accuracies and the averaged probabilities."""
    preds, targs = learn.capture_preds()
    aug = BatchTransformCB(lambda b: (tfm(b[0]), *b[1:]), on_train=False, on_val=True)
    preds2, _ = learn.capture_preds(cbs=[aug])
    avg = (preds.softmax(-1) + preds2.softmax(-1)) / 2
    acc = lambda p: (p.argmax(-1) == targs).float().mean().item()
    return {'accuracy': acc(preds), 'tta_accuracy': acc(avg), 'probs': avg, 'targets': targs}


Learner.capture_preds = capture_preds
Learner.show_image_batch = show_image_batch
