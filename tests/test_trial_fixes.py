"""What a new user's trial found besides prediction: `valid_pct` on a folder that has valid/ is refused, not silently
ignoring valid/; a set mixing grey and colour images says in one line which it became and why, counting the files;
the progress bar numbers epochs as the table, the logs and the stop messages do."""
import io
import re
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from miniai.data.decode import ImageDataError
from miniai.data.folders import folder_images, write_image_folder
from miniai.datasets import DataLoaders
from miniai.data.loader import TensorDataLoader
from miniai.learner import MetricsCB, ProgressCB, TrainLearner


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv('MINIAI_CACHE', str(tmp_path / 'cache'))


def folder(tmp_path, valid=True):
    x, y = torch.arange(8 * 16, dtype=torch.uint8).view(8, 1, 4, 4), torch.tensor([0, 1] * 4)
    write_image_folder(tmp_path / 'd', x, y, ['a', 'b'])
    if valid: write_image_folder(tmp_path / 'd', x[:4], y[:4], ['a', 'b'], 'valid')
    return tmp_path / 'd'


def test_valid_pct_on_a_folder_with_valid_is_an_error_not_a_silent_choice(tmp_path):
    root = folder(tmp_path)
    with pytest.raises(ImageDataError, match=r'^.*/d has a valid/ folder, but valid_pct=0\.25 \(--valid-pct\) would '
                                             r'hold out part of train/ and leave valid/ unused: drop valid_pct to '
                                             r'validate on valid/, or give valid_pct the folder of class folders '
                                             r'itself \(.*/d/train\)$'):
        DataLoaders.from_folder(root, valid_pct=0.25, device='cpu')
    assert len(DataLoaders.from_folder(root / 'train', valid_pct=0.25, device='cpu').valid.x) == 2, 'as it says'
    assert len(DataLoaders.from_folder(root, device='cpu').valid.x) == 4


def test_a_set_mixing_grey_and_colour_says_which_it_became_and_why(tmp_path, capsys):
    root = folder(tmp_path)
    colour = root / 'train' / 'b' / '3.png'
    Image.fromarray(np.full((4, 4, 3), (200, 10, 10), np.uint8)).save(colour)
    images = folder_images(root)
    assert images.x.shape[1] == 3
    err = capsys.readouterr().err
    assert re.fullmatch(r'miniai: .*/d: 1 of the 12 images is colour \(e\.g\. .*/d/train/b/3\.png\) and 11 grey '
                        r'\(e\.g\. .*/d/train/a/0\.png\), so all are read as colour, 3 channels, the grey ones '
                        r'repeated in each \(one set, one channel count\); make the colour ones grey to train on 1 '
                        r'channel\n', err), err
    folder_images(root)
    assert capsys.readouterr().err == '', 'said once, when the cache is built'
    folder_images(folder(tmp_path / 'grey'))
    assert capsys.readouterr().err == '', 'nothing to say on a set of one kind'


class Terminal(io.StringIO):
    "A stdout that says it is a terminal, so ProgressCB draws its bars."
    def isatty(self): return True


def test_the_progress_bar_numbers_epochs_as_the_table_does(monkeypatch):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 4, generator=g), torch.randint(0, 2, (32,), generator=g)
    dls = DataLoaders(TensorDataLoader(x, y, 16), TensorDataLoader(x, y, 16))
    out = Terminal()
    monkeypatch.setattr(sys, 'stdout', out)
    learn = TrainLearner(nn.Linear(4, 2), dls, F.cross_entropy, lr=0.1, cbs=[MetricsCB(), ProgressCB()])
    learn.fit(2)
    shown = out.getvalue()
    assert 'epoch 1 train :' in shown and 'epoch 1 eval :' in shown and 'Epoch 2/2' not in shown
    rows = [m.group(1) for l in shown.splitlines() if (m := re.match(r'[\d.]+ +(\d+) +(train|eval) +\d\d:\d\d', l))]
    assert rows == ['0', '0', '1', '1'], 'the table: epochs 0 and 1'
