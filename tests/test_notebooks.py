"""Every tutorial notebook runs top to bottom in a real Jupyter kernel (on a data subset: MINIAI_QUICK=1), and each
plotting helper shows its figure once there."""
import os
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NBS = Path(__file__).resolve().parent.parent / 'nbs'
NOTEBOOKS = sorted(NBS.glob('[0-9][0-9]_*.ipynb'))


def execute(nb: nbformat.NotebookNode, path: Path = NBS) -> nbformat.NotebookNode:
    "Execute `nb` in a fresh kernel started in `path`, in place, and return it with its outputs."
    NotebookClient(nb, timeout=600, kernel_name='python3', resources={'metadata': {'path': str(path)}}).execute()
    return nb


def run_notebook(path: Path, quick: bool = True) -> nbformat.NotebookNode:
    "Execute a copy of the notebook at `path` in a fresh kernel and return it with its outputs."
    nb = nbformat.read(path, as_version=4)
    env_before = os.environ.get('MINIAI_QUICK')
    os.environ['MINIAI_QUICK'] = '1' if quick else ''
    os.environ.setdefault('MPLBACKEND', 'Agg')
    try: execute(nb)
    finally:
        if env_before is None: os.environ.pop('MINIAI_QUICK', None)
        else: os.environ['MINIAI_QUICK'] = env_before
    return nb


def outputs_text(nb) -> str:
    "All text and Markdown the notebook printed or displayed."
    parts = []
    for cell in nb.cells:
        for out in cell.get('outputs', []):
            if 'text' in out: parts.append(out['text'])
            for kind in ('text/plain', 'text/markdown', 'text/html'):
                if kind in out.get('data', {}): parts.append(out['data'][kind])
    return '\n'.join(parts)


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 4, f'expected the tutorial notebooks in {NBS}'


@pytest.mark.parametrize('path', NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path):
    nb = run_notebook(path)
    errors = [o for c in nb.cells for o in c.get('outputs', []) if o.get('output_type') == 'error']
    assert not errors, errors
    text = outputs_text(nb)
    if path.stem == '02_resnet':
        # the summary came out as a Markdown table with the seed's parameter totals
        md = [o['data']['text/markdown'] for c in nb.cells for o in c.get('outputs', [])
              if 'text/markdown' in o.get('data', {})]
        assert any(m.lstrip().startswith('|') for m in md), 'learn.summary() did not render as a Markdown table'
        assert '1,226,882' in text or '1226882' in text
    if path.stem == '07_diffusion':
        # the FID/KID table of the samples, real images and noise, each row with its two numbers
        for row in ('| DDIM samples | 32 |', '| real test images | 32 |', '| pure noise | 32 |'): assert row in text


# One cell per plotting helper a user may end a cell with; each must show its figure once in Jupyter's inline
# backend (a returned Figure would show a second time, as the cell's value).
PLOT_SETUP = """\
%matplotlib inline
import torch, torch.nn.functional as F
from torch import nn
from miniai.datasets import DataLoaders, show_image, show_images, subplots, get_grid
from miniai.learner import TrainLearner, MetricsCB, ProgressCB
from miniai.activations import ActivationStats
from miniai.callbacks.schedule import RecorderCB
from miniai.data.loader import TensorDataLoader
from miniai.models.layers import plot_func
from miniai.tools.interpret import ClassificationInterpretation
from torcheval.metrics import MulticlassAccuracy
g = torch.Generator().manual_seed(0)
x, y = torch.randint(0, 256, (64, 1, 8, 8), generator=g, dtype=torch.uint8), torch.randint(0, 3, (64,), generator=g)
dls = DataLoaders(TensorDataLoader(x[:48], y[:48], 16, mean=0.5, std=0.3), TensorDataLoader(x[48:], y[48:], 16,
                  mean=0.5, std=0.3))
dls.classes = ['a', 'b', 'c']
model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
astats, rec = ActivationStats(lambda m: isinstance(m, nn.ReLU)), RecorderCB(lr=lambda cb: cb.pg['lr'])
progress = ProgressCB(plot=True)
learn = TrainLearner(model, dls, F.cross_entropy, lr=0.1, cbs=[MetricsCB(accuracy=MulticlassAccuracy()), astats, rec])
learn.fit(1)
interp = ClassificationInterpretation.from_learner(learn)
"""
PLOT_CELLS = {
    'show_image': 'show_image(torch.rand(1, 8, 8))',
    'show_images': 'show_images(torch.rand(4, 1, 8, 8))',
    'subplots': 'subplots(1, 2)',
    'get_grid': 'get_grid(4)',
    'dls.show_batch': 'dls.show_batch(max_n=4)',
    'learn.show_image_batch': 'learn.show_image_batch(max_n=4)',
    'color_dim': 'astats.color_dim()',
    'dead_chart': 'astats.dead_chart()',
    'plot_stats': 'astats.plot_stats()',
    'RecorderCB.plot': 'rec.plot()',
    'lr_find': 'learn.lr_find(max_epochs=1)',
    'ProgressCB(plot=True) fit': 'learn.fit(1, cbs=[progress])',
    'ProgressCB.plot_losses': 'progress.plot_losses()',
    'plot_confusion_matrix': 'interp.plot_confusion_matrix()',
    'plot_top_losses': 'interp.plot_top_losses(4)',
    'plot_func': 'plot_func(torch.sin)',
}


def test_each_plotting_helper_shows_its_figure_once_in_a_kernel(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(PLOT_SETUP)] +
                                  [nbformat.v4.new_code_cell(src) for src in PLOT_CELLS.values()])
    env_before = os.environ.pop('MPLBACKEND', None)  # as in a user's kernel: the inline backend
    try: execute(nb, tmp_path)
    finally:
        if env_before is not None: os.environ['MPLBACKEND'] = env_before
    errors = [o for c in nb.cells for o in c.get('outputs', []) if o.get('output_type') == 'error']
    assert not errors, errors
    images = {name: sum('image/png' in o.get('data', {}) for o in cell.outputs)
              for name, cell in zip(PLOT_CELLS, nb.cells[1:])}
    assert images == dict.fromkeys(PLOT_CELLS, 1), images
