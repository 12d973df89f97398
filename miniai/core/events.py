"""Callbacks and the events they handle: the vocabulary the `Learner` loop is written in (see `miniai.core.learner`
for the order), and how the loop runs them: `with_cbs` around each stage, failures of cleanups attached to the error
on its way (`note_failure`)."""
from __future__ import annotations

import re
import traceback
import warnings
from collections.abc import Callable, Iterable
from functools import wraps
from typing import Any

#: what callbacks and their helpers are handed: a `miniai.core.learner.Learner`, which imports this module, so it is
#: named here without being imported (an import, even for annotations only, would make the two modules a cycle)
AnyLearner = Any


__all__ = ['CancelFitException', 'CancelBatchException', 'CancelEpochException', 'Callback', 'EVENTS', 'STEPS',
           'callback_name', 'run_cbs', 'sort_cbs', 'with_cbs', 'misspelt_events', 'note_failure']


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
    """Base class of callbacks: define methods named after events (see `EVENTS`); lower `order` runs first. A
    Learner finds its callbacks by `name` too (`learn.progress` is its `ProgressCB`).

    Besides events, a callback may offer what other parts of miniai look up when they need it (never earlier, so the
    order of `before_fit`s does not matter), instead of changing each other's methods:
    - `state_dict()` / `load_state_dict(state)`: its state, kept in checkpoints and handed back on resume;
    - `unscale_grads(learn)`: divide loss-scaled gradients by the scale (`GradClipCB` asks before it clips);
    - `metrics_reducer()`: how `MetricsCB` merges its metrics over processes (`DDPCB`, `AccelerateCB`);
    - `annotate_metrics(row) -> row`: a change to each epoch's metrics row before it is shown (`CompileCB`);
    - `show_metrics(row)`: shows the metrics rows instead of `MetricsCB`'s print (`ProgressCB`);
    - `checkpoint_paths() -> (paths, fallbacks)`: the files it writes that a run can go on from (`fit(resume='auto')`).
    """
    order = 0
    #: set aside while the Learner is probed (`lr_find`, `capture_preds`, `summary`...): True for callbacks that
    #: report, record, save or schedule, which would otherwise treat the probe as training
    skip_in_probes = False

    @property
    def name(self) -> str:
        "The class name in snake case without a trailing 'CB' or 'Callback': `ProgressCB` -> 'progress'."
        return callback_name(type(self).__name__)


def callback_name(cls_name: str) -> str:
    "A callback class's name as a Learner attribute: snake case, a trailing 'CB' or 'Callback' dropped."
    base = re.sub(r'(CB|Callback)$', '', cls_name) or cls_name
    return re.sub(r'(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])', '_', base).lower()


def sort_cbs(cbs: Iterable) -> list:
    "Callbacks sorted by their `order` (stable, so equal orders keep their given order)."
    return sorted(cbs, key=lambda cb: getattr(cb, 'order', 0))


def run_cbs(cbs: Iterable, method_nm: str, learn: AnyLearner | None = None) -> None:
    "Call `method_nm(learn)` on each callback in `cbs` that has it, in `order`."
    for cb in sort_cbs(cbs):
        method = getattr(cb, method_nm, None)
        if method is not None: method(learn)


def misspelt_events(cb: object) -> list[str]:
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
        if hasattr(exc, 'add_note'): exc.add_note(line)  # pyright: ignore[reportAttributeAccessIssue]  (Python >= 3.11)
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
    def __init__(self, nm: str) -> None: self.nm = nm

    def __call__(self, f: Callable[..., None]) -> Callable[..., None]:
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
