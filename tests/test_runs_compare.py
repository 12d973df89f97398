"""The local runs table: `miniai.runs.compare` and `python -m miniai runs` read run folders (settings.json, metrics.csv,
result.json, interrupted.ckpt) and show the settings that differ, final and best metrics, time to target and status;
`--plot` draws every run's curves on one figure. Run folders are written here as the main job writes them."""
import json
import matplotlib
import pytest

matplotlib.use('Agg')

from miniai.app.cli import main  # noqa: E402
from miniai.runs import compare  # noqa: E402
from miniai.runs.compare import find_runs  # noqa: E402


def fake_run(folder, name, lr, accs, status='finished', seed=42):
    "A run folder as `miniai train` leaves it: two epochs of metrics, its settings, and what its status needs."
    folder.mkdir(parents=True)
    rows = ['accuracy,loss,epoch,train,time']
    for e, a in enumerate(accs):
        rows += [f'{a - 0.05},{1 - a + 0.1},{e},train,1.0', f'{a},{1 - a},{e},eval,0.1']
    (folder / 'metrics.csv').write_text('\n'.join(rows) + '\n')
    (folder / 'settings.json').write_text(json.dumps({'run_name': name, 'started': '2026-12-07T16:00:00', 'lr': lr,
                                                       'seed': seed, 'data': 'fashion', 'model': 'resnet9_small',
                                                       'bs': 256}))
    if status == 'finished': (folder / 'result.json').write_text(json.dumps({'time_to_target': 12.5}))
    if status == 'interrupted': (folder / 'interrupted.ckpt').write_bytes(b'')
    (folder / 'wandb' / 'files').mkdir(parents=True)  # a tracker's copy of the files is not another run
    (folder / 'wandb' / 'files' / 'metrics.csv').write_text(rows[0] + '\n')


@pytest.fixture
def runs(tmp_path):
    fake_run(tmp_path / 'runs' / 'a', 'slow', 0.003, [0.80, 0.85])
    fake_run(tmp_path / 'runs' / 'b', 'fast', 0.01, [0.84, 0.90])
    fake_run(tmp_path / 'runs' / 'c', 'cut', 0.03, [0.70], status='interrupted')
    fake_run(tmp_path / 'runs' / 'd', 'broken', 0.1, [0.30, 0.20], status='failed')
    return tmp_path / 'runs'


def test_compare_shows_differing_settings_final_and_best_metrics_and_status(runs, tmp_path):
    assert [p.name for p in find_runs(runs)] == ['a', 'b', 'c', 'd']
    table, fig = compare(runs, plot=tmp_path / 'runs.png')
    assert list(table['name']) == ['slow', 'fast', 'cut', 'broken']
    assert 'lr' in table.columns and 'seed' not in table.columns and 'bs' not in table.columns, 'only what differs'
    assert list(table['lr']) == [0.003, 0.01, 0.03, 0.1]
    assert list(table['final accuracy']) == [0.85, 0.90, 0.70, 0.20]
    assert list(table['best accuracy']) == [0.85, 0.90, 0.70, 0.30]
    assert table['best loss'][3] == pytest.approx(0.7), 'the lowest loss, not the last'
    assert list(table['status']) == ['finished', 'finished', 'interrupted', 'failed']
    assert list(table['time to target (s)'][:2]) == [12.5, 12.5]
    loss_ax, acc_ax = fig.axes
    assert len(loss_ax.lines) == 8 and len(acc_ax.lines) == 4, 'train and valid loss, and accuracy, for each run'
    assert (tmp_path / 'runs.png').stat().st_size > 1000


def test_the_runs_command_prints_the_table_and_saves_the_figure(runs, tmp_path, capsys):
    assert main(['runs', runs, '--plot', tmp_path / 'p.png']) == 0  # as `python -m miniai runs FOLDER --plot P`
    head, *lines = capsys.readouterr().out.splitlines()
    assert head.split()[:4] == ['name', 'date', 'data', 'model'] and 'lr' in head.split() and 'status' in head
    assert [l.split()[0] for l in lines[:4]] == ['slow', 'fast', 'cut', 'broken']
    assert lines[2].split()[-1] == 'interrupted' and (tmp_path / 'p.png').is_file()
    assert main(['runs', tmp_path / 'nothing']) == 2
    assert capsys.readouterr().err.startswith('miniai: error: no runs')
