"""What the ranks of a run agree on beside the gradients: the batch to stop after, and checkpoints written once.

Under `torchrun` a scheduler's SIGTERM reaches the ranks at slightly different moments, or only one of them. A rank
that stopped at the batch its own signal arrived would leave the others waiting in the gradient all-reduce. Instead
every rank puts its request into a small all-reduce on the CPU (`StopAgreement`, on the gloo group beside the
training's, so it never waits for a GPU), run in the background and read when the next one starts: every rank learns
of any request at the same batch, and they all stop there. Checkpoints are written once, by the main process (global
rank 0), holding what differs per rank (random states, data order) gathered from every rank, and no rank goes on
before the file is complete (`save_by_main`); a resumed rank takes its own part back (`this_rank`).
"""
from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.distributed as dist

from ..core.ranks import is_dist, is_main_process, local_rank, rank, world_size
from ..core.state import loader_state, rng_state
from .ddp import all_agree, cpu_group, gather_to_main

if TYPE_CHECKING:
    from ..core.learner import Learner

__all__ = ['StopAgreement', 'rank_state', 'save_by_main', 'save_together', 'this_rank']


class StopAgreement:
    """Every rank calls `poll(request)` at the same point of each batch, `request` being the signal number it was
    asked to stop by (or None). It returns the signal the ranks agreed to stop for, on every rank at the same batch (the
    largest any rank asked for), and None until then. Alone, it answers `request` at once.

    The ranks compare notes in rounds: a round's all-reduce (stop flag and seconds per batch, on the CPU) runs in the
    background and is read when the next round starts. Rounds start every batch at first, then every `seconds` or so:
    every N batches, N worked out from the slowest rank's pace, the same on every rank. So a stop comes at most two
    rounds (about 2 x `seconds`, default 0.5; `$MINIAI_STOP_CHECK_SECONDS`) after the signal, and the rounds cost next
    to nothing however short a batch is. The ranks' CPUs drift at most a round apart."""
    def __init__(self, seconds: float | None = None) -> None:
        self.group = cpu_group() if is_dist() and world_size() > 1 else None
        self.seconds = float(os.environ.get('MINIAI_STOP_CHECK_SECONDS', 0.5)) if seconds is None else seconds
        self.agreed, self._work, self._flag, self.rounds = None, None, None, 0
        self._n, self._next, self._every, self._since, self._t = 0, 0, 1, 0, time.perf_counter()

    def poll(self, request: int | None) -> int | None:
        "This batch's answer (when distributed every rank calls it, once per batch: its rounds are collectives)."
        if self.agreed is not None: return self.agreed
        if self.group is None:
            self.agreed = request
            return request
        self._n += 1
        if self._n < self._next: return None
        if self._work is not None and self._read() is not None: return self.agreed
        now = time.perf_counter()
        pace, self._t, self._since = (now - self._t) / max(1, self._n - self._since), now, self._n
        self._flag = torch.tensor([request or 0, pace], dtype=torch.float64)
        self._work = dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        self._next, self.rounds = self._n + self._every, self.rounds + 1
        return None

    def _read(self) -> int | None:
        self._work.wait()
        (flag, pace), self._work = self._flag.tolist(), None
        if flag: self.agreed = int(flag)
        self._every = max(1, min(1000, int(self.seconds / pace))) if pace > 0 else 1  # the same on every rank
        return self.agreed

    def settle(self, request: int | None) -> int | None:
        """After the last batch (every rank calls it): the agreed signal, from the round in flight and, if that holds
        none, one last round with `request`, waited for at once."""
        if self._work is not None: self._read()
        if self.agreed is None:
            self._next = 0
            self.poll(request)
        if self._work is not None: self._read()
        return self.agreed


def rank_state(learn: Learner, rng: dict | None = None) -> dict:
    """What a checkpoint keeps of this rank alone: its random generators (`rng`, else now) and its training data order;
    and which process it was (global rank, LOCAL_RANK), for the record."""
    dl = getattr(getattr(learn, 'dls', None), 'train', None)
    return {'rank': rank(), 'local_rank': local_rank(), 'rng': rng_state() if rng is None else rng,
            'data': loader_state(dl)}


def save_by_main(write: Callable[[list | None], object], mine: dict, path: str | os.PathLike) -> Path:
    """Called on every rank at once: the main process calls `write(states)`, `states` being every rank's `mine` in
    rank order (None when alone), and every rank waits until it is done. If it fails, every rank raises: the main
    process its own error, the others one naming `path`, instead of waiting for a file that never comes."""
    if not is_dist() or world_size() == 1:
        write(None)
        return Path(path)
    states, err = gather_to_main(mine), None
    if is_main_process():
        try: write(states)
        except Exception as e: err = e
    if not all_agree(err is None):  # also the wait: it completes once the main process is done
        if err is not None: raise err
        raise RuntimeError(f'rank {rank()}: rank 0 failed to write {path} (its error says why); nothing was saved')
    return Path(path)


def save_together(learn: Learner, path: str | os.PathLike, rng: dict | None = None, **extra: Any) -> Path:
    """`learn.save(path, **extra)` from code that runs on every rank at once (SaveModelCB, InterruptCB): the main
    process writes, with each rank's own random states (`rng`: taken earlier, else now) and data order, and every rank
    waits for the file. Alone, the same as `learn.save`."""
    if rng is not None: extra['rng'] = rng
    return save_by_main(lambda ranks: learn.save(path, **extra, **({'ranks': ranks} if ranks else {})),
                        rank_state(learn, rng), path)


def this_rank(ck: dict, where: object) -> dict:
    """The checkpoint `ck` as this rank goes on from it: with its own random states and data order when the file holds
    every rank's. Resuming with another number of processes than saved it works, with a warning saying what is not
    exact (docs/on-a-cluster.md)."""
    saved, now, ranks = ck.get('world_size') or 1, world_size(), ck.get('ranks')
    if saved != now and is_main_process():
        warnings.warn(
            f'{where} was saved by {saved} process(es) and is resumed by {now}: the weights, optimizer, schedulers, '
            f'epoch and batch go on exactly, and so does which images make up each global batch (miniai\'s '
            f'TensorDataLoader, the same global batch size); the random streams (rank r takes those of rank r mod '
            f'{saved} then) and BatchNorm\'s per-rank batch statistics do not, so the run will not end on the weights '
            f'of an uninterrupted {saved}- or {now}-process run', stacklevel=2)
    if not ranks: return ck
    mine = ranks[rank() % len(ranks)]
    return {**ck, 'rng': mine['rng'], 'data': mine['data']}
