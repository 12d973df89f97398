"""Tensors inside nested containers (dicts, lists, tuples, named tuples): one walker, for every job that reaches into a
batch or a model's output (moving it, copying it, finding its shape or devices)."""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

__all__ = ['apply_to_tensors', 'tensors_in', 'first_shape', 'to_cpu']


def apply_to_tensors(f: Callable[[torch.Tensor], Any], x: Any) -> Any:
    "`x` with every tensor `t` inside it replaced by `f(t)`; containers keep their type, other values stay as they are."
    if isinstance(x, torch.Tensor): return f(x)
    if isinstance(x, Mapping): return {k: apply_to_tensors(f, v) for k, v in x.items()}
    if isinstance(x, tuple) and hasattr(x, '_fields'): return type(x)(*(apply_to_tensors(f, v) for v in x))
    if isinstance(x, (list, tuple)): return type(x)(apply_to_tensors(f, v) for v in x)
    return x


def tensors_in(x: Any) -> Iterator[torch.Tensor]:
    "Every tensor inside `x`, depth first, in order (a dict's values in its order)."
    if isinstance(x, torch.Tensor): yield x
    elif isinstance(x, Mapping):
        for v in x.values(): yield from tensors_in(v)
    elif isinstance(x, (list, tuple)):
        for v in x: yield from tensors_in(v)


def first_shape(x: Any) -> tuple | None:
    "The shape of `x`, or of the first tensor inside it; None if there is none."
    t = next(tensors_in(x), None)
    return None if t is None else tuple(t.shape)


def _cpu(t: torch.Tensor) -> torch.Tensor:
    res = t.detach().cpu()
    return res.float() if res.dtype == torch.float16 else res


def to_cpu(x: Any) -> Any:
    "Detach and move tensors (also inside dicts, lists, tuples) to the CPU; float16 becomes float32."
    return apply_to_tensors(_cpu, x)
