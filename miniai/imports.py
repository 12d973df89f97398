"""Everything the course's lessons start from, in one line: `from miniai.imports import *`. A front: it defines
nothing, it gathers names.

First the standard and third-party names the course's `imports` module gives (torch, nn, F, optim, lr_scheduler,
fastcore as fc, numpy as np, matplotlib as mpl, plt, torchvision's transforms as T and its functional API as TF,
datasets and `load_dataset`, ...), then the public names (`__all__`) of miniai's room modules. Where two modules
export one name, the later module wins: the course's modules come last, in the course's order, so a name means what
it meant there (`conv` is `miniai.init.conv`, `summary` is `Learner.summary` as `miniai.augment` exports it). Left
out: `miniai.app.cli`, the command line (its `main` and `train` are not for a notebook's namespace).

This module gathers names for notebooks; it costs what it imports (torchvision, datasets) and nothing in the library
imports it.
"""
import importlib
import math
import random
from functools import partial, wraps
from operator import attrgetter, itemgetter
from pathlib import Path

import datasets
import fastcore.all as fc
import matplotlib as mpl
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from datasets import load_dataset
from fastcore.foundation import L
from torch import nn, optim, tensor
from torch.nn import init
from torch.optim import lr_scheduler
from torch.utils.data import DataLoader, default_collate
from torchvision.io import ImageReadMode, read_image

#: the names above, as the course's imports module gives them
THIRD_PARTY = ['torch', 'random', 'datasets', 'math', 'fc', 'np', 'mpl', 'plt', 'T', 'TF', 'F', 'DataLoader',
               'default_collate', 'Path', 'nn', 'tensor', 'init', 'L', 'load_dataset', 'itemgetter', 'attrgetter',
               'partial', 'wraps', 'lr_scheduler', 'optim', 'read_image', 'ImageReadMode']
#: miniai's room modules whose names the course's imports module does not star-import (most of them the course's
#: miniai does not have); their names are laid down first, room by room in the direction of imports
LIBRARY_MODULES = ('core.ranks', 'core.basic_loop', 'core.devices', 'core.events', 'core.messages', 'core.nested',
                   'core.state', 'core.checks', 'core.groups', 'core.learner', 'core.freezing', 'core.files', 'core.memory', 'data.decode',
                   'data.normalise', 'data.loader', 'data.items', 'data.imagecache', 'data.folders', 'data.hf', 'data.show',
                   'data.targets', 'data.targetmetrics', 'data.tables', 'data.dataloaders', 'data.fashion',
                   'data.fashion_tasks', 'data.augment', 'data.warp', 'data.masks', 'data.segmetrics', 'callbacks.metrics',
                   'callbacks.progress', 'callbacks.suggest', 'callbacks.schedule', 'callbacks.onecycle', 'callbacks.hooks',
                   'callbacks.transform', 'callbacks.mix', 'callbacks.preds',
                   'callbacks.averaging', 'callbacks.tricks', 'callbacks.loggers', 'callbacks.trackers',
                   'callbacks.clients', 'models.layers', 'models.backbones', 'models.vision', 'models.resnet',
                   'models.unet', 'models.segment', 'models.diffusion', 'engines.precision', 'engines.compile', 'engines.plan',
                   'engines.ddp', 'engines.cluster', 'engines.accelerate', 'runs.ckptfile', 'runs.checkpoint',
                   'runs.interrupt', 'runs.autoresume', 'runs.compare', 'tools.summary', 'tools.inference', 'tools.results', 'tools.interpret',
                   'tools.export', 'tools.fid', 'app.recipe', 'app.runfolder',
                   'app.predict', 'app.tasks')
#: the course's modules, in the order its imports module star-imports them (later ones win)
COURSE_MODULES = ('datasets', 'conv', 'learner', 'activations', 'init', 'sgd', 'resnet', 'augment', 'accel',
                  'training')


def _public_names() -> tuple[dict, dict]:
    """Every module's `__all__` names and objects, later modules overriding earlier ones; and the names a module
    works out only when they are read (`conv.def_device`), with their modules: unresolved here too."""
    names, lazy = {}, {}
    for mod in LIBRARY_MODULES + COURSE_MODULES:
        m = importlib.import_module(f'{__package__}.{mod}')
        for n in m.__all__:
            if n in vars(m): names[n] = getattr(m, n)
            else: lazy[n] = m
    return names, lazy


def __getattr__(name: str):
    # read when used, as in their own module: importing this module never picks a device (which can fail under torchrun)
    if name in _LAZY: return getattr(_LAZY[name], name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


_names, _LAZY = _public_names()
globals().update(_names)
__all__ = THIRD_PARTY + [n for n in [*_names, *_LAZY] if n not in THIRD_PARTY]
del _names
