"""The fast paths: mixed precision (bf16 on CPUs with AMX, fp16 or bf16 on CUDA) and channels-last memory format;
`AccelerateCB`, training through Hugging Face Accelerate."""
from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from .callback import Callback
from .checks import warn_once
from .compile import CompileCB
from .conv import default_device, to_device
from .learner import DeviceCB, TrainCB
from .ranks import world_size
from .state import match_state_layout

__all__ = ['MixedPrecision', 'ChannelsLastCB', 'warn_fp16_on_cpu', 'cpu_has_bf16', 'cuda_has_bf16', 'fastest_settings',
           'precision_cbs', 'SpeedPlan',
           'fastest_plan', 'AccelerateCB']


def _device_of(model) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device('cpu')


def cuda_has_bf16(device=None) -> bool:
    """Whether the CUDA GPU `device` (default: the current one) does bf16 arithmetic in hardware: compute capability
    8.0 (Ampere) or newer. `torch.cuda.is_bf16_supported()` also counts emulation, so it says True on a T4 or V100,
    where bf16 runs far slower than fp16; and it asks about the current device, not a given one."""
    if getattr(torch.version, 'hip', None): return torch.cuda.is_bf16_supported()  # ROCm: torch knows the GPU
    return torch.cuda.get_device_capability(device)[0] >= 8


def _needs_loss_scaling(device_type: str, dtype: torch.dtype) -> bool:
    "fp16 gradients underflow without a loss scaler; bf16 has fp32's range and needs none."
    return dtype == torch.float16 and device_type == 'cuda'


class MixedPrecision(TrainCB):
    """Run the forward pass and loss under `torch.autocast` in `dtype` (default: bf16 on CPU; on CUDA bf16 where
    supported, else fp16). fp16 scales the loss with a `GradScaler`, so its `backward` and `step` must be used: with
    a `TrainLearner` (whose own methods win) fp16 is refused; bf16 needs no scaling and works with either."""
    order = DeviceCB.order + 10

    def __init__(self, dtype: torch.dtype | None = None, n_inp: int = 1):
        super().__init__(n_inp)
        if dtype not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f'MixedPrecision: dtype must be torch.bfloat16, torch.float16 or None (choose for the '
                             f'device); got {dtype!r}')
        self.dtype, self.scaler, self._ctx, self._scaler_state = dtype, None, None, None
        self._asked = dtype  # None: chosen again at each fit, for the device the model is on then

    def before_fit(self, learn):
        dev = _device_of(learn.model)
        self.device_type, dtype = dev.type, self._asked
        if dtype is None: dtype = torch.bfloat16 if dev.type != 'cuda' or cuda_has_bf16(dev) else torch.float16
        if dtype == torch.float16 and dev.type == 'cpu': warn_fp16_on_cpu()
        self.dtype, self.scaler = dtype, None  # a scaler from an earlier fit is never reused
        if _needs_loss_scaling(dev.type, dtype):
            if getattr(type(learn), 'backward', None) is not None:
                raise TypeError(f'MixedPrecision(fp16) scales the loss in its own backward and step, but '
                                f'{type(learn).__name__} defines those itself; use a plain Learner with '
                                f'MixedPrecision, or dtype=torch.bfloat16')
            self.scaler = torch.amp.GradScaler(dev.type)
            # a resume (ResumeCB runs first) handed over the saved scale: this fit's scaler starts from it
            if self._scaler_state is not None: self.scaler.load_state_dict(self._scaler_state)
        self._scaler_state = None

    def state_dict(self) -> dict:
        "The loss scaler's state (scale, growth tracker): empty without fp16 or before the first step."
        return {'scaler': self.scaler.state_dict()} if self.scaler is not None else {}

    def load_state_dict(self, sd: dict) -> None:
        "Keep what `state_dict` gave for the scaler that the next fit makes (a resume calls this before that)."
        self._scaler_state = sd.get('scaler') or None  # {} is a scaler that never stepped: nothing to restore

    def unscale_grads(self, learn) -> None:
        "Divide the gradients by the loss scale now (before clipping them), once per step; a no-op without fp16."
        if self.scaler is not None: self.scaler.unscale_(learn.opt)

    def before_batch(self, learn):
        self._ctx = torch.autocast(self.device_type, dtype=self.dtype)
        self._ctx.__enter__()

    def _exit(self):
        if self._ctx is not None:
            self._ctx.__exit__(None, None, None)
            self._ctx = None

    def after_loss(self, learn): self._exit()
    def cleanup_batch(self, learn): self._exit()  # also when the batch ended by an exception

    def backward(self, learn):
        if self.scaler is None: learn.loss.backward()
        else: self.scaler.scale(learn.loss).backward()

    def step(self, learn):
        if self.scaler is None: learn.opt.step()
        else:
            self.scaler.step(learn.opt)
            self.scaler.update()


