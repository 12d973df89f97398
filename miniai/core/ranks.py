"""Which process this is when several train together (`torch.distributed`), so only one prints and writes files."""
from __future__ import annotations

import os

import torch.distributed as dist

__all__ = ['is_dist', 'rank', 'local_rank', 'local_world_size', 'world_size', 'is_main_process']


def is_dist() -> bool:
    "Whether a `torch.distributed` process group is running."
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    "This process's rank: from the process group, else from torchrun's RANK variable, else 0."
    if is_dist(): return dist.get_rank()
    return int(os.environ.get('RANK', 0))


def local_rank() -> int:
    "This process's rank on its machine (torchrun's LOCAL_RANK), which picks its GPU."
    return int(os.environ.get('LOCAL_RANK', 0))


def local_world_size() -> int:
    "How many processes train on this machine (torchrun's LOCAL_WORLD_SIZE), else 1."
    return int(os.environ.get('LOCAL_WORLD_SIZE', 1))


def world_size() -> int:
    "How many processes train together: from the process group, else torchrun's WORLD_SIZE, else 1."
    if is_dist(): return dist.get_world_size()
    return int(os.environ.get('WORLD_SIZE', 1))


def is_main_process() -> bool:
    "True on the process that prints and writes files: rank 0, or the only process."
    return rank() == 0
