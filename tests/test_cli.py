"""The main job's command line: help, clear errors with exit code 2, a short real run, resuming it, and stopping it
with SIGTERM or Ctrl-C and going on with the command it prints."""
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import torch

from miniai.core.state import CheckpointError
from miniai.runs.ckptfile import read_checkpoint
from miniai.app.cli import build_parser, main
from miniai.data.fashion import find_fashion_mnist

needs_data = pytest.mark.skipif(find_fashion_mnist() is None, reason='Fashion-MNIST is not installed')


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, '-m', 'miniai', *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, 'MPLBACKEND': 'Agg'})


def test_help_explains_every_option():
    text = build_parser()._subparsers._group_actions[0].choices['train'].format_help()
    for opt in ('--epochs', '--bs', '--lr', '--model', '--precision', '--out', '--resume', '--seed', '--augment',
                '--wd', '--label-smoothing', '--drop', '--threads', '--data', '--size', '--valid-pct'):
        assert opt in text
    # defaults are shown where they say something, never as 'None' or as a flag's True/False
    assert '(default: 8)' in text and '(default: 0.05)' in text and '(default: ema)' in text
    for noise in ('(default: None)', '(default: True)', '(default: False)'): assert noise not in text
    # the main job's defaults are the recipe that reached 94% soonest (bench/results/time_to_accuracy.md)
    a = build_parser().parse_args(['train'])
    assert (a.model, a.label_smoothing, a.augment, a.epochs, a.average, a.target) == (
        'resnet9_small', 0.1, 'auto', 8, 'ema', 0.94)


@pytest.mark.parametrize('args,msg', [(['train', '--epochs', '0'], 'must be > 0'),
                                      (['train', '--bs', 'big'], "expected an integer, got 'big'"),
                                      (['train', '--precision', 'fp64'], "invalid choice: 'fp64'"),
                                      (['train', '--resume', '/nonexistent.ckpt'], 'no checkpoint at'),
                                      (['train', '--resume', 'auto'], '--resume auto needs --out DIR'),
                                      (['train', '--augment', 'heavy'], "invalid choice: 'heavy'"),
                                      (['train', '--label-smoothing', '1.5'], 'must be in [0, 1), got 1.5'),
                                      (['train', '--drop', 'x'], "expected a number, got 'x'"),
                                      (['train', '--wd', '-1'], 'must be >= 0, got -1'),
                                      (['train', '--threads', '0'], 'must be > 0'),
                                      ([], 'required')])
