"""Shared test set-up: tests marked `cuda` are skipped, with the reason, where torch sees no GPU; under pytest-xdist
(`make test`) each worker's torch gets its share of the cores, so the workers' threads do not outnumber them."""
import os

import pytest
import torch

if (_workers := int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1'))) > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _workers))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available(): return
    skip = pytest.mark.skip(reason='needs a CUDA GPU (torch.cuda.is_available() is False here)')
    for item in items:
        if 'cuda' in item.keywords: item.add_marker(skip)


@pytest.fixture(scope='module')
def one_thread():
    "Torch on one thread for a module's tests (small models: faster, and steadier on a shared machine)."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