def _channels_last(x):
    return x.contiguous(memory_format=torch.channels_last) if isinstance(x, torch.Tensor) and x.dim() == 4 else x


class ChannelsLastCB(Callback):
    "Put the model and every 4-d input batch in `torch.channels_last` memory format (fast convolutions on CPU/GPU)."
    order = DeviceCB.order + 5

    def before_fit(self, learn):
        learn.model.to(memory_format=torch.channels_last)
        if 'opt' in learn.__dict__: match_state_layout(learn.opt)  # e.g. state loaded by a resume before this
    def before_batch(self, learn):
        b = learn.batch
        learn.batch = (_channels_last(b[0]), *b[1:])


def warn_fp16_on_cpu() -> None:
    "Say, once a process, that fp16 autocast on a CPU is much slower than fp32 and that bf16 is the CPU's half type."
    warn_once('fp16 on cpu', "fp16 autocast on a CPU runs many times slower than fp32 (26x for a small CNN, "
              "bench/results/fp16_cpu.md): CPUs have no fast fp16 arithmetic. Use bf16 (precision_cbs('bf16') or "
              "MixedPrecision(torch.bfloat16); '--precision bf16' on the command line), fast on CPUs with AMX or "
              "AVX-512 bf16, or fp32")


def cpu_has_bf16() -> bool:
    "Whether this CPU does bf16 arithmetic natively (AMX or AVX-512 bf16), so bf16 autocast speeds training up."
    try: flags = Path('/proc/cpuinfo').read_text()
    except OSError: flags = ''
    return any(f in flags for f in (' amx_bf16', ' avx512_bf16')) or 'AMX' in torch.backends.cpu.get_cpu_capability()


def precision_cbs(precision: str, device=None) -> list:
    "Callbacks for `precision`: 'fp32', 'bf16', 'fp16', 'channels-last', 'bf16-cl' (bf16 and channels-last)."
    table = {'fp32': [], 'bf16': [MixedPrecision(torch.bfloat16)], 'fp16': [MixedPrecision(torch.float16)],
             'channels-last': [ChannelsLastCB()], 'bf16-cl': [MixedPrecision(torch.bfloat16), ChannelsLastCB()]}
    if precision not in table: raise ValueError(f"precision must be one of {', '.join(table)}; got {precision!r}")
    return table[precision]


@dataclass
class SpeedPlan:
    "What `fastest_plan` chose for a device, each choice with its reason in `why`."
    device: str
    precision: str  # a `precision_cbs` setting
    channels_last: bool
    optimizer: str  # AdamW's implementation: 'fused', 'foreach' or 'for-loop'
    compile: str | None  # a `CompileCB` mode, or None to stay eager
    why: dict = field(default_factory=dict)

    def cbs(self) -> list:
        "The callbacks that put the plan into effect: precision and memory format, and `CompileCB` if it compiles."
        return precision_cbs(self.precision) + ([CompileCB(self.compile)] if self.compile else [])

    def opt_kwargs(self) -> dict:
        "Keyword arguments that select the optimizer's implementation, e.g. `optim.AdamW(ps, lr, **plan.opt_kwargs())`."
        return {'fused': {'fused': True}, 'foreach': {'foreach': True}, 'for-loop': {'foreach': False}}[self.optimizer]

    def __str__(self):
        return '\n'.join(f'{k}: {v} ({self.why[k]})' for k, v in (
            ('precision', self.precision), ('memory format', 'channels-last' if self.channels_last else 'contiguous'),
            ('optimizer', f'{self.optimizer} AdamW'), ('compile', self.compile or 'no'), ('data', self.device)))


