"""Data: the in-memory loader (loader), normalising images (normalise), decoding one image (decode), the uint8 image
cache (imagecache) and the sources that feed it (folders, hf), what targets are (targets, targetmetrics), tables and
image pairs (tables), segmentation folders (masks), Fashion-MNIST (fashion; problems beyond one class made from it:
fashion_tasks), `DataLoaders` where they all come together (dataloaders), showing images (show), batch augmentation
(augment) and photo augmentation in one sampling per batch (warp). Imports only miniai.core.

`miniai.data` was a module before it was this room: its names are still found here (`from miniai.data import
TensorDataLoader`), with a FutureWarning naming their new module."""
from .._moved import room_getattr

__getattr__ = room_getattr(__name__)
