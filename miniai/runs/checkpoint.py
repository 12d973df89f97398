"""Checkpoints that resume exactly and load safely (the file itself: `miniai.runs.ckptfile`).

A checkpoint holds the model's weights and buffers, the optimizer's state, the epoch, the RNG states (Python, NumPy,
torch's CPU and CUDA generators), the training data's order and the state of every callback that keeps one
(`state_dict`/`load_state_dict`: schedulers, the fp16 loss scaler, weight averages, the best value so far...), so
`fit(n, resume=path)` continues a run as if it had never stopped. Weights are stored under the plain
model's names, whatever wraps it (DDP's `module.`, torch.compile's `_orig_mod.`), and load into the model however
it is wrapped then. Loading never unpickles anything: tensors come from safetensors, everything else from JSON.
Files are written to a temporary name and renamed, so a crash while saving leaves the previous checkpoint intact.
"""
from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Any

from ..callbacks.metrics import improved, monitor_mode, monitor_value
from ..callbacks.schedule import BaseSchedCB
from ..core.events import Callback, CancelBatchException, CancelEpochException
from ..core.freezing import freeze_to, frozen_groups, unfreeze
from ..core.learner import Learner, learner_method
from ..core.ranks import is_main_process, world_size
from ..core.state import (callback_states, load_callback_states, loader_state, match_state_layout, plain_keys,
                          plain_saved_keys, plain_state_dict, rng_state, set_loader_state, set_rng_state,
                          stateful_callbacks)
from ..engines.cluster import save_together, this_rank
from ..engines.precision import MixedPrecision
from .ckptfile import CheckpointError, read_checkpoint, write_checkpoint

__all__ = ['CheckpointError', 'save_checkpoint', 'read_checkpoint', 'rng_snapshot', 'save_mid_epoch', 'load_into',
           'ResumeCB', 'SaveModelCB']


def rng_snapshot() -> dict:
    "The random generators' states as a checkpoint holds them: taken now, to be saved later (see `save_mid_epoch`)."
    return rng_state()  # tuples, an ndarray and byte tensors: all kept by the file format as JSON and safetensors


def save_checkpoint(learn: Learner, path: str | os.PathLike, **extra: Any) -> Path:
    "Write everything needed to resume `learn` exactly to `path` (atomically); returns the path."
    path, (cb_states, cbs_needed, cbs_required) = Path(path), callback_states(learn.cbs)
    state = {'model': plain_state_dict(learn.model), 'epoch': getattr(learn, 'epoch', None),
             'opt': learn.opt.state_dict() if 'opt' in learn.__dict__ else None, 'rng': rng_snapshot(),
             'data': loader_state(getattr(learn.dls, 'train', None)), 'callbacks': cb_states,
             'callbacks_needed': cbs_needed, 'callbacks_required': cbs_required, 'world_size': world_size(),
             'frozen_to': frozen_groups(learn), 'saved_at': time.time(), **extra}
    write_checkpoint(state, path)
    return path


def mid_epoch_position(learn: Learner) -> dict:
    "Where `learn` is at the end of its current batch: epoch, phase, training batches in the epoch and done."
    n = len(learn.dls.train)
    return {'epoch': learn.epoch, 'phase': 'train' if learn.training else 'valid', 'n_batches': n,
            'batch': learn.iter + 1 if learn.training else n}


def save_mid_epoch(learn: Learner, path: str | os.PathLike, rng: dict | None = None) -> Path:
    """Save `learn` part-way through epoch `learn.epoch`, at the end of batch `learn.iter`, so that `fit(n,
    resume=path)` goes on with the next batch (during validation: with the whole validation, after the epoch's
    training); `rng`: generator states taken earlier (`rng_snapshot`) to store instead of the current ones. Called on
    every rank at once (see `save_together`)."""
    e = learn.epoch
    extra = {'position': mid_epoch_position(learn), 'epoch': e - 1 if e else None}  # 'epoch': the last one finished
    return save_together(learn, path, rng, **extra)


def _resume_mid_epoch(learn: Learner, ck: dict) -> tuple[int, int]:
    """Set `learn` to go on inside the epoch that the checkpoint `ck` was saved in (by `save_mid_epoch`): that epoch
    comes first; returns (that epoch, training batches already done). A stop after the last training batch but before
    the epoch's end skips all of them and still runs `after_epoch`. The data is placed later (`_place_data`)."""
    pos = ck['position']
    learn.epochs = range(pos['epoch'], learn.n_epochs)
    return pos['epoch'], pos['batch']


