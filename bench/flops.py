"""FLOPs of torchvision's resnet18 at 1x3x224x224: miniai's summary next to FlopCounterMode, fvcore and torchinfo.

    python -m bench.flops

fvcore and torchinfo count a multiply-add as one operation; their numbers are doubled in the last column to
compare like with like. Those not installed (`pip install -e '.[bench]'`) are left out.
"""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

from miniai.tools.summary import summary

RESULTS = Path(__file__).parent / 'results'


def main():
    model, x = torchvision.models.resnet18().eval(), torch.randn(1, 3, 224, 224)
    rows = [('miniai `summary`', summary(model, x).totals['flops'], 'FLOPs', 1)]
    with FlopCounterMode(display=False) as c: model(x)
    rows.append(('torch `FlopCounterMode`', c.get_total_flops(), 'FLOPs', 1))
    try:
        from fvcore.nn import FlopCountAnalysis
        rows.append(('fvcore `FlopCountAnalysis`', FlopCountAnalysis(model, x).unsupported_ops_warnings(False)
                     .uncalled_modules_warnings(False).total(), 'multiply-adds', 2))
    except ImportError: pass
    try:
        from torchinfo import summary as ti_summary
        with contextlib.redirect_stdout(io.StringIO()):
            stats = ti_summary(model, input_data=x, verbose=0)
        rows.append(('torchinfo `summary`', stats.total_mult_adds, 'multiply-adds', 2))
    except ImportError: pass
    ref = rows[1][1]
    lines = ['### FLOPs of torchvision resnet18, input 1x3x224x224', '',
             '| tool | reported | unit | as FLOPs | vs FlopCounterMode |', '|---|---|---|---|---|']
    lines += [f'| {n} | {v / 1e9:.4f} G | {u} | {v * k / 1e9:.4f} G | {v * k / ref - 1:+.2%} |' for n, v, u, k in rows]
    md = '\n'.join(lines)
    print(md)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / 'flops.md').write_text(md + '\n')


if __name__ == '__main__': main()
