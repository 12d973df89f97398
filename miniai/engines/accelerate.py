"""`AccelerateCB`: training through Hugging Face Accelerate (the course's callback), for a plain `Learner`."""
from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader

from ..core.devices import deliver_loader, to_device
from ..core.learner import DeviceCB, Learner, TrainCB
from ..core.ranks import world_size
from .ddp import RankMetrics

__all__ = ['AccelerateCB']

_PRECISIONS = ('no', 'fp16', 'bf16', 'fp8')
#: what `Accelerator.prepare` leaves on the objects it is given (autocast forward, prepared mark, scaler's step)
_ACCELERATE_MARKS = ('forward', '_original_forward', '_is_accelerate_prepared', 'step')


def _keep_attrs(obj, names) -> Callable[[], None]:
    "A function that puts the instance attributes `names` of `obj` back as they are now (removing those now absent)."
    d = getattr(obj, '__dict__', None)
    if d is None: return lambda: None
    saved = {n: d[n] for n in names if n in d}
    def undo():
        for n in names:
            if n in saved: d[n] = saved[n]
            else: d.pop(n, None)
    return undo


def _accelerate():
    try:
        import accelerate
        import accelerate.state
    except ImportError as e:
        raise ImportError('AccelerateCB needs Hugging Face Accelerate, which is not installed: pip install accelerate '
                          "(or pip install -e '.[dev]' in a checkout of miniai)") from e
    return accelerate


