"""Training on several processes with `torch.distributed` (DDP), launched by `torchrun`, with no code change.

`DDPCB` does nothing in a single process. Under `torchrun` (which sets RANK, LOCAL_RANK, WORLD_SIZE and
MASTER_ADDR/PORT) it joins the process group (NCCL when the model is on a GPU, gloo on the CPU), checks that the
model is on this process's own device (`DeviceCB()` puts it on cuda:LOCAL_RANK), wraps the model in
`DistributedDataParallel`, gives each rank its own shard of every epoch (the fast tensor loader and torch
`DataLoader`s alike), merges the metrics' states over the ranks so the reported numbers are global, and
lets only rank 0 print and write files (`ProgressCB`, `SaveModelCB`, the loggers check `is_main_process`).
"""
from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from .callback import Callback
from .conv import ENV, resolve_device
from .learner import DeviceCB
from .progress import quiet_torcheval
from .ranks import is_dist, is_main_process, local_rank, rank, world_size

__all__ = ['is_dist', 'rank', 'local_rank', 'world_size', 'is_main_process', 'init_distributed', 'DDPCB']


def init_distributed(timeout: float = 300., backend: str | None = None) -> bool:
    """Join the process group torchrun describes in the environment (once); False when running alone.
    `backend`: 'nccl' (one GPU per process) or 'gloo' (CPU processes, or several sharing a GPU); default NCCL when
    this process's default device is a GPU. `timeout` bounds how long a collective waits for a rank that died, so a
    failure cannot hang the others."""
    if is_dist(): return True
    if world_size() <= 1: return False
    if backend is None: backend = 'nccl' if torch.device(resolve_device()).type == 'cuda' else 'gloo'
    if backend == 'nccl': torch.cuda.set_device(torch.device(resolve_device('cuda')))
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
    return True


def _model_device(model) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device('cpu')


def _check_placement(cb, learn) -> tuple[torch.device, str]:
    "The model's device and the backend to use, after checking that the model is where this process trains."
    later = [type(c).__name__ for c in learn.cbs if isinstance(c, DeviceCB) and c.order > cb.order]
    if later: raise RuntimeError(f'DDPCB (order {cb.order}) would wrap the model before {later[0]} moves it; give '
                                 f'DDPCB a higher order than every DeviceCB')
    dev = _model_device(learn.model)
    backend = cb.backend or ('nccl' if dev.type == 'cuda' else 'gloo')
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


def _synced_compute(metric):
    "Merge every rank's state of a torcheval metric, then compute (a collective: every rank must call it)."
    with quiet_torcheval(): from torcheval.metrics.toolkit import get_synced_metric
    return get_synced_metric(metric).compute()  # this torcheval gives the merged metric to every rank


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
    raise TypeError(f'DDPCB cannot shard a {type(dl).__name__}: use miniai.fashion.TensorDataLoader or a '
                    f'torch DataLoader')


class DDPCB(Callback):
    """Data-parallel training over the processes `torchrun` started; a no-op in a single process, so the same
    script runs either way. `backend`: 'nccl' or 'gloo'; default NCCL when the model is on a GPU, else gloo.
    `timeout` (seconds) bounds waits for a failed rank."""
    skip_in_probes = True
    order = 10  # after DeviceCB and ChannelsLastCB have placed the model

    def __init__(self, timeout: float = 300., find_unused_parameters: bool = False, backend: str | None = None):
        if backend not in (None, 'nccl', 'gloo'):
            raise ValueError(f"DDPCB: backend must be 'nccl', 'gloo' or None (by the model's device), got {backend!r}")
        self.timeout, self.find_unused, self.backend = timeout, find_unused_parameters, backend

    def before_fit(self, learn):
        self.active = is_dist() or world_size() > 1
        if not self.active: return
        dev, backend = _check_placement(self, learn)
        init_distributed(self.timeout, backend)
        ids = [dev.index] if dev.type == 'cuda' else None
        self.plain = learn.model
        learn.model = DistributedDataParallel(learn.model, device_ids=ids, find_unused_parameters=self.find_unused)
        self.orig, self.undo = {}, []
        for name, shuffle in (('train', True), ('valid', False)):
            dl = getattr(learn.dls, name, None)
            if dl is None: continue
            new, undo = _shard(dl, shuffle)
            self.orig[name] = dl
            setattr(learn.dls, name, new)
            self.undo.append(undo)
        metrics = getattr(learn, 'metrics', None)
        if metrics is not None: metrics.compute = _synced_compute

    def before_epoch(self, learn):
        if self.active and isinstance(getattr(learn.dl, 'sampler', None), DistributedSampler):
            learn.dl.sampler.set_epoch(learn.epoch)

    def cleanup_fit(self, learn):
        if not getattr(self, 'active', False): return
        # before_fit may have failed part-way: undo only what it did
        if getattr(self, 'plain', None) is not None: learn.model = self.plain  # the plain module again
        for name, dl in getattr(self, 'orig', {}).items(): setattr(learn.dls, name, dl)
        for undo in getattr(self, 'undo', []): undo()
        metrics = getattr(learn, 'metrics', None)
        if metrics is not None: metrics.compute = type(metrics).compute
