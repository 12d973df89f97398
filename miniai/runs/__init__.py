"""Runs: the checkpoint file (ckptfile), saving, loading and `ResumeCB` (checkpoint), stopping on a signal
(interrupt), and `resume='auto'` (autoresume). Imports the rooms below it. A package, not a namespace: without this
file `find_packages` leaves the room out of the wheel."""
