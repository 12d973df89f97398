"""The course's `miniai.training`: the plain loop the `Learner` replaces. A front: the code lives in
miniai.core.basic_loop and miniai.data.dataloaders."""
from __future__ import annotations

from .core.basic_loop import accuracy, fit, report  # noqa: F401
from .data.dataloaders import Dataset, get_dls  # noqa: F401

__all__ = ['accuracy', 'report', 'Dataset', 'fit', 'get_dls']
