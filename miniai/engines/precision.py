"""Precision and memory format: mixed precision (bf16 on CPUs with AMX or AVX-512 bf16, fp16 or bf16 on CUDA), and
channels-last; which hardware does bf16 fast."""
from __future__ import annotations

from pathlib import Path

import torch

from ..core.devices import model_device
from ..core.events import Callback
from ..core.learner import DeviceCB, Learner, TrainCB
from ..core.messages import warn_once
from ..core.state import match_state_layout

__all__ = ['MixedPrecision', 'ChannelsLastCB', 'warn_fp16_on_cpu', 'cpu_has_bf16', 'cuda_has_bf16', 'precision_cbs']

def cuda_has_bf16(device: str | torch.device | None = None) -> bool:
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

    def __init__(self, dtype: torch.dtype | None = None, n_inp: int = 1) -> None:
        super().__init__(n_inp)
        if dtype not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f'MixedPrecision: dtype must be torch.bfloat16, torch.float16 or None (choose for the '
                             f'device); got {dtype!r}')
        self.dtype, self.scaler, self._ctx, self._scaler_state = dtype, None, None, None
        self._asked = dtype  # None: chosen again at each fit, for the device the model is on then

    def before_fit(self, learn: Learner) -> None:
        dev = model_device(learn.model)
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

    @property
    def resume_needs_state(self) -> bool:
        "A resumed fp16 fit needs its loss scale: with fp16 asked for, or a scaler in use."
        return self.scaler is not None or self._asked == torch.float16

    def state_dict(self) -> dict:
        "The loss scaler's state (scale, growth tracker): empty without fp16 or before the first step."
        return {'scaler': self.scaler.state_dict()} if self.scaler is not None else {}

    def load_state_dict(self, sd: dict) -> None:
        "Keep what `state_dict` gave for the scaler that the next fit makes (a resume calls this before that)."
        self._scaler_state = sd.get('scaler') or None  # {} is a scaler that never stepped: nothing to restore

    def unscale_grads(self, learn: Learner) -> None:
        "Divide the gradients by the loss scale now (before clipping them), once per step; a no-op without fp16."
        if self.scaler is not None: self.scaler.unscale_(learn.opt)

    def before_batch(self, learn: Learner) -> None:
        self._ctx = torch.autocast(self.device_type, dtype=self.dtype)
        self._ctx.__enter__()

    def _exit(self):
        if self._ctx is not None:
            self._ctx.__exit__(None, None, None)
            self._ctx = None

    def after_loss(self, learn: Learner) -> None: self._exit()
    def cleanup_batch(self, learn: Learner) -> None: self._exit()  # also when the batch ended by an exception

    def backward(self, learn: Learner) -> None:
        if self.scaler is None: learn.loss.backward()
        else: self.scaler.scale(learn.loss).backward()

    def step(self, learn: Learner) -> None:
        if self.scaler is None: learn.opt.step()
        else:
            self.scaler.step(learn.opt)
            self.scaler.update()


def _channels_last(x):
    return x.contiguous(memory_format=torch.channels_last) if isinstance(x, torch.Tensor) and x.dim() == 4 else x


class ChannelsLastCB(Callback):
    "Put the model and every 4-d input batch in `torch.channels_last` memory format (fast convolutions on CPU/GPU)."
    order = DeviceCB.order + 5

    def before_fit(self, learn: Learner) -> None:
        learn.model.to(memory_format=torch.channels_last)
        if 'opt' in learn.__dict__: match_state_layout(learn.opt)  # e.g. state loaded by a resume before this
    def before_batch(self, learn: Learner) -> None:
        b = learn.batch
        learn.batch = (_channels_last(b[0]), *b[1:])


def warn_fp16_on_cpu() -> None:
    "Say, once a process, that fp16 autocast on a CPU is much slower than fp32 and that bf16 is the CPU's half type."
    warn_once('fp16 on cpu', "fp16 autocast on a CPU runs many times slower than fp32 (bench/results/fp16_cpu.md "
              "measures it): CPUs have no fast fp16 arithmetic. Use bf16 (precision_cbs('bf16') or "
              "MixedPrecision(torch.bfloat16); '--precision bf16' on the command line), fast on CPUs with AMX or "
              "AVX-512 bf16, or fp32")


def cpu_has_bf16() -> bool:
    "Whether this CPU does bf16 arithmetic natively (AMX or AVX-512 bf16), so bf16 autocast speeds training up."
    try: flags = Path('/proc/cpuinfo').read_text()
    except OSError: flags = ''
    return any(f in flags for f in (' amx_bf16', ' avx512_bf16')) or 'AMX' in torch.backends.cpu.get_cpu_capability()


def precision_cbs(precision: str, device: str | torch.device | None = None) -> list:
    "Callbacks for `precision`: 'fp32', 'bf16', 'fp16', 'channels-last', 'bf16-cl' (bf16 and channels-last)."
    table = {'fp32': [], 'bf16': [MixedPrecision(torch.bfloat16)], 'fp16': [MixedPrecision(torch.float16)],
             'channels-last': [ChannelsLastCB()], 'bf16-cl': [MixedPrecision(torch.bfloat16), ChannelsLastCB()]}
    if precision not in table: raise ValueError(f"precision must be one of {', '.join(table)}; got {precision!r}")
    return table[precision]
