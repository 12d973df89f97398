"""bench.stop_agreement runs end to end (two gloo processes, every mode, the save) and writes its tables."""
import subprocess
import sys

from miniai.data.fashion import find_fashion_mnist
import pytest

pytestmark = pytest.mark.skipif(find_fashion_mnist() is None, reason='Fashion-MNIST is not installed')


def test_tiny_run_times_every_mode_and_the_save(tmp_path):
    r = subprocess.run([sys.executable, '-m', 'bench.stop_agreement', '--tiny', '--rounds', '1', '--results',
                        str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    md = (tmp_path / 'stop_agreement.md').read_text()
    rows = [l for l in md.splitlines() if l.startswith('| the main job') or l.startswith('| 784-128-10 MLP')]
    assert len(rows) == 4 and all(l.count('|') == 11 for l in rows), md
    cells = [[c.strip() for c in l.split('|')[1:-1]] for l in rows]
    assert all(c[1] == '5 (train + valid)' for c in cells), '4 training batches and 1 validation batch a rank'
    # a round after each of the 5 batches and the last one after the fit; at the default pace fewer
    # (how many fewer depends on how long the batches take: under load every batch may get one, so at most 6)
    assert all(c[9] == '6' and 1 <= int(c[6]) <= 6 for c in cells), cells
    assert '### The save a stop waits for' in md and 'MiB |' in md
