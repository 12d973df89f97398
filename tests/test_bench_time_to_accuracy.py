"""bench.time_to_accuracy: a tiny run end to end writes a table row and a chart from the run's own curve."""
import json
import subprocess
import sys

import pytest

from bench.time_to_accuracy import RECIPES, table
from miniai.data.fashion import find_fashion_mnist


@pytest.mark.skipif(find_fashion_mnist() is None, reason='Fashion-MNIST is not installed')
def test_tiny_run_writes_table_and_chart(tmp_path):
    runs, results = tmp_path / 'runs', tmp_path / 'results'
    r = subprocess.run([sys.executable, '-m', 'bench.time_to_accuracy', '--tiny', '--only', 'default',
                        '--runs', str(runs), '--results', str(results)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((runs / 'default-s42' / 'result.json').read_text())
    md = (results / 'time_to_accuracy.md').read_text()
    row = next(l for l in md.splitlines() if l.startswith('| default | 42 |'))
    reached = f"{res['time_to_target'] / 60:.1f} min" if res['time_to_target'] is not None else 'not reached'
    assert f"| {reached} |" in row and f"{100 * res['accuracy']:.2f}%" in row, (row, res)
    assert (results / 'time_to_accuracy.png').stat().st_size > 10_000
    # a second call finds the run done and does not train again
    again = subprocess.run([sys.executable, '-m', 'bench.time_to_accuracy', '--tiny', '--only', 'default',
                            '--runs', str(runs), '--results', str(results)], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and '$ ' not in again.stdout, again.stdout


def test_table_says_not_reached_and_keeps_the_best_epoch():
    res = {'recipe': 'default', 'seed': 0, 'epochs': 2, 'accuracy': 0.931, 'time_to_target': None, 'device': 'cpu',
           'curve': [{'epoch': 0, 'seconds': 10.0, 'accuracy': 0.935}, {'epoch': 1, 'seconds': 20.0, 'accuracy': 0.931}]}
    row = next(l for l in table([res]).splitlines() if l.startswith('| default |'))
    assert '| not reached |' in row and '| 93.10% | 93.50% |' in row
    assert all(name in table([res]) for name in RECIPES)
