"""The course's `miniai.accel`: mixed precision, the speed plan and `AccelerateCB`. A front: the code lives in
miniai.engines."""
from __future__ import annotations

from .engines.accelerate import AccelerateCB  # noqa: F401
from .engines.plan import fastest_plan, fastest_settings, SpeedPlan  # noqa: F401
from .engines.precision import (ChannelsLastCB, cpu_has_bf16, cuda_has_bf16, MixedPrecision,
                                precision_cbs, warn_fp16_on_cpu)  # noqa: F401

__all__ = ['MixedPrecision', 'ChannelsLastCB', 'warn_fp16_on_cpu', 'cpu_has_bf16', 'cuda_has_bf16', 'fastest_settings',
           'precision_cbs', 'SpeedPlan', 'fastest_plan', 'AccelerateCB']
