"""`CompileCB`: the Learner's model through `torch.compile` while it fits, the plain model the rest of the time.

The model is compiled in place (`nn.Module.compile`), so `learn.model` stays the same object, its `state_dict` keys
stay plain (no `_orig_mod.`), and callbacks, hooks and checkpoints see the model they expect. The compiled callable
is kept and put back at the next fit, so a second fit (or `lr_find` before the fit) reuses what was compiled.
What dynamo does by default, and what this callback changes while it fits:

- Hooks: dynamo does not guard on a module's hooks (`skip_nnmodule_hook_guards`), so a hook registered after the
  first compiled call never runs, and one removed afterwards keeps running inside the compiled graph. During a fit
  the guards are switched on: adding or removing a hook (`ActivationStats`, `HooksCallback`) recompiles once.
- Recompile limit: every in-place compiled module shares one code object (`Module._call_impl`) and, by default,
  one limit of 8 compiled variants for the whole process (each model, batch shape, train/eval mode and set of hooks
  is one), after which dynamo quietly runs eager. Each CompileCB keeps its own entries (`isolate_recompiles`, where
  torch has it) with its own limit.
- Shapes: `dynamic=False` (the default here) compiles one static graph per batch shape, so the last, smaller
  batch of an epoch costs one more compile instead of switching every batch to slower dynamic-shape kernels.
- CUDA graphs (`mode='reduce-overhead'` on CUDA): a replay overwrites the previous replay's outputs, so each batch
  starts a new CUDA-graph step (`torch.compiler.cudagraph_mark_step_begin`) and the predictions are copied out
  (a few KB) before callbacks keep them; forward hooks, whose tensors would be overwritten too, are refused with
  an error. On a CPU model 'reduce-overhead' has nothing to capture and compiles as 'default', with a warning.

Compiling takes time (tens of seconds for a ResNet on a CPU): the batches that compiled are timed, the metrics
table marks each epoch that compiled with that time, and `compiles` keeps a record per epoch.
"""
from __future__ import annotations

import inspect
import time
import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..core.devices import model_device
from ..core.events import Callback
from ..core.nested import apply_to_tensors

if TYPE_CHECKING:
    from ..core.learner import Learner

__all__ = ['CompileCB', 'COMPILE_MODES']

#: the modes of `torch.compile`; None means its default
COMPILE_MODES = ('default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs')
_CUDA_GRAPH_MODES = ('reduce-overhead', 'max-autotune')  # on CUDA, inductor captures CUDA graphs in these


def _copy_out(x):
    "Tensors in `x` (nested in tuples, lists, dicts) copied out of CUDA-graph memory; autograd flows through."
    return apply_to_tensors(torch.clone, x)


def _hooked(model: nn.Module) -> list[str]:
    "Names of the modules of `model` that carry forward hooks."
    return [n or '(model)' for n, m in model.named_modules() if m._forward_hooks]


