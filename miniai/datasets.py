"""The course's `miniai.datasets`: `DataLoaders`, collation and showing images. A front: the code lives in
miniai.data."""
from __future__ import annotations

from .data.dataloaders import collate_dict, DataLoaders, inplace  # noqa: F401
from .data.show import get_grid, show_image, show_images, subplots  # noqa: F401

__all__ = ['inplace', 'collate_dict', 'DataLoaders', 'show_image', 'subplots', 'get_grid', 'show_images']
