"""The main job with trackers: `--log wandb mlflow` interrupted by SIGTERM and started again with `--resume auto` goes on
in the same W&B and MLflow runs, every step logged once, read back through the clients; a missing client is one line
naming the extra to install."""
import json
import os
import subprocess
import sys

import pytest

from miniai.data.fashion import find_fashion_mnist
from test_trackers import wandb_history, wandb_records

pytest.importorskip('wandb')
pytest.importorskip('mlflow')
pytestmark = pytest.mark.skipif(find_fashion_mnist() is None, reason='needs Fashion-MNIST')

JOB = ['-m', 'miniai', 'train', '--epochs', 2, '--bs', 32, '--n-train', 192, '--n-valid', 32, '--model',
       'seed002_resnet', '--no-summary', '--no-tta', '--threads', 1, '--precision', 'fp32']  # 6 batches an epoch


def env(tmp_path, **more):
    return {**{k: v for k, v in os.environ.items() if not k.startswith(('MINIAI_', 'WANDB_', 'MLFLOW_'))},
            'MINIAI_DEVICE': 'cpu', 'OMP_NUM_THREADS': '1', 'MPLBACKEND': 'Agg', 'CUDA_VISIBLE_DEVICES': '',
            'WANDB_MODE': 'offline', 'WANDB_SILENT': 'true', 'MLFLOW_TRACKING_URI': f'file://{tmp_path}/mlruns',
            'MLFLOW_ALLOW_FILE_STORE': 'true', **more}


def test_a_sigtermed_run_resumed_goes_on_in_the_same_wandb_and_mlflow_runs_with_every_step_once(tmp_path, monkeypatch):
    monkeypatch.setenv('MLFLOW_ALLOW_FILE_STORE', 'true')
    out = tmp_path / 'run'
    args = [sys.executable, *map(str, JOB), '--out', str(out), '--log', 'wandb', 'mlflow', '--run-name', 'alpha',
            '--resume', 'auto']
    first = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, timeout=300,
                           env=env(tmp_path, MINIAI_DRILL='SIGTERM@0:1:2'))  # after batch 2 of epoch 1
    assert first.returncode == 143 and 'interrupted.ckpt' in first.stderr, first.stderr
    from mlflow import MlflowClient
    c = MlflowClient(f'file://{tmp_path}/mlruns')
    (run,) = c.search_runs([c.get_experiment_by_name('miniai').experiment_id])
    assert run.info.status == 'KILLED' and run.info.run_name == 'alpha'
    again = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, timeout=300, env=env(tmp_path))
    assert again.returncode == 0, again.stderr
    (run,) = c.search_runs([c.get_experiment_by_name('miniai').experiment_id])  # still one run, finished now
    assert run.info.status == 'FINISHED'
    rid = run.info.run_id
    assert [m.step for m in c.get_metric_history(rid, 'train/batch_loss')] == [10], 'every 10th of 12 batches'
    assert [m.step for m in c.get_metric_history(rid, 'valid/accuracy')] == [6, 12]
    assert [m.step for m in c.get_metric_history(rid, 'train/loss')] == [6, 12]
    assert run.data.params['seed'] == '42' and run.data.params['model'] == 'seed002_resnet'
    assert {'result.json', 'best.ckpt', 'loss.png', 'settings.json'} <= {a.path for a in c.list_artifacts(rid)}
    assert run.data.metrics['accuracy'] == pytest.approx(json.loads((out / 'result.json').read_text())['accuracy'])
    parts = sorted((out / 'wandb').glob('offline-run-*'))
    recs = [wandb_records(p) for p in parts]
    assert len(parts) == 2 and len({next(r['run']['run_id'] for r in rs if r['type'] == 'run') for rs in recs}) == 1
    hist = [wandb_history(rs) for rs in recs]
    steps = [s for h in hist for s, r in sorted(h.items()) if 'valid/accuracy' in r]
    assert steps == [6, 12], 'the first process logged epoch 0, the resumed one epoch 1: once each'
    assert [s for h in hist for s, r in sorted(h.items()) if 'train/batch_loss' in r] == [10]


def test_a_missing_client_is_one_line_naming_the_extra(tmp_path):
    (tmp_path / 'wandb').mkdir()
    (tmp_path / 'wandb' / '__init__.py').write_text("raise ImportError('No module named wandb')\n")
    r = subprocess.run([sys.executable, *map(str, JOB), '--out', str(tmp_path / 'run'), '--log', 'wandb'],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path,
                       env=env(tmp_path, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get('PYTHONPATH', '')])))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "miniai: error: logging to wandb needs the wandb package: pip install 'miniai-learner[wandb]'"], r.stderr
    assert not (tmp_path / 'run').exists(), 'nothing was trained'
