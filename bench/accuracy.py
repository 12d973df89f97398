"""Collect finished training runs into the accuracy table, bench/results/accuracy.md.

    python -m miniai train --epochs 5 --seed 42 --out runs/e5-s42      # (long: run these in the background)
    python -m bench.accuracy runs/e5-s42 runs/e5-s0 runs/e20-s42 ...

Each run folder holds the `result.json` that `python -m miniai train` writes; the table gives, per run, the command,
seed, wall time, threads and the test accuracy with and without TTA, grouped by epoch budget and compared with the
course's numbers and this project's targets.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

RESULTS = Path(__file__).parent / 'results'
# epochs -> (the course's miniai, this project's target), test accuracy in %
COURSE = {5: (93.4, 94.0), 20: (94.3, 95.0), 50: (94.9, 95.5)}
# runs that agree on all of these are one recipe with different seeds
SAME_RECIPE = ('epochs', 'model', 'bs', 'lr', 'wd', 'label_smoothing', 'drop', 'augment', 'precision')


def load(run: Path) -> dict:
    "A run's result.json, with a readable error when the run has not finished."
    f = Path(run) / 'result.json'
    if not f.exists(): raise SystemExit(f'{run}: no result.json (has the run finished?)')
    return json.loads(f.read_text())


def best(r: dict) -> float:
    "The run's reported accuracy in %: with TTA when it was measured."
    return 100 * max(r['accuracy'], r.get('tta_accuracy') or 0)


def recipe(r: dict) -> str:
    "What the run trained, in short: model, augmentation level and label smoothing."
    return ', '.join([r.get('model', '?'), f"augment {r.get('augment', '?')}", f"ls {r.get('label_smoothing', '?')}"])


def table(runs: list[dict], notes: str = '') -> str:
    lines = ['# Fashion-MNIST test accuracy (10,000 images), trained on the 60,000 training images only', '',
             'Written by `python -m bench.accuracy RUN_DIR...` from the runs\' `result.json`. Wall time is on this',
             "project's 2-core CPU (no GPU); `threads` is torch's thread count for the run.", '',
             'The recipe column spells out what the command chose (model, augmentation, label smoothing), so a run',
             'stays readable after the defaults change.', '',
             '| epochs | command | recipe | seed | wall time | threads | accuracy | with TTA | course | target | met |',
             '|---|---|---|---|---|---|---|---|---|---|---|']
    for r in sorted(runs, key=lambda r: (r['epochs'], r.get('command', ''), r['seed'])):
        course, target = COURSE.get(r['epochs'], (None, None))
        tta = f"{100 * r['tta_accuracy']:.2f}%" if r.get('tta_accuracy') is not None else '-'
        met = '-' if target is None else ('yes' if best(r) >= target else 'no')
        lines.append(f"| {r['epochs']} | `{r.get('command', '?')}` | {recipe(r)} | {r['seed']} | {r['wall_seconds'] / 60:.1f} min | "
                     f"{r.get('threads', '?')} | {100 * r['accuracy']:.2f}% | {tta} | "
                     f"{course if course else '-'}% | {target if target else '-'}% | {met} |")
    groups = {}
    for r in runs: groups.setdefault(tuple(r.get(k) for k in SAME_RECIPE), []).append(r)
    means = [(g[0], len(g), statistics.mean(best(r) for r in g)) for g in groups.values() if len(g) > 1]
    if means:
        lines += ['', 'Recipes run with more than one seed (mean of the reported accuracy):', '']
        lines += [f"- {r['epochs']} epochs, {recipe(r)}, {n} seeds: {m:.2f}%"
                  for r, n, m in sorted(means, key=lambda t: t[0]['epochs'])]
    return '\n'.join(lines) + ('\n\n' + notes.strip() if notes else '') + '\n'


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('runs', nargs='+', type=Path, help='run folders written by `python -m miniai train --out`')
    p.add_argument('--notes', type=Path, help='a Markdown file appended under the table')
    p.add_argument('--out', type=Path, default=RESULTS / 'accuracy.md')
    a = p.parse_args(argv)
    md = table([load(r) for r in a.runs], a.notes.read_text() if a.notes else '')
    a.out.write_text(md)
    print(md)


if __name__ == '__main__': main()
