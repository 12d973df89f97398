"""Checkpoints that resume exactly and load safely: one safetensors file, its structure as JSON in the header.

A checkpoint holds the model's weights and buffers, the optimizer's and schedulers' state, the epoch, the RNG
states (Python, NumPy, torch) and the training data's order, so `fit(n, resume=path)` continues a run as if it had
never stopped. Loading never unpickles anything: tensors come from safetensors, everything else from JSON. Files
are written to a temporary name and renamed, so a crash while saving leaves the previous checkpoint intact.
"""
from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .callback import Callback
from .ranks import is_main_process
from .learner import Learner
from .sgd import BaseSchedCB
from .state import set_rng_state

__all__ = ['CheckpointError', 'save_checkpoint', 'read_checkpoint', 'ResumeCB', 'SaveModelCB', 'monitor_value']

FORMAT = 'miniai-checkpoint-1'


class CheckpointError(ValueError):
    "A checkpoint that cannot be used: unreadable, tampered with, or made for another model."


def _encode(obj, prefix: str, tensors: dict):
    "JSON-able form of `obj`, its tensors moved into `tensors` under keys starting with `prefix`."
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous().clone()
        return {'__tensor__': prefix}
    if isinstance(obj, np.ndarray): return {'__ndarray__': _encode(torch.from_numpy(obj.copy()), prefix, tensors)}
    if isinstance(obj, dict):
        return {'__dict__': [[k, _encode(v, f'{prefix}.{k}', tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        items = [_encode(v, f'{prefix}.{i}', tensors) for i, v in enumerate(obj)]
        return {'__tuple__': items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, (bool, int, float, str)): return obj
    if isinstance(obj, (np.integer, np.floating)): return obj.item()
    raise TypeError(f'cannot store a {type(obj).__name__} at {prefix!r} in a checkpoint')


def _decode(obj, tensors: dict):
    if isinstance(obj, list): return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict): return obj
    if '__tensor__' in obj:
        key = obj['__tensor__']
        if key not in tensors: raise CheckpointError(f'the header names tensor {key!r}, which the file lacks')
        return tensors[key]
    if '__ndarray__' in obj: return _decode(obj['__ndarray__'], tensors).numpy()
    if '__tuple__' in obj: return tuple(_decode(v, tensors) for v in obj['__tuple__'])
    if '__dict__' in obj: return {k: _decode(v, tensors) for k, v in obj['__dict__']}
    raise CheckpointError(f'unexpected entry in the checkpoint header: {str(obj)[:80]}')


def _atomic_save(tensors: dict, meta: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={'format': FORMAT, 'miniai': json.dumps(meta)})
        with open(tmp, 'rb') as f: os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp): os.remove(tmp)


def _rng() -> dict:
    np_state = np.random.get_state()
    return {'python': list(random.getstate()), 'numpy': list(np_state), 'torch': torch.get_rng_state()}


def _sched_cbs(learn) -> list:
    return [cb for cb in learn.cbs if isinstance(cb, BaseSchedCB) and hasattr(cb, 'schedo')]


def save_checkpoint(learn: Learner, path, **extra) -> Path:
    "Write everything needed to resume `learn` exactly to `path` (atomically); returns the path."
    path = Path(path)
    state = {'model': learn.model.state_dict(), 'epoch': getattr(learn, 'epoch', None),
             'opt': learn.opt.state_dict() if 'opt' in learn.__dict__ else None,
             'scheds': [cb.schedo.state_dict() for cb in _sched_cbs(learn)], 'rng': _rng(),
             'data': learn.dls.train.state_dict() if hasattr(getattr(learn.dls, 'train', None), 'state_dict') else None,
             'history': getattr(getattr(learn, 'metrics', None), 'history', None), **extra}
    tensors = {}
    meta = _encode(state, 'ckpt', tensors)
    _atomic_save(tensors, meta, path)
    return path


def read_checkpoint(path) -> dict:
    "The contents of a checkpoint file, checked; raises `CheckpointError` naming the file and the problem."
    path = Path(path)
    if not path.is_file(): raise CheckpointError(f'no checkpoint at {path}')
    try:
        with safe_open(str(path), framework='pt') as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f'{path} is not a readable miniai checkpoint (safetensors): {e}. It may be '
                              f'truncated, corrupted, or another kind of file (pickles are never loaded).') from e
    if header.get('format') != FORMAT:
        raise CheckpointError(f'{path}: header format is {header.get("format")!r}, expected {FORMAT!r}')
    try: meta = json.loads(header['miniai'])
    except (KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f'{path}: the JSON part of the header is missing or damaged ({e})') from e
    try: return _decode(meta, tensors)
    except CheckpointError as e: raise CheckpointError(f'{path}: {e} (tampered with?)') from None


def _check_model(model, sd: dict, path) -> None:
    "Raise unless `sd` fits `model` exactly: every key present, none extra, every shape and dtype equal."
    own = model.state_dict()
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
    _check_model(learn.model, ck['model'], path)  # everything is checked before anything is copied
    learn.model.load_state_dict(ck['model'])
    if with_opt and ck.get('opt') is not None and 'opt' in learn.__dict__:
        try: learn.opt.load_state_dict(ck['opt'])
        except (ValueError, KeyError) as e: raise CheckpointError(f'{path}: optimizer state does not fit: {e}') from e
    return ck


def _learn_save(self: Learner, path, **extra) -> Path:
    "Save this Learner's full training state to `path` (see `save_checkpoint`); only the main process writes."
    return save_checkpoint(self, path, **extra) if is_main_process() else Path(path)


def _learn_load(self: Learner, path, with_opt: bool = True) -> Learner:
    "Load weights (and, with `with_opt`, the optimizer's state) from a checkpoint, after checking it fits."
    load_into(self, path, with_opt)
    return self


class ResumeCB(Callback):
    "Added by `fit(..., resume=path)`: restore the state saved at the end of an epoch and go on from the next one."
    order = -10  # before ProgressCB wraps the epochs in a bar

    def __init__(self, path): self.path = path

    def before_fit(self, learn):
        ck = load_into(learn, self.path)
        self._scheds, self._opt = ck['scheds'], ck.get('opt')
        done = -1 if ck['epoch'] is None else ck['epoch']
        learn.epochs = range(done + 1, learn.n_epochs)
        if ck.get('data') is not None and hasattr(learn.dls.train, 'load_state_dict'):
            learn.dls.train.load_state_dict(ck['data'])
        r = ck['rng']
        set_rng_state({'python': (r['python'][0], tuple(r['python'][1]), r['python'][2]),
                       'numpy': tuple(r['numpy']), 'torch': r['torch']})
        self._pending = True

    def before_epoch(self, learn):
        if not self._pending: return
        self._pending = False
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
        # building a scheduler resets the optimizer's learning rate and momentum: put the saved ones back
        if scheds and self._opt is not None: learn.opt.load_state_dict(self._opt)


def monitor_value(learn: Learner, monitor: str):
    "The latest value of `monitor` ('valid loss', 'train accuracy', or a metric name for validation) from MetricsCB."
    stage, _, name = monitor.partition(' ') if monitor.startswith(('valid ', 'train ')) else ('valid', '', monitor)
    want = 'eval' if stage == 'valid' else 'train'
    history = getattr(getattr(learn, 'metrics', None), 'history', None)
    if history is None: raise ValueError(f"monitor {monitor!r} needs a MetricsCB among the Learner's callbacks")
    for row in reversed(history):
        if row['train'] == want:
            if name not in row: raise ValueError(f'monitor {monitor!r}: no metric {name!r}; have {sorted(row)}')
            return row[name]
    return None


class SaveModelCB(Callback):
    """After each epoch, write `dir/last.ckpt` (with `every_epoch`) and `dir/best.ckpt` when `monitor` improves
    (lower for names with 'loss' in them, higher otherwise, unless `mode` says). Only the main process writes."""
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
        if self.every_epoch: learn.save(self.dir / 'last.ckpt')
        if not self.save_best: return
        v = monitor_value(learn, self.monitor)
        if v is None: return
        if self.best is None or (v < self.best if self.mode == 'min' else v > self.best):
            self.best = v
            learn.save(self.dir / 'best.ckpt', best={'monitor': self.monitor, 'value': v})


Learner.save = _learn_save
Learner.load = _learn_load
Learner._resume_cb = lambda self, path: ResumeCB(path)
