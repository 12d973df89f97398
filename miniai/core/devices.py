"""Where tensors live: the one place that decides devices (`default_device`, `resolve_device`, `to_device`), and
where a model is (`model_device`, `model_dtype`).

The default device is worked out when it is first needed, not at import, so importing miniai never fails:
- `$MINIAI_DEVICE` wins when set ('cpu', 'cuda', 'cuda:1', 'mps'...): `MINIAI_DEVICE=cpu` makes every default CPU,
  the way to run several CPU processes on a machine with fewer GPUs than processes;
- else a CUDA GPU, then Apple's MPS, then the CPU.
Under `torchrun` (LOCAL_RANK is set) 'cuda' means this process's own GPU, cuda:LOCAL_RANK: it is made the current
device as soon as the library resolves a device, so even a bare 'cuda' (`.to('cuda')`, `DeviceCB('cuda')`) lands
there. Asking for a GPU that this machine does not have is one clear error naming the numbers and the ways out.
"""
from __future__ import annotations

import copy
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import default_collate

from .nested import apply_to_tensors
from .ranks import local_rank, local_world_size

__all__ = ['def_device', 'default_device', 'resolve_device', 'to_device', 'collate_device', 'pins_by_default',
           'deliver_loader', 'HostCopies', 'cpu_copy', 'pinned_rows', 'model_device', 'model_dtype', 'ENV']

ENV = 'MINIAI_DEVICE'


def _best_device() -> str:
    if torch.cuda.is_available(): return 'cuda'
    mps = getattr(torch.backends, 'mps', None)
    if mps is not None and mps.is_available(): return 'mps'
    return 'cpu'


def _too_few_gpus(n_procs: int, n_gpus: int) -> RuntimeError:
    return RuntimeError(
        f'miniai: {n_procs} processes on this machine (torchrun --nproc_per_node={n_procs}; this is LOCAL_RANK '
        f'{local_rank()}) but only {n_gpus} CUDA GPU(s) visible, and NCCL needs one GPU per process. Either start at '
        f'most {n_gpus} process(es) per machine (torchrun --nproc_per_node={n_gpus}), or run the processes on the '
        f'CPU: set {ENV}=cpu (every default device becomes the CPU), or pass DeviceCB("cpu"), '
        f'DDPCB(backend="gloo") and fashion_dls(device="cpu"). If each process is shown a GPU of its own '
        f'(CUDA_VISIBLE_DEVICES set per process), set {ENV}=cuda:0.')


def _this_process_gpu() -> torch.device:
    """This process's GPU, made current: cuda:LOCAL_RANK when every process on the machine sees all its GPUs (torchrun),
    cuda:0 when the launcher showed this process only GPUs of its own (Slurm's --gpus-per-task, one GPU per
    container: fewer visible than processes, and not started by torchrun, whose processes all see the same GPUs);
    without LOCAL_RANK, the current GPU."""
    if 'LOCAL_RANK' not in os.environ: return torch.device('cuda')
    n_procs, n_gpus = max(local_world_size(), local_rank() + 1), torch.cuda.device_count()
    if n_procs <= n_gpus: idx = local_rank()
    elif n_gpus >= 1 and 'TORCHELASTIC_RUN_ID' not in os.environ: idx = 0  # set by torchrun's agent in each process
    else: raise _too_few_gpus(n_procs, n_gpus)
    torch.cuda.set_device(idx)  # so a bare 'cuda' anywhere (ours or the user's) means this GPU too
    return torch.device('cuda', idx)


def _from_env() -> torch.device | None:
    want = os.environ.get(ENV, '').strip()
    if not want: return None
    try: dev = torch.device(want)
    except RuntimeError as e: raise ValueError(f'{ENV}={want!r} is not a device torch knows ({e})') from None
    if dev.type == 'cuda' and not torch.cuda.is_available():
        raise RuntimeError(f'{ENV}={want!r} asks for a CUDA GPU, but torch sees none here; unset it or use cpu')
    return dev


def resolve_device(device: str | torch.device | None = None) -> str:
    """The device `device` stands for in this process, as a string: None means `default_device()`; 'cuda' without
    an index means this process's GPU (cuda:LOCAL_RANK under torchrun, or the GPU `$MINIAI_DEVICE` names)."""
    if device is None: return default_device()
    dev = torch.device(device)
    if dev.type != 'cuda' or dev.index is not None: return str(dev)
    env = _from_env()
    return default_device() if env is not None and env.type == 'cuda' else str(_this_process_gpu())


def default_device() -> str:
    """Where miniai puts models and data unless told otherwise: `$MINIAI_DEVICE`, else a CUDA GPU (this process's
    own under torchrun), else MPS, else the CPU. 'cuda' in a single process, 'cuda:N' under torchrun."""
    env = _from_env()
    if env is not None:
        if env.type != 'cuda': return str(env)
        if env.index is None: return str(_this_process_gpu())
        torch.cuda.set_device(env)  # a bare 'cuda' means the named GPU too
        return str(env)
    best = _best_device()
    return str(_this_process_gpu()) if best == 'cuda' else best


