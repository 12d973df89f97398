"""The `Learner`: a training loop in which every step is an event that callbacks handle.

The loop, as it reads (each `cleanup_*` runs however its stage ends):

    before_fit
      for each epoch: before_epoch
        for each batch: before_batch
          predict  -> after_predict
          get_loss -> after_loss
          if training: backward -> after_backward, step -> after_step, zero_grad
        after_batch          (cleanup_batch always runs)
      after_epoch            (cleanup_epoch always runs)
    after_fit                (cleanup_fit always runs)

`CancelBatchException` ends the batch, `CancelEpochException` the epoch and `CancelFitException` the fit, each
quietly; a `CancelFitException` raised in `after_epoch` ends the fit once every callback has handled that
`after_epoch` (so an epoch that finished is logged and saved whatever the order of the callback that stops); any other
exception runs the cleanups and reaches the caller unchanged (a cleanup that fails meanwhile is
attached to it as a note, never raised in its place). `predict`, `get_loss`, `backward`, `step` and `zero_grad` are
methods of a Learner subclass (`TrainLearner`) or of a callback (`TrainCB`).
"""
from __future__ import annotations

import difflib
import os
import warnings
from collections.abc import Callable, Iterable
from functools import partial
from typing import TYPE_CHECKING, Any

import fastcore.all as fc
import torch
import torch.nn.functional as F
from torch import nn, optim

from .checks import FirstBatchChecks, explain_forward_failure, loss_failure, takes_tuples
from .devices import deliver_loader, resolve_device, to_device
from .events import (EVENTS, STEPS, Callback, CancelFitException, callback_name, misspelt_events, note_failure, run_cbs,
                     sort_cbs, with_cbs)
from .groups import LR, optimizer_params

__all__ = ['Learner', 'TrainLearner', 'MomentumLearner', 'TrainCB', 'DeviceCB', 'SingleBatchCB', 'compute_loss',
           'learner_method']


def _handler_name(m) -> str:
    owner = getattr(m, '__self__', None)
    return f'{type(owner).__name__}.{m.__name__}' if owner is not None else getattr(m, '__qualname__', repr(m))


def _run_every(methods, learn):
    """Run every cleanup even if one raises (so hooks are removed and files closed); then raise the first error,
    with the later ones attached to it (see `note_failure`)."""
    errors = []
    for m in methods:
        try: m(learn)
        except BaseException as e: errors.append((m, e))
    if not errors: return
    first = errors[0][1]
    for m, e in errors[1:]: note_failure(first, e, _handler_name(m))
    raise first


def _finish_then_stop(methods, learn):
    "Run every `after_epoch` handler; a `CancelFitException` among them ends the fit after the last one has run."
    stop = None
    for m in methods:
        try: m(learn)
        except CancelFitException as e:
            if stop is None: stop = e
    if stop is not None: raise stop


def compute_loss(loss_func: Callable, preds: Any, *targets: Any) -> Any:
    "`loss_func(preds, *targets)`, with an error naming the loss and both shapes (or devices) when they do not fit."
    try: return loss_func(preds, *targets)
    except (RuntimeError, ValueError, IndexError, TypeError) as e:
        raise loss_failure(loss_func, preds, targets, e) from e


