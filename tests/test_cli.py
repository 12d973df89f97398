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
    for opt in ('--epochs', '--bs', '--lr', '--model', '--precision', '--out', '--resume', '--seed', '--augment',
                '--wd', '--label-smoothing', '--drop', '--threads'):
        assert opt in text
    # defaults are shown where they say something, never as 'None' or as a flag's True/False
    assert '(default: 5)' in text and '(default: 0.05)' in text
    for noise in ('(default: None)', '(default: True)', '(default: False)'): assert noise not in text
    # the main job's defaults are the recipe that measured best at 5 epochs (bench/results/accuracy.md)
    a = build_parser().parse_args(['train'])
    assert (a.model, a.label_smoothing, a.augment, a.epochs) == ('fashion_resnet_wide', 0.1, 'auto', 5)


@pytest.mark.parametrize('args,msg', [(['train', '--epochs', '0'], 'must be > 0'),
                                      (['train', '--bs', 'big'], "expected an integer, got 'big'"),
                                      (['train', '--precision', 'fp64'], "invalid choice: 'fp64'"),
                                      (['train', '--resume', '/nonexistent.ckpt'], 'no checkpoint at'),
                                      (['train', '--augment', 'heavy'], "invalid choice: 'heavy'"),
                                      (['train', '--label-smoothing', '1.5'], 'must be in [0, 1), got 1.5'),
                                      (['train', '--drop', 'x'], "expected a number, got 'x'"),
                                      (['train', '--wd', '-1'], 'must be >= 0, got -1'),
                                      (['train', '--threads', '0'], 'must be > 0'),
                                      ([], 'required')])
def test_bad_arguments_exit_2_with_a_message(args, msg, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(args) if 'resume' not in str(args) else __import__('miniai.cli').cli.main(args)
    assert e.value.code == 2
    assert msg in capsys.readouterr().err


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
    from miniai.recipe import augment_tfms, build_model, make_learner
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
