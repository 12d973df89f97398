"""The course's `miniai.learner`: the `Learner`, its callbacks and `lr_find`. A front: the code lives in miniai.core
(the loop) and miniai.callbacks."""
from __future__ import annotations

from .callbacks.metrics import MetricsCB  # noqa: F401
from .callbacks.progress import ProgressCB  # noqa: F401
from .callbacks.schedule import lr_find, LRFinderCB  # noqa: F401
from .core.checks import NamedBatchCB  # noqa: F401
from .core.events import (Callback, CancelBatchException, CancelEpochException, CancelFitException,
                          EVENTS, run_cbs, STEPS, with_cbs)  # noqa: F401
from .core.learner import (compute_loss, DeviceCB, Learner, MomentumLearner, SingleBatchCB,
                           TrainCB, TrainLearner)  # noqa: F401
from .core.nested import to_cpu  # noqa: F401
from .core.state import looking  # noqa: F401

__all__ = ['CancelFitException', 'CancelBatchException', 'CancelEpochException', 'Callback', 'EVENTS', 'STEPS',
           'run_cbs', 'with_cbs', 'Learner', 'TrainLearner', 'MomentumLearner', 'TrainCB', 'DeviceCB', 'to_cpu',
           'MetricsCB', 'ProgressCB', 'SingleBatchCB', 'LRFinderCB', 'lr_find', 'compute_loss', 'looking',
           'NamedBatchCB']
