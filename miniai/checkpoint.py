"""Checkpoints that resume exactly and load safely (the file itself: `miniai.ckptfile`).

A checkpoint holds the model's weights and buffers, the optimizer's and schedulers' state, the epoch, the RNG
states (Python, NumPy, torch's CPU and CUDA generators), the fp16 loss scaler's state and the training data's
order, so `fit(n, resume=path)` continues a run as if it had never stopped. Weights are stored under the plain
model's names, whatever wraps it (DDP's `module.`, torch.compile's `_orig_mod.`), and load into the model however
it is wrapped then. Loading never unpickles anything: tensors come from safetensors, everything else from JSON.
Files are written to a temporary name and renamed, so a crash while saving leaves the previous checkpoint intact.
"""
from __future__ import annotations

import re
import time
import warnings
from pathlib import Path

from .accel import MixedPrecision
from .callback import Callback, CancelBatchException, CancelEpochException, callback_states, load_callback_states
from .ckptfile import CheckpointError, read_checkpoint, write_checkpoint
from .cluster import save_together, this_rank
from .ranks import is_main_process, world_size
from .learner import Learner
from .sgd import BaseSchedCB
from .state import (loader_state, match_state_layout, plain_keys, plain_state_dict, rng_state, set_loader_state,
                    set_rng_state)

__all__ = ['CheckpointError', 'save_checkpoint', 'read_checkpoint', 'rng_snapshot', 'save_mid_epoch', 'ResumeCB',
           'SaveModelCB', 'monitor_value']

def _rng() -> dict:
    return rng_state()  # tuples, an ndarray and byte tensors: all kept by the file format as JSON and safetensors


def _unwrapped_saved(sd: dict, want: set) -> dict:
    "Weights from a file written before names were unwrapped: drop `_orig_mod.` parts, then a leading `module.`."
    if set(sd) == want: return sd
    sd2 = {re.sub(r'(^|\.)_orig_mod\.', r'\1', k): v for k, v in sd.items()}
    if set(sd2) != want and all(k.startswith('module.') for k in sd2): sd2 = {k[7:]: v for k, v in sd2.items()}
    return sd2 if set(sd2) == want else sd


def _amp_states(learn) -> list:
    return [cb.state_dict() for cb in learn.cbs if isinstance(cb, MixedPrecision)]


def _load_amp_states(learn, states, path) -> None:
    "Give each MixedPrecision its saved loss-scaler state (it applies it when it makes its scaler)."
    mps = [cb for cb in learn.cbs if isinstance(cb, MixedPrecision)]
    for cb, st in zip(mps, states or []): cb.load_state_dict(st)
    if any(st for st in (states or [])[len(mps):]):
        warnings.warn(f'{path} holds an fp16 loss scaler state, but this fit has no MixedPrecision to take it: the '
                      f'resumed run will not be exact')


def rng_snapshot() -> dict:
    "The random generators' states as a checkpoint holds them: taken now, to be saved later (see `save_mid_epoch`)."
    return _rng()


def _sched_cbs(learn) -> list:
    return [cb for cb in learn.cbs if isinstance(cb, BaseSchedCB) and hasattr(cb, 'schedo')]


def save_checkpoint(learn: Learner, path, **extra) -> Path:
    "Write everything needed to resume `learn` exactly to `path` (atomically); returns the path."
    path, (cb_states, cbs_needed) = Path(path), callback_states(learn.cbs)
    state = {'model': plain_state_dict(learn.model), 'epoch': getattr(learn, 'epoch', None),
             'opt': learn.opt.state_dict() if 'opt' in learn.__dict__ else None,
             'scheds': [cb.schedo.state_dict() for cb in _sched_cbs(learn)], 'rng': _rng(),
             'data': loader_state(getattr(learn.dls, 'train', None)),
             'history': getattr(getattr(learn, 'metrics', None), 'history', None), 'amp': _amp_states(learn),
             'callbacks': cb_states, 'callbacks_needed': cbs_needed, 'world_size': world_size(),
             'saved_at': time.time(), **extra}
    write_checkpoint(state, path)
    return path


def mid_epoch_position(learn: Learner) -> dict:
    "Where `learn` is at the end of its current batch: epoch, phase, training batches in the epoch and done."
    n = len(learn.dls.train)
    return {'epoch': learn.epoch, 'phase': 'train' if learn.training else 'valid', 'n_batches': n,
            'batch': learn.iter + 1 if learn.training else n}


def save_mid_epoch(learn: Learner, path, rng: dict | None = None) -> Path:
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


def load_into(learn: Learner, path, with_opt: bool = True) -> dict:
    "Check the checkpoint at `path` against `learn`, then load weights (and optimizer state); returns its contents."
    ck = read_checkpoint(path)
    keys = {plain: k for k, plain in plain_keys(learn.model).items()}  # unwrapped name -> this model's name
    ck['model'] = _unwrapped_saved(ck['model'], set(keys))
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


def _learn_save(self: Learner, path, **extra) -> Path:
    "Save this Learner's full training state to `path` (see `save_checkpoint`); only the main process writes."
    return save_checkpoint(self, path, **extra) if is_main_process() else Path(path)


def _learn_load(self: Learner, path, with_opt: bool = True) -> Learner:
    "Load weights (and, with `with_opt`, the optimizer's state) from a checkpoint, after checking it fits."
    load_into(self, path, with_opt)
    return self


