"""The speed plan: the fastest safe settings for a device (precision, memory format, AdamW's implementation, whether to
compile, where the data lives), each with its reason; the reasons cite what bench/results measured."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..core.devices import default_device
from .compile import CompileCB
from .precision import cpu_has_bf16, cuda_has_bf16, precision_cbs

__all__ = ['SpeedPlan', 'fastest_plan', 'fastest_settings', 'CUDA_COMPILE_EPOCHS']


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


#: measured break-even of `CompileCB`, in epochs of the main job's wide ResNet at batch 256 (bench/results/compile.md)
CUDA_COMPILE_EPOCHS = 19


def fastest_plan(device: str | torch.device | None = None, epochs: int | None = None) -> SpeedPlan:
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
        opt, why['optimizer'] = 'fused', ('CPU: a fused AdamW step of the wide ResNet took about a quarter of the '
                                          'time of foreach or the for-loop, and training steps ran 2 to 13% faster '
                                          '(bench/results/compile.md)')
    else: opt, why['optimizer'] = 'foreach', f'{device.type}: foreach AdamW (fused is for CPU and CUDA)'
    if device.type == 'cuda':
        cost = (f"CUDA graphs cut an epoch of the wide ResNet from 1.22 s to 0.48 s on an H200, but the first epoch "
                f"takes 14 s (break-even about {CUDA_COMPILE_EPOCHS} epochs, bench/results/compile.md)")
        mode = 'reduce-overhead' if epochs is not None and epochs >= CUDA_COMPILE_EPOCHS else None
        why['compile'] = (f'reduce-overhead for {epochs} epochs: {cost}' if mode else
                          f'eager for {epochs} epochs: {cost}' if epochs is not None else
                          f'eager, as the number of epochs is not given (pass epochs=): {cost}')
    else:
        mode, why['compile'] = None, ('eager: with bf16 and channels-last, compiled training steps were about 9% slower '
                                      'than eager ones on the CPUs measured (the convolutions are oneDNN kernels either '
                                      'way), after one to two minutes of compiling (bench/results/compile.md)')
    why['data'] = (f'keep the data on {device} (fashion_dls(device=...)): a batch that never crosses the bus costs '
                   f'nothing to move' if device.type != 'cpu' else 'cpu: the data is already where the model is')
    return SpeedPlan(str(device), precision, cl, opt, mode, why)


def fastest_settings(device: str | torch.device | None = None) -> tuple[str, str]:
    "The fastest safe precision setting for `device` (default: the best available) and why, e.g. ('bf16-cl', '...')."
    device = torch.device(device or default_device())  # MINIAI_DEVICE=cpu on a GPU machine plans for the CPU
    if device.type == 'cuda':
        if cuda_has_bf16(device): return 'bf16-cl', 'CUDA GPU with bf16 (compute capability 8.0+): bf16 autocast + channels-last'
        return 'fp16', 'CUDA GPU without bf16 in hardware (compute capability < 8.0): fp16 autocast with loss scaling'
    if device.type == 'cpu' and cpu_has_bf16():
        return 'bf16-cl', 'CPU with AMX/AVX-512 bf16: bf16 autocast + channels-last'
    return 'fp32', f'{device.type} without fast bf16: plain fp32'
