"""State, and looking without changing it: the random generators (`set_seed`, `rng_state`), a data loader's order as a
checkpoint keeps it, a model's weights under its unwrapped names (the one place that knows DDP's and torch.compile's
wrappers), `unchanged` (snapshot and restore), and the one protocol by which callbacks keep state in checkpoints
(`state_dict`/`load_state_dict`, collected by `callback_states`)."""
from __future__ import annotations

import inspect
import os
import random
import re
import warnings
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from copy import deepcopy
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

if TYPE_CHECKING:
    from .learner import Learner

__all__ = ['CheckpointError', 'set_seed', 'rng_state', 'set_rng_state', 'unwrap_model', 'plain_keys',
           'plain_state_dict', 'plain_saved_keys', 'keeps_state', 'loader_generator', 'note_epoch_start',
           'loader_state', 'set_loader_state', 'unchanged', 'looking', 'match_state_layout', 'stateful_callbacks',
           'callback_states', 'load_callback_states']


class CheckpointError(ValueError):
    "A checkpoint that cannot be used: unreadable, tampered with, or made for another model or run."


def set_seed(seed: int, deterministic: bool = False) -> None:
    "Seed Python's, NumPy's and torch's random generators; `deterministic` also asks torch for deterministic kernels."
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def rng_state() -> dict:
    """The states of Python's, NumPy's and torch's random generators: the CPU's and, once CUDA is in use, every CUDA
    device's (with `cuda_device`, the device this process draws from)."""
    res = {'python': random.getstate(), 'numpy': np.random.get_state(), 'torch': torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        res['cuda'], res['cuda_device'] = torch.cuda.get_rng_state_all(), torch.cuda.current_device()
    return res


def set_rng_state(state: dict) -> None:
    """Restore generator states taken by `rng_state` (lists where it had tuples are fine: that is how JSON keeps
    them). CUDA states go back to the devices present; the one this process drew from also goes to this process's
    device, so a run saved by rank 0 of a multi-GPU job continues its stream on cuda:LOCAL_RANK of any rank."""
    py = state['python']
    random.setstate((py[0], tuple(py[1]), py[2]))
    np.random.set_state(tuple(state['numpy']))
    torch.set_rng_state(state['torch'])
    if state.get('cuda') is not None and torch.cuda.is_available():
        _set_cuda_rng(state['cuda'], state.get('cuda_device'))


def _set_cuda_rng(states: list, saved_from: int | None) -> None:
    for i, st in enumerate(states[:torch.cuda.device_count()]): torch.cuda.set_rng_state(st, i)
    here = torch.cuda.current_device()
    if saved_from is not None and saved_from < len(states) and here != saved_from:
        torch.cuda.set_rng_state(states[saved_from], here)


_WRAPPERS = (nn.DataParallel, nn.parallel.DistributedDataParallel)


def _inner_name(m: nn.Module) -> str | None:
    "The attribute under which `m` holds the module it wraps, if it is a DDP, DataParallel or torch.compile wrapper."
    if isinstance(m, _WRAPPERS): return 'module'
    return '_orig_mod' if '_orig_mod' in m._modules else None  # torch.compile's OptimizedModule


def unwrap_model(model: nn.Module) -> nn.Module:
    "The model inside DDP, DataParallel and torch.compile wrappers (itself when it is not wrapped)."
    while (inner := _inner_name(model)) is not None: model = getattr(model, inner)
    return model


def _wrapper_paths(model: nn.Module) -> list[tuple[str, str]]:
    "(where a wrapper sits, what it wraps) for each wrapper anywhere in `model`, innermost first."
    res = [(f'{name}.' if name else '', f'{inner}.') for name, m in model.named_modules(remove_duplicate=False)
           if (inner := _inner_name(m)) is not None]
    return sorted(res, key=lambda t: -len(t[0]))


def plain_keys(model: nn.Module) -> dict[str, str]:
    "For each key of `model.state_dict()`, the key the model has unwrapped: without `module.`/`_orig_mod.` parts."
    wrappers, res = _wrapper_paths(model), {}
    for k in model.state_dict():
        plain = k
        for where, inner in wrappers:
            if plain.startswith(where + inner): plain = where + plain[len(where + inner):]
        res[k] = plain
    return res


def plain_state_dict(model: nn.Module) -> dict:
    "`model.state_dict()` under the unwrapped model's names, the same whether it is plain, compiled or in DDP."
    keys = plain_keys(model)
    return {keys[k]: v for k, v in model.state_dict().items()}


def plain_saved_keys(sd: dict, want: set) -> dict:
    """Weights saved under a wrapped model's names (files written before names were unwrapped), under the plain names
    `want`: torch.compile's `_orig_mod.` parts dropped, then a leading `module.` (DDP's). Returned as given when that
    does not give `want`."""
    if set(sd) == want: return sd
    sd2 = {re.sub(r'(^|\.)_orig_mod\.', r'\1', k): v for k, v in sd.items()}
    consume_prefix_in_state_dict_if_present(sd2, 'module.')
    return sd2 if set(sd2) == want else sd


def keeps_state(obj: object) -> bool:
    """Whether `obj` (an optimizer, a scheduler, a data loader) has a state to save and load back. Hugging Face
    Accelerate's prepared loaders have `state_dict`/`load_state_dict` whatever they wrap, but they work only when the
    loader inside has them too (not over torch's `DataLoader`, whose state is its sampler's)."""
    if not (hasattr(obj, 'state_dict') and hasattr(obj, 'load_state_dict')): return False
    inner = getattr(obj, 'base_dataloader', None)
    return inner is None or hasattr(inner, 'state_dict')


def loader_generator(dl: Any) -> torch.Generator | None:
    "The `torch.Generator` a torch DataLoader shuffles with (`DataLoader(..., generator=g)`), where it has its own."
    g = None if keeps_state(dl) else getattr(dl, 'generator', None)  # a loader with a state keeps its order itself
    return g if isinstance(g, torch.Generator) else None


_EPOCH_START = weakref.WeakKeyDictionary()  # loader -> its generator's state as the current epoch started


def note_epoch_start(dl: Any) -> None:
    """Remember the state of `dl`'s generator as an epoch starts (before its order is drawn), so that a checkpoint
    taken part-way through the epoch can run the same order again (InterruptCB calls it)."""
    g = loader_generator(dl)
    if g is not None: _EPOCH_START[dl] = g.get_state()


def loader_state(dl: Any) -> dict | None:
    """What a checkpoint keeps of a training loader to give it back its order: its own `state_dict()` where it has one
    (miniai's TensorDataLoader), else the states of the generator a torch DataLoader shuffles with, now and at the
    start of this epoch (`note_epoch_start`); None where the order comes from the global RNG (kept with the RNGs)."""
    if keeps_state(dl): return dl.state_dict()
    g = loader_generator(dl)
    return None if g is None else {'torch_generator': g.get_state(), 'epoch_generator': _EPOCH_START.get(dl)}


def set_loader_state(dl: Any, state: dict | None, repeat_epoch: bool = False) -> bool:
    """Give `dl` the order kept in `state` (from `loader_state`): the coming epochs', or with `repeat_epoch` that of
    the epoch under way when it was taken, to run it again. Returns whether it could."""
    if state is None: return False
    if 'torch_generator' in state:
        g, st = loader_generator(dl), state.get('epoch_generator' if repeat_epoch else 'torch_generator')
        if g is None or st is None: return False
        g.set_state(st)
        return True
    if not keeps_state(dl): return False
    if not repeat_epoch: dl.load_state_dict(state)
    elif 'repeat_epoch' in inspect.signature(dl.load_state_dict).parameters:
        dl.load_state_dict(state, repeat_epoch=True)
    else: return False
    return True


@contextmanager
def unchanged(model: nn.Module, *others: Any) -> Iterator[None]:
    """Run the body, then put back `model`'s parameters, gradients, buffers and train/eval modes, the RNGs, and the
    state of each of `others` that has `state_dict`/`load_state_dict` (optimizers, schedulers, data loaders) and the
    generator of each torch DataLoader among them that has its own.

    Parameters and buffers are restored in place (the same tensor objects), so optimizers and hooks that hold
    them keep working. Restoring happens whether the body returns or raises."""
    tensors = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    modes = {m: m.training for m in model.modules()}
    grads = {p: (None if p.grad is None else p.grad.detach().clone()) for p in model.parameters()}
    gens = [g for g in map(loader_generator, others) if g is not None]
    gen_states = [g.get_state() for g in gens]
    others = [o for o in others if keeps_state(o)]  # pyright: ignore[reportAssignmentType]
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
        for g, st in zip(gens, gen_states): g.set_state(st)
        set_rng_state(rngs)


@contextmanager
def looking(learn: Learner, quiet: bool = True) -> Iterator[Learner]:
    """Inside, run probes (`lr_find`, `capture_preds`, ...) through `fit`; afterwards the model, its optimizer (the
    same object, same state), the data order and the RNGs are as they were. `quiet` sets aside meanwhile the
    callbacks marked `skip_in_probes` (metrics, progress, schedulers, checkpoints, loggers), which would treat the
    probe as training."""
    had_opt, old_opt = 'opt' in learn.__dict__, learn.__dict__.get('opt')
    dls = [getattr(learn.dls, a, None) for a in ('train', 'valid')]
    hidden = [c for c in learn.cbs if getattr(c, 'skip_in_probes', False)] if quiet else []
    for c in hidden: learn.cbs.remove(c)
    try:
        with unchanged(learn.model, old_opt, *dls): yield learn
    finally:
        learn.cbs += hidden
        if had_opt: learn.opt = old_opt
        else: learn.__dict__.pop('opt', None)


@torch.no_grad()
def match_state_layout(opt: torch.optim.Optimizer) -> None:
    """Give each optimizer state tensor shaped like its parameter the parameter's memory layout (strides).
    Loaded states are contiguous, and a model turned channels-last after its optimizer state was made has NHWC
    weights: a fused AdamW reads both as flat memory, so mismatched layouts would pair the wrong elements."""
    for group in opt.param_groups:
        for p in group['params']:
            st = opt.state.get(p)
            for k, v in (st or {}).items():
                if isinstance(v, torch.Tensor) and v.shape == p.shape and v.stride() != p.stride():
                    st[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)


# -- callbacks' own state in checkpoints ---------------------------------------------------------------------------
def stateful_callbacks(cbs: Iterable) -> dict:
    """The callbacks that keep state (a `state_dict` and a `load_state_dict` method), by class name (numbered `.1`,
    `.2`... when a class is there more than once), in the order given."""
    own = [cb for cb in cbs if callable(getattr(cb, 'state_dict', None))
           and callable(getattr(cb, 'load_state_dict', None))]
    names = [type(cb).__name__ for cb in own]
    return {(n if names.count(n) == 1 else f'{n}.{names[:i].count(n)}'): cb
            for i, (n, cb) in enumerate(zip(names, own))}


def callback_states(cbs: Iterable) -> tuple[dict, list, list]:
    """Each stateful callback's `state_dict()` by name (None where it has nothing to keep yet); the names of those the
    training itself goes on from (`resume_needs_state`), and of those it cannot go on without (`'required'`)."""
    found = stateful_callbacks(cbs)
    needs = {k: getattr(cb, 'resume_needs_state', False) for k, cb in found.items()}
    return ({k: cb.state_dict() for k, cb in found.items()}, [k for k, v in needs.items() if v],
            [k for k, v in needs.items() if v == 'required'])


def load_callback_states(cbs: Iterable, states: dict | None, where: str | os.PathLike, needed: Iterable[str] | None = (),
                         required: Iterable[str] | None = ()) -> None:
    """Hand each callback of `cbs` its saved state (`load_state_dict`; each applies it when it next starts a fit).
    A saved state the training goes on from (`needed`) that no callback of `cbs` takes, or a callback of `cbs` that
    needs one (`resume_needs_state`) and finds none in `where` (the run was saved without it), is warned of: the run
    does not go on exactly. Where the state is `required` (a schedule cannot go on from nothing, nor be dropped
    part-way), it is a `CheckpointError` instead, raised before anything is loaded."""
    found, states = stateful_callbacks(cbs), states or {}
    lost = [k for k in needed or () if k not in found and states.get(k)]
    missing = [k for k, cb in found.items() if k not in states and getattr(cb, 'resume_needs_state', False)]
    fatal = [k for k in lost if k in (required or ())] + \
            [k for k in missing if getattr(found[k], 'resume_needs_state', False) == 'required']
    if fatal:
        raise CheckpointError(f'{where} and this fit differ in {", ".join(k.split(".")[0] for k in fatal)}, whose '
                              f'state the run cannot go on without: resume with the callbacks the run had, or start a '
                              f'new run')
    for k in lost:
        warnings.warn(f'{where} holds the state of a {k.split(".")[0]}, which this fit does not have: it is not used '
                      f'(add the same callback to go on exactly)')
    for k in missing:
        warnings.warn(f'{where} was saved by a run without this fit\'s {k.split(".")[0]}: it starts afresh, so the '
                      f'run does not go on exactly as it would have')
    for k, cb in found.items():
        if states.get(k) is not None: cb.load_state_dict(states[k])
