"""The course's `miniai.fid`: `ImageEval` (FID and KID) and the course's helpers. A front: the code lives in
miniai.tools.fid."""
from __future__ import annotations

from .tools.fid import ImageEval  # noqa: F401
from .tools.fid import calc_fid as _calc_fid, calc_kid as _calc_kid, calc_stats as _calc_stats  # noqa: F401
from .tools.fid import sqrtm_newton_schulz as _sqrtm_newton_schulz, squared_mmd as _squared_mmd  # noqa: F401
# the course calls its helpers by these private names (`from miniai.fid import _calc_fid`): public ones in the room

__all__ = ['ImageEval']