def __getattr__(name: str):
    # `def_device` is looked up when it is read (PEP 562), so importing this module cannot fail on a machine where
    # resolving the device would (more torchrun processes than GPUs), and `$MINIAI_DEVICE` set later is honoured
    if name == 'def_device': return default_device()
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__(): return sorted([*globals(), 'def_device'])  # so tab completion in notebooks offers it


def to_device(x: Any, device: str | torch.device | None = None) -> Any:
    """Move a tensor, or the tensors inside nested dicts, lists and tuples, to `device` (default: `default_device()`).
    Copies to an accelerator are asynchronous (`non_blocking`): from pinned CPU memory they overlap with compute and
    never make the CPU wait. Copies to the CPU are not, since the CPU could otherwise read data still being copied."""
    device = resolve_device(device)
    non_blocking = torch.device(device).type != 'cpu'
    return apply_to_tensors(lambda t: t.to(device, non_blocking=non_blocking), x)


def pins_by_default(device: str | torch.device) -> bool:
    "Whether data held on `device` will be trained on a CUDA GPU here, so its batches are worth pinning."
    return (torch.device(device).type == 'cpu' and torch.cuda.is_available()
            and os.environ.get(ENV, '').strip().split(':')[0] in ('', 'cuda'))


def pinned_rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    "Rows `idx` of the CPU tensor `t`, gathered straight into pinned memory: a batch the GPU can copy asynchronously."
    # Pinning all of `t` would not do: indexing a pinned tensor gives an ordinary (pageable) one, and a copy from
    # pageable memory makes the CPU wait. So the batch itself is gathered into a pinned buffer, in one pass. The
    # buffer comes from torch's caching pinned allocator, which does not hand it out again before the copy that
    # reads it has finished, so a batch can never be overwritten while it is on its way to the GPU.
    out = torch.empty((len(idx), *t.shape[1:]), dtype=t.dtype, pin_memory=True)
    return torch.index_select(t, 0, idx, out=out)


def deliver_loader(dl: Any, device: str | torch.device) -> Callable[[], object]:
    """Ask the loader `dl` to hand out its batches on `device` if it can (it has `deliver_to`, as `TensorDataLoader`
    does); returns the function that puts its delivery back as it was (nothing to do for other loaders)."""
    deliver = getattr(dl, 'deliver_to', None)
    if not callable(deliver): return lambda: None
    before = dl.delivery
    deliver(device)
    return lambda: deliver(before)


class HostCopies:
    """Copy results to the CPU as they come, without making the CPU wait: call it on a tensor (or nested tensors) to
    get CPU ones; `wait()` once before reading them. A CUDA tensor is copied into pinned memory asynchronously, in
    its stream's order, so its GPU memory may be reused as soon as the caller lets go of it (what is held on the GPU
    stays one batch deep); CPU tensors are taken as they are, those on other devices copied at once."""
    def __init__(self) -> None: self._from = set()

    def __call__(self, x: Any) -> Any: return apply_to_tensors(self.copy, x)

    def copy(self, t: torch.Tensor) -> torch.Tensor:
        "One tensor on the CPU (pinned, still on its way, for a CUDA tensor)."
        if t.device.type == 'cpu': return t
        if t.device.type != 'cuda': return t.to('cpu')
        self._from.add(t.device)
        return torch.empty_like(t, device='cpu', pin_memory=True).copy_(t, non_blocking=True)

    def wait(self) -> None:
        "Wait until every copy made so far has arrived."
        for dev in self._from: torch.cuda.synchronize(dev)
        self._from.clear()


def cpu_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` on the CPU, the model itself left as it is: each parameter and buffer is copied straight to
    the CPU, never first duplicated where it is (as `copy.deepcopy(model).cpu()` would, on the GPU)."""
    memo = {}
    for t in (*model.parameters(), *model.buffers()):
        if id(t) in memo: continue
        host = t.detach().to('cpu', copy=True)
        memo[id(t)] = nn.Parameter(host, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else host
    return copy.deepcopy(model, memo)  # the rest of the model (modules, attributes) copied as usual


def collate_device(b: list) -> Any:
    "`default_collate` the batch `b`, then move it to the default device."
    return to_device(default_collate(b))


def model_device(model: nn.Module) -> torch.device:
    "Where `model` is: the device of its first parameter (or buffer), the CPU for a model with neither."
    t = next(model.parameters(), None)
    if t is None: t = next(model.buffers(), None)
    return t.device if t is not None else torch.device('cpu')


def model_dtype(model: nn.Module) -> torch.dtype:
    "The dtype of `model`'s first floating-point parameter or buffer; float32 for a model with none."
    return next((t.dtype for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()), torch.float32)
