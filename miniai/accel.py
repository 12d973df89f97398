"""The fast paths: mixed precision (bf16 on CPUs with AMX, fp16 or bf16 on CUDA) and channels-last memory format."""
from __future__ import annotations

from pathlib import Path

import torch

from .callback import Callback
from .learner import DeviceCB, TrainCB

__all__ = ['MixedPrecision', 'ChannelsLastCB', 'cpu_has_bf16', 'fastest_settings', 'precision_cbs']


def _device_of(model) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device('cpu')


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
        self.dtype, self.scaler, self._ctx = dtype, None, None

    def before_fit(self, learn):
        dev = _device_of(learn.model)
        self.device_type = dev.type
        if self.dtype is None:
            self.dtype = (torch.bfloat16 if dev.type != 'cuda' or torch.cuda.is_bf16_supported() else torch.float16)
        if self.dtype == torch.float16 and dev.type == 'cuda':
            if getattr(type(learn), 'backward', None) is not None:
                raise TypeError(f'MixedPrecision(fp16) scales the loss in its own backward and step, but '
                                f'{type(learn).__name__} defines those itself; use a plain Learner with '
                                f'MixedPrecision, or dtype=torch.bfloat16')
            self.scaler = torch.amp.GradScaler('cuda')

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

    def before_fit(self, learn): learn.model.to(memory_format=torch.channels_last)
    def before_batch(self, learn):
        b = learn.batch
        learn.batch = (_channels_last(b[0]), *b[1:])


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


def fastest_settings(device=None) -> tuple[str, str]:
    "The fastest safe precision setting for `device` (default: the best available) and why, e.g. ('bf16-cl', '...')."
    device = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if device.type == 'cuda':
        if torch.cuda.is_bf16_supported(): return 'bf16-cl', 'CUDA GPU with bf16: bf16 autocast + channels-last'
        return 'fp16', 'CUDA GPU without bf16: fp16 autocast with loss scaling'
    if device.type == 'cpu' and cpu_has_bf16():
        return 'bf16-cl', 'CPU with AMX/AVX-512 bf16: bf16 autocast + channels-last'
    return 'fp32', f'{device.type} without fast bf16: plain fp32'