#: measured break-even of `CompileCB`, in epochs of the main job's wide ResNet at batch 256 (bench/results/compile.md):
#: on one H200, 'reduce-overhead' takes 0.48 s an epoch against 1.22 s eager after a 14 s first epoch (issue 15)
CUDA_COMPILE_EPOCHS = 19


def fastest_plan(device=None, epochs: int | None = None) -> SpeedPlan:
    """The fastest safe settings for training on `device` (default: the best available) for `epochs` epochs, each
    with its reason: precision and memory format (`fastest_settings`), AdamW's implementation, whether to compile
    (only where the measured speed-up repays the compile time within `epochs`), and where the data lives."""
    device = torch.device(device or default_device())
    precision, why_p = fastest_settings(device)
    cl = precision.endswith('-cl') or precision == 'channels-last'
    why = {'precision': why_p,
           'memory format': 'channels-last: the convolutions run faster on NHWC data' if cl else
           f'contiguous: goes with the {precision} setting'}
    if device.type == 'cuda':
        opt, why['optimizer'] = 'fused', 'CUDA: fused AdamW updates all parameters in a few kernel launches'
    elif device.type == 'cpu':  # fused AdamW runs on CPUs since torch 2.4
        opt, why['optimizer'] = 'fused', ('CPU: a fused AdamW step of the wide ResNet took 13 ms here, foreach 45 ms '
                                          'and the for-loop 50 ms; training steps ran 2 to 13% faster')
    else: opt, why['optimizer'] = 'foreach', f'{device.type}: foreach AdamW (fused is for CPU and CUDA)'
    if device.type == 'cuda':
        cost = (f"CUDA graphs cut an epoch of the wide ResNet from 1.22 s to 0.48 s on an H200, but the first epoch "
                f"takes 14 s (break-even about {CUDA_COMPILE_EPOCHS} epochs)")
        mode = 'reduce-overhead' if epochs is not None and epochs >= CUDA_COMPILE_EPOCHS else None
        why['compile'] = (f'reduce-overhead for {epochs} epochs: {cost}' if mode else
                          f'eager for {epochs} epochs: {cost}' if epochs is not None else
                          f'eager, as the number of epochs is not given (pass epochs=): {cost}')
    else:
        mode, why['compile'] = None, ('eager: with bf16 and channels-last, compiled training steps were 9% slower '
                                      'than eager ones on this CPU (the convolutions are oneDNN kernels either way), '
                                      'after one to two minutes of compiling')
    why['data'] = (f'keep the data on {device} (fashion_dls(device=...)): a batch that never crosses the bus costs '
                   f'nothing to move' if device.type != 'cpu' else 'cpu: the data is already where the model is')
    return SpeedPlan(str(device), precision, cl, opt, mode, why)


def fastest_settings(device=None) -> tuple[str, str]:
    "The fastest safe precision setting for `device` (default: the best available) and why, e.g. ('bf16-cl', '...')."
    device = torch.device(device or default_device())  # MINIAI_DEVICE=cpu on a GPU machine plans for the CPU
    if device.type == 'cuda':
        if cuda_has_bf16(device): return 'bf16-cl', 'CUDA GPU with bf16 (compute capability 8.0+): bf16 autocast + channels-last'
        return 'fp16', 'CUDA GPU without bf16 in hardware (compute capability < 8.0): fp16 autocast with loss scaling'
    if device.type == 'cpu' and cpu_has_bf16():
        return 'bf16-cl', 'CPU with AMX/AVX-512 bf16: bf16 autocast + channels-last'
    return 'fp32', f'{device.type} without fast bf16: plain fp32'


# -- Hugging Face Accelerate -----------------------------------------------------------------------------------------

_PRECISIONS = ('no', 'fp16', 'bf16', 'fp8')
#: what `Accelerator.prepare` leaves on the objects it is given (autocast forward, prepared mark, scaler's step)
_ACCELERATE_MARKS = ('forward', '_original_forward', '_is_accelerate_prepared', 'step')


