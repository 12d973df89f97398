"""Time to accuracy: wall-clock seconds from the start of `fit` until a validation metric first reaches a target,
checked after every epoch (the measure of issue 15: seconds until 94% test accuracy on Fashion-MNIST)."""
from __future__ import annotations

import time

from .callback import Callback
from .checkpoint import monitor_value
from .ranks import is_main_process

__all__ = ['TimeToAccuracyCB']


class TimeToAccuracyCB(Callback):
    """After each validation epoch, note the seconds since the fit began and `metric` (a `MetricsCB` metric, e.g.
    'accuracy'); the first time it reaches `target`, say so. `curve` holds every (epoch, seconds, value) row and
    `reached` the first row at or above the target (None until then). The clock covers everything in the fit
    (training, validation, callbacks, checkpoints); a resumed fit goes on from the time its checkpoint was saved at."""
    order = 19  # after MetricsCB has logged the epoch, before SaveModelCB (20) saves it: checkpoints hold its row
    skip_in_probes = True

    def __init__(self, target: float = 0.94, metric: str = 'accuracy', verbose: bool = True):
        self.target, self.metric, self.verbose = target, metric, verbose
        self.curve, self.reached, self._t0, self._pending = [], None, None, None

    def before_fit(self, learn):
        self.curve, self.reached, self._t0 = [], None, time.perf_counter()
        if self._pending is not None:
            st, self._pending = self._pending, None
            self._t0 -= st['seconds']
            self.curve, self.reached = [dict(r) for r in st['curve']], st['reached']

    def elapsed(self) -> float:
        "Seconds since the fit began (including the time before a resume)."
        return 0.0 if self._t0 is None else time.perf_counter() - self._t0

    def after_epoch(self, learn):
        if learn.training and learn.phases[1]: return  # wait for this epoch's validation
        v = monitor_value(learn, self.metric)  # a float: reading it waited for the device
        if v is None: return
        row = {'epoch': learn.epoch, 'seconds': self.elapsed(), self.metric: float(v)}
        self.curve.append(row)
        if self.reached is None and v >= self.target:
            self.reached = row
            if self.verbose and is_main_process():
                print(f'Reached {self.metric} {self.target:.2%} after epoch {learn.epoch + 1}: {row["seconds"]:.1f} s '
                      f'from the start of fit ({self.metric} {v:.4f})', flush=True)

    def checkpoint_state(self) -> dict:
        return {'seconds': self.elapsed(), 'curve': self.curve, 'reached': self.reached}

    def load_checkpoint_state(self, state: dict) -> None: self._pending = state
