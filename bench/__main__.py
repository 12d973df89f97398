"""`python -m bench` (or `make bench`): every benchmark in one go, then a summary table and chart in bench/results/.

Runs, in this order: data loading, framework overhead (with fastai and Lightning when installed), precision and
memory format, FLOP counting, FID's numerics (against scipy's `sqrtm` when installed), photo augmentation (against
torchvision.transforms.v2 per item), transfer (fine-tuning a pretrained backbone against training from scratch; its
pretrained bodies are cached, so reruns skip pretraining). Each writes its own Markdown table; this collects them into
`bench/results/README.md` and draws `bench/results/overview.png` (the speed-up of each contender in each benchmark).
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt

from bench import augment, data, fid, flops, overhead, precision, transfer

RESULTS = Path(__file__).parent / 'results'


def _ratios(md: str, col: int) -> dict:
    "Contender -> number in column `col` of a Markdown table (values like '1.07x' or '121x')."
    out = {}
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip('|').split('|')]
        if len(cells) > col and (m := re.match(r'([\d.]+)x$', cells[col])): out[cells[0]] = float(m.group(1))
    return out


STEPS = [('data', data.main, ['--rounds', '3']), ('overhead', overhead.main, ['--rounds', '5', '--peers']),
         ('precision', precision.main, []), ('flops', flops.main, None), ('fid', fid.main, []),
         ('augment', augment.main, ['--rounds', '5']), ('transfer', transfer.main, [])]


def main(argv=None):
    "Run every benchmark, then `collect`; `--collect` only redraws the summary from the tables already written."
    argv = sys.argv[1:] if argv is None else argv
    if argv not in ([], ['--collect']): raise SystemExit(f'usage: python -m bench [--collect]; got {" ".join(argv)}')
    if not argv:
        for name, fn, args in STEPS:
            print(f'\n## {name}\n', flush=True)
            fn(args) if args is not None else fn()
    collect()


def collect():
    "Gather the benchmarks' tables into bench/results/README.md and draw bench/results/overview.png."
    missing = [n for n, *_ in STEPS if not (RESULTS / f'{n}.md').exists()]
    if missing: raise SystemExit(f'no table yet for {", ".join(missing)} in {RESULTS}: run `python -m bench` first')
    parts = [(RESULTS / f'{n}.md').read_text() for n, *_ in STEPS]
    (RESULTS / 'README.md').write_text('# Benchmark results\n\nWritten by `python -m bench`.\n\n' + '\n'.join(parts))
    mlp, _, resnet = parts[1].partition('\n### ')
    charts = [('data: speed-up over the per-item loader', _ratios(parts[0], 3)),
              ('overhead, MLP batch 64: time / hand loop (lower is better)', _ratios(mlp, 2)),
              ('overhead, ResNet batch 1024: time / hand loop (lower is better)', _ratios(resnet, 2)),
              ('precision: speed-up over fp32', _ratios(parts[2], 3)),
              ('augment: speed-up over torchvision', _ratios(parts[5], 4))]
    fig, axs = plt.subplots(1, 5, figsize=(25, 3.5))
    for ax, (title, vals) in zip(axs, charts):
        ax.barh(list(vals), list(vals.values()))
        ax.set_title(title, fontsize=9)
        for i, v in enumerate(vals.values()): ax.text(v, i, f' {v:g}x', va='center', fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / 'overview.png', dpi=70)
    print(f'\nwrote {RESULTS / "README.md"} and {RESULTS / "overview.png"}')


if __name__ == '__main__': sys.exit(main())
