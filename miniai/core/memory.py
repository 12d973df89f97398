"""Freeing memory in a notebook: old tracebacks and IPython's output history keep tensors alive."""
from __future__ import annotations

import gc
import sys
import traceback

import torch

__all__ = ['clean_ipython_hist', 'clean_tb', 'clean_mem']


def clean_ipython_hist() -> None:
    "Drop IPython's references to old outputs, which keep tensors alive."
    try: ip = get_ipython()  # noqa: F821  (defined only inside IPython)  # pyright: ignore[reportUndefinedVariable]
    except NameError: return
    user_ns = ip.user_ns
    ip.displayhook.flush()
    pc = ip.displayhook.prompt_count + 1
    for n in range(1, pc): user_ns.pop('_i' + repr(n), None)
    user_ns.update(dict(_i='', _ii='', _iii=''))
    hm = ip.history_manager
    hm.input_hist_parsed[:] = [''] * pc
    hm.input_hist_raw[:] = [''] * pc
    hm._i = hm._ii = hm._iii = hm._i00 = ''


def clean_tb() -> None:
    "Drop the last traceback, whose frames keep tensors alive."
    for attr in ('last_traceback', 'last_type', 'last_value', 'last_exc'):
        if hasattr(sys, attr): delattr(sys, attr)
    traceback.clear_frames(sys.exc_info()[2]) if sys.exc_info()[2] else None


def clean_mem() -> None:
    "Free memory held by old tracebacks and notebook outputs; empty CUDA's cache where there is one."
    clean_tb()
    clean_ipython_hist()
    gc.collect()
    if torch.cuda.is_available(): torch.cuda.empty_cache()