def _place_data(learn: Learner, ck: dict, path) -> None:
    """Check the training loader against the checkpoint `ck` and give it the saved order. Done at the first training
    `before_epoch`, when every `before_fit` has run: DDPCB shards the loaders in its own, and the file counts the
    batches of one rank's shard."""
    pos, dl, state = ck.get('position'), learn.dls.train, ck.get('data')
    if pos is None:  # saved at an epoch's end: the next epoch's order comes next
        set_loader_state(dl, state)
        return
    if hasattr(dl, '__len__') and len(dl) != pos['n_batches']:
        raise CheckpointError(f'{path} was saved with {pos["n_batches"]} training batches an epoch, this fit has '
                              f'{len(dl)}: resume with the same data and batch size')
    finished = pos['phase'] == 'valid'  # its training, end included, was done: the next epoch's order comes next
    if not set_loader_state(dl, state, repeat_epoch=not finished) and not finished:
        warnings.warn(f'{path}: {type(dl).__name__} cannot repeat the order of epoch {pos["epoch"]}, which stopped '
                      f'after {pos["batch"]} batches; the first {pos["batch"]} it gives are skipped, so the run goes '
                      f'on as the stopped one would only if its order does not change from epoch to epoch')


def _check_model(model, sd: dict, path) -> None:
    "Raise unless `sd` fits `model` exactly: every key present, none extra, every shape and dtype equal."
    own = plain_state_dict(model)
    missing, extra = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    shapes = [f'{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}' for k, v in own.items()
              if k in sd and sd[k].shape != v.shape]
    if missing or extra or shapes:
        parts = [f'missing keys {missing[:10]}' if missing else '', f'unexpected keys {extra[:10]}' if extra else '',
                 f'different shapes: {"; ".join(shapes[:10])}' if shapes else '']
        raise CheckpointError(f'{path} was made for another model: ' + ', '.join(p for p in parts if p))


def load_into(learn: Learner, path: str | os.PathLike, with_opt: bool = True) -> dict:
    "Check the checkpoint at `path` against `learn`, then load weights (and optimizer state); returns its contents."
    ck = read_checkpoint(path)
    keys = {plain: k for k, plain in plain_keys(learn.model).items()}  # unwrapped name -> this model's name
    ck['model'] = plain_saved_keys(ck['model'], set(keys))
    _check_model(learn.model, ck['model'], path)  # everything is checked before anything is copied
    learn.model.load_state_dict({keys[k]: v for k, v in ck['model'].items()})
    if with_opt: _load_opt(learn, ck.get('opt'), path)
    return ck


def _load_opt(learn: Learner, sd: dict | None, path) -> None:
    "Load the optimizer state `sd` into `learn.opt`: onto each parameter's device and dtype, in its memory layout."
    if sd is None or 'opt' not in learn.__dict__: return
    try: learn.opt.load_state_dict(sd)
    except (ValueError, KeyError) as e: raise CheckpointError(f'{path}: optimizer state does not fit: {e}') from e
    match_state_layout(learn.opt)


@learner_method
def save(self: Learner, path: str | os.PathLike, **extra: Any) -> Path:
    "Save this Learner's full training state to `path` (see `save_checkpoint`); only the main process writes."
    return save_checkpoint(self, path, **extra) if is_main_process() else Path(path)


@learner_method
def load(self: Learner, path: str | os.PathLike, with_opt: bool = True) -> Learner:
    "Load weights (and, with `with_opt`, the optimizer's state) from a checkpoint, after checking it fits."
    load_into(self, path, with_opt)
    return self


def _upgrade(ck: dict, cbs) -> dict:
    """A checkpoint from before every callback kept its state through `state_dict` (files of miniai 0.1 written
    before the one-house layout): its schedulers' and loss scalers' states, kept in lists in the order of the fit's
    callbacks, become states by callback name, as the file would hold them now."""
    if 'scheds' not in ck and 'amp' not in ck: return ck
    states, needed, required = dict(ck.get('callbacks') or {}), list(ck.get('callbacks_needed') or []), []
    names = {id(cb): k for k, cb in stateful_callbacks(cbs).items()}
    for key, kind in (('scheds', BaseSchedCB), ('amp', MixedPrecision)):
        own, saved = [names[id(cb)] for cb in cbs if isinstance(cb, kind)], list(ck.get(key) or [])
        saved += [None] * (len(own) - len(saved))  # this fit has more: they find no state (warned of, or refused)
        for i, st in enumerate(saved):
            k = own[i] if i < len(own) else f'{kind.__name__}.{i}'  # more than this fit has: a state with no taker
            if st: states[k] = st
            if st: needed.append(k)
            if key == 'scheds': required.append(k)
    return {**ck, 'callbacks': states, 'callbacks_needed': needed, 'callbacks_required': required}


