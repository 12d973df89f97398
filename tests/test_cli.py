"""The main job's command line: help, clear errors with exit code 2, a short real run, and resuming it."""
import json
import os
import subprocess
import sys
import time

import pytest

from miniai.checkpoint import read_checkpoint
from miniai.cli import build_parser
from miniai.fashion import find_fashion_mnist


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, '-m', 'miniai', *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, 'MPLBACKEND': 'Agg'})


def test_help_explains_every_option():
    text = build_parser()._subparsers._group_actions[0].choices['train'].format_help()
    for opt in ('--epochs', '--bs', '--lr', '--model', '--precision', '--out', '--resume', '--seed'):
        assert opt in text


@pytest.mark.parametrize('args,msg', [(['train', '--epochs', '0'], 'must be > 0'),
                                      (['train', '--bs', 'big'], "expected a int, got 'big'"),
                                      (['train', '--precision', 'fp64'], "invalid choice: 'fp64'"),
                                      (['train', '--resume', '/nonexistent.ckpt'], 'no checkpoint at'),
                                      ([], 'required')])
def test_bad_arguments_exit_2_with_a_message(args, msg, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(args) if 'resume' not in str(args) else __import__('miniai.cli').cli.main(args)
    assert e.value.code == 2
    assert msg in capsys.readouterr().err


@pytest.mark.skipif(find_fashion_mnist() is None, reason='Fashion-MNIST is not installed')
def test_short_run_saves_everything(tmp_path):
    out = tmp_path / 'run'
    r = cli('train', '--epochs', 1, '--bs', 128, '--n-train', 512, '--n-valid', 256, '--out', out, '--no-summary')
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'Test accuracy:' in r.stdout and 'with TTA' in r.stdout and 'precision:' in r.stdout
    for f in ('last.ckpt', 'best.ckpt', 'final.ckpt', 'metrics.csv', 'loss.png', 'lr.png', 'result.json'):
        assert (out / f).exists(), f
    res = json.loads((out / 'result.json').read_text())
    assert 0 <= res['accuracy'] <= 1 and res['epochs'] == 1
    assert len((out / 'metrics.csv').read_text().splitlines()) == 3, 'probes (TTA) must not log rows'


@pytest.mark.skipif(find_fashion_mnist() is None, reason='Fashion-MNIST is not installed')
def test_killed_run_resumes_from_its_last_checkpoint(tmp_path):
    out = tmp_path / 'run'
    args = ['train', '--epochs', 3, '--bs', 128, '--n-train', 512, '--n-valid', 256, '--out', out, '--no-summary',
            '--no-tta']
    proc = subprocess.Popen([sys.executable, '-m', 'miniai', *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, 'MPLBACKEND': 'Agg'})
    deadline = time.time() + 240
    while not (out / 'last.ckpt').exists() and time.time() < deadline and proc.poll() is None: time.sleep(0.05)
    proc.kill()
    proc.wait()
    done = read_checkpoint(out / 'last.ckpt')['epoch']
    assert done < 2, 'the run should have been killed before its end'
    r = cli(*args, '--resume', out / 'last.ckpt')
    assert r.returncode == 0, r.stderr[-2000:]
    epochs = [l.split(',')[2:4] for l in (out / 'metrics.csv').read_text().splitlines()[1:]]
    assert epochs[-4:] == [['1', 'train'], ['1', 'eval'], ['2', 'train'], ['2', 'eval']]
    assert read_checkpoint(out / 'last.ckpt')['epoch'] == 2
    r = cli(*args[:2], 5, *args[3:], '--resume', out / 'last.ckpt')
    assert r.returncode != 0 and 'resume with the same epochs' in r.stderr
