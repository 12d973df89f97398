"""Resuming `python -m miniai train --arch resnet18 --pretrained` runs (`miniai.app.recipe.fine_tune_run`): the
weights come from the checkpoint, never from the download, and the run ends where an uninterrupted one does."""
import pytest
import torch
import torchvision

from miniai.app.recipe import run_recipe
from miniai.data.fashion import find_fashion_mnist
from miniai.runs.ckptfile import read_checkpoint
from miniai.runs.interrupt import Interrupted

pytestmark = pytest.mark.skipif(find_fashion_mnist() is None, reason='Fashion-MNIST is not installed')
RUN = dict(model='resnet18', pretrained=True, epochs=3, bs=16, n_train=32, n_valid=16, summary=False, use_tta=False,
           average=None, target=None, augment=False, lr=1e-3, precision='fp32')


@pytest.fixture(scope='module')
def weights_home(tmp_path_factory):
    "A TORCH_HOME holding 'downloaded' resnet18 weights where torchvision's `weights=` looks."
    home = tmp_path_factory.mktemp('torch')
    (home / 'hub' / 'checkpoints').mkdir(parents=True)
    torch.manual_seed(0)
    url = torchvision.models.ResNet18_Weights.DEFAULT.url
    torch.save(torchvision.models.resnet18().state_dict(), home / 'hub' / 'checkpoints' / url.rsplit('/', 1)[-1])
    return home


@pytest.fixture(scope='module')
def uninterrupted(weights_home, tmp_path_factory):
    "The final weights of the run that nothing stops."
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv('TORCH_HOME', str(weights_home))
        out = tmp_path_factory.mktemp('whole')
        run_recipe(out=out, **RUN)
    return read_checkpoint(out / 'final.ckpt')['model']


def _no_download(*a, **k): raise AssertionError('a resumed run must take its weights from the checkpoint')


@pytest.mark.parametrize('drill', ['SIGTERM@0:0:1', 'SIGTERM@0:1:0'], ids=['in-frozen-epoch', 'in-unfrozen-fit'])
def test_a_pretrained_fine_tune_resumes_to_the_uninterrupted_weights(drill, weights_home, uninterrupted, tmp_path,
                                                                      monkeypatch):
    "Stopped in the frozen epoch or in the unfrozen fit, `resume='auto'` goes on in that fit and ends the same."
    monkeypatch.setenv('TORCH_HOME', str(weights_home))
    monkeypatch.setenv('MINIAI_DRILL', drill)
    with pytest.raises(Interrupted): run_recipe(out=tmp_path, **RUN)
    assert bool(read_checkpoint(tmp_path / 'interrupted.ckpt')['frozen_to']) == (drill == 'SIGTERM@0:0:1')
    monkeypatch.delenv('MINIAI_DRILL')
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'empty'))
    monkeypatch.setattr(torch.hub, 'load_state_dict_from_url', _no_download)
    run_recipe(out=tmp_path, resume='auto', **RUN)
    final = read_checkpoint(tmp_path / 'final.ckpt')['model']
    assert final.keys() == uninterrupted.keys()
    for k, v in uninterrupted.items(): torch.testing.assert_close(final[k], v, rtol=1e-4, atol=1e-5, msg=k)


def test_a_checkpoint_at_the_frozen_epochs_end_starts_the_unfrozen_fit_from_its_weights(weights_home, tmp_path,
                                                                                         monkeypatch):
    "A run that stopped between the two fits (its newest file: the frozen epoch's last.ckpt) trains the unfrozen fit."
    monkeypatch.setenv('TORCH_HOME', str(weights_home))
    run_recipe(out=tmp_path, **{**RUN, 'epochs': 1})  # fine_tune(0): the frozen epoch alone
    ck = read_checkpoint(tmp_path / 'last.ckpt')
    assert ck['frozen_to'] and ck['epoch'] == 0
    (tmp_path / 'metrics.csv').unlink()
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'empty'))
    monkeypatch.setattr(torch.hub, 'load_state_dict_from_url', _no_download)
    run_recipe(out=tmp_path, resume=tmp_path / 'last.ckpt', **RUN)
    after = read_checkpoint(tmp_path / 'last.ckpt')
    assert after['frozen_to'] == 0 and after['epoch'] == 1  # the unfrozen fit's 2 epochs, not the frozen one again
    conv = 'model.0.0.weight' if 'model.0.0.weight' in ck['model'] else next(k for k in ck['model'] if 'weight' in k)
    assert not torch.equal(after['model'][conv], ck['model'][conv])  # unfrozen: the body trained
