"""The overhead benchmark's machinery (not its timings: those belong in bench/results, never in tests)."""
import pytest

from miniai.data.fashion import find_fashion_mnist

pytestmark = pytest.mark.skipif(find_fashion_mnist() is None, reason='Fashion-MNIST is not installed')


def test_overhead_jobs_run_every_contender_to_the_same_accuracy(monkeypatch):
    from bench import overhead
    monkeypatch.setitem(overhead.JOBS, 'resnet', {**overhead.JOBS['resnet'], 'bs': 64, 'n_train': 128, 'n_valid': 64})
    for job in ('mlp', 'resnet'):
        rows = overhead.run(rounds=1, job=job)
        assert [r['contender'] for r in rows] == ['hand-written loop', 'miniai TrainLearner']
        assert rows[0]['ratio'] == 1 and rows[1]['seconds'] > 0
        assert rows[0]['valid accuracy'] == pytest.approx(rows[1]['valid accuracy'], abs=1e-6), job
        if job == 'mlp': assert rows[0]['valid accuracy'] > 0.7, 'one real epoch of the MLP learns something'


def test_overhead_writes_one_table_per_job(monkeypatch, tmp_path):
    from bench import overhead
    monkeypatch.setattr(overhead, 'RESULTS', tmp_path)
    monkeypatch.setitem(overhead.JOBS, 'resnet', {**overhead.JOBS['resnet'], 'bs': 64, 'n_train': 128, 'n_valid': 64})
    overhead.main(['--rounds', '1', '--only', 'resnet'])
    md = (tmp_path / 'overhead.md').read_text()
    assert md.startswith('### course ResNet') and '| miniai TrainLearner |' in md


def test_accuracy_table_groups_seeds_and_checks_targets(tmp_path):
    import json
    from bench import accuracy
    runs = []
    # two seeds of one recipe, and a third run that differs only in augmentation: not the same recipe
    for seed, acc, tta, aug in ((42, 0.9391, 0.9402, 'flip'), (0, 0.9380, 0.9385, 'flip'), (1, 0.9, 0.9, 'full')):
        d = tmp_path / f's{seed}'
        d.mkdir()
        cmd = f'python -m miniai train --epochs 5 --seed {seed}'  # --out differs too in real runs
        (d / 'result.json').write_text(json.dumps({'epochs': 5, 'seed': seed, 'accuracy': acc, 'tta_accuracy': tta,
                                                   'wall_seconds': 600, 'threads': 1, 'command': cmd,
                                                   'model': 'fashion_resnet_wide', 'augment': aug,
                                                   'label_smoothing': 0.1}))
        runs.append(d)
    out = tmp_path / 'accuracy.md'
    accuracy.main([*map(str, runs), '--out', str(out)])
    md = out.read_text()
    assert ('| 5 | `python -m miniai train --epochs 5 --seed 0` | fashion_resnet_wide, augment flip, ls 0.1 | 0 | 10.0 min'
            ' | 1 | 93.80% | 93.85% | 93.4% | 94.0% | no |') in md
    assert '| 94.02% | 93.4% | 94.0% | yes |' in md
    assert '5 epochs, fashion_resnet_wide, augment flip, ls 0.1, 2 seeds: 93.94%' in md
    assert 'augment full, ls 0.1, 2 seeds' not in md and '3 seeds' not in md
    with pytest.raises(SystemExit, match='no result.json'): accuracy.main([str(tmp_path / 'missing')])


def test_collect_gathers_every_table_and_draws_the_chart(monkeypatch, tmp_path):
    import shutil
    import bench.__main__ as bm
    from bench import overhead
    monkeypatch.setattr(bm, 'RESULTS', tmp_path)
    with pytest.raises(SystemExit, match='no table yet for data, overhead, precision, flops'): bm.main(['--collect'])
    for name, *_ in bm.STEPS: shutil.copy(overhead.RESULTS / f'{name}.md', tmp_path)
    bm.main(['--collect'])
    summary = (tmp_path / 'README.md').read_text()
    for name, *_ in bm.STEPS: assert (tmp_path / f'{name}.md').read_text() in summary
    png = (tmp_path / 'overview.png').read_bytes()
    assert png[:8] == b'\x89PNG\r\n\x1a\n' and len(png) > 10_000
    with pytest.raises(SystemExit, match='usage: python -m bench'): bm.main(['--fast'])
