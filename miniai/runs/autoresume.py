"""Runs that go on by themselves: `fit(n, resume='auto')`, and `python -m miniai train --resume auto --out DIR`.

The run's checkpoints are where its callbacks write them: `InterruptCB`'s file (interrupted.ckpt) and `SaveModelCB`'s
last.ckpt, with its best.ckpt as the last resort. 'auto' takes the newest complete one, by the time it was saved; a
damaged one is skipped with a warning and the one saved before it is used; with none, the run starts fresh. Under
`torchrun` the main process chooses and every rank takes that same file (a rank that cannot see it is an error on
every rank: the run folder must be shared by the nodes). So `torchrun --max-restarts N`, a requeued Slurm job or a
restarted Kubernetes pod, started again with the same command, finish the run without a person.
"""
from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch.distributed as dist
from safetensors import SafetensorError, safe_open

from ..core.devices import resolve_device
from ..core.learner import DeviceCB, Learner, learner_method
from ..core.ranks import is_dist, is_main_process, rank, world_size
from ..engines.ddp import DDPCB, all_agree, cpu_group, default_backend, init_distributed
from .checkpoint import CheckpointError, ResumeCB, read_checkpoint

__all__ = ['run_checkpoints', 'newest_checkpoint', 'choose_together', 'AutoResumeCB']


def run_checkpoints(learn: Learner) -> tuple[list[Path], list[Path]]:
    """The files this Learner's callbacks write that a run can go on from (each callback with `checkpoint_paths()`
    says which: `InterruptCB`'s file, `SaveModelCB`'s last.ckpt), and the fallbacks (its best.ckpt, an earlier
    state)."""
    paths, fallbacks = [], []
    for cb in learn.cbs:
        if callable(f := getattr(cb, 'checkpoint_paths', None)):
            p, fb = f()  # pyright: ignore[reportGeneralTypeIssues]  (checkpoint_paths() gives a pair)
            paths += p
            fallbacks += fb
    return list(dict.fromkeys(paths)), list(dict.fromkeys(fallbacks))


def _saved_at(path: Path) -> float:
    """When `path` was saved: the time its writer put in the header (the same clock for every file of a run, whatever
    copied them since), else the file's own time. Raises `CheckpointError` when the header cannot be read."""
    try:
        with safe_open(str(path), framework='pt') as f: header = json.loads((f.metadata() or {})['miniai'])
        top = dict(header.get('__dict__', []))  # the top level of the state, as `save_checkpoint` encodes it
    except (SafetensorError, OSError, ValueError, RuntimeError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f'{path}: its header cannot be read ({e})') from e
    t = top.get('saved_at')
    return float(t) if isinstance(t, (int, float)) else path.stat().st_mtime


def newest_checkpoint(paths: Iterable[str | os.PathLike], fallbacks: Iterable[str | os.PathLike] = ()) -> Path | None:
    """The newest complete checkpoint among `paths` (those that exist), by the time each was saved, else among
    `fallbacks`; a damaged one is skipped with a warning naming it and the problem, and the next newest tried. None
    when there is none."""
    dated = []
    for tier, group in enumerate((paths, fallbacks)):
        for p in dict.fromkeys(map(Path, group)):
            if not p.is_file(): continue
            try: dated.append((-tier, _saved_at(p), str(p)))
            except CheckpointError as e: warnings.warn(f'resume: skipping {p}, which is damaged: {e}', stacklevel=2)
    for *_, p in sorted(dated, reverse=True):
        try:
            read_checkpoint(p)  # every tensor and the whole header: a file that loads
            return Path(p)
        except CheckpointError as e:
            warnings.warn(f'resume: skipping {p}, which is damaged: {e}; trying the one saved before it', stacklevel=2)
    return None


def _join_group(learn: Learner) -> bool:
    """Join the process group now, as the fit's `DDPCB` would (its backend and timeout, for the device `DeviceCB` puts
    the model on), so that the ranks can share the choice before anything is loaded. False without a DDPCB."""
    if is_dist(): return True
    ddp = getattr(learn, 'ddp', None)
    if not isinstance(ddp, DDPCB) or world_size() <= 1: return False
    placer = getattr(learn, 'device', None)
    dev = placer.device if isinstance(placer, DeviceCB) else resolve_device()
    return init_distributed(ddp.timeout, ddp.backend or default_backend(dev))


def choose_together(learn: Learner, paths: Iterable[str | os.PathLike], fallbacks: Iterable[str | os.PathLike] = ()) -> Path | None:
    "`newest_checkpoint(paths, fallbacks)` as the main process sees it, on every rank (a collective)."
    if not _join_group(learn): return newest_checkpoint(paths, fallbacks)
    choice = [None]
    if is_main_process():
        found = newest_checkpoint(paths, fallbacks)
        choice = [None if found is None else str(found)]
    dist.broadcast_object_list(choice, src=0, group=cpu_group())  # pyright: ignore[reportArgumentType]
    path = None if choice[0] is None else Path(choice[0])
    seen = path is None or path.is_file()
    if not all_agree(seen):
        where = 'this rank' if not seen else 'another rank'
        raise CheckpointError(f'rank {rank()}: rank 0 chose {path} to resume from, but {where} cannot see it: the run '
                              f'folder must be shared by every node (and give every node the same --out)')
    return path


class AutoResumeCB(ResumeCB):
    """Added by `fit(n, resume='auto')`: go on from the newest complete checkpoint of the run (see this module's
    docstring), or start fresh when there is none. Says which on the main process."""
    def __init__(self) -> None: super().__init__(None)

    def before_fit(self, learn: Learner) -> None:
        paths, fallbacks = run_checkpoints(learn)
        if not paths:
            raise ValueError("fit(resume='auto') looks for the run's checkpoints where its InterruptCB and SaveModelCB "
                             "write them, but this fit has neither: add them, or give resume a checkpoint's path")
        self.path = choose_together(learn, paths, fallbacks)
        if is_main_process():
            folders = ', '.join(sorted({str(p.parent) for p in paths}))
            print(f'miniai: resuming from {self.path}' if self.path is not None else
                  f'miniai: no checkpoint to resume from in {folders}: starting fresh', flush=True)
        if self.path is not None: super().before_fit(learn)


@learner_method
def resume_cb(self: Learner, resume: str | os.PathLike) -> ResumeCB:
    "The callback that `fit(resume=...)` adds: `AutoResumeCB` for 'auto', else a `ResumeCB` of that path."
    return AutoResumeCB() if isinstance(resume, str) and resume == 'auto' else ResumeCB(resume)
