"""The course's `miniai.fid`: `ImageEval` (FID and KID) and the course's helpers. A front: the code lives in
miniai.tools.fid."""
from __future__ import annotations

from .tools.fid import _calc_fid, _calc_kid, _calc_stats, _sqrtm_newton_schulz, _squared_mmd, ImageEval  # noqa: F401

__all__ = ['ImageEval']
