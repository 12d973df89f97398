"""Tools for a trained (or training) model: `summary` (summary), predictions and TTA (inference), results and top
losses for targets of any kind (results), what a classifier gets wrong (interpret), export for inference (export), and
FID/KID (fid). Imports the rooms below it."""
