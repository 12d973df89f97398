"""Every tutorial notebook runs top to bottom in a real Jupyter kernel (on a data subset: MINIAI_QUICK=1)."""
import os
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NBS = Path(__file__).resolve().parent.parent / 'nbs'
NOTEBOOKS = sorted(NBS.glob('[0-9][0-9]_*.ipynb'))


def run_notebook(path: Path, quick: bool = True) -> nbformat.NotebookNode:
    "Execute a copy of the notebook at `path` in a fresh kernel and return it with its outputs."
    nb = nbformat.read(path, as_version=4)
    env_before = os.environ.get('MINIAI_QUICK')
    os.environ['MINIAI_QUICK'] = '1' if quick else ''
    os.environ.setdefault('MPLBACKEND', 'Agg')
    try:
        NotebookClient(nb, timeout=600, kernel_name='python3', resources={'metadata': {'path': str(NBS)}}).execute()
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