class ResumeCB(Callback):
    """Added by `fit(..., resume=path)`: restore the saved state and go on from where it was saved: from the next epoch
    for a checkpoint saved at the end of one (`SaveModelCB`), from the next batch for one saved part-way through an
    epoch (`InterruptCB`). The batches done before the stop are skipped, so the metrics reported for that epoch cover
    only the batches run after resuming (none of its training batches if it stopped during validation)."""
    order = -10  # before ProgressCB wraps the epochs in a bar

    def __init__(self, path): self.path, self._pending, self._mid, self._data = path, False, None, None

    def before_fit(self, learn):
        # The optimizer's state is loaded at the first before_epoch, once every before_fit has run: `load_state_dict`
        # puts it on the parameters' device and dtype as they are then, so a model that DeviceCB (or any callback)
        # moves after this one finds its state beside it. Building a scheduler also resets the learning rate. The
        # training data is checked and given its order then too, once DDPCB has sharded it.
        ck = this_rank(load_into(learn, self.path, with_opt=False), self.path)
        self._scheds, self._opt = ck['scheds'], ck.get('opt')
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
        set_rng_state(ck['rng'])
        _load_amp_states(learn, ck.get('amp'), self.path)
        load_callback_states(learn.cbs, ck.get('callbacks'), self.path, ck.get('callbacks_needed'))
        self._pending = True

    def before_epoch(self, learn):
        if self._pending:
            self._pending = False
            self._restore_scheds(learn)
            _load_opt(learn, self._opt, self.path)
        if self._data is not None and learn.training:
            data, self._data = self._data, None
            _place_data(learn, data, self.path)
        mid = self._mid
        if mid is not None and learn.training and learn.epoch == mid[0] and mid[2] == 'valid':
            self._mid = None
            raise CancelEpochException()  # its training was over when it stopped: only its validation is left

    def before_batch(self, learn):
        mid = self._mid
        if mid is None or not learn.training or learn.epoch != mid[0]: return
        if learn.iter < mid[1]: raise CancelBatchException()  # done before the stop
        self._mid = None

    def _restore_scheds(self, learn):
        scheds = _sched_cbs(learn)  # made in their own before_fit, after ours: restore them now
        if len(scheds) != len(self._scheds):
            raise CheckpointError(f'{self.path} holds {len(self._scheds)} scheduler states, this fit has '
                                  f'{len(scheds)} schedulers')
        for cb, st in zip(scheds, self._scheds):
            now, then = cb.schedo.state_dict().get('total_steps'), st.get('total_steps')
            if now != then:
                raise CheckpointError(f'{self.path} was saved by a run scheduled for {then} steps, this fit is '
                                      f'scheduled for {now}: resume with the same epochs and batch size')
            cb.schedo.load_state_dict(st)


def monitor_value(learn: Learner, monitor: str):
    "The latest value of `monitor` ('valid loss', 'train accuracy', or a metric name for validation) from MetricsCB."
    stage, _, name = monitor.partition(' ') if monitor.startswith(('valid ', 'train ')) else ('valid', '', monitor)
    want = 'eval' if stage == 'valid' else 'train'
    metrics = getattr(learn, 'metrics', None)
    if getattr(metrics, 'history', None) is None:
        raise ValueError(f"monitor {monitor!r} needs a MetricsCB among the Learner's callbacks")
    for row in reversed(metrics.rows()):  # this fit's: an earlier fit's values say nothing about this one
        if row['train'] == want:
            if name not in row: raise ValueError(f'monitor {monitor!r}: no metric {name!r}; have {sorted(row)}')
            return row[name]
    return None


class SaveModelCB(Callback):
    """After each epoch, write `dir/last.ckpt` (with `every_epoch`) and `dir/best.ckpt` when `monitor` improves
    (lower for names with 'loss' in them, higher otherwise, unless `mode` says). Only the main process writes; the
    other ranks wait for it."""
    skip_in_probes = True
    order = 20  # after MetricsCB has logged the epoch

    def __init__(self, dir='checkpoints', monitor: str = 'valid loss', mode: str | None = None,
                 every_epoch: bool = False, save_best: bool = True):
        self.dir, self.monitor, self.every_epoch, self.save_best = Path(dir), monitor, every_epoch, save_best
        self.mode = mode or ('min' if 'loss' in monitor else 'max')
        if self.mode not in ('min', 'max'): raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.best = None

    def after_epoch(self, learn):
        if learn.training and learn.phases[1]: return  # decide once the epoch's validation is in
        v = monitor_value(learn, self.monitor) if self.save_best else None
        better = v is not None and (self.best is None or (v < self.best if self.mode == 'min' else v > self.best))
        if better: self.best = v  # before saving last.ckpt, so that a run resumed from it knows this epoch's value
        if self.every_epoch: save_together(learn, self.dir / 'last.ckpt')
        if better: save_together(learn, self.dir / 'best.ckpt', best={'monitor': self.monitor, 'value': v})

    def checkpoint_state(self) -> dict:
        "The best value so far: a resumed run overwrites best.ckpt only when it beats the run before the stop."
        return {'monitor': self.monitor, 'best': self.best}

    def load_checkpoint_state(self, state: dict) -> None:
        if state.get('monitor') == self.monitor: self.best = state.get('best')


Learner.save = _learn_save
Learner.load = _learn_load
Learner._resume_cb = lambda self, path: ResumeCB(path)