def test_bad_arguments_exit_2_with_a_message(args, msg, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(args) if 'resume' not in str(args) else __import__('miniai.app.cli').app.cli.main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert msg in err and err.startswith('miniai: error: ') and err.count('\n') == 1, err


@pytest.mark.skipif(find_fashion_mnist() is None, reason='Fashion-MNIST is not installed')
def test_short_run_saves_everything(tmp_path):
    out = tmp_path / 'run'
    r = cli('train', '--epochs', 1, '--bs', 128, '--n-train', 512, '--n-valid', 256, '--out', out, '--no-summary',
            '--augment', 'crop-flip', '--label-smoothing', 0.1, '--wd', 0.01, '--drop', 0.2, '--threads', 1)
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'Test accuracy:' in r.stdout and 'with TTA' in r.stdout and 'precision:' in r.stdout
    for f in ('last.ckpt', 'best.ckpt', 'final.ckpt', 'metrics.csv', 'loss.png', 'lr.png', 'result.json'):
        assert (out / f).exists(), f
    res = json.loads((out / 'result.json').read_text())
    assert 0 <= res['accuracy'] <= 1 and res['epochs'] == 1
    assert (res['augment'], res['label_smoothing'], res['wd'], res['drop']) == ('crop-flip', 0.1, 0.01, 0.2)
    assert res['command'].startswith('python -m miniai train --epochs 1 --bs 128') and res['threads'] == 1
    assert 'augmentation: RandCropPad, RandFlip;' in r.stdout and 'label smoothing 0.1' in r.stdout
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


def test_recipe_options_reach_the_learner():
    import torch
    import torch.nn.functional as F
    from torch import nn
    from miniai.augment import RandCropPad, RandErase, RandFlip
    from miniai.app.recipe import augment_tfms, build_model, make_learner
    assert augment_tfms('none') == [] and augment_tfms(False) == []
    assert [type(t) for t in augment_tfms('crop-flip')] == [RandCropPad, RandFlip]
    assert [type(t) for t in augment_tfms(True)] == [RandCropPad, RandFlip, RandErase]
    with pytest.raises(ValueError, match="unknown augmentation 'heavy'; choose one of auto, none, flip"):
        augment_tfms('heavy')
    assert [[type(t) for t in augment_tfms('auto', e)] for e in (1, 5, 6, 20, 21)] == [
        [RandFlip], [RandFlip], [RandCropPad, RandFlip], [RandCropPad, RandFlip], [RandCropPad, RandFlip, RandErase]]
    with pytest.raises(ValueError, match="'auto' needs the number of epochs"): augment_tfms('auto')
    model = build_model('fashion_resnet', drop=0.3)
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == [0.3]
    assert [m.p for m in build_model('fashion_resnet').modules() if isinstance(m, nn.Dropout)] == [0.1]
    dls = type('D', (), {'train': [0] * 4, 'valid': [0]})()
    learn, _ = make_learner(model, dls, epochs=1, lr=0.1, precision='fp32', augment='flip', label_smoothing=0.2)
    preds, y = torch.randn(8, 10), torch.randint(0, 10, (8,))
    assert torch.equal(learn.loss_func(preds, y), F.cross_entropy(preds, y, label_smoothing=0.2))
    assert not torch.allclose(learn.loss_func(preds, y), F.cross_entropy(preds, y))
    with pytest.raises(ValueError, match=r'label_smoothing must be in \[0, 1\); got 1'):
        make_learner(model, dls, epochs=1, lr=0.1, precision='fp32', label_smoothing=1)


# -- errors a user can fix: one line, exit 2; the traceback only on request; bugs keep theirs ---------------------------
SMALL = ['--epochs', 1, '--bs', 64, '--n-train', 128, '--n-valid', 64, '--model', 'fashion_resnet', '--no-summary',
         '--no-tta', '--threads', 1]


def garbage_file(tmp: Path) -> Path:
    (tmp / 'bad.ckpt').write_text('not a checkpoint at all')
    return tmp / 'bad.ckpt'


def other_models_checkpoint(tmp: Path) -> Path:
    from torch import nn
    from miniai.runs.checkpoint import save_checkpoint
    from miniai.learner import Learner
    return save_checkpoint(Learner(nn.Linear(3, 2)), tmp / 'other.ckpt')


def data_without_files(tmp: Path, monkeypatch) -> None:
    (tmp / 'data').mkdir()
    monkeypatch.setenv('MINIAI_DATA', str(tmp / 'data'))


def data_with_a_truncated_file(tmp: Path, monkeypatch) -> None:
    folder = find_fashion_mnist()
    (tmp / 'data').mkdir()
    for name in ('train-images-idx3-ubyte', 't10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'):
        src = next(p for p in (folder / name, folder / f'{name}.gz') if p.exists())
        (tmp / 'data' / src.name).symlink_to(src)
    (tmp / 'data' / 'train-labels-idx1-ubyte').write_bytes(b'\x00\x00\x08\x01\x00\x00\xea\x60' + bytes(100))
    monkeypatch.setenv('MINIAI_DATA', str(tmp / 'data'))


def out_is_a_file(tmp: Path) -> list:
    (tmp / 'f').write_text('')
    return ['--out', tmp / 'f']


USER_ERRORS = {  # name: (set-up returning extra arguments, what the one line must say)
    'garbage --resume': (lambda t, m: ['--resume', garbage_file(t)], 'bad.ckpt is not a readable miniai checkpoint'),
    "another model's checkpoint": (lambda t, m: ['--resume', other_models_checkpoint(t)],
                                   'other.ckpt was made for another model'),
    'data folder without the files': (lambda t, m: data_without_files(t, m) or [],
                                      'lacks train-images-idx3-ubyte, train-labels-idx1-ubyte'),
    'truncated IDX file': (lambda t, m: data_with_a_truncated_file(t, m) or [],
                           "train-labels-idx1-ubyte: header says shape (60000,) (60008 bytes) but the file has 108 "
                           "bytes; truncated. Replace the file (Debian's dataset-fashion-mnist package"),
    '--out is a file': (lambda t, m: out_is_a_file(t),
                        'cannot make the run folder there'),
}


@needs_data
@pytest.mark.parametrize('case', list(USER_ERRORS))
def test_user_errors_are_one_line_and_exit_2(case, tmp_path, monkeypatch, capsys):
    setup, says = USER_ERRORS[case]
    extra = setup(tmp_path, monkeypatch)
    args = ['train', *SMALL, *(['--out', tmp_path / 'run'] if '--out' not in extra else []), *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith('miniai: error: ') and err.count('\n') == 1 and 'Traceback' not in err, err
    assert says in err, err
    print(f'\n{case}: {err.strip()}')


def test_under_torchrun_the_main_job_needs_a_run_folder_and_a_batch_that_divides(tmp_path, monkeypatch, capsys):
    "--bs is the global batch size: each of the N processes takes bs/N, so N must divide it; say so, in one line."
    monkeypatch.setenv('WORLD_SIZE', '2')
    assert main(['train', '--epochs', 1]) == 2
    assert 'under torchrun (2 processes) give --out DIR, the same folder for every node' in capsys.readouterr().err
    monkeypatch.setenv('WORLD_SIZE', '3')
    assert main(['train', '--bs', 64, '--out', tmp_path / 'run']) == 2
    err = capsys.readouterr().err
    assert '--bs 64 is the global batch size and must divide evenly among the 3 processes' in err
    assert err.count('\n') == 1
    assert not (tmp_path / 'run').exists(), 'nothing was written'


@needs_data
@pytest.mark.parametrize('how', ['--debug', 'MINIAI_DEBUG=1'])
def test_debug_shows_the_traceback_of_user_errors(how, tmp_path, monkeypatch):
    args = ['train', *SMALL, '--out', tmp_path / 'run', '--resume', garbage_file(tmp_path)]
    if how == '--debug': args.append('--debug')
    else: monkeypatch.setenv('MINIAI_DEBUG', '1')
    with pytest.raises(CheckpointError, match='is not a readable miniai checkpoint'): main(args)


def test_bugs_keep_their_traceback(monkeypatch, tmp_path):
    import miniai.app.cli
    def buggy(args): return 1 / 0
    monkeypatch.setattr(miniai.app.cli, 'train', buggy)
    with pytest.raises(ZeroDivisionError): main(['train', '--out', tmp_path])
    def user_error_and_a_failed_cleanup(args):
        e = CheckpointError('bad file')
        e.add_note('while this exception was on its way, `cleanup_fit` also failed: AttributeError: x')
        raise e
    monkeypatch.setattr(miniai.app.cli, 'train', user_error_and_a_failed_cleanup)
    with pytest.raises(CheckpointError): main(['train', '--out', tmp_path])


@needs_data
def test_user_error_from_a_real_process_has_no_traceback(tmp_path):
    r = cli('train', *SMALL, '--out', tmp_path / 'run', '--resume', garbage_file(tmp_path), timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('miniai: error: ') and 'Traceback' not in r.stderr, r.stderr


# -- SIGTERM / Ctrl-C on the real main job --------------------------------------------------------------------------------
JOB = ['train', '--epochs', 2, '--bs', 64, '--n-train', 384, '--n-valid', 64, '--model', 'seed002_resnet',
       '--no-summary', '--no-tta', '--threads', 1]
CPU_ENV = {**os.environ, 'MPLBACKEND': 'Agg', 'CUDA_VISIBLE_DEVICES': ''}  # bitwise equality is promised on CPU


def stop_mid_epoch(out: Path, signum: int) -> subprocess.CompletedProcess:
    "Run the job, send `signum` as soon as its first epoch's checkpoint exists (epoch 1 is starting), wait for it."
    proc = subprocess.Popen([sys.executable, '-m', 'miniai', *map(str, JOB), '--out', str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=CPU_ENV)
    deadline = time.time() + 300
    while not (out / 'last.ckpt').exists() and proc.poll() is None and time.time() < deadline: time.sleep(0.01)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@needs_data
def test_sigterm_mid_epoch_then_the_printed_command_ends_bitwise_as_an_uninterrupted_run(tmp_path):
    full = subprocess.run([sys.executable, '-m', 'miniai', *map(str, JOB), '--out', str(tmp_path / 'full')],
                          capture_output=True, text=True, env=CPU_ENV, timeout=300)
    assert full.returncode == 0, full.stderr[-2000:]
    r = stop_mid_epoch(tmp_path / 'cut', signal.SIGTERM)
    assert r.returncode == 143, r.stderr[-3000:]
    assert 'Traceback' not in r.stderr, r.stderr
    ck = read_checkpoint(tmp_path / 'cut' / 'interrupted.ckpt')
    pos = ck['position']
    assert pos['epoch'] == 1 and pos['phase'] == 'train' and 0 < pos['batch'] < pos['n_batches'] == 6, pos
    assert (f"miniai: stopped by SIGTERM in epoch 1, after {pos['batch']} of its 6 training batches; saved to "
            f"{tmp_path / 'cut' / 'interrupted.ckpt'}") in r.stderr
    command = next(l for l in r.stderr.splitlines() if l.startswith('miniai: to continue: ')).split(': ', 2)[2]
    args = shlex.split(command)
    assert args[:3] == ['python', '-m', 'miniai'] and args[-2:] == ['--resume', str(tmp_path / 'cut' / 'interrupted.ckpt')]
    go_on = subprocess.run([sys.executable, *args[1:]], capture_output=True, text=True, env=CPU_ENV, timeout=300)
    assert go_on.returncode == 0, go_on.stderr[-2000:]
    a, b = (read_checkpoint(tmp_path / d / 'final.ckpt')['model'] for d in ('full', 'cut'))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), 'continued weights differ'
    rows = [l.split(',')[2:4] for l in (tmp_path / 'cut' / 'metrics.csv').read_text().splitlines()[1:]]
    assert rows == [['0', 'train'], ['0', 'eval'], ['1', 'train'], ['1', 'eval']], 'one row per epoch and stage'
    print(f'\nSIGTERM after batch {pos["batch"]}/6 of epoch 1, continued with: {command}\n'
          f'final weights: all {len(a)} tensors bitwise equal to the uninterrupted run')


@needs_data
def test_ctrl_c_mid_epoch_saves_and_exits_130(tmp_path):
    r = stop_mid_epoch(tmp_path / 'run', signal.SIGINT)
    assert r.returncode == 130, r.stderr[-3000:]
    assert 'Traceback' not in r.stderr and 'KeyboardInterrupt' not in r.stderr, r.stderr
    assert 'miniai: SIGINT received: stopping after this batch' in r.stderr
    assert f"saved to {tmp_path / 'run' / 'interrupted.ckpt'}" in r.stderr
    assert read_checkpoint(tmp_path / 'run' / 'interrupted.ckpt')['position']['epoch'] == 1
    assert '--resume ' + str(tmp_path / 'run' / 'interrupted.ckpt') in r.stderr


@pytest.mark.parametrize('name', ['fashion_resnet', 'seed002_resnet', 'resnet9', 'resnet9_small'])
def test_every_model_is_built_for_the_datas_channels_size_and_classes(name):
    from miniai.app.recipe import build_model
    model = build_model(name, in_channels=3, n_classes=4, size=32).eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    assert build_model(name).eval()(torch.randn(2, 1, 28, 28)).shape == (2, 10), "Fashion-MNIST's by default"


def test_a_model_made_for_fashion_mnist_only_is_refused_for_other_data(monkeypatch):
    from torch import nn
    from miniai.app import recipe
    monkeypatch.setitem(recipe.MODELS, 'tiny', lambda: nn.Linear(784, 10))  # takes no in_channels or n_classes
    assert isinstance(recipe.build_model('tiny', size=28), nn.Linear)
    with pytest.raises(ValueError, match="model 'tiny' takes no in_channels, so it cannot be built for in_channels=3"):
        recipe.build_model('tiny', in_channels=3)


@needs_data
def test_arch_pretrained_fine_tunes_a_torchvision_backbone_from_its_cached_weights(tmp_path):
    "`--arch resnet18 --pretrained`: the weights come through torchvision's `weights=` (from $TORCH_HOME), then fine_tune."
    import torch
    import torchvision
    home = tmp_path / 'torch'
    (home / 'hub' / 'checkpoints').mkdir(parents=True)
    torch.manual_seed(0)
    url = torchvision.models.ResNet18_Weights.DEFAULT.url
    torch.save(torchvision.models.resnet18().state_dict(), home / 'hub' / 'checkpoints' / url.rsplit('/', 1)[-1])
    out = tmp_path / 'run'
    r = subprocess.run([sys.executable, '-m', 'miniai', 'train', '--arch', 'resnet18', '--pretrained', '--epochs', '2',
                        '--bs', '32', '--n-train', '64', '--n-valid', '32', '--out', str(out), '--no-summary',
                        '--no-tta', '--threads', '1', '--average', 'none'], capture_output=True, text=True,
                       timeout=300, env={**os.environ, 'MPLBACKEND': 'Agg', 'TORCH_HOME': str(home)})
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((out / 'result.json').read_text())
    assert res['model'] == 'resnet18' and res['epochs'] == 2
    meta = json.loads((out / 'model.json').read_text())
    assert meta['build_model']['name'] == 'resnet18'
    assert len((out / 'metrics.csv').read_text().splitlines()) == 5  # a frozen fit's epoch, then the unfrozen one's
