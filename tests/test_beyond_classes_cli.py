"""`python -m miniai train` on targets beyond one class per image (miniai.app.tasks): the task inferred from the data
folder (a table of labels or numbers, or image pairs) or named with --task, trained by the recipe's Learner with the
targets' loss and metrics, and the run folder written (result.json, metrics.csv, checkpoints, results.png)."""
import json

import pytest

from miniai.app.cli import main
from miniai.app.runfolder import RunError, load_run
from miniai.app.tasks import data_task
from miniai.data.fashion_tasks import write_ink_regression, write_pairs_multilabel, write_upscale_pairs

pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp('tasks')
    return dict(multilabel=write_pairs_multilabel(root / 'ml', 160), regression=write_ink_regression(root / 'rg', 160),
                image=write_upscale_pairs(root / 'up', 160))


@pytest.mark.parametrize('task, metrics', [('multilabel', ['accuracy_multi', 'f1_multi']),
                                           ('regression', ['mse', 'mae']), ('image', ['mse', 'mae'])])
def test_train_infers_the_task_from_the_data_and_writes_the_run(folders, task, metrics, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv('MINIAI_CACHE', str(tmp_path / 'cache'))
    assert data_task(str(folders[task])) == task
    out = tmp_path / 'run'
    code = main(['train', '--data', folders[task], '--epochs', '1', '--bs', '32', '--n-train', '64', '--out', out,
                 '--no-summary', '--average', 'none', '--model', 'fashion_resnet', '--precision', 'fp32'])
    assert code == 0
    res = json.loads((out / 'result.json').read_text())
    assert res['task'] == task and all(isinstance(res[m], float) for m in metrics)
    assert {'metrics.csv', 'model.json', 'best.ckpt', 'results.png', 'loss.png'} <= {p.name for p in out.iterdir()}
    assert json.loads((out / 'model.json').read_text())['targets']['kind'] == task
    assert f'({task};' in capsys.readouterr().out
    with pytest.raises(RunError, match=f'a {task} run'): load_run(out)  # not rebuilt as a classifier


def test_a_task_the_data_cannot_have_is_one_clear_error(folders, tmp_path, capsys):
    code = main(['train', '--data', folders['image'], '--task', 'regression', '--out', tmp_path / 'run'])
    assert code == 2
    assert 'error: --task regression needs a table labels.csv (file names, then numbers) in --data' in \
        capsys.readouterr().err
    assert data_task(str(folders['multilabel']), 'class') == 'class'  # named: the table read as one class a row
    assert data_task('fashion') is None  # the classification recipe
