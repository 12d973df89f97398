"""miniai: a small, fast, callback-driven training library for PyTorch in the style of the fast.ai course.

Importing the package patches the methods that live in later modules onto `Learner` (`summary`, ...), so
`learn.summary()` works whichever module the user imported.
"""
__version__ = '0.1.0'

# imported for the methods they patch onto Learner
from . import learner, summary, augment, checkpoint, autoresume  # noqa: F401,E402