class Learner:
    """Holds a model, data, a loss and an optimizer; `fit` runs the loop of events above through its callbacks, which
    it also finds by name (`learn.progress` is its `ProgressCB`, see `Callback.name`).

    Methods that other modules add, next to the feature they belong to (`@learner_method`):
    `lr_find` (miniai.callbacks.schedule), `capture_preds` (miniai.callbacks.preds), `summary` (miniai.tools.summary),
    `get_preds`, `predict_item`, `show_image_batch` (miniai.tools.inference), `show_results` (miniai.tools.results),
    `export` (miniai.tools.export), `save`, `load`, `resume_cb` (miniai.runs.checkpoint), `freeze`, `freeze_to`,
    `unfreeze` (miniai.core.freezing), `fit_one_cycle`, `fit_flat_cos`, `fine_tune` (miniai.callbacks.onecycle).
    Importing miniai adds them all."""
    def __init__(self, model: nn.Module, dls: Any = (0,), loss_func: Callable = F.mse_loss, lr: float | None = 0.1,
                 cbs: Callback | Iterable[Callback] | None = None, opt_func: Callable | None = optim.SGD,
                 splitter: Callable[[nn.Module], Iterable] | None = None) -> None:
        self.model, self.dls, self.loss_func, self.lr, self.opt_func = model, dls, loss_func, lr, opt_func
        self.splitter = splitter  # model -> parameter groups (None: `default_splitter`); see miniai.core.groups
        self.cbs = fc.L(list(fc.L(cbs)))  # a copy: fit and probes add and remove callbacks on it
        self._dispatch = None

    # -- the loop -------------------------------------------------------------------------------------------
    @with_cbs('batch')
    def _one_batch(self):
        try: self._step('predict')
        except RuntimeError as e:  # explained here, after the fact: checking every batch beforehand would cost time
            clearer = explain_forward_failure(self, e)
            if clearer is None: raise
            raise clearer from e
        self.callback('after_predict')
        self._step('get_loss')
        self.callback('after_loss')
        if self.training:
            self._step('backward')
            self.callback('after_backward')
            self._step('step')
            self.callback('after_step')
            self._step('zero_grad')

    @with_cbs('epoch')
    def _one_epoch(self):
        n = 0
        for self.iter, self.batch in enumerate(self.dl):
            self._one_batch()
            n += 1
        if n == 0: raise ValueError(f'the {"training" if self.training else "validation"} data loader is empty: '
                                    f'it yielded no batch in epoch {self.epoch}')

    def one_epoch(self, training: bool) -> None:
        "Run one epoch over `dls.train` (`training=True`) or `dls.valid` (without gradients)."
        self.model.train(training)
        self.dl = self.dls.train if training else self.dls.valid
        if training: self._one_epoch()
        else:
            with torch.no_grad(): self._one_epoch()

    @with_cbs('fit')
    def _fit(self, train: bool, valid: bool):
        for self.epoch in self.epochs:
            if train: self.one_epoch(True)
            if valid: self.one_epoch(False)

    def fit(self, n_epochs: int = 1, train: bool = True, valid: bool = True,
            cbs: Callback | Iterable[Callback] | None = None, lr: LR | None = None,
            resume: str | os.PathLike | None = None) -> None:
        """Train for `n_epochs` with a fresh optimizer at `lr` (a number; or `slice(lo, hi)`, rates growing
        geometrically over the parameter groups, see `miniai.core.groups`); `cbs` are used for this fit only.
        `resume`: a checkpoint path (see `miniai.runs.checkpoint`) to continue a run from where it was saved."""
        if not isinstance(n_epochs, int) or isinstance(n_epochs, bool) or n_epochs < 0:
            raise ValueError(f'fit: n_epochs must be a whole number >= 0, got {n_epochs!r}')
        self._check_dls(train, valid)
        cbs = fc.L(cbs)
        if resume is not None: cbs.append(self.resume_cb(resume))
        self.cbs += cbs
        try:
            self._prepare_dispatch()
            self.n_epochs, self.phases = n_epochs, (train, valid)
            self.epochs: Any = range(n_epochs)  # a progress bar may wrap it
            if lr is None: lr = self.lr
            if self.opt_func: self.opt = self.opt_func(*optimizer_params(self.model, lr, getattr(self, 'splitter', None)))
            self._fit(train, valid)
        finally:  # nothing here may raise: it would replace the exception on its way
            for cb in cbs:
                if cb in self.cbs: self.cbs.remove(cb)
            self._dispatch = None

    def _check_dls(self, train: bool, valid: bool):
        for need, attr in ((train, 'train'), (valid, 'valid')):
            if need and not hasattr(self.dls, attr):
                raise TypeError(f'Learner.dls has no .{attr} (got {type(self.dls).__name__}); pass a '
                                f'miniai.datasets.DataLoaders(train_dl, valid_dl), or fit(..., {attr}=False)')
            dl = getattr(self.dls, attr, None) if need else None
            if dl is not None and hasattr(dl, '__len__') and len(dl) == 0:
                raise ValueError(f'Learner.dls.{attr} is empty: it has no batch (is the dataset smaller than the '
                                 f'batch size with drop_last=True?)')

    # -- dispatch ------------------------------------------------------------------------------------------
    def _prepare_dispatch(self):
        "Resolve, once per fit, which bound methods handle each event and each step."
        cbs = sort_cbs(self.cbs)
        for cb in cbs:
            for bad in misspelt_events(cb):
                close = difflib.get_close_matches(bad, EVENTS + STEPS, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ''
                warnings.warn(f"{type(cb).__name__}.{bad} looks like an event but is not one, so it is never "
                              f"called{hint}", stacklevel=3)
        # callables only: a data attribute that happens to share a name (`step = 0`) is not a handler
        table = {ev: [getattr(cb, ev) for cb in cbs if callable(getattr(cb, ev, None))] for ev in EVENTS + STEPS}
        for ev, m in FirstBatchChecks(self).handlers.items(): table[ev].append(m)
        for ev in ('cleanup_batch', 'cleanup_epoch', 'cleanup_fit'):
            if len(table[ev]) > 1: table[ev] = [partial(_run_every, table[ev])]
        table['after_epoch'] = [partial(_finish_then_stop, table['after_epoch'])]
        steps = {}
        for s in STEPS:
            own = getattr(type(self), s, None)
            if own is not None and not getattr(own, 'step_from_callbacks', False): steps[s] = getattr(self, s)
            else:
                if len(table[s]) > 1:
                    names = ', '.join(type(m.__self__).__name__ for m in table[s])
                    warnings.warn(f'several callbacks do the {s!r} step ({names}), so it runs {len(table[s])} times '
                                  f'a batch; keep one (e.g. MixedPrecision replaces TrainCB)', stacklevel=3)
                steps[s] = partial(self._run_all, table[s])
        self._dispatch, self._steps = table, steps

    def _run_all(self, methods):
        for m in methods: m(self)

    def _step(self, name: str): self._steps[name]()

    def callback(self, method_nm: str) -> None:
        "Run event `method_nm` on every callback that handles it."
        d = self._dispatch
        if d is not None and method_nm in d:
            for m in d[method_nm]: m(self)
        else: run_cbs(self.cbs, method_nm, self)

    if TYPE_CHECKING:  # the loop's state (batch, preds, loss, opt, epoch...) is set on the Learner by its callbacks
        def __setattr__(self, name: str, value: Any) -> None: ...

    def __getattr__(self, name: str) -> Any:
        if name in STEPS: return partial(self.callback, name)
        if not name.startswith('_') and (cb := self._callback_named(name)) is not None: return cb
        raise AttributeError(f'{type(self).__name__!r} object has no attribute {name!r}')

    def _callback_named(self, name: str):
        "The first callback called `name` (`Callback.name`), else the first whose base class is (a subclass of DDPCB)."
        cbs = self.__dict__.get('cbs', ())
        for cb in cbs:
            if getattr(cb, 'name', None) == name: return cb
        for cb in cbs:
            if any(callback_name(c.__name__) == name for c in type(cb).__mro__[1:]
                   if issubclass(c, Callback) and c is not Callback): return cb
        return None

    def predict(self, x: Any = None, act: Callable | None = None) -> Any:
        """With `x`: the class of `x` (one item or a batch), its probability and all probabilities, through this
        Learner's callbacks (see `miniai.tools.inference.predict`). Without: the loop's 'predict' step, which a plain
        Learner takes from its callbacks (`TrainCB`)."""
        if x is None: return self.callback('predict')
        return self.predict_item(x, act)
    predict.step_from_callbacks = True  # pyright: ignore[reportFunctionMemberAccess]  (a mark the dispatch reads)

    @property
    def training(self) -> bool: return self.model.training


def learner_method(f: Callable | None = None, *, name: str | None = None) -> Callable:
    """Decorator: add the function `f` to `Learner` as a method called `name` (default: `f`'s own name), from the
    module of the feature it belongs to (each is listed in `Learner`'s docstring); `f` itself stays what the module
    exports."""
    if f is None: return lambda g: learner_method(g, name=name)
    setattr(Learner, name or f.__name__, f)
    return f


class TrainLearner(Learner):
    "A `Learner` with the usual steps: predict from `batch[0]`, loss against `batch[1]`, backward, step, zero."
    @takes_tuples
    def predict(self, x: Any = None, act: Callable | None = None) -> Any:
        "The 'predict' step: the model's output for `batch[0]`; with `x`, `Learner.predict` (a class for `x`)."
        if x is not None: return Learner.predict(self, x, act)
        self.preds = self.model(self.batch[0])
    def get_loss(self) -> None: self.loss = compute_loss(self.loss_func, self.preds, self.batch[1])
    def backward(self) -> None: self.loss.backward()
    def step(self) -> None: self.opt.step()
    def zero_grad(self) -> None: self.opt.zero_grad()


class MomentumLearner(TrainLearner):
    "A `TrainLearner` whose `zero_grad` keeps `mom` times the old gradients (momentum without optimizer state)."
    def __init__(self, model: nn.Module, dls: Any, loss_func: Callable, lr: float | None = None,
                 cbs: Callback | Iterable[Callback] | None = None, opt_func: Callable = optim.SGD, mom: float = 0.85) -> None:
        self.mom = mom
        super().__init__(model, dls, loss_func, lr, cbs, opt_func)

    def zero_grad(self) -> None:
        with torch.no_grad():
            for p in self.model.parameters():
                if p.grad is not None: p.grad *= self.mom


class TrainCB(Callback):
    "The training steps as a callback, for a plain `Learner`; the first `n_inp` batch items go to the model."
    def __init__(self, n_inp: int = 1) -> None: self.n_inp = n_inp
    @takes_tuples
    def predict(self, learn: Learner) -> None: learn.preds = learn.model(*learn.batch[:self.n_inp])
    def get_loss(self, learn: Learner) -> None:
        learn.loss = compute_loss(learn.loss_func, learn.preds, *learn.batch[self.n_inp:])
    def backward(self, learn: Learner) -> None: learn.loss.backward()
    def step(self, learn: Learner) -> None: learn.opt.step()
    def zero_grad(self, learn: Learner) -> None: learn.opt.zero_grad()


class DeviceCB(Callback):
    """Move the model to `device` when the fit starts, and each batch to it before it is used. `device` defaults to
    `default_device()`; it is resolved when the callback is made, so under torchrun 'cuda' (or nothing) means
    this process's GPU, cuda:LOCAL_RANK, before anything is placed. A loader that can deliver its batches
    (`deliver_to`, as `TensorDataLoader` does) is asked to, for each epoch of the fit: CPU-held uint8 images in
    pinned memory (`fashion_dls(device='cpu')` on a CUDA machine) then cross to the GPU as uint8 without making the
    CPU wait, and are normalised there; outside the fit the loader yields CPU batches again."""
    def __init__(self, device: str | torch.device | None = None) -> None: self.device = resolve_device(device)
    def before_fit(self, learn: Learner) -> None:
        if hasattr(learn.model, 'to'): learn.model.to(self.device)
    def before_epoch(self, learn: Learner) -> None:
        self._undeliver = deliver_loader(getattr(learn, 'dl', None), self.device)
    def before_batch(self, learn: Learner) -> None: learn.batch = to_device(learn.batch, device=self.device)
    def cleanup_epoch(self, learn: Learner) -> None: self.__dict__.pop('_undeliver', lambda: None)()


class SingleBatchCB(Callback):
    "End the fit after one batch: a quick check that the whole loop runs."
    order = 1
    def after_batch(self, learn: Learner) -> None: raise CancelFitException()
