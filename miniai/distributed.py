"""Training on several processes with `torch.distributed` (DDP), launched by `torchrun`, with no code change.

`DDPCB` does nothing in a single process. Under `torchrun` (or anything that sets RANK, WORLD_SIZE and
MASTER_ADDR/PORT) it joins the process group, wraps the model in `DistributedDataParallel`, gives each rank its
own shard of every epoch, sums the metrics' state over the ranks so the reported numbers are global, and lets only
rank 0 print and write files.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ['is_dist', 'rank', 'world_size', 'is_main_process']


def is_dist() -> bool:
    "Whether a `torch.distributed` process group is running."
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    "This process's rank (0 without a process group)."
    return dist.get_rank() if is_dist() else int(os.environ.get('RANK', 0)) if 'WORLD_SIZE' in os.environ else 0


def world_size() -> int:
    "How many processes train together (1 without a process group)."
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    "True on the process that prints and writes files: rank 0, or the only process."
    return rank() == 0
