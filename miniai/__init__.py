"""miniai: a small, fast, callback-driven training library for PyTorch in the style of the fast.ai course.

The course's module names (`miniai.learner`, `datasets`, `conv`, `activations`, `init`, `sgd`, `resnet`, `augment`,
`accel`, `training`, `fid`, `diffusion`, `imports`) are the front door; the code lives in rooms by concern behind them
(core, data, callbacks, models, engines, runs, tools, app: see ARCHITECTURE.md). Importing the package adds the
Learner methods that live with their features (`lr_find`, `summary`, `save`, `get_preds`, ... listed in `Learner`'s
docstring), so `learn.summary()` works whichever module the user imported.
"""
__version__ = '0.1.0'

import warnings as _warnings

# torcheval's metrics call the deprecated `torch.jit.script` as they are imported (the quick start imports them), and
# torch warns about it on every run: only that one FutureWarning, raised from torch.jit, is set aside
_warnings.filterwarnings('ignore', message=r'`torch\.jit\.script` is deprecated', category=FutureWarning,
                         module=r'torch\.jit')

from ._moved import install_moved_modules  # noqa: E402

install_moved_modules()  # the flat modules of earlier versions (`miniai.fashion`...) import, with a FutureWarning

# imported for the Learner methods they add
from .core import freezing  # noqa: F401,E402
from .callbacks import onecycle, preds, schedule  # noqa: F401,E402
from .runs import autoresume, checkpoint  # noqa: F401,E402
from .tools import export, inference, results, summary  # noqa: F401,E402
from .tools.export import load_exported  # noqa: E402
from .app.runfolder import load_run  # noqa: E402
