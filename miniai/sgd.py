"""The course's `miniai.sgd`: schedulers as callbacks, `RecorderCB`. A front: the code lives in
miniai.callbacks.schedule."""
from __future__ import annotations

from .callbacks.schedule import BaseSchedCB, BatchSchedCB, EpochSchedCB, HasLearnCB, RecorderCB  # noqa: F401

__all__ = ['BaseSchedCB', 'BatchSchedCB', 'EpochSchedCB', 'HasLearnCB', 'RecorderCB']
