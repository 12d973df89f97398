"""Training on several processes with `torch.distributed` (DDP), launched by `torchrun`, with no code change.

`DDPCB` does nothing in a single process. Under `torchrun` (which sets RANK, LOCAL_RANK, WORLD_SIZE and
MASTER_ADDR/PORT) it joins the process group (NCCL when the model is on a GPU, gloo on the CPU), checks that the
model is on this process's own device (`DeviceCB()` puts it on cuda:LOCAL_RANK), wraps the model in
`DistributedDataParallel`, gives each rank its own shard of every epoch (the fast tensor loader and torch
`DataLoader`s alike), has `MetricsCB` merge the metrics' states over the ranks (`RankMetrics`) so the reported
numbers are global, and lets only rank 0 print and write files (`ProgressCB`, `SaveModelCB`, the loggers check
`is_main_process`). A process group it joined is ended with the fit (a group the user made is left alone). Beside
it, a small gloo group on the CPU (`cpu_group`) carries what ranks agree on outside the gradients (stopping, saving,
choosing a checkpoint), so that never adds a GPU synchronisation.
"""
from __future__ import annotations

import os
import socket
import warnings
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from ..callbacks.metrics import quiet_torcheval
from ..core.devices import ENV, model_device, resolve_device
from ..core.events import Callback
from ..core.learner import DeviceCB
from ..core.ranks import is_dist, is_main_process, local_rank, local_world_size, rank, world_size

if TYPE_CHECKING:
    from torcheval.metrics.metric import Metric

    from ..core.learner import Learner

__all__ = ['init_distributed', 'end_distributed', 'default_backend', 'cpu_group', 'gpu_id', 'gradient_group',
           'gather_to_main', 'all_agree', 'RankMetrics', 'DDPCB']

_joined = None  # the default process group, when `init_distributed` made it (so it is ours to end)
_cpu = {}  # default process group -> the gloo group beside it (`cpu_group`)
_timeout = 300.  # seconds: that of the group `init_distributed` made, for the gloo group beside it too


def default_backend(device: str | torch.device) -> str:
    """The backend for a model on `device`: NCCL for a GPU of this process's own, gloo on the CPU, and gloo when
    several processes on this machine may share one GPU through `MINIAI_DEVICE=cuda:N` (NCCL refuses two ranks on one
    device). Whether they do is known only once they have joined: `DDPCB` then asks (`gradient_group`) and gives
    the gradients NCCL when each has a GPU of its own after all (each process shown its own GPU)."""
    if torch.device(device).type != 'cuda': return 'gloo'
    fixed = torch.device(os.environ[ENV]).index is not None if os.environ.get(ENV, '').strip() else False
    return 'gloo' if fixed and local_world_size() > 1 else 'nccl'


def init_distributed(timeout: float = 300., backend: str | None = None) -> bool:
    """Join the process group torchrun describes in the environment (once); False when running alone.
    `backend`: 'nccl' (one GPU per process) or 'gloo' (CPU processes, or several sharing a GPU); default
    `default_backend` of this process's default device. `timeout` bounds how long a collective waits for a rank that
    died, so a failure cannot hang the others."""
    global _joined, _timeout
    if is_dist(): return True
    if world_size() <= 1: return False
    if backend is None: backend = default_backend(resolve_device())
    if backend == 'nccl': torch.cuda.set_device(torch.device(resolve_device('cuda')))
    restarted = os.environ.get('TORCHELASTIC_RESTART_COUNT', '0') != '0'
    if restarted and os.environ.get('TORCHELASTIC_USE_AGENT_STORE') == 'True':
        warnings.warn('torchrun restarted this job, its workers sharing the rendezvous store (the default): they may '
                      'read the addresses of the processes that died and fail to connect (PyTorch issue #135712). Set '
                      'TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in the environment of torchrun', RuntimeWarning,
                      stacklevel=2)
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
    if dist.is_initialized(): _joined, _timeout = dist.group.WORLD, timeout
    return True


def end_distributed() -> None:
    "End the process group if `init_distributed` made it (a group the user made is left alone)."
    global _joined
    if _joined is None or not is_dist() or dist.group.WORLD is not _joined: return
    _joined = None
    _cpu.clear()
    dist.destroy_process_group()


