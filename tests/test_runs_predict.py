"""A run of the main job you can load and use on new images: `load_run(folder)` from a real `miniai train` run on a
folder of PNGs and JPEGs of mixed sizes (its model rebuilt from what the run recorded, no knowledge of the recipe),
and `miniai predict` on a run and on an export, with a broken file among the images."""
import contextlib
import csv
import io
import json
import shutil

import pytest
import torch

from miniai import load_run
from miniai.app.cli import main
from miniai.app.runfolder import RunError
from miniai.data.fashion import find_fashion_mnist
from miniai.tools.inference import Prediction
from test_new_images import LABELS, image_folders, pick, write_images

pytestmark = [pytest.mark.skipif(find_fashion_mnist() is None, reason='Fashion-MNIST is not installed (make data)'),
              pytest.mark.filterwarnings('ignore:The image decoding and encoding capabilities of TorchVision')]


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    "`miniai train` for one epoch on a folder of PNGs and JPEGs of mixed sizes (--size 16), and a folder of new ones."
    root = tmp_path_factory.mktemp('run')
    mp = pytest.MonkeyPatch()
    mp.setenv('MINIAI_CACHE', str(root / 'cache'))
    names = image_folders(root, 20, 6)
    new = write_images(root / 'new', *pick('test', 2, start=30), names, 3)
    out, said = root / 'out', io.StringIO()
    with contextlib.redirect_stdout(said):
        code = main(['train', '--data', root / 'data', '--size', 16, '--epochs', 1, '--bs', 16, '--out', out,
                     '--no-summary', '--no-tta', '--threads', 1, '--target', 0.3, '--precision', 'fp32'])
    assert code == 0
    yield root, out, new, said.getvalue()
    mp.undo()


def test_a_run_records_what_rebuilds_its_model(run):
    _, out, _, _ = run
    meta = json.loads((out / 'model.json').read_text())
    assert meta['build_model'] == {'name': 'resnet9_small', 'drop': None, 'in_channels': 1, 'n_classes': 3, 'size': 16}
    assert meta['classes'] == sorted(LABELS) and meta['input_shape'] == [1, 16, 16] and meta['resize'] == 'cover'
    assert len(meta['mean']) == len(meta['std']) == 1 and meta['data']['size'] == 16


def test_on_other_data_the_job_names_the_validation_split_and_the_target_it_was_given(run):
    printed = run[3]
    assert '\nValidation accuracy: ' in printed and 'Test accuracy' not in printed
    assert 'Time to the target given, 30.0% validation accuracy (--target 0.3): ' in printed
    assert 'test accuracy' not in printed
    assert json.loads((run[1] / 'result.json').read_text())['measured_on'] == 'validation'


def test_load_run_gives_a_learner_that_predicts_interprets_fine_tunes_and_exports(run, tmp_path):
    root, out, new, _ = run
    learn = load_run(out)  # its data is still there: reloaded
    res = json.loads((out / 'result.json').read_text())
    preds, targs = learn.get_preds()
    assert (preds.argmax(1) == targs).float().mean().item() == pytest.approx(res['accuracy'], abs=1e-6), \
        'final.ckpt holds the weights the run last measured'
    p = learn.predict(new[0])
    assert isinstance(p, Prediction) and p.label in LABELS
    bare = load_run(out, data=None)  # no data: still predicts and exports
    assert torch.allclose(bare.predict(new[1]).probs, learn.predict(new[1]).probs, atol=1e-5)
    m = __import__('miniai').load_exported(bare.export(tmp_path / 'exp'))
    assert torch.allclose(m.predict(new[1]).probs, learn.predict(new[1]).probs, atol=1e-5)
    learn.fit(1, lr=1e-4)  # fine-tunes on the reloaded data
    with pytest.raises(RunError, match=r'no readable model\.json .*load_run takes a run folder of `python -m miniai '
                                       r'train`'):
        load_run(root / 'data')


def test_miniai_predict_on_a_run_and_an_export_with_a_broken_file(run, tmp_path, capsys):
    root, out, new, _ = run
    folder = tmp_path / 'imgs'
    shutil.copytree(root / 'new', folder)
    broken = folder / 'top' / 'broken.png'
    broken.write_bytes(new[0].read_bytes()[:60])
    learn = load_run(out, data=None)
    capsys.readouterr()
    assert main(['predict', out, folder, '--out', tmp_path / 'preds.csv', '--top-k', 2]) == 0
    shown = capsys.readouterr()
    lines = shown.out.splitlines()
    assert lines[0].split() == ['file', 'label', 'prob', 'top', '2'] and len(lines) == 1 + 7 + 1
    assert any('broken.png' in l and 'error: ' in l and 'cannot be decoded' in l for l in lines)
    assert shown.err == 'miniai: 1 of 7 file(s) could not be read as images (see their lines)\n'
    rows = list(csv.DictReader((tmp_path / 'preds.csv').open()))
    assert [r['file'] for r in rows] == [str(f) for f in sorted(folder.rglob('*.*'))]
    for r in rows:
        if r['file'] == str(broken):
            assert r['label'] == '' and 'cannot be decoded' in r['error']
            continue
        want = learn.predict(r['file'])
        assert r['label'] == want.label and float(r['prob']) == pytest.approx(want.prob, abs=1e-4)
        assert len(r['top_k'].split(';')) == 2 and r['top_k'].startswith(f'{want.label}:')
    exp = learn.export(tmp_path / 'exp')
    assert main(['predict', exp, new[0], broken]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[1] == learn.predict(new[0]).label and 'error:' in lines[2]
    assert main(['predict', exp, broken]) == 2, 'nothing could be predicted'
    assert capsys.readouterr().err == 'miniai: 1 of 1 file(s) could not be read as images (see their lines)\n'
    assert main(['predict', root / 'data', new[0]]) == 2
    err = capsys.readouterr().err
    assert err.startswith('miniai: error: ') and err.count('\n') == 1 and 'no readable model.json' in err
