"""W&B and MLflow trackers, offline with the real clients: what a fit logs is read back through each client's own reader
(`wandb leet inspect --json` for an offline run's log, `MlflowClient` for a local store); a resumed fit goes on in the
same run at the next step; only rank 0 logs; a tracker that fails warns once and the training is untouched; the
course's lesson 21 `WandBCB` (written in this file as the course wrote it) runs on our `MetricsCB`."""
import json
import subprocess
import sys
import warnings
from pathlib import Path

import fastcore.all as fc
import matplotlib
import pytest
import torch
import torch.nn.functional as F
from torch import nn

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

from miniai.callbacks.clients import MLflowCB, WandBCB  # noqa: E402
from miniai.callbacks.metrics import quiet_torcheval  # noqa: E402
from miniai.core.events import Callback, CancelFitException  # noqa: E402
from miniai.data.loader import TensorDataLoader  # noqa: E402
from miniai.data.show import get_grid, show_image  # noqa: E402
from miniai.datasets import DataLoaders  # noqa: E402
from miniai.learner import MetricsCB, TrainLearner  # noqa: E402
from miniai.runs.checkpoint import SaveModelCB  # noqa: E402

wandb = pytest.importorskip('wandb')
pytest.importorskip('mlflow')
with quiet_torcheval(): from torcheval.metrics import MulticlassAccuracy  # noqa: E402


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv('WANDB_MODE', 'offline')
    monkeypatch.setenv('WANDB_SILENT', 'true')
    monkeypatch.setenv('MLFLOW_ALLOW_FILE_STORE', 'true')  # a local folder: no database to create (seconds)
    monkeypatch.chdir(tmp_path)  # where wandb keeps its settings


def learner(cbs=(), metrics=True):
    "4 training batches and 2 validation batches an epoch."
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 6, generator=g), torch.randint(0, 3, (48,), generator=g)
    dls = DataLoaders(TensorDataLoader(x[:32], y[:32], 8, shuffle=True, seed=0), TensorDataLoader(x[32:], y[32:], 8))
    torch.manual_seed(0)
    m = MetricsCB(accuracy=MulticlassAccuracy()) if metrics else MetricsCB()
    return TrainLearner(nn.Linear(6, 3), dls, F.cross_entropy, lr=0.1, cbs=[m, *cbs])


def wandb_records(run_dir) -> list[dict]:
    "An offline run's records, read by the wandb client's own reader of its transaction log."
    out = subprocess.run([sys.executable, '-m', 'wandb', 'leet', 'inspect', '--json', str(run_dir)], check=True,
                         capture_output=True, text=True).stdout
    return [json.loads(line) for line in out.splitlines()]


def wandb_history(records) -> dict[int, dict]:
    rows = {}
    for r in records:
        if r['type'] == 'history': rows.setdefault(r['history']['step'].get('num', 0), {}).update(r['history']['item'])
    return rows


def test_wandb_offline_records_settings_losses_metrics_best_and_files(tmp_path):
    (tmp_path / 'result.json').write_text('{"accuracy": 0.5}')
    cb = WandBCB(dir=tmp_path / 'wb', loss_every=2, config={'seed': 7, 'data': 'toy'}, run_name='first',
                 files=[tmp_path / 'result.json'])
    learn = learner([cb])
    learn.fit(2)
    recs = wandb_records(next((tmp_path / 'wb' / 'wandb').glob('offline-run-*')))
    run = next(r['run'] for r in recs if r['type'] == 'run')
    config = run['config']['update']
    assert run['display_name'] == 'first' and run['run_id'] == cb.run_id
    assert config['seed'] == 7 and config['data'] == 'toy' and config['lr'] == 0.1 and config['epochs'] == 2
    assert config['bs'] == 8 and config['params'] == 21 and config['optimizer'] == 'SGD' and 'torch' in config
    hist = wandb_history(recs)
    assert sorted(s for s, r in hist.items() if 'train/batch_loss' in r) == [2, 4, 6, 8], 'every 2nd of 8 batches'
    epochs = {s: r for s, r in hist.items() if 'valid/accuracy' in r}
    assert sorted(epochs) == [4, 8] and [r['epoch'] for r in epochs.values()] == [0, 1]
    rows = learn.metrics.history
    assert epochs[8]['valid/accuracy'] == pytest.approx(rows[3]['accuracy'])
    assert epochs[8]['train/loss'] == pytest.approx(rows[2]['loss'])
    summary = {k: v for r in recs if r['type'] == 'summary' for k, v in r['summary'].get('update', {}).items()}
    assert summary['best_valid/accuracy'] == pytest.approx(max(r['accuracy'] for r in rows if r['train'] == 'eval'))
    assert summary['status'] == 'finished'
    files = {f['path'] for r in recs if r['type'] == 'files' for f in r['files']['files']}
    assert 'result.json' in files
    assert next(r['exit'] for r in recs if r['type'] == 'exit').get('exit_code', 0) == 0


