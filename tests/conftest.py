"""Shared test set-up: tests marked `cuda` are skipped, with the reason, where torch sees no GPU; under pytest-xdist
(`make test`) each worker's torch gets its share of the cores, so the workers' threads do not outnumber them; and
every temporary file the tests make, in this process or in the notebook kernels and torchrun jobs they start, goes
under pytest's own temporary folder, which it removes."""
import os
import tempfile

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


@pytest.fixture(scope='session', autouse=True)
def temp_files_under_pytest(tmp_path_factory):
    """TMPDIR points into pytest's temporary folder for the whole run: notebooks' `tempfile.mkdtemp()` folders, the
    benches' and torchrun's scratch files are then removed with it (pytest.ini keeps only failed tests' files) instead
    of piling up in /tmp run after run (CI's disk once filled up)."""
    tmp = tmp_path_factory.mktemp('tmp')
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv('TMPDIR', str(tmp))
        mp.setattr(tempfile, 'tempdir', str(tmp))
        yield tmp