class ResumeCB(Callback):
    """Added by `fit(..., resume=path)`: restore the saved state (the callbacks' own through their `load_state_dict`,
    which each applies as it starts the fit) and go on from where it was saved: from the next epoch
    for a checkpoint saved at the end of one (`SaveModelCB`), from the next batch for one saved part-way through an
    epoch (`InterruptCB`). The batches done before the stop are skipped, so the metrics reported for that epoch cover
    only the batches run after resuming (none of its training batches if it stopped during validation)."""
    order = -10  # before ProgressCB wraps the epochs in a bar

    def __init__(self, path: str | os.PathLike | None) -> None: self.path, self._pending, self._mid, self._data = path, False, None, None

    def before_fit(self, learn: Learner) -> None:
        # The optimizer's state is loaded at the first before_epoch, once every before_fit has run: `load_state_dict`
        # puts it on the parameters' device and dtype as they are then, so a model that DeviceCB (or any callback)
        # moves after this one finds its state beside it; and it comes after the schedulers were built (building one
        # resets the learning rate). The training data is checked and given its order then too, once DDPCB has
        # sharded it.
        ck = _upgrade(this_rank(load_into(learn, self.path, with_opt=False), self.path), learn.cbs)  # pyright: ignore[reportArgumentType]  (AutoResumeCB sets the path first)
        self._opt = ck.get('opt')
        self._data = {k: ck.get(k) for k in ('position', 'data')}  # placed at the first training before_epoch
        if ck.get('position') is not None:
            self._mid = (*_resume_mid_epoch(learn, ck), ck['position']['phase'])
        else:
            done = -1 if ck['epoch'] is None else ck['epoch']
            if done + 1 >= learn.n_epochs > 0:
                raise CheckpointError(f'{self.path} was saved after epoch {done + 1} of a {learn.n_epochs}-epoch fit: '
                                      f'that run is complete, nothing is left to resume (its weights are in the file: '
                                      f'learn.load it, or start a new run to train more)')
            learn.epochs = range(done + 1, learn.n_epochs)
        if ck.get('frozen_to'): freeze_to(learn, ck['frozen_to'])  # the run trained these groups, and only these
        elif 'frozen_to' in ck and frozen_groups(learn): unfreeze(learn)
        set_rng_state(ck['rng'])
        load_callback_states(learn.cbs, ck.get('callbacks'), self.path, ck.get('callbacks_needed'),  # pyright: ignore[reportArgumentType]
                             ck.get('callbacks_required'))
        self._pending = True

    def before_epoch(self, learn: Learner) -> None:
        if self._pending:
            self._pending = False
            _load_opt(learn, self._opt, self.path)
        if self._data is not None and learn.training:
            data, self._data = self._data, None
            _place_data(learn, data, self.path)
        mid = self._mid
        if mid is not None and learn.training and learn.epoch == mid[0] and mid[2] == 'valid':
            self._mid = None
            raise CancelEpochException()  # its training was over when it stopped: only its validation is left

    def before_batch(self, learn: Learner) -> None:
        mid = self._mid
        if mid is None or not learn.training or learn.epoch != mid[0]: return
        if learn.iter < mid[1]: raise CancelBatchException()  # done before the stop
        self._mid = None


class SaveModelCB(Callback):
    """After each epoch, write `dir/last.ckpt` (with `every_epoch`) and `dir/best.ckpt` when `monitor` improves
    (lower for names with 'loss' in them, higher otherwise, unless `mode` says). Only the main process writes; the
    other ranks wait for it."""
    skip_in_probes = True
    order = 20  # after MetricsCB has logged the epoch

    def __init__(self, dir: str | os.PathLike = 'checkpoints', monitor: str = 'valid loss', mode: str | None = None,
                 every_epoch: bool = False, save_best: bool = True) -> None:
        self.dir, self.monitor, self.every_epoch, self.save_best = Path(dir), monitor, every_epoch, save_best
        self.mode, self.best = monitor_mode(monitor, mode), None

    def after_epoch(self, learn: Learner) -> None:
        if learn.training and learn.phases[1]: return  # decide once the epoch's validation is in
        v = monitor_value(learn, self.monitor) if self.save_best else None
        better = v is not None and improved(v, self.best, self.mode)
        if better: self.best = v  # before saving last.ckpt, so that a run resumed from it knows this epoch's value
        if self.every_epoch: save_together(learn, self.dir / 'last.ckpt')
        if better: save_together(learn, self.dir / 'best.ckpt', best={'monitor': self.monitor, 'value': v})

    def state_dict(self) -> dict:
        "The best value so far: a resumed run overwrites best.ckpt only when it beats the run before the stop."
        return {'monitor': self.monitor, 'best': self.best}

    def load_state_dict(self, state: dict) -> None:
        if state.get('monitor') == self.monitor: self.best = state.get('best')

    def checkpoint_paths(self) -> tuple[list[Path], list[Path]]:
        "What a run can go on from (`fit(resume='auto')`): last.ckpt, and best.ckpt (an earlier state) as a fallback."
        return [self.dir / 'last.ckpt'], [self.dir / 'best.ckpt']
