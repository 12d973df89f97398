"""miniai: a small, fast, callback-driven training library for PyTorch in the style of the fast.ai course."""
__version__ = '0.1.0'
