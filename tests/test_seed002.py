"""Acceptance: the seed document's ResNet walk-through runs on this library and prints the seed's shapes and totals."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from miniai.data.fashion import find_fashion_mnist

SEED = Path(__file__).parent / 'seeds' / 'seed002.py'


@pytest.mark.skipif(find_fashion_mnist() is None, reason='Fashion-MNIST is not installed (make data)')
def test_seed002_runs_and_prints_the_seed_numbers():
    res = subprocess.run([sys.executable, str(SEED)], capture_output=True, text=True, timeout=600,
                         env={**os.environ, 'MPLBACKEND': 'Agg'})
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    assert out.startswith('torch.Size([1024, 1, 28, 28])')
    shapes = [l for l in out.splitlines() if l.split(' ')[0] in ('ResBlock', 'Sequential', 'Flatten')
              and 'torch.Size' in l]
    assert shapes == [
        'ResBlock torch.Size([1024, 1, 28, 28]) torch.Size([1024, 8, 28, 28])',
        'ResBlock torch.Size([1024, 8, 28, 28]) torch.Size([1024, 16, 14, 14])',
        'ResBlock torch.Size([1024, 16, 14, 14]) torch.Size([1024, 32, 7, 7])',
        'ResBlock torch.Size([1024, 32, 7, 7]) torch.Size([1024, 64, 4, 4])',
        'ResBlock torch.Size([1024, 64, 4, 4]) torch.Size([1024, 128, 2, 2])',
        'ResBlock torch.Size([1024, 128, 2, 2]) torch.Size([1024, 256, 1, 1])',
        'Sequential torch.Size([1024, 256, 1, 1]) torch.Size([1024, 10, 1, 1])',
        'Flatten torch.Size([1024, 10, 1, 1]) torch.Size([1024, 10])']
    totals = [l for l in out.splitlines() if l.startswith('Total number of params:')]
    assert totals == ['Total number of params: 1247362', 'Total number of params: 1226882',
                      'Total number of params: 1226882']
    assert '|ResBlock|(1024, 1, 28, 28)|(1024, 8, 28, 28)|680|' in out
    assert '|GlobalAvgPool|(1024, 256, 1, 1)|(1024, 256)|0|' in out
    assert '|Linear|(1024, 256)|(1024, 10)|2570|0.00|' in out
    assert 'Total number of flops: 4.67582' in out
