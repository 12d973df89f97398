"""Training on several processes with `torch.distributed` (DDP), launched by `torchrun`, with no code change.

`DDPCB` does nothing in a single process. Under `torchrun` (which sets RANK, LOCAL_RANK, WORLD_SIZE and
MASTER_ADDR/PORT) it joins the process group (NCCL on GPUs, gloo on CPUs), puts each process on its own GPU,
wraps the model in `DistributedDataParallel`, gives each rank its own shard of every epoch (the fast tensor loader
and torch `DataLoader`s alike), merges the metrics' states over the ranks so the reported numbers are global, and
lets only rank 0 print and write files (`ProgressCB`, `SaveModelCB`, the loggers check `is_main_process`).
"""
from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from .callback import Callback
from .ranks import is_dist, is_main_process, local_rank, rank, world_size

__all__ = ['is_dist', 'rank', 'local_rank', 'world_size', 'is_main_process', 'init_distributed', 'DDPCB']


def init_distributed(timeout: float = 300.) -> bool:
    """Join the process group torchrun describes in the environment (once); False when running alone.
    `timeout` bounds how long a collective waits for a rank that died, so a failure cannot hang the others."""
    if is_dist(): return True
    if world_size() <= 1: return False
    backend = 'nccl' if torch.cuda.is_available() else 'gloo'
    if torch.cuda.is_available(): torch.cuda.set_device(local_rank())
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
    return True


def _synced_compute(metric):
    "Merge every rank's state of a torcheval metric, then compute (a collective: every rank must call it)."
    from torcheval.metrics.toolkit import get_synced_metric
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
    script runs either way. `timeout` (seconds) bounds waits for a failed rank."""
    skip_in_probes = True
    order = 10  # after DeviceCB and ChannelsLastCB have placed the model

    def __init__(self, timeout: float = 300., find_unused_parameters: bool = False):
        self.timeout, self.find_unused = timeout, find_unused_parameters

    def before_fit(self, learn):
        self.active = init_distributed(self.timeout)
        if not self.active: return
        dev = next(learn.model.parameters()).device
        ids = [dev.index if dev.index is not None else local_rank()] if dev.type == 'cuda' else None
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
        learn.model = self.plain  # the plain module again: for saving, summaries and single-process use
        for name, dl in self.orig.items(): setattr(learn.dls, name, dl)
        for undo in self.undo: undo()
        metrics = getattr(learn, 'metrics', None)
        if metrics is not None: metrics.compute = type(metrics).compute