class CompileCB(Callback):
    """Compile `learn.model` with `torch.compile(mode=mode, backend=backend, dynamic=dynamic, **kwargs)` for the fits
    this callback takes part in (see the module's docstring for hooks, shapes and CUDA graphs). `mode`: 'default',
    'reduce-overhead' (CUDA graphs on a CUDA model), 'max-autotune' or 'max-autotune-no-cudagraphs'; `backend`:
    'inductor', or 'eager'/'aot_eager' to check that a model traces without generating code. `compile_secs` is the
    time spent in batches that compiled, `compiles` one record per epoch that did."""
    order = 30  # after DeviceCB/ChannelsLastCB placed the model and hook callbacks hooked it

    def __init__(self, mode: str = 'default', backend: str = 'inductor', dynamic: bool | None = False,
                 recompile_limit: int = 32, **kwargs: Any) -> None:
        if mode not in COMPILE_MODES:
            raise ValueError(f"CompileCB: mode must be one of {', '.join(COMPILE_MODES)}; got {mode!r}")
        self.mode, self.backend, self.dynamic, self.recompile_limit, self.kwargs = (mode, backend, dynamic,
                                                                                   recompile_limit, kwargs)
        self.compile_secs, self.compiles = 0., []
        self._model = self._compiled = self._key = None
        self._reset_fit()

    def _reset_fit(self):
        self.cuda_graphs, self._patch = False, None
        self._epoch_secs, self._epoch_graphs, self._t, self._g = 0., 0, None, 0

    def _mode_for(self, model: nn.Module) -> str:
        cuda = model_device(model).type == 'cuda'
        if self.mode == 'reduce-overhead' and not cuda and self.backend == 'inductor':
            warnings.warn("CompileCB(mode='reduce-overhead') captures CUDA graphs, which need a CUDA model; this model "
                          "is on the CPU, so it is compiled with mode='default'", stacklevel=2)
            return 'default'
        self.cuda_graphs = cuda and self.mode in _CUDA_GRAPH_MODES and self.backend == 'inductor'
        return self.mode

    def _compile(self, model: nn.Module, mode: str):
        "Compile `model` in place, or put back what an earlier fit compiled for the same model and mode."
        if self._model is model and self._key == mode:
            model._compiled_call_impl = self._compiled
            return
        kw = dict(backend=self.backend, dynamic=self.dynamic, **self.kwargs)
        if self.backend == 'inductor': kw['mode'] = mode  # other backends do not take a mode
        params = inspect.signature(torch.compile).parameters
        if 'isolate_recompiles' in params: kw.update(isolate_recompiles=True, recompile_limit=self.recompile_limit)  # pyright: ignore[reportArgumentType]  (torch.compile's options are typed narrower than they are)
        model.compile(**kw)
        self._model, self._compiled, self._key = model, model._compiled_call_impl, mode

    def before_fit(self, learn: Learner) -> None:
        model = learn.model
        if not isinstance(model, nn.Module):
            raise TypeError(f'CompileCB compiles an nn.Module; learn.model is a {type(model).__name__}')
        if hasattr(model, '_orig_mod'):
            raise ValueError('CompileCB: learn.model is already a torch.compile() wrapper (OptimizedModule); give the '
                             'Learner the plain model and let CompileCB compile it, or drop CompileCB')
        if getattr(model, '_compiled_call_impl', None) not in (None, self._compiled):
            raise ValueError('CompileCB: learn.model was compiled already (model.compile() was called); drop that '
                             'call or CompileCB')
        import torch._dynamo
        from torch._dynamo.utils import counters
        self._stats = counters['stats']
        mode = self._mode_for(model)
        if self.cuda_graphs and (hooked := _hooked(model)):
            raise RuntimeError(f'CompileCB(mode={self.mode!r}) replays CUDA graphs, which overwrite every tensor a '
                               f'forward hook keeps at the next batch; hooks are on {", ".join(hooked[:5])}. Use '
                               f"mode='default' (no CUDA graphs) while hooks are on, or remove them")
        cfg = {'skip_nnmodule_hook_guards': False}
        if 'isolate_recompiles' not in inspect.signature(torch.compile).parameters:  # older torch: one shared limit
            key = 'recompile_limit' if hasattr(torch._dynamo.config, 'recompile_limit') else 'cache_size_limit'
            cfg[key] = self.recompile_limit  # pyright: ignore[reportArgumentType]  (torch's config: an int)
        self._patch = torch._dynamo.config.patch(**cfg)  # pyright: ignore[reportArgumentType]
        self._patch.__enter__()
        self._compile(model, mode)

    def annotate_metrics(self, row: dict) -> dict:
        "The metrics row (`MetricsCB` asks), its time marked with the seconds spent compiling when this epoch compiled."
        if not self._epoch_graphs: return row
        return {**row, 'time': f"{row.get('time', '')} (compiling {self._epoch_secs:.0f}s)".strip()}

    def before_epoch(self, learn: Learner) -> None: self._epoch_secs, self._epoch_graphs = 0., 0

    def before_batch(self, learn: Learner) -> None:
        if self.cuda_graphs: torch.compiler.cudagraph_mark_step_begin()
        self._t, self._g = time.perf_counter(), self._stats['unique_graphs']

    def after_predict(self, learn: Learner) -> None:
        if self.cuda_graphs: learn.preds = _copy_out(learn.preds)

    def cleanup_batch(self, learn: Learner) -> None:
        if self._t is None: return
        if (n := self._stats['unique_graphs'] - self._g):
            secs = time.perf_counter() - self._t
            self._epoch_secs += secs
            self._epoch_graphs += n
            self.compile_secs += secs
        self._t = None

    def after_epoch(self, learn: Learner) -> None:
        if self._epoch_graphs:
            self.compiles.append({'epoch': learn.epoch, 'train': 'train' if learn.training else 'eval',
                                  'secs': self._epoch_secs, 'graphs': self._epoch_graphs})

    def cleanup_fit(self, learn: Learner) -> None:
        if self._model is not None: self._model._compiled_call_impl = None  # the plain model outside the fit
        if self._patch is not None: self._patch.__exit__(None, None, None)
        self._reset_fit()

    def __repr__(self):
        return (f'CompileCB(mode={self.mode!r}, backend={self.backend!r}): {len(self.compiles)} compiling epochs, '
                f'{self.compile_secs:.1f} s')