def mlflow_client(tmp_path):
    from mlflow import MlflowClient
    return MlflowClient(f'file://{tmp_path}/mlruns')


def test_mlflow_local_store_records_settings_losses_metrics_best_and_artifacts(tmp_path):
    (tmp_path / 'result.json').write_text('{"accuracy": 0.5}')
    cb = MLflowCB(tracking_uri=f'file://{tmp_path}/mlruns', loss_every=2, config={'seed': 7}, run_name='first',
                  files=[tmp_path / 'result.json'])
    learn = learner([cb])
    learn.fit(2)
    c = mlflow_client(tmp_path)
    run = c.get_run(cb.run_id)
    assert run.info.status == 'FINISHED' and run.info.run_name == 'first'
    p = run.data.params
    assert (p['seed'], p['lr'], p['epochs'], p['bs'], p['params'], p['optimizer']) == ('7', '0.1', '2', '8', '21', 'SGD')
    assert [m.step for m in c.get_metric_history(cb.run_id, 'train/batch_loss')] == [2, 4, 6, 8]
    acc = c.get_metric_history(cb.run_id, 'valid/accuracy')
    rows = [r for r in learn.metrics.history if r['train'] == 'eval']
    assert [(m.step, m.value) for m in acc] == [(4, pytest.approx(rows[0]['accuracy'])),
                                                 (8, pytest.approx(rows[1]['accuracy']))]
    assert run.data.metrics['best_valid/accuracy'] == pytest.approx(max(r['accuracy'] for r in rows))
    assert [a.path for a in c.list_artifacts(cb.run_id)] == ['result.json']


class StopAfter(Callback):
    "Ends the fit once epoch `epoch` is done (after SaveModelCB has saved it), as an interruption would."
    order = 30
    def __init__(self, epoch): self.epoch = epoch
    def after_epoch(self, learn):
        if not learn.training and learn.epoch == self.epoch: raise CancelFitException()


@pytest.mark.parametrize('tracker', ['mlflow', 'wandb'])
def test_a_resumed_fit_goes_on_in_the_same_run_with_no_repeated_or_missing_step(tracker, tmp_path):
    make = (lambda: MLflowCB(tracking_uri=f'file://{tmp_path}/mlruns', loss_every=1)) if tracker == 'mlflow' else \
           (lambda: WandBCB(dir=tmp_path / 'wb', loss_every=1))
    first = make()
    learner([first, SaveModelCB(tmp_path, every_epoch=True)]).fit(3, cbs=[StopAfter(0)])
    if tracker == 'mlflow':  # a fit ended by a callback (as early stopping does) finished: it did not fail
        assert mlflow_client(tmp_path).get_run(first.run_id).info.status == 'FINISHED'
    second = make()
    learner([second, SaveModelCB(tmp_path, every_epoch=True)]).fit(3, resume=tmp_path / 'last.ckpt')
    assert second.run_id == first.run_id
    if tracker == 'mlflow':
        c = mlflow_client(tmp_path)
        assert len(c.search_runs([c.get_experiment_by_name('miniai').experiment_id])) == 1
        assert [m.step for m in c.get_metric_history(first.run_id, 'train/batch_loss')] == list(range(1, 13))
        assert [m.step for m in c.get_metric_history(first.run_id, 'valid/loss')] == [4, 8, 12]
        assert c.get_run(first.run_id).info.status == 'FINISHED'
    else:
        parts = sorted((tmp_path / 'wb' / 'wandb').glob('offline-run-*'))  # one log per process, one run id
        recs = [wandb_records(p) for p in parts]
        assert len(parts) == 2 and {next(r['run']['run_id'] for r in rs if r['type'] == 'run') for rs in recs} == \
               {first.run_id}
        steps = [s for rs in recs for s, r in sorted(wandb_history(rs).items()) if 'train/batch_loss' in r]
        assert steps == list(range(1, 13))


def test_only_global_rank_0_logs(tmp_path, monkeypatch):
    monkeypatch.setenv('RANK', '1')
    cb = MLflowCB(tracking_uri=f'file://{tmp_path}/mlruns')
    learner([cb]).fit(1)
    assert cb.run_id is None and not (tmp_path / 'mlruns').exists()


