"""Taking a look without changing anything: snapshot and restore of a model's (and optimizer's) state and RNGs."""
from __future__ import annotations

import random
from contextlib import contextmanager
from copy import deepcopy

import numpy as np
import torch
from torch import nn

__all__ = ['rng_state', 'set_rng_state', 'unchanged']


def rng_state() -> dict:
    "The states of Python's, NumPy's and torch's (CPU and every CUDA device's) random generators."
    res = {'python': random.getstate(), 'numpy': np.random.get_state(), 'torch': torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized(): res['cuda'] = torch.cuda.get_rng_state_all()
    return res


def set_rng_state(state: dict) -> None:
    "Restore generator states taken by `rng_state`."
    random.setstate(state['python'])
    np.random.set_state(state['numpy'])
    torch.set_rng_state(state['torch'])
    if 'cuda' in state: torch.cuda.set_rng_state_all(state['cuda'])


@contextmanager
def unchanged(model: nn.Module, *others):
    """Run the body, then put back `model`'s parameters, gradients, buffers and train/eval modes, the RNGs, and the
    state of each of `others` that has `state_dict`/`load_state_dict` (optimizers, schedulers, data loaders).

    Parameters and buffers are restored in place (the same tensor objects), so optimizers and hooks that hold
    them keep working. Restoring happens whether the body returns or raises."""
    tensors = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    modes = {m: m.training for m in model.modules()}
    grads = {p: (None if p.grad is None else p.grad.detach().clone()) for p in model.parameters()}
    others = [o for o in others if hasattr(o, 'state_dict') and hasattr(o, 'load_state_dict')]
    states = [deepcopy(o.state_dict()) for o in others]
    rngs = rng_state()
    try: yield
    finally:
        with torch.no_grad():
            for k, v in model.state_dict(keep_vars=True).items():
                if k in tensors: v.copy_(tensors[k])
            for p, g in grads.items(): p.grad = g
        for m, mode in modes.items(): m.training = mode
        for o, st in zip(others, states): o.load_state_dict(st)
        set_rng_state(rngs)
