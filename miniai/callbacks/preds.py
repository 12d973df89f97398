"""Collecting predictions: `CapturePreds`, the one collector behind `learn.capture_preds`, `learn.get_preds`, TTA,
the interpretation and FID's features."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ..core.devices import HostCopies
from ..core.events import Callback, CancelBatchException
from ..core.learner import Learner, learner_method
from ..core.state import looking

__all__ = ['CapturePreds', 'capture_preds']


def _cat(ts: list) -> torch.Tensor | None:
    "The tensors `ts` joined along the first dimension, on the CPU; half-precision floats as float32; None if none."
    if not ts: return None
    res = torch.cat(ts)
    return res.float() if res.dtype in (torch.float16, torch.bfloat16) else res


class CapturePreds(Callback):
    """Collect every batch's predictions and targets (and inputs, if `inps`), each copied to the CPU as it comes (from
    a GPU asynchronously, into pinned memory: no wait per batch, and no more than a batch held on the GPU), joined
    when the fit ends (as `all_preds`, `all_targs`, `all_inps`; None where there were none, such as the targets of
    batches without any).
    With `skip_loss`, each batch ends once its prediction is taken: no loss is computed (batches need no targets)."""
    order = 0  # takes each batch in after_batch before SingleBatchCB (1) ends the fit

    all_preds: Any  # lists of batches during the fit; tensors (or None) once it ends
    all_targs: Any
    all_inps: Any

    def __init__(self, inps: bool = False, skip_loss: bool = False) -> None:
        self.inps, self.skip_loss = inps, skip_loss
        # taken in after_predict: after every other after_predict (CompileCB copies outputs out of CUDA-graph memory)
        if skip_loss: self.order = 100
        self.all_preds, self.all_targs, self.all_inps, self._host = [], [], [], HostCopies()

    def before_fit(self, learn: Learner) -> None:
        self.all_preds, self.all_targs, self.all_inps, self._host = [], [], [], HostCopies()

    def _take(self, learn):
        b, host = learn.batch, self._host
        self.all_preds.append(host(learn.preds.detach()))
        if len(b) > 1: self.all_targs.append(host(b[1]))
        if self.inps: self.all_inps.append(host(b[0]))

    def after_predict(self, learn: Learner) -> None:
        if not self.skip_loss: return
        self._take(learn)
        raise CancelBatchException()  # nothing else is needed from this batch

    def after_batch(self, learn: Learner) -> None:
        if not self.skip_loss: self._take(learn)

    def cleanup_fit(self, learn: Learner) -> None:  # not after_fit: a cancelled fit (e.g. `SingleBatchCB`) keeps what it saw
        self._host.wait()
        self.all_preds, self.all_targs, self.all_inps = _cat(self.all_preds), _cat(self.all_targs), _cat(self.all_inps)


@learner_method
def capture_preds(self: Learner, cbs: Iterable[Callback] | None = None, inps: bool = False) -> tuple[Any, ...]:
    """Predictions and targets (and inputs, if `inps`) over the validation set, through the Learner's callbacks plus
    `cbs`. A look, not a change: the model, optimizer, data order and RNGs are left as they were."""
    cp = CapturePreds(inps)
    with looking(self): self.fit(1, train=False, cbs=[cp] + list(cbs or []))
    return (cp.all_preds, cp.all_targs) + ((cp.all_inps,) if inps else ())
