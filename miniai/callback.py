"""Callbacks and the events they handle: the vocabulary the `Learner` loop is written in."""
from __future__ import annotations

import traceback
import warnings
from collections.abc import Mapping
from functools import wraps

import torch

__all__ = ['CancelFitException', 'CancelBatchException', 'CancelEpochException', 'Callback', 'EVENTS', 'STEPS',
           'run_cbs', 'with_cbs', 'misspelt_events', 'note_failure', 'to_cpu', 'callback_states',
           'load_callback_states']


class CancelFitException(Exception): "Raise in a callback to end the fit quietly (`after_fit` is skipped)."
class CancelBatchException(Exception): "Raise in a callback to end the current batch quietly."
class CancelEpochException(Exception): "Raise in a callback to end the current epoch quietly."

_CANCEL = {'fit': CancelFitException, 'epoch': CancelEpochException, 'batch': CancelBatchException}
_QUIET = tuple(_CANCEL.values())
#: the steps of a batch, provided by a Learner subclass or by a callback such as `TrainCB`
STEPS = ('predict', 'get_loss', 'backward', 'step', 'zero_grad')
#: every event a callback may handle
EVENTS = tuple(f'{w}_{s}' for s in ('fit', 'epoch', 'batch') for w in ('before', 'after', 'cleanup')) + (
    'after_predict', 'after_loss', 'after_backward', 'after_step')


class Callback:
    "Base class of callbacks: define methods named after events (see `EVENTS`); lower `order` runs first."
    order = 0
    #: set aside while the Learner is probed (`lr_find`, `capture_preds`, `summary`...): True for callbacks that
    #: report, record, save or schedule, which would otherwise treat the probe as training
    skip_in_probes = False


def sort_cbs(cbs) -> list:
    "Callbacks sorted by their `order` (stable, so equal orders keep their given order)."
    return sorted(cbs, key=lambda cb: getattr(cb, 'order', 0))


def run_cbs(cbs, method_nm: str, learn=None) -> None:
    "Call `method_nm(learn)` on each callback in `cbs` that has it, in `order`."
    for cb in sort_cbs(cbs):
        method = getattr(cb, method_nm, None)
        if method is not None: method(learn)


def misspelt_events(cb) -> list[str]:
    "Public methods of `cb` named like an event (`before_`, `after_`, `cleanup_`) that are not one."
    cls = type(cb)
    return [n for n in dir(cls) if n.startswith(('before_', 'after_', 'cleanup_')) and n not in EVENTS
            and callable(getattr(cls, n, None))]


def _origin(e: BaseException) -> str:
    "Where `e` was raised: the innermost Python function of its traceback, and its file and line."
    tb = e.__traceback__
    if tb is None: return ''
    while tb.tb_next is not None: tb = tb.tb_next
    code = tb.tb_frame.f_code
    return f' (in {getattr(code, "co_qualname", code.co_name)}, {code.co_filename}:{tb.tb_lineno})'


def note_failure(exc: BaseException, failure: BaseException, where: str) -> None:
    """Attach to `exc` (the exception on its way to the caller) that `where` failed with `failure` meanwhile: as a
    note, shown under `exc`'s traceback (Python >= 3.11), else as a warning. `exc` itself is left to go on."""
    lines = [f'while this exception was on its way, {where} also failed: '
             f'{"".join(traceback.format_exception_only(type(failure), failure)).strip()}{_origin(failure)}']
    lines += [f'  {n}' for n in getattr(failure, '__notes__', ())]
    for line in lines:
        if hasattr(exc, 'add_note'): exc.add_note(line)
        else: warnings.warn(line, RuntimeWarning, stacklevel=2)


def _cleanup_under(o, cleanup: str, exc: BaseException) -> None:
    "Run `cleanup` while `exc` is on its way; a failure is attached to `exc` rather than replacing it."
    try: o.callback(cleanup)
    except BaseException as failure:
        # a Cancel* exception is a quiet stop, not an error: it would swallow the note, so the failure goes on instead
        if isinstance(exc, _QUIET): raise
        note_failure(exc, failure, f'`{cleanup}`')


class with_cbs:
    """Decorator: run `before_{nm}`, the function, `after_{nm}`; swallow `Cancel{Nm}Exception`; always `cleanup_{nm}`.
    An exception on its way reaches the caller as the same object even if the cleanup fails too (the failure is
    attached to it, see `note_failure`); a cleanup that fails when nothing else went wrong raises its own error."""
    def __init__(self, nm: str): self.nm = nm

    def __call__(self, f):
        before, after, cleanup, cancel = (f'before_{self.nm}', f'after_{self.nm}', f'cleanup_{self.nm}',
                                          _CANCEL[self.nm])
        @wraps(f)
        def _f(o, *args, **kwargs):
            # not try/finally: an exception raised in a `finally:` replaces the one on its way
            try:
                o.callback(before)
                f(o, *args, **kwargs)
                o.callback(after)
            except cancel: pass
            except BaseException as e:
                _cleanup_under(o, cleanup, e)
                raise
            o.callback(cleanup)
        return _f


def to_cpu(x):
    "Detach and move tensors (also inside dicts, lists, tuples) to the CPU; float16 becomes float32."
    if isinstance(x, Mapping): return {k: to_cpu(v) for k, v in x.items()}
    if isinstance(x, list): return [to_cpu(o) for o in x]
    if isinstance(x, tuple): return tuple(to_cpu(list(x)))
    res = x.detach().cpu()
    return res.float() if res.dtype == torch.float16 else res


# -- callbacks' own state in checkpoints ---------------------------------------------------------------------------
def _stateful(cbs) -> dict:
    "The callbacks that keep state in checkpoints (`checkpoint_state`), by class name (numbered when repeated)."
    own = [cb for cb in cbs if callable(getattr(cb, 'checkpoint_state', None))]
    names = [type(cb).__name__ for cb in own]
    return {(n if names.count(n) == 1 else f'{n}.{names[:i].count(n)}'): cb
            for i, (n, cb) in enumerate(zip(names, own))}


def callback_states(cbs) -> tuple[dict, list]:
    """Each callback's `checkpoint_state()` by name, and the names of those the training itself goes on from
    (`resume_needs_state = True`), for a checkpoint to hold."""
    found = _stateful(cbs)
    return ({k: cb.checkpoint_state() for k, cb in found.items()},
            [k for k, cb in found.items() if getattr(cb, 'resume_needs_state', False)])


def load_callback_states(cbs, states: dict | None, where, needed=()) -> None:
    "Hand each callback its saved state; one the training needs, saved by a callback `cbs` lack, is warned of."
    found = _stateful(cbs)
    for k, st in (states or {}).items():
        if k in found: found[k].load_checkpoint_state(st)
        elif st is not None and k in (needed or ()):
            warnings.warn(f'{where} holds the state of a {k.split(".")[0]}, which this fit does not have: it is not '
                          f'used (add the same callback to go on exactly)')
