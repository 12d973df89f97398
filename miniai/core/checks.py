"""The usual mistakes, caught early with one clear message each: what the Learner checks at the first batch of every
fit (dict batches, the model's output width against the classes, `nll_loss` on raw outputs) and how it explains a
failure inside the model (which module, what it got, what it expects; a model and batch on different devices).

Nothing here costs a training step anything: the checks run once a fit and then take themselves out of the Learner's
dispatch, and failures are explained only once they have happened. Values that must be read from the device (the
loss) are read at once on the CPU and, elsewhere, at the end of the first epoch, where the metrics are read anyway, so
that no check adds a host-device synchronisation to a batch. One exception: the largest target of the first batch
(without `dls.classes`) is read at once everywhere, one small read per fit, since a target out of range crashes the
loss itself (on CUDA, a device-side assert that leaves the GPU unusable) before any later read could explain it.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from .devices import model_device, model_dtype
from .events import AnyLearner, Callback
from .messages import warn_user
from .nested import first_shape, tensors_in


_Fn = TypeVar('_Fn', bound=Callable[..., Any])

__all__ = ['ModuleForwardError', 'takes_tuples', 'module_expects', 'forward_error', 'failed_module', 'device_mismatch',
           'dtype_mismatch', 'explain_forward_failure', 'is_nll_loss', 'is_classification_loss', 'loss_failure',
           'NamedBatchCB', 'FirstBatchChecks']

class ModuleForwardError(RuntimeError):
    "A forward pass failed inside a module; the message names the module's path and the input shape it got."


def takes_tuples(f: _Fn) -> _Fn:
    "Mark a `predict` step that reads the batch by position (`batch[0]`), so that a dict batch is refused clearly."
    f.takes_tuples = True  # type: ignore[attr-defined]
    return f


# -- a failure inside the model ----------------------------------------------------------------------------------
def module_expects(m: nn.Module) -> str:
    "What `m` takes as input, in words, for the layers whose input size is fixed ('' for the others)."
    if isinstance(m, nn.modules.conv._ConvNd): return f'{m.in_channels} input channels'
    if isinstance(m, nn.Linear): return f'{m.in_features} input features (the last dimension)'
    if isinstance(m, nn.modules.batchnorm._NormBase): return f'{m.num_features} channels'
    if isinstance(m, (nn.LayerNorm, nn.GroupNorm)): return m.extra_repr()
    if isinstance(m, nn.Embedding): return f'indices below {m.num_embeddings}'
    return ''


def forward_error(model: nn.Module, m: nn.Module, shape: tuple | None, e: BaseException,
                  batch_shape: tuple | None = None) -> ModuleForwardError:
    "The error for a forward pass of `model` that failed in its module `m`, which got input of `shape`."
    path = next((p for p, mod in model.named_modules() if mod is m), None) or '(model)'
    want, batch = module_expects(m), batch_shape is not None and batch_shape != shape
    return ModuleForwardError(f"forward failed in module '{path}' ({type(m).__name__}) with input shape {shape}"
                              + (f'; it expects {want}' if want else '')
                              + (f'; the batch had shape {batch_shape}' if batch else '') + f': {e}')


def failed_module(e: BaseException, model: nn.Module) -> tuple[nn.Module, object] | None:
    """The innermost module of `model` whose forward was running when `e` was raised, and the shape of the input it
    got, read from the traceback; None if `e` was not raised inside the model."""
    mods, found, tb = {id(m) for m in model.modules()}, None, e.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        me = frame.f_locals.get('self')
        if isinstance(me, nn.Module) and id(me) in mods and frame.f_code.co_name not in ('_call_impl',
                                                                                         '_wrapped_call_impl'):
            names = frame.f_code.co_varnames
            arg = frame.f_locals.get(names[1]) if frame.f_code.co_argcount > 1 else None
            found = (me, first_shape(arg))
        tb = tb.tb_next
    return found


def device_mismatch(model: nn.Module, data: Any, cbs: Iterable = ()) -> str | None:
    "Why `data` cannot go through `model` if its tensors are on another device than the model's parameters; else None."
    if next(model.parameters(), None) is None: return None  # nothing of the model's sits on a device
    dev = model_device(model)
    others = sorted({str(t.device) for t in tensors_in(data)} - {str(dev)})
    if not others: return None
    has = [cb for cb in cbs if type(cb).__name__ == 'DeviceCB']
    fix = (f'DeviceCB({str(has[0].device)!r}) is there, so something after it moved one of them: put both on one '
           f'device' if has else "add DeviceCB() to the Learner's callbacks, which puts the model and every batch on "
           "one device (default_device() unless you name one)")
    return f"the model's parameters are on {dev} but the batch is on {', '.join(others)}: {fix}"


def dtype_mismatch(model: nn.Module, x: Any) -> str | None:
    """Why the input `x` cannot go through `model` if it is not of its weights' float dtype (uint8 pixels that were
    never normalised, integers, float64); else None."""
    if not isinstance(x, torch.Tensor) or x.dtype == (w := model_dtype(model)): return None
    if not x.is_floating_point() and x.dtype != torch.uint8 and any(
            isinstance(m, (nn.Embedding, nn.EmbeddingBag)) for m in model.modules()): return None  # indices: as meant
    if x.dtype == torch.uint8:
        return (f"the model's input is uint8, pixels that were never normalised (what decode_image and dls.valid.x "
                f"hold), but its weights are {w}: normalise them first. learn.predict(x) does it for you (and "
                f"takes files and PIL images); for a batch, dls.normalise(x) gives what the loaders give the model")
    fix = f'x.to({w})' if x.is_floating_point() else 'x.to(torch.uint8) and normalise it if it holds pixels'
    return f"the model's input is {x.dtype} but its weights are {w}: convert it ({fix})"


def explain_forward_failure(learn: AnyLearner, e: RuntimeError) -> Exception | None:
    "A clearer error for `e`, raised by the model's forward pass during a fit, or None when there is nothing to add."
    if isinstance(e, torch.OutOfMemoryError): return None
    batch, said = getattr(learn, 'batch', None), str(e).lower()
    # only when torch's error is about devices: a model may move its inputs itself and fail for another reason
    if any(w in said for w in ('device', 'cuda', 'mps')) and (why := device_mismatch(learn.model, batch, learn.cbs)):
        return RuntimeError(f'{why}. ({e})')
    # the cause before any channel or feature count: a uint8 batch fails in the first layer whatever its shape
    x = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
    if any(w in said for w in ('type', 'byte', 'long', 'double')) and (why := dtype_mismatch(learn.model, x)):
        return TypeError(f'{why}. ({e})')
    if (where := failed_module(e, learn.model)) is None: return None
    return forward_error(learn.model, *where, e, batch_shape=first_shape(batch))  # pyright: ignore[reportArgumentType]


# -- the loss -------------------------------------------------------------------------------------------------
def _func_of(loss_func):
    "The function or module behind `loss_func`, through `functools.partial`s."
    while hasattr(loss_func, 'func') and hasattr(loss_func, 'keywords'): loss_func = loss_func.func
    return loss_func


def is_nll_loss(loss_func: Callable) -> bool:
    "Whether `loss_func` is `nll_loss` (the function, a partial of it, or `nn.NLLLoss`), which takes log-probabilities."
    f = _func_of(loss_func)
    return f is F.nll_loss or isinstance(f, nn.NLLLoss)


def is_classification_loss(loss_func: Callable) -> bool:
    """Whether `loss_func` is cross-entropy or `nll_loss` (functions, partials of them, or their modules): a loss that
    takes one output per class. Other losses may pair class labels with outputs of another width (embeddings)."""
    f = _func_of(loss_func)
    return f is F.cross_entropy or isinstance(f, nn.CrossEntropyLoss) or is_nll_loss(loss_func)


def loss_failure(loss_func: Callable, preds: Any, targets: Sequence, e: BaseException) -> ValueError:
    "The error for a loss function that could not take the model's output and the targets: shapes, or devices."
    name = getattr(_func_of(loss_func), '__name__', None) or type(_func_of(loss_func)).__name__
    if len({str(t.device) for t in (preds, *targets) if isinstance(t, torch.Tensor)}) > 1:
        where = ', '.join(str(t.device) for t in targets if isinstance(t, torch.Tensor))
        return ValueError(f'loss function {name} got the model output on {preds.device} and the target on {where}: '
                          f'DeviceCB() puts the model and every batch on one device ({e})')
    shapes = ', '.join(str(tuple(t.shape)) if hasattr(t, 'shape') else type(t).__name__ for t in targets)
    pshape = tuple(preds.shape) if hasattr(preds, 'shape') else type(preds).__name__
    return ValueError(f'loss function {name} could not take the model output of shape {pshape} with target shape '
                      f'{shapes}: {e}')


# -- dict batches ---------------------------------------------------------------------------------------------
class NamedBatchCB(Callback):
    """Turn each batch that is a dict (the Hugging Face way: `{'image': ..., 'label': ...}`) into the tuple the
    Learner's steps and callbacks read by position: the values of `inputs`, then those of `targets` (a key or a list
    of keys each). Batches that are not dicts go through unchanged."""
    order = -20  # before every callback that reads the batch by position (augmentation, channels-last, ...)
    def __init__(self, inputs: str | Sequence[str] = 'input', targets: str | Sequence[str] = 'label') -> None:
        as_list = lambda k: [k] if isinstance(k, str) else list(k)
        self.keys = as_list(inputs) + as_list(targets)

    def before_batch(self, learn: AnyLearner) -> None:
        b = learn.batch
        if not isinstance(b, Mapping): return
        if missing := [k for k in self.keys if k not in b]:
            raise KeyError(f'NamedBatchCB: the batch has no {", ".join(map(repr, missing))}; its keys are '
                           f'{", ".join(map(repr, b))}')
        learn.batch = tuple(b[k] for k in self.keys)


# -- the first batch ----------------------------------------------------------------------------------------
def _step_funcs(learn, step: str) -> list:
    "The plain functions that do `step` in this fit: the Learner's own method, or those of its callbacks."
    own = getattr(type(learn), step, None)
    if own is not None and not getattr(own, 'step_from_callbacks', False): return [own]
    return [getattr(type(cb), step) for cb in learn.cbs if callable(getattr(cb, step, None))
            and hasattr(type(cb), step)]


def _reads_now(device: torch.device) -> bool:
    "Whether a value on `device` can be read within a batch without making the CPU wait for the device."
    return device.type == 'cpu'


def _classes(learn):
    return getattr(getattr(learn, 'dls', None), 'classes', None)


#: target kinds (miniai.data.targets) whose loss compares outputs and targets of one shape, item for item
_SAME_SHAPE = ('multilabel', 'regression', 'image')


def _check_target_shape(kind: str, out: tuple, want: tuple) -> None:
    "One clear error where a model's outputs cannot be compared with targets of `kind` item for item."
    if out == want: return
    per = {'multilabel': 'labels (dls.targets.classes)', 'regression': 'target values (columns)'}.get(kind)
    if per is not None and len(out) == 2 and len(want) == 2:
        raise ValueError(f'the model outputs {out[1]} values per item, but the {kind} targets have {want[1]} {per}: '
                         f'make its last layer output {want[1]}')
    raise ValueError(f'the model outputs shape {out} but the {kind} targets of the batch have shape {want}: for '
                     f'{kind} targets the loss compares them item for item, so they must match')


class FirstBatchChecks:
    """The Learner's look at the first batch of each fit: each per-batch handler runs once and then leaves the dispatch;
    a value on an accelerator is read at the end of the first epoch (see this module's docstring)."""
    def __init__(self, learn: AnyLearner) -> None:
        self.learn, self._later = learn, []
        self.handlers = {'before_batch': self.before_batch, 'after_predict': self.after_predict,
                         'after_loss': self.after_loss, 'after_epoch': self.after_epoch}

    def _done(self, event: str) -> None:
        "Take this check out of the dispatch: a new list, so the loop going through the old one is not disturbed."
        d = self.learn._dispatch
        if d is not None and event in d: d[event] = [m for m in d[event] if getattr(m, '__self__', None) is not self]

    def _read(self, tensors: list, then) -> None:
        "Call `then` on the values of `tensors`: now on the CPU, at the end of the first epoch elsewhere."
        dev = tensors[0].device
        if dev.type == 'meta': return  # no values there
        if _reads_now(dev): then(*[t.item() for t in tensors])
        else: self._later.append((tensors, then))

    def before_batch(self, learn: AnyLearner) -> None:
        self._done('before_batch')
        b = learn.batch
        if not isinstance(b, (Mapping, torch.Tensor)): return
        by_position = [f for f in _step_funcs(learn, 'predict') if getattr(f, 'takes_tuples', False)]
        if by_position and isinstance(b, torch.Tensor):  # batch[0] would be its first item, silently
            raise TypeError(f'the data loader yields bare tensors (shape {tuple(b.shape)}), but '
                            f'{by_position[0].__qualname__} takes the model input as batch[0]: make it yield tuples, '
                            f'(inputs, targets) or (inputs,)')
        if by_position:
            keys = ', '.join(repr(k) for k in b)
            raise TypeError(
                f'the data loader yields dicts (keys {keys}), but {by_position[0].__qualname__} takes the model '
                f'input as batch[0] and the target as batch[1]. Make it yield tuples (DataLoaders.from_dd(dd, bs) '
                f'does, with as_tuple=True, through collate_dict; or collate_fn=collate_dict(ds)), or add '
                f"NamedBatchCB(inputs=..., targets=...) naming the keys (e.g. NamedBatchCB('image', 'label')).")

    def after_predict(self, learn: AnyLearner) -> None:
        self._done('after_predict')
        preds, b = learn.preds, learn.batch
        y = b[-1] if isinstance(b, (tuple, list)) and len(b) >= 2 else None
        kind = getattr(getattr(getattr(learn, 'dls', None), 'targets', None), 'kind', 'class')
        if kind in _SAME_SHAPE and isinstance(preds, torch.Tensor) and isinstance(y, torch.Tensor):
            return _check_target_shape(kind, tuple(preds.shape), tuple(y.shape))
        if not (isinstance(preds, torch.Tensor) and isinstance(y, torch.Tensor) and preds.is_floating_point()
                and not y.is_floating_point() and not y.is_complex() and y.dtype != torch.bool
                and preds.dim() >= 2 and y.dim() == preds.dim() - 1 and len(y) == len(preds)):
            return  # not the (N, C, ...) outputs and (N, ...) class indices of a classification
        # only for a loss that takes a score per class: a feature extractor or a metric-learning loss may pair
        # class labels with outputs of any width (ImageEval's features, embeddings)
        if not is_classification_loss(learn.loss_func): return
        n_out, classes = preds.shape[1], _classes(learn)
        if classes is not None and len(classes) != n_out:
            raise ValueError(f'the model outputs {n_out} values per item, but the data has {len(classes)} classes '
                             f'(dls.classes): make its last layer output {len(classes)}')
        if classes is None and y.numel() and y.device.type != 'meta':  # read now, even on a GPU: one small read, at the first batch of a fit only,
            # since an out-of-range target crashes the loss (a device-side assert on CUDA) before any later read
            self._check_width(n_out, int(y.max().item()), len(y))

    def _check_width(self, n_out: int, top: int, n: int) -> None:
        if top >= n_out:
            raise ValueError(f'the model outputs {n_out} values per item, but the first batch has target {top}: '
                             f'it needs at least {top + 1} outputs (one per class)')
        # with ten items a class or more, a class missing from the first batch is very unlikely (below 1e-4)
        if top + 1 < n_out and n >= 10 * n_out:
            warn_user(f'the model outputs {n_out} values per item, but the largest target in the first batch of {n} '
                      f'is {top}: if there are {top + 1} classes, make its last layer output {top + 1} (the other '
                      f'{n_out - top - 1} are never a target)')

    def after_loss(self, learn: AnyLearner) -> None:
        self._done('after_loss')
        loss, preds = learn.loss, learn.preds
        if not (isinstance(loss, torch.Tensor) and loss.numel() == 1 and isinstance(preds, torch.Tensor)
                and preds.is_floating_point() and preds.dim() >= 2): return
        if is_nll_loss(learn.loss_func):
            lse = preds.detach().float().logsumexp(1).abs().max()
            self._read([loss.detach(), lse], self._check_nll)

    def _check_nll(self, loss: float, lse: float) -> None:
        if lse < 1e-2 and loss >= 0: return
        warn_user(f'nll_loss takes log-probabilities (the output of log_softmax), but the model outputs raw scores '
                  f'(their log-sum-exp over the classes is up to {lse:.3g}, not 0; the first loss is {loss:.4g}'
                  f'{", below 0, which no classification loss can be" if loss < 0 else ""}): use F.cross_entropy on '
                  f'raw outputs, or end the model with nn.LogSoftmax(dim=1)')

    def after_epoch(self, learn: AnyLearner) -> None:  # stays for the fit (once an epoch, with nothing left to read after the first)
        later, self._later = self._later, []
        for tensors, then in later: then(*[t.item() for t in tensors])
