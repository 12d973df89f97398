"""Time to 94%: how long each recipe takes from the start of `fit` until the Fashion-MNIST test accuracy (10,000 images,
no TTA, training on the 60,000) first reaches the target, checked after every epoch.

    python -m bench.time_to_accuracy                  # runs every recipe not yet run (long on a CPU: background it)
    python -m bench.time_to_accuracy --only resnet9   # one recipe (several: repeat --only)
    python -m bench.time_to_accuracy --collect        # only rewrite the table and chart from the finished runs
    python -m bench.time_to_accuracy --tiny           # a seconds-long smoke run on 1,024 images (the test uses it)

Each run is `python -m miniai train ... --out RUNS/<recipe>-s<seed>`; its `result.json` holds the accuracy after every
epoch with the seconds since the start of fit. A run whose result.json exists is not run again. The table and a chart
of accuracy against wall time go to bench/results/time_to_accuracy.md and .png. The result.json of the runs measured
for the README are kept in bench/results/time_to_accuracy_runs/ (`--collect --runs bench/results/time_to_accuracy_runs`
redraws the table from them).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / 'results'
RUNS = Path('runs/time_to_accuracy')
TARGET = 0.94

#: recipe name -> (what it is, `miniai train` options, seeds). The main job's default runs with two seeds.
RECIPES = {
    'default': ('the main job as shipped (`make train`): ResNet-9 at width 32 (`resnet9_small`), 8 epochs, crop+flip, '
                'EMA of the weights, one-cycle AdamW at 1e-2, batch 256, label smoothing 0.1', [], (42, 0)),
    'no-ema': ('the default without the EMA of the weights',
               ['--model', 'resnet9_small', '--epochs', '8', '--augment', 'crop-flip', '--average', 'none'], (42,)),
    '6-epochs': ('the default for 6 epochs', ['--model', 'resnet9_small', '--epochs', '6', '--augment', 'crop-flip',
                                              '--average', 'ema'], (42,)),
    '5-epochs': ('the default for 5 epochs, flips only (what `--augment auto` picks for 5)',
                 ['--model', 'resnet9_small', '--epochs', '5', '--augment', 'flip', '--average', 'ema'], (42,)),
    'course': ("the course's lesson-14 recipe: its ResNet (fashion_resnet), batch 1024, one-cycle AdamW at 2e-2, "
               "crop+flip, no label smoothing, 5 epochs",
               ['--model', 'fashion_resnet', '--epochs', '5', '--bs', '1024', '--lr', '0.02', '--wd', '0.01',
                '--label-smoothing', '0', '--drop', '0', '--augment', 'crop-flip', '--average', 'none'], (42,)),
    'wide-5': ('the previous default: fashion_resnet_wide (9.6 M parameters), 5 epochs, flips, no EMA',
               ['--model', 'fashion_resnet_wide', '--epochs', '5', '--augment', 'flip', '--average', 'none'], (42,)),
}
TINY = ['--n-train', '1024', '--n-valid', '512', '--epochs', '2', '--bs', '128', '--target', '0.5', '--no-summary',
        '--model', 'resnet9_small']


def command(opts: list[str], seed: int, out: Path, tiny: bool = False, threads: int | None = None) -> list[str]:
    base = [sys.executable, '-m', 'miniai', 'train', *opts, '--seed', str(seed), '--no-tta', '--out', str(out)]
    if threads: base += ['--threads', str(threads)]
    return base + TINY if tiny else base + ['--target', str(TARGET)]


def run(name: str, seed: int, runs: Path, tiny: bool = False, threads: int | None = None) -> dict | None:
    "Run one recipe with one seed (unless its result is there already); returns its result, None if it failed."
    out = runs / f'{name}-s{seed}'
    if (out / 'result.json').exists(): return json.loads((out / 'result.json').read_text())
    cmd = command(RECIPES[name][1], seed, out, tiny, threads)
    print('$', shlex.join(cmd[1:]).replace('-m miniai', 'python -m miniai', 1), flush=True)
    log = runs / f'{name}-s{seed}.log'
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, 'w') as f: r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ})
    if r.returncode != 0:
        print(f'{name} (seed {seed}) failed with exit code {r.returncode}: see {log}', file=sys.stderr)
        return None
    return json.loads((out / 'result.json').read_text())


def collect(runs: Path) -> list[dict]:
    found = []
    for name in RECIPES:
        for f in sorted(runs.glob(f'{name}-s*/result.json')):
            if f.parent.name.rpartition('-s')[0] == name: found.append({'recipe': name, **json.loads(f.read_text())})
    return found


def _t(s) -> str: return '-' if s is None else f'{s / 60:.1f} min'


def table(results: list[dict], target: float = TARGET, notes: str = '') -> str:
    lines = [f'# Time to {target:.0%}: Fashion-MNIST test accuracy (10,000 images, no TTA), training on the 60,000', '',
             'Written by `python -m bench.time_to_accuracy`. Time runs from the start of `fit` (data already loaded,',
             'summary printed) to the end of the first epoch whose test accuracy reaches the target; it includes',
             'validation and checkpoints. `device` is where the run trained; `threads` is torch\'s CPU thread',
             'count.', '',
             f'| recipe | seed | device | threads | epochs | time to {target:.0%} | at epoch | final accuracy | '
             f'best accuracy | wall time | command |', '|---|---|---|---|---|---|---|---|---|---|---|']
    for r in results:
        curve = r.get('curve') or []
        best = max((c['accuracy'] for c in curve), default=r['accuracy'])
        reached = r.get('time_to_target')
        lines.append(f"| {r['recipe']} | {r['seed']} | {r.get('device', '?')} | {r.get('threads', '?')} | "
                     f"{r['epochs']} | "
                     f"{_t(reached) if reached is not None else 'not reached'} | {r.get('epochs_to_target') or '-'} | "
                     f"{100 * r['accuracy']:.2f}% | {100 * best:.2f}% | {_t(r.get('wall_seconds'))} | "
                     f"`{r.get('command', '?')}` |")
    lines += ['', 'Recipes:', ''] + [f'- **{n}**: {d}' for n, (d, _, _) in RECIPES.items()]
    return '\n'.join(lines) + '\n' + ('\n' + notes.strip() + '\n' if notes.strip() else '')


def chart(results: list[dict], path: Path, target: float = TARGET) -> Path:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        c = r.get('curve') or []
        if c: ax.plot([p['seconds'] / 60 for p in c], [100 * p['accuracy'] for p in c], 'o-', ms=3,
                      label=f"{r['recipe']} (seed {r['seed']}, {r.get('device', '?')}, {r.get('threads', '?')} thr.)")
    ax.axhline(100 * target, color='grey', ls='--', lw=1)
    ax.set_xlabel('minutes from the start of fit')
    ax.set_ylabel('test accuracy (%)')
    ax.set_ylim(bottom=max(80, ax.get_ylim()[0]))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=90, bbox_inches='tight')
    plt.close(fig)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--only', action='append', choices=list(RECIPES), help='run only this recipe (repeatable)')
    p.add_argument('--collect', action='store_true', help='run nothing; rewrite the table and chart')
    p.add_argument('--tiny', action='store_true', help='a smoke run on 1,024 images to target 50%% (for tests)')
    p.add_argument('--notes', type=Path, default=None,
                   help='a Markdown file appended under the table (default: results/time_to_accuracy_notes.md)')
    p.add_argument('--threads', type=int, default=None, help="torch's CPU threads for each run (default: torch's)")
    p.add_argument('--runs', type=Path, default=None, help=f'where the runs go (default {RUNS})')
    p.add_argument('--results', type=Path, default=None, help=f'where the table and chart go (default {RESULTS})')
    a = p.parse_args(argv)
    runs = a.runs or (Path('runs/time_to_accuracy_tiny') if a.tiny else RUNS)
    results_dir = a.results or RESULTS
    if not a.collect:
        for name in a.only or list(RECIPES):
            for seed in (RECIPES[name][2][:1] if a.tiny else RECIPES[name][2]): run(name, seed, runs, a.tiny, a.threads)
    results = collect(runs)
    if not results: raise SystemExit(f'no finished runs under {runs}')
    target = 0.5 if a.tiny else TARGET
    results_dir.mkdir(parents=True, exist_ok=True)
    notes = a.notes or (results_dir / 'time_to_accuracy_notes.md')
    md = table(results, target, notes.read_text() if notes.is_file() and not a.tiny else '')
    (results_dir / 'time_to_accuracy.md').write_text(md)
    chart(results, results_dir / 'time_to_accuracy.png', target)
    print(md)


if __name__ == '__main__': main()