def _keep_attrs(obj, names) -> Callable[[], None]:
    "A function that puts the instance attributes `names` of `obj` back as they are now (removing those now absent)."
    d = getattr(obj, '__dict__', None)
    if d is None: return lambda: None
    saved = {n: d[n] for n in names if n in d}
    def undo():
        for n in names:
            if n in saved: d[n] = saved[n]
            else: d.pop(n, None)
    return undo


def _accelerate():
    try:
        import accelerate
        import accelerate.state
    except ImportError as e:
        raise ImportError('AccelerateCB needs Hugging Face Accelerate, which is not installed: pip install accelerate '
                          "(or pip install -e '.[dev]' in a checkout of miniai)") from e
    return accelerate


class AccelerateCB(TrainCB):
    """Train through Hugging Face Accelerate (`pip install accelerate`), for a plain `Learner` (like `TrainCB`, the
    first `n_inp` batch items go to the model). `before_fit` hands the model, the optimizer and the torch
    `DataLoader`s to `Accelerator.prepare` (device placement; DDP, FSDP or DeepSpeed over the processes `accelerate
    launch` started; mixed precision), and `backward` is the accelerator's.

    `mixed_precision`: 'no', 'bf16' (CPU and GPU), 'fp16' (GPU, with loss scaling; on a CPU Accelerate trains in
    fp32, and this says so in a warning), 'fp8', or None for what `accelerate launch`/`accelerate config` chose.
    miniai's `TensorDataLoader` is not a torch DataLoader, so Accelerate leaves it alone: it shards itself (each
    process takes its interleaved part of one shared order) and its batches are moved to the accelerator's device.
    With several processes the metrics are merged over them before they are computed, and only the main process
    prints and writes; `learn.save` (and so `SaveModelCB`) writes the unwrapped model, so a checkpoint loads into
    the plain one. After the fit, however it ends, the Learner holds its own model, optimizer and loaders again.
    `accelerator_kwargs` go to `accelerate.Accelerator`."""
    order = DeviceCB.order + 10

    def __init__(self, n_inp: int = 1, mixed_precision: str | None = 'fp16', **accelerator_kwargs):
        super().__init__(n_inp)
        if mixed_precision not in _PRECISIONS + (None,):
            raise ValueError(f"AccelerateCB: mixed_precision must be one of {', '.join(map(repr, _PRECISIONS))} or "
                             f"None; got {mixed_precision!r}")
        self.mixed_precision, self.accelerator_kwargs, self._undo = mixed_precision, accelerator_kwargs, []
        self.acc = self._new_accelerator()

    def _new_accelerator(self):
        accelerate = _accelerate()
        kw = dict(self.accelerator_kwargs)
        # launched as several processes (`accelerate launch --multi_gpu`, torchrun) where there is no GPU: Accelerate
        # joins them into one job (gloo) only when told it runs on CPUs; otherwise each would train alone
        if world_size() > 1 and not torch.cuda.is_available(): kw.setdefault('cpu', True)
        # Accelerate keeps one precision per process and refuses to change it; a notebook that tries fp16, then bf16,
        # gets what it asked for (the process group, held apart from this state, is kept)
        state = accelerate.state.AcceleratorState
        held = getattr(state, '_shared_state', {}).get('_mixed_precision')
        if self.mixed_precision is not None and held not in (None, self.mixed_precision): state._reset_state()
        acc = accelerate.Accelerator(mixed_precision=self.mixed_precision, **kw)
        if acc.state.mixed_precision == 'fp16' and acc.device.type == 'cpu':
            warnings.warn("AccelerateCB(mixed_precision='fp16'): fp16 needs a GPU; on the CPU Accelerate trains in "
                          "fp32. Pass mixed_precision='bf16' (fast on CPUs with AMX/AVX-512 bf16) or 'no'.",
                          stacklevel=3)
        return acc

    def _check_fp16(self, learn, opt):
        "fp16 scales the loss: the scaled backward must be ours, and the optimizer one the scaler can unscale."
        if getattr(type(learn), 'backward', None) is not None:
            raise TypeError(f"AccelerateCB(mixed_precision='fp16') scales the loss in its own backward, but "
                            f"{type(learn).__name__} defines backward itself: use a plain Learner with AccelerateCB, "
                            f"or mixed_precision='bf16'")
        if opt is not None and not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"AccelerateCB(mixed_precision='fp16') unscales gradients in a torch.optim.Optimizer; "
                            f"{type(opt).__name__} is not one: use a torch optimizer, or mixed_precision='bf16' "
                            f"or 'no'")

    def before_fit(self, learn):
        if self.mixed_precision is not None and self.acc.state.mixed_precision != self.mixed_precision:
            self.acc = self._new_accelerator()  # another AccelerateCB has set the process's precision since
        acc, opt, n = self.acc, learn.__dict__.get('opt'), self.acc.num_processes
        if acc.scaler is not None: self._check_fp16(learn, opt)
        dls = {k: getattr(learn.dls, k) for k in ('train', 'valid') if getattr(learn.dls, k, None) is not None}
        for k, dl in dls.items():
            if n > 1 and not isinstance(dl, DataLoader) and not hasattr(dl, 'world_size'):
                raise TypeError(f'AccelerateCB cannot share dls.{k} (a {type(dl).__name__}) among {n} processes: use '
                                f'a torch DataLoader or miniai.fashion.TensorDataLoader')
        todo = [learn.model, *([opt] if opt is not None else []),
                *[dl for dl in dls.values() if isinstance(dl, DataLoader)]]
        self._undo += [_keep_attrs(learn, ('model', 'opt', 'save')), _keep_attrs(learn.dls, tuple(dls)),
                       *[_keep_attrs(o, _ACCELERATE_MARKS) for o in todo[:1 + (opt is not None)]],
                       *[_keep_attrs(dl.sampler, ('generator',)) for dl in todo if isinstance(dl, DataLoader)]]
        prepared = acc.prepare(*todo)
        prepared = list(prepared) if len(todo) > 1 else [prepared]
        learn.model = prepared.pop(0)
        if opt is not None: learn.opt = prepared.pop(0)
        for k, dl in dls.items():
            if isinstance(dl, DataLoader): setattr(learn.dls, k, prepared.pop(0))
            elif n > 1:
                self._undo.append(_keep_attrs(dl, ('rank', 'world_size')))
                dl.rank, dl.world_size = acc.process_index, n
        metrics = getattr(learn, 'metrics', None)
        if n > 1 and metrics is not None:
            from .distributed import _measured_anywhere, _synced_compute
            self._undo.append(_keep_attrs(metrics, ('compute', 'measured')))
            metrics.compute, metrics.measured = _synced_compute, _measured_anywhere
        if hasattr(type(learn), 'save'): learn.save = self._unwrapped_save(learn)
        dev = acc.device  # made concrete, so batches already there compare equal ('cpu:0' would copy every batch)
        if dev.type == 'cpu': dev = torch.device('cpu')
        elif dev.type == 'cuda' and dev.index is None: dev = torch.device('cuda', torch.cuda.current_device())
        self.device = dev

    def _unwrapped_save(self, learn):
        "`learn.save` for the time of the fit, writing the unwrapped model (its plain keys load into the plain model)."
        save = type(learn).save
        def save_unwrapped(path, **extra):
            wrapped = learn.model
            learn.model = self.acc.unwrap_model(wrapped, keep_torch_compile=False)
            try: return save(learn, path, **extra)
            finally: learn.model = wrapped
        return save_unwrapped

    def before_batch(self, learn):
        # a prepared DataLoader already delivers on the device; a TensorDataLoader may hold its data elsewhere
        x = learn.batch[0] if isinstance(learn.batch, (tuple, list)) and learn.batch else None
        if isinstance(x, torch.Tensor) and x.device != self.device: learn.batch = to_device(learn.batch, self.device)

    def backward(self, learn): self.acc.backward(learn.loss)

    def unscale_grads(self, learn) -> None:
        "Divide fp16 gradients by the loss scale now (for `GradClipCB`); Accelerate unscales each optimizer once."
        self.acc.unscale_gradients(learn.opt)

    def cleanup_fit(self, learn):
        undo, self._undo = self._undo, []
        for f in reversed(undo): f()
        self.acc.free_memory()  # drop the accelerator's references to this fit's model, optimizer and loaders
