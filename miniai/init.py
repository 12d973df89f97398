"""The course's `miniai.init`: `GeneralRelu`, initialisation, `conv`, `BatchTransformCB`, freeing memory. A front: the
code lives in miniai.models.layers, miniai.callbacks.transform and miniai.core.memory."""
from __future__ import annotations

from .callbacks.transform import BatchTransformCB  # noqa: F401
from .core.memory import clean_ipython_hist, clean_mem, clean_tb  # noqa: F401
from .models.layers import conv, GeneralRelu, get_model, init_weights, lsuv_init, plot_func  # noqa: F401

__all__ = ['clean_ipython_hist', 'clean_tb', 'clean_mem', 'BatchTransformCB', 'GeneralRelu', 'plot_func',
           'init_weights', 'lsuv_init', 'conv', 'get_model']
