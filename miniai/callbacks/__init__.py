"""Callbacks: metrics (metrics), progress bars and plots (progress), schedules and the learning-rate finder
(schedule), hooks and activation statistics (hooks), batch transforms (transform), MixUp and CutMix (mix), collecting predictions (preds),
weight averaging (averaging), training tricks (tricks), and loggers and trackers (loggers). Imports miniai.core and
miniai.data only."""
