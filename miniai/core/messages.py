"""Warnings that point at the user's line: `warn_user`, and `warn_once` for what is worth saying once a process."""
from __future__ import annotations

import os
import sys
import warnings

__all__ = ['warn_user', 'warn_once']

_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # miniai/
_warned: set = set()


def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    "Warn `message`, attributed to the first caller outside miniai (the user's line that led here)."
    f, level = sys._getframe(0), 1
    while f is not None and f.f_code.co_filename.startswith(_PACKAGE): f, level = f.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


def warn_once(key: str, message: str, category: type[Warning] = UserWarning) -> None:
    "`warn_user(message)` the first time `key` comes up in this process, and never again."
    if key in _warned: return
    _warned.add(key)
    warn_user(message, category)
