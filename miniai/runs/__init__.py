"""Runs: the checkpoint file (ckptfile), saving, loading and `ResumeCB` (checkpoint), stopping on a signal
(interrupt), `resume='auto'` (autoresume), and runs side by side (compare: `miniai.runs.compare(...)`). A package, not
a namespace: without this file `find_packages` leaves the room out of the wheel."""
from .compare import compare

__all__ = ['compare']