class AccelerateCB(TrainCB):
    """Train through Hugging Face Accelerate (`pip install accelerate`), for a plain `Learner` (like `TrainCB`, the
    first `n_inp` batch items go to the model). `before_fit` hands the model, the optimizer and the torch
    `DataLoader`s to `Accelerator.prepare` (device placement; DDP, FSDP or DeepSpeed over the processes `accelerate
    launch` started; mixed precision), and `backward` is the accelerator's.

    `mixed_precision`: 'no', 'bf16' (CPU and GPU), 'fp16' (GPU, with loss scaling; on a CPU Accelerate trains in
    fp32, and this says so in a warning), 'fp8', or None for what `accelerate launch`/`accelerate config` chose.
    miniai's `TensorDataLoader` is not a torch DataLoader, so Accelerate leaves it alone: it shards itself (each
    process takes its interleaved part of one shared order) and its batches are moved to the accelerator's device.
    With several processes the metrics are merged over them before they are computed (`metrics_reducer`), and only
    the main process prints and writes; checkpoints hold the unwrapped model's weights (`plain_state_dict`), so they
    load into the plain one. After the fit, however it ends, the Learner holds its own model, optimizer and loaders
    again.
    `accelerator_kwargs` go to `accelerate.Accelerator`."""
    order = DeviceCB.order + 10

    def __init__(self, n_inp: int = 1, mixed_precision: str | None = 'fp16', **accelerator_kwargs: Any) -> None:
        super().__init__(n_inp)
        if mixed_precision not in _PRECISIONS + (None,):
            raise ValueError(f"AccelerateCB: mixed_precision must be one of {', '.join(map(repr, _PRECISIONS))} or "
                             f"None; got {mixed_precision!r}")
        self.mixed_precision, self.accelerator_kwargs, self._undo = mixed_precision, accelerator_kwargs, []
        self.acc = self._new_accelerator()

    def _new_accelerator(self):
        accelerate = _accelerate()
        kw = dict(self.accelerator_kwargs)
        # launched as several processes (`accelerate launch --multi_gpu`, torchrun) where there is no GPU: Accelerate
        # joins them into one job (gloo) only when told it runs on CPUs; otherwise each would train alone
        if world_size() > 1 and not torch.cuda.is_available(): kw.setdefault('cpu', True)
        # Accelerate keeps one precision per process and refuses to change it; a notebook that tries fp16, then bf16,
        # gets what it asked for (the process group, held apart from this state, is kept)
        state = accelerate.state.AcceleratorState
        held = getattr(state, '_shared_state', {}).get('_mixed_precision')
        if self.mixed_precision is not None and held not in (None, self.mixed_precision): state._reset_state()
        acc = accelerate.Accelerator(mixed_precision=self.mixed_precision, **kw)
        if acc.state.mixed_precision == 'fp16' and acc.device.type == 'cpu':
            warnings.warn("AccelerateCB(mixed_precision='fp16'): fp16 needs a GPU; on the CPU Accelerate trains in "
                          "fp32. Pass mixed_precision='bf16' (fast on CPUs with AMX/AVX-512 bf16) or 'no'.",
                          stacklevel=3)
        return acc

    def _check_fp16(self, learn, opt):
        "fp16 scales the loss: the scaled backward must be ours, and the optimizer one the scaler can unscale."
        if getattr(type(learn), 'backward', None) is not None:
            raise TypeError(f"AccelerateCB(mixed_precision='fp16') scales the loss in its own backward, but "
                            f"{type(learn).__name__} defines backward itself: use a plain Learner with AccelerateCB, "
                            f"or mixed_precision='bf16'")
        if opt is not None and not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"AccelerateCB(mixed_precision='fp16') unscales gradients in a torch.optim.Optimizer; "
                            f"{type(opt).__name__} is not one: use a torch optimizer, or mixed_precision='bf16' "
                            f"or 'no'")

    def before_fit(self, learn: Learner) -> None:
        if self.mixed_precision is not None and self.acc.state.mixed_precision != self.mixed_precision:
            self.acc = self._new_accelerator()  # another AccelerateCB has set the process's precision since
        acc, opt, n = self.acc, learn.__dict__.get('opt'), self.acc.num_processes
        if acc.scaler is not None: self._check_fp16(learn, opt)
        dls = {k: getattr(learn.dls, k) for k in ('train', 'valid') if getattr(learn.dls, k, None) is not None}
        for k, dl in dls.items():
            if n > 1 and not isinstance(dl, DataLoader) and not hasattr(dl, 'world_size'):
                raise TypeError(f'AccelerateCB cannot share dls.{k} (a {type(dl).__name__}) among {n} processes: use '
                                f'a torch DataLoader or miniai.data.loader.TensorDataLoader')
        loaders = {k: dl for k, dl in dls.items() if isinstance(dl, DataLoader)}  # others shard themselves
        todo = {'model': learn.model, **({'opt': opt} if opt is not None else {}), **loaders}
        # what Accelerate changes in the objects it is given, and what this fit swaps, put back by cleanup_fit
        self._undo += [_keep_attrs(learn, ('model', 'opt')), _keep_attrs(learn.dls, tuple(dls)),
                       *[_keep_attrs(todo[k], _ACCELERATE_MARKS) for k in ('model', 'opt') if k in todo],
                       *[_keep_attrs(dl.sampler, ('generator',)) for dl in loaders.values()]]
        prepared = acc.prepare(*todo.values())  # returned in the order given (one object alone, not in a tuple)
        prepared = dict(zip(todo, prepared if len(todo) > 1 else [prepared]))
        learn.model = prepared['model']
        if opt is not None: learn.opt = prepared['opt']
        for k, dl in dls.items():
            if k in loaders: setattr(learn.dls, k, prepared[k])
            elif n > 1:
                self._undo.append(_keep_attrs(dl, ('rank', 'world_size')))
                dl.rank, dl.world_size = acc.process_index, n
        dev = acc.device  # made concrete, so batches already there compare equal ('cpu:0' would copy every batch)
        if dev.type == 'cpu': dev = torch.device('cpu')
        elif dev.type == 'cuda' and dev.index is None: dev = torch.device('cuda', torch.cuda.current_device())
        self.device = dev

    def metrics_reducer(self) -> type[RankMetrics] | None:
        "`MetricsCB` merges its metrics over the processes while they train together."
        return RankMetrics if getattr(self, '_undo', None) and self.acc.num_processes > 1 else None

    def before_epoch(self, learn: Learner) -> None: self._undeliver = deliver_loader(getattr(learn, 'dl', None), self.device)
    def cleanup_epoch(self, learn: Learner) -> None: self.__dict__.pop('_undeliver', lambda: None)()

    def before_batch(self, learn: Learner) -> None:
        # a prepared DataLoader already delivers on the device; a TensorDataLoader is asked to (before_epoch), and
        # a batch still elsewhere (a loader that cannot deliver) is moved here
        x = learn.batch[0] if isinstance(learn.batch, (tuple, list)) and learn.batch else None
        if isinstance(x, torch.Tensor) and x.device != self.device: learn.batch = to_device(learn.batch, self.device)

    def backward(self, learn: Learner) -> None: self.acc.backward(learn.loss)

    def unscale_grads(self, learn: Learner) -> None:
        "Divide fp16 gradients by the loss scale now (for `GradClipCB`); Accelerate unscales each optimizer once."
        self.acc.unscale_gradients(learn.opt)

    def cleanup_fit(self, learn: Learner) -> None:
        undo, self._undo = self._undo, []
        for f in reversed(undo): f()
        self.acc.free_memory()  # drop the accelerator's references to this fit's model, optimizer and loaders