def cpu_group() -> dist.ProcessGroup | None:
    """A gloo group of all ranks beside the default one (made once, on first use, which must come at the same point
    on every rank), for small CPU collectives that must never wait for a GPU; None when not distributed."""
    if not is_dist(): return None
    world = dist.group.WORLD
    if world not in _cpu:
        _cpu.clear()  # an earlier default group's: gone with it
        _cpu[world] = dist.new_group(backend='gloo', timeout=timedelta(seconds=_timeout))
    return _cpu[world]


def gpu_id(device: str | torch.device) -> str:
    "The identity of the physical GPU behind `device` (its UUID), the same whichever GPUs this process is shown."
    return str(torch.cuda.get_device_properties(torch.device(device)).uuid)


def gradient_group(device: str | torch.device, backend: str) -> dist.ProcessGroup | None:
    """The process group DDP all-reduces the gradients in: None for the default group, or, where the default is gloo
    only because the processes named a GPU through `MINIAI_DEVICE=cuda:N`, an NCCL group when their GPUs turn out to
    be different ones (each process shown a GPU of its own). A collective (every rank calls it)."""
    device = torch.device(device)
    if backend != 'gloo' or device.type != 'cuda' or default_backend(device) != 'gloo': return None
    mine = (socket.gethostname(), gpu_id(device))
    every = [None] * world_size()
    dist.all_gather_object(every, mine, group=cpu_group())  # pyright: ignore[reportArgumentType]
    if len(set(every)) < len(every): return None  # two ranks on one GPU: gloo, since NCCL refuses that
    return dist.new_group(backend='nccl', timeout=timedelta(seconds=_timeout))  # pyright: ignore[reportReturnType]  (new_group gives a group on the ranks in it)


def gather_to_main(obj: object) -> list | None:
    "Every rank's `obj` (picklable), in rank order, on the main process; None on the others. A collective."
    if not is_dist() or world_size() == 1: return [obj]
    got = [None] * world_size() if is_main_process() else None
    dist.gather_object(obj, got, dst=0, group=cpu_group())  # pyright: ignore[reportArgumentType]
    return got


def all_agree(ok: bool) -> bool:
    "Whether `ok` holds on every rank. A collective (every rank must call it)."
    if not is_dist() or world_size() == 1: return bool(ok)
    t = torch.tensor([int(bool(ok))])
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=cpu_group())
    return bool(t.item())


def _check_placement(cb, learn) -> tuple[torch.device, str]:
    "The model's device and the backend to use, after checking that the model is where this process trains."
    later = [type(c).__name__ for c in learn.cbs if isinstance(c, DeviceCB) and c.order > cb.order]
    if later: raise RuntimeError(f'DDPCB (order {cb.order}) would wrap the model before {later[0]} moves it; give '
                                 f'DDPCB a higher order than every DeviceCB')
    dev = model_device(learn.model)
    backend = cb.backend or default_backend(dev)
    where = f'this process (rank {rank()}, LOCAL_RANK {local_rank()})'
    if dev.type == 'cuda':
        own = torch.device(resolve_device('cuda'))
        if dev.index != own.index:
            raise RuntimeError(f'DDPCB: the model is on {dev} but {where} trains on {own}: let DeviceCB() place it '
                               f'(or .to(def_device)), not a fixed cuda:{dev.index}')
    elif backend == 'nccl':
        raise RuntimeError(f'DDPCB(backend="nccl") needs the model on a GPU, but in {where} it is on {dev}: add '
                           f'DeviceCB(), or train on CPU processes with DDPCB(backend="gloo") (or {ENV}=cpu)')
    return dev, backend


class RankMetrics:
    """How `MetricsCB` reads its metrics when several processes train together: every rank's state merged before the
    value is computed. Both are collectives, so every rank calls them, and calls both or neither."""
    @staticmethod
    def compute(metric: Metric) -> Any:
        "Merge every rank's state of a torcheval metric, then compute."
        with quiet_torcheval(): from torcheval.metrics.toolkit import get_synced_metric
        return get_synced_metric(metric).compute()  # this torcheval gives the merged metric to every rank

    @staticmethod
    def measured(weight: float) -> bool:
        "Whether any rank measured a batch this epoch: all of them then compute, or none (one alone would hang)."
        if not is_dist(): return weight > 0
        t = torch.tensor([float(weight)], dtype=torch.float64)
        dist.all_reduce(t, group=cpu_group())
        return t.item() > 0


