"""The course's `miniai.activations`: seeds, hooks and activation statistics. A front: the code lives in
miniai.core.state and miniai.callbacks.hooks."""
from __future__ import annotations

from .callbacks.hooks import ActivationStats, append_stats, get_hist, get_min, Hook, Hooks, HooksCallback  # noqa: F401
from .core.state import set_seed  # noqa: F401

__all__ = ['set_seed', 'Hook', 'Hooks', 'HooksCallback', 'append_stats', 'get_hist', 'get_min', 'ActivationStats']
