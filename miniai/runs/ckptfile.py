"""The checkpoint file: one safetensors file, the structure of what it holds as JSON in its header.

Tensors (weights, optimizer state, generator states) go into the safetensors part under keys that say where they
sit; everything else (numbers, strings, lists, dicts, tuples, NumPy arrays) is JSON in the header, with markers for
the tensors and the types JSON lacks. Reading never unpickles anything, and a file that is not what it should be is
one `CheckpointError` naming it. Writing goes through `atomic_path` (a temporary file beside it, synced, then renamed),
so a crash while saving leaves the previous file intact.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..core.files import atomic_path
from ..core.state import CheckpointError

__all__ = ['CheckpointError', 'FORMAT', 'write_checkpoint', 'read_checkpoint']

FORMAT = 'miniai-checkpoint-1'


def _encode(obj, prefix: str, tensors: dict):
    "JSON-able form of `obj`, its tensors moved into `tensors` under keys starting with `prefix`."
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous().clone()
        return {'__tensor__': prefix}
    if isinstance(obj, np.ndarray): return {'__ndarray__': _encode(torch.from_numpy(obj.copy()), prefix, tensors)}
    if isinstance(obj, dict):
        return {'__dict__': [[k, _encode(v, f'{prefix}.{k}', tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        items = [_encode(v, f'{prefix}.{i}', tensors) for i, v in enumerate(obj)]
        return {'__tuple__': items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, (bool, int, float, str)): return obj
    if isinstance(obj, (np.integer, np.floating)): return obj.item()
    raise TypeError(f'cannot store a {type(obj).__name__} at {prefix!r} in a checkpoint')


def _decode(obj, tensors: dict):
    if isinstance(obj, list): return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict): return obj
    if '__tensor__' in obj:
        key = obj['__tensor__']
        if key not in tensors: raise CheckpointError(f'the header names tensor {key!r}, which the file lacks')
        return tensors[key]
    if '__ndarray__' in obj: return _decode(obj['__ndarray__'], tensors).numpy()  # pyright: ignore[reportAttributeAccessIssue]  (an __ndarray__ holds a tensor)
    if '__tuple__' in obj: return tuple(_decode(v, tensors) for v in obj['__tuple__'])
    if '__dict__' in obj: return {k: _decode(v, tensors) for k, v in obj['__dict__']}
    raise CheckpointError(f'unexpected entry in the checkpoint header: {str(obj)[:80]}')


def write_checkpoint(state: dict, path: Path) -> None:
    "Write `state` (tensors, numbers, strings, lists, tuples, dicts, arrays) to the checkpoint file `path`, atomically."
    tensors = {}
    meta = _encode(state, 'ckpt', tensors)
    with atomic_path(path) as tmp: save_file(tensors, str(tmp), metadata={'format': FORMAT, 'miniai': json.dumps(meta)})


def read_checkpoint(path: str | os.PathLike) -> dict:
    "The contents of a checkpoint file, checked; raises `CheckpointError` naming the file and the problem."
    path = Path(path)
    if not path.is_file(): raise CheckpointError(f'no checkpoint at {path}')
    try:
        with safe_open(str(path), framework='pt') as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f'{path} is not a readable miniai checkpoint (safetensors): {e}. It may be '
                              f'truncated, corrupted, or another kind of file (pickles are never loaded).') from e
    if header.get('format') != FORMAT:
        raise CheckpointError(f'{path}: header format is {header.get("format")!r}, expected {FORMAT!r}')
    try: meta = json.loads(header['miniai'])
    except (KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f'{path}: the JSON part of the header is missing or damaged ({e})') from e
    try: return _decode(meta, tensors)  # pyright: ignore[reportReturnType]  (the top level is a dict)
    except CheckpointError as e: raise CheckpointError(f'{path}: {e} (tampered with?)') from None
