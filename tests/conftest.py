"""Shared test set-up: tests marked `cuda` are skipped, with the reason, where torch sees no GPU."""
import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available(): return
    skip = pytest.mark.skip(reason='needs a CUDA GPU (torch.cuda.is_available() is False here)')
    for item in items:
        if 'cuda' in item.keywords: item.add_marker(skip)
