"""Runs you can load: `load_run(folder)` gives a Learner for a run folder of the main job (`python -m miniai train`),
from what the run recorded next to its checkpoints (`model.json`: the model's name and arguments, the classes, how
inputs were made, the data), with no knowledge of the recipe's code. It predicts, interprets, fine-tunes and exports
as the Learner that trained it."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..core.learner import DeviceCB, Learner, TrainCB
from ..data.items import Preprocess
from ..data.loader import TensorDataLoader

__all__ = ['CHECKPOINTS', 'RunError', 'run_record', 'load_run']

CHECKPOINTS = ('final.ckpt', 'best.ckpt', 'last.ckpt', 'interrupted.ckpt')  # the first found is loaded


class RunError(ValueError):
    "A folder that is not a loadable run of the main job: no record, a record of another format, no checkpoint."


def run_record(folder: str | os.PathLike) -> dict:
    "What the run in `folder` recorded about its model and data (`model.json`), checked."
    from .recipe import RUN_FILE, RUN_FORMAT
    folder = Path(folder)
    try: meta = json.loads((folder / RUN_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        why = 'no such folder' if not folder.is_dir() else f'no readable {RUN_FILE} ({getattr(e, "strerror", e) or e})'
        raise RunError(f'{folder}: {why}; load_run takes a run folder of `python -m miniai train` (one written '
                       f'since runs record their model), and load_exported a folder of learn.export') from None
    if meta.get('format') != RUN_FORMAT:
        raise RunError(f'{folder / RUN_FILE}: format {meta.get("format")!r}, expected {RUN_FORMAT!r}')
    return meta


def _stand_in(meta: dict):
    "Loaders with no items that know what the data was (shape, normalisation, classes): enough to predict and export."
    from ..data.dataloaders import DataLoaders  # imported when needed: it brings matplotlib (0.4 s)
    prep = Preprocess.from_json(meta)
    x, y = torch.zeros(0, *prep.shape, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64)
    norm: dict[str, Any] = {} if prep.mean is None else dict(mean=prep.mean, std=prep.std)
    dls = DataLoaders(TensorDataLoader(x, y, **norm), TensorDataLoader(x, y, **norm))
    dls.mean, dls.std, dls.classes, dls.source = prep.mean, prep.std, list(meta['classes']), 'none'
    return dls


def _data(meta: dict, data, bs: int):
    "The loaders of `data`: 'auto' (the run's own data where it still is, else a stand-in), None, or a path."
    from .recipe import recipe_dls
    rec = meta.get('data') or {}
    if data is None: return _stand_in(meta)
    if data == 'auto':
        where = rec.get('data')
        if where is None or (where != 'fashion' and not Path(where).exists()): return _stand_in(meta)
        data = where
    args: dict[str, Any] = {k: rec.get(k) for k in ('n_train', 'n_valid', 'size', 'valid_pct')}
    dls = recipe_dls(str(data), bs, seed=rec.get('seed', 42), **args)
    if list(dls.classes) != list(meta['classes']):
        raise RunError(f'{data}: its classes {list(dls.classes)} are not the run\'s {meta["classes"]}')
    return dls


def load_run(folder: str | os.PathLike, checkpoint: str | os.PathLike | None = None, data: str | os.PathLike | None = 'auto', bs: int = 256, lr: float = 1e-3) -> Learner:
    """A Learner for the run in `folder`: its model rebuilt from `model.json` with the weights of `checkpoint` (a
    file name in the folder or a path; default: the first of `CHECKPOINTS` there, the finished run's weights first),
    cross-entropy, AdamW at `lr` for fine-tuning, accuracy as its metric. `data`: 'auto' reloads the run's data if it
    is still where it was (for interpreting or fine-tuning), None gives loaders with no items that still know the
    shape, normalisation and classes (enough for `predict` and `export`), a path loads other data of those classes."""
    from ..callbacks.metrics import MetricsCB, quiet_torcheval
    with quiet_torcheval(): from torcheval.metrics import MulticlassAccuracy
    from .recipe import build_model
    folder = Path(folder)
    meta = run_record(folder)
    if (kind := (meta.get('targets') or {}).get('kind', 'class')) != 'class':
        raise RunError(f'{folder}: a {kind} run (miniai train --task {kind}); load_run rebuilds runs of one class per '
                       f'image only: load its final.ckpt into the model with learn.load, or export it from training')
    if checkpoint is None:
        checkpoint = next((folder / c for c in CHECKPOINTS if (folder / c).is_file()), None)
        if checkpoint is None: raise RunError(f'{folder}: no checkpoint ({", ".join(CHECKPOINTS)}) to load')
    ckpt = Path(checkpoint) if Path(checkpoint).is_file() else folder / checkpoint
    learn = Learner(build_model(**meta['build_model']), _data(meta, data, bs), F.cross_entropy, lr=lr,
                    cbs=[DeviceCB(), TrainCB(), MetricsCB(accuracy=MulticlassAccuracy())], opt_func=torch.optim.AdamW)
    learn.load(ckpt, with_opt=False)
    learn.model.eval()
    learn.run_folder, learn.checkpoint = folder, ckpt
    return learn
