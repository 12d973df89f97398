"""Looking inside a model as it runs: seeds, hooks, and activation statistics."""
from __future__ import annotations

import random

import numpy as np
import torch

__all__ = ['set_seed']


def set_seed(seed: int, deterministic: bool = False) -> None:
    "Seed Python's, NumPy's and torch's random generators; `deterministic` also asks torch for deterministic kernels."
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
