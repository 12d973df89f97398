"""bench/fine_tune_peers.py's machinery (its numbers live in bench/results/fine_tune_peers.md); no fastai needed."""
import pytest

from bench import fine_tune_peers as ftp
from miniai.data.fashion import find_fashion_mnist


def test_without_fastai_the_bench_says_so_and_stops(monkeypatch):
    monkeypatch.setattr(ftp, 'fastai_available', lambda: False)
    with pytest.raises(SystemExit, match='fastai is not importable'): ftp.main(['--rounds', '1'])


def test_the_table_gives_each_library_its_epochs_accuracy_and_time_against_fastai():
    runs = {'miniai': [{'epochs': [1., 2.], 'accuracy': 0.8}, {'epochs': [1., 2.], 'accuracy': 0.9}],
            'fastai': [{'epochs': [2., 4.], 'accuracy': 0.85}, {'epochs': [2., 4.], 'accuracy': 0.85}]}
    md = ftp.table(runs, 'python -m bench.fine_tune_peers', (1.0, 2.0), (100, 50))
    assert '| miniai | 2 | 1.00 ± 0.00 | 2.00 ± 0.00 | 3.00 ± 0.00 | 0.50x | 85.0% ± 7.1 |' in md
    assert '| fastai | 2 | 2.00 ± 0.00 | 4.00 ± 0.00 | 6.00 ± 0.00 | 1.00x | 85.0% ± 0.0 |' in md
    assert 'load average 1.0 at the start and 2.0 at the end' in md


@pytest.mark.skipif(find_fashion_mnist() is None, reason='Fashion-MNIST is not installed')
def test_tiny_run_fine_tunes_with_miniai_alone_when_fastai_is_missing(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(ftp, 'fastai_available', lambda: False)
    ftp.main(['--tiny', '--workdir', str(tmp_path), '--out', str(tmp_path / 'out.md')])
    assert 'skipping it' in capsys.readouterr().out
    md = (tmp_path / 'out.md').read_text()
    row = next(line for line in md.splitlines() if line.startswith('| miniai | 1 |'))
    assert row.endswith('± 0.0 |') and '| n/a |' in row and '| fastai |' not in md
