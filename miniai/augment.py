"""The course's `miniai.augment`: batch augmentation, capturing predictions, TTA and `summary`. A front: the code lives
in miniai.data.augment, miniai.callbacks and miniai.tools."""
from __future__ import annotations

from .callbacks.preds import capture_preds, CapturePreds  # noqa: F401
from .callbacks.transform import augment_cb  # noqa: F401
from .data.augment import rand_copy, rand_erase, RandCopy, RandCropPad, RandErase, RandFlip  # noqa: F401
from .tools.inference import show_image_batch, tta  # noqa: F401
from .tools.summary import learner_summary as summary  # noqa: F401

__all__ = ['RandFlip', 'RandCropPad', 'rand_erase', 'RandErase', 'rand_copy', 'RandCopy', 'augment_cb', 'CapturePreds',
           'capture_preds', 'show_image_batch', 'tta', 'summary']