def _shard(dl, shuffle: bool):
    "A version of `dl` that yields only this rank's part of each epoch (and how to undo it)."
    if hasattr(dl, 'world_size') and hasattr(dl, 'rank'):  # miniai's TensorDataLoader shards itself
        old = (dl.rank, dl.world_size)
        dl.rank, dl.world_size = rank(), world_size()
        def undo(): dl.rank, dl.world_size = old
        return dl, undo
    if isinstance(dl, DataLoader):
        sampler = DistributedSampler(dl.dataset, shuffle=shuffle, drop_last=True)
        new = DataLoader(dl.dataset, batch_size=dl.batch_size, sampler=sampler, collate_fn=dl.collate_fn,
                         num_workers=dl.num_workers, pin_memory=dl.pin_memory, drop_last=dl.drop_last)
        return new, lambda: None
    raise TypeError(f'DDPCB cannot shard a {type(dl).__name__}: use miniai.data.loader.TensorDataLoader or a '
                    f'torch DataLoader')


class DDPCB(Callback):
    """Data-parallel training over the processes `torchrun` started; a no-op in a single process, so the same
    script runs either way. `backend`: 'nccl' or 'gloo'; default `default_backend` of the model's device (NCCL on a
    GPU of its own, else gloo). `timeout` (seconds) bounds waits for a failed rank. A process group it joined is
    ended when the fit ends, however it ends; one the user made is left alone."""
    skip_in_probes = True
    order = 10  # after DeviceCB and ChannelsLastCB have placed the model

    def __init__(self, timeout: float = 300., find_unused_parameters: bool = False, backend: str | None = None) -> None:
        if backend not in (None, 'nccl', 'gloo'):
            raise ValueError(f"DDPCB: backend must be 'nccl', 'gloo' or None (by the model's device), got {backend!r}")
        self.timeout, self.find_unused, self.backend = timeout, find_unused_parameters, backend

    def before_fit(self, learn: Learner) -> None:
        self.active = is_dist() or world_size() > 1
        if not self.active: return
        dev, backend = _check_placement(self, learn)
        init_distributed(self.timeout, backend)
        cpu_group()  # made here, at the same point on every rank, for the callbacks that agree on the CPU
        ids = [dev.index] if dev.type == 'cuda' else None
        group = gradient_group(dev, backend) if self.backend is None else None  # a backend given is used as given
        self.plain = learn.model
        learn.model = DistributedDataParallel(learn.model, device_ids=ids, find_unused_parameters=self.find_unused,
                                              process_group=group)
        self.orig, self.undo = {}, []
        for name, shuffle in (('train', True), ('valid', False)):
            dl = getattr(learn.dls, name, None)
            if dl is None: continue
            new, undo = _shard(dl, shuffle)
            self.orig[name] = dl
            setattr(learn.dls, name, new)
            self.undo.append(undo)

    def metrics_reducer(self) -> type[RankMetrics] | None:
        "`MetricsCB` merges its metrics over the ranks while this callback trains data-parallel."
        return RankMetrics if getattr(self, 'active', False) else None

    def before_epoch(self, learn: Learner) -> None:
        if self.active and isinstance(getattr(learn.dl, 'sampler', None), DistributedSampler):
            learn.dl.sampler.set_epoch(learn.epoch)

    def cleanup_fit(self, learn: Learner) -> None:
        if not getattr(self, 'active', False):
            end_distributed()  # joined early (fit(resume='auto') chose a checkpoint) by a fit that failed before ours
            return
        # before_fit may have failed part-way: undo only what it did
        if getattr(self, 'plain', None) is not None: learn.model = self.plain  # the plain module again
        for name, dl in getattr(self, 'orig', {}).items(): setattr(learn.dls, name, dl)
        for undo in getattr(self, 'undo', []): undo()
        end_distributed()  # a group it joined ends with the fit, failed or not (it would leak and warn at exit)
