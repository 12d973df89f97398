"""miniai: a small, fast, callback-driven training library for PyTorch in the style of the fast.ai course.

Importing the package patches the methods that live in later modules onto `Learner` (`summary`, ...), so
`learn.summary()` works whichever module the user imported.
"""
__version__ = '0.1.0'

import warnings as _warnings

# torcheval's metrics call the deprecated `torch.jit.script` as they are imported (the quick start imports them), and
# torch warns about it on every run: only that one FutureWarning, raised from torch.jit, is set aside
_warnings.filterwarnings('ignore', message=r'`torch\.jit\.script` is deprecated', category=FutureWarning,
                         module=r'torch\.jit')

# imported for the methods they patch onto Learner
from . import learner, summary, augment, checkpoint, autoresume, inference, export  # noqa: F401,E402
from .export import load_exported  # noqa: E402