class BrokenStore(MLflowCB):
    "A store that fails as a full disk would, after the run is open."
    def send(self, values, step): raise OSError(28, 'No space left on device')


def test_a_failing_tracker_warns_once_and_the_training_is_untouched(tmp_path):
    plain = learner()
    plain.fit(2)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        broken = learner([BrokenStore(tracking_uri=f'file://{tmp_path}/mlruns', loss_every=1)])
        broken.fit(2)
    said = [str(x.message) for x in w if 'logging failed' in str(x.message)]
    assert len(said) == 1 and 'No space left on device' in said[0], said
    assert torch.equal(broken.model.weight, plain.model.weight)
    assert [r['loss'] for r in broken.metrics.history] == [r['loss'] for r in plain.metrics.history]


# -- the course's lesson 21 WandBCB, as the course wrote it --------------------------------------------------------------
def sample(model, sz):
    "The lesson's notebook defines its own DDPM sampler; here, the model's outputs as 'images' of the asked size."
    with torch.no_grad(): return [torch.zeros(sz) + model(torch.zeros(1, 6)).mean() - 0.5]


class CourseWandBCB(MetricsCB):  # the course calls it WandBCB; its code, unchanged:
    order=100
    def __init__(self, config, *ms, project='ddpm_cifar10', **metrics):
        fc.store_attr()
        super().__init__(*ms, **metrics)

    def before_fit(self, learn): wandb.init(project=self.project, config=self.config)
    def after_fit(self, learn): wandb.finish()

    def _log(self, d):
        if self.train:
            wandb.log({'train_'+m:float(d[m]) for m in self.all_metrics})
        else:
            wandb.log({'val_'+m:float(d[m]) for m in self.all_metrics})
            wandb.log({'samples':self.sample_figure(learn)})
        print(d)

    def sample_figure(self, learn):
        with torch.no_grad():
            samples = sample(learn.model, (16, 3, 32, 32))
        s = (samples[-1] + 0.5).clamp(0,1)
        plt.clf()
        fig, axs = get_grid(16)
        for im,ax in zip(s[:16], axs.flat): show_image(im, ax=ax)
        return fig

    def after_batch(self, learn):
        super().after_batch(learn)
        wandb.log({'loss':learn.loss})


def test_the_course_lesson_21_wandbcb_runs_unchanged_on_metricscb(capsys):
    global learn  # the course's `_log` reads the notebook's global `learn`
    class WhereItLogs(Callback):
        def before_epoch(self, learn): self.dir = wandb.run.dir  # the offline run's files/ folder
    cb, where = CourseWandBCB({'lr': 0.1}, accuracy=MulticlassAccuracy()), WhereItLogs()
    learn = TrainLearner(learner(metrics=False).model, learner().dls, F.cross_entropy, lr=0.1, cbs=[cb, where])
    learn.fit(2)
    recs = wandb_records(Path(where.dir).parent)
    assert next(r['run'] for r in recs if r['type'] == 'run')['config']['update']['lr'] == 0.1
    logged = [r['history']['item'] for r in recs if r['type'] == 'history']
    rows = cb.history
    assert sum('loss' in h for h in logged) == 12, 'a loss per batch (4 training, 2 validation, 2 epochs)'
    assert [h['train_accuracy'] for h in logged if 'train_accuracy' in h] == \
           [pytest.approx(float(f"{r['accuracy']:.3f}")) for r in rows if r['train'] == 'train']
    assert [h['val_loss'] for h in logged if 'val_loss' in h] == \
           [pytest.approx(float(f"{r['loss']:.3f}")) for r in rows if r['train'] == 'eval']
    assert [h['samples._type'] for h in logged if 'samples._type' in h] == ['image-file'] * 2, 'a figure a validation'
    files = [f['path'] for r in recs if r['type'] == 'files' for f in r['files']['files']]
    assert sum(f.startswith('media/images/samples_') for f in files) == 2
    assert capsys.readouterr().out.count("'train': 'eval'") == 2, 'and it prints each row, as the course did'


def test_a_fit_that_fails_ends_its_run_failed_and_the_error_reaches_the_caller(tmp_path):
    class Boom(Callback):
        def after_epoch(self, learn): raise ValueError('boom')
    cb = MLflowCB(tracking_uri=f'file://{tmp_path}/mlruns')
    with pytest.raises(ValueError, match='boom'): learner([cb, Boom()]).fit(2)
    assert mlflow_client(tmp_path).get_run(cb.run_id).info.status == 'FAILED'
