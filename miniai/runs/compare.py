"""Runs side by side, with no server: `compare(folders)` reads run folders of the main job (`settings.json`, `metrics.csv`,
`result.json`, an `interrupted.ckpt`) and gives a table (a pandas DataFrame: name, date, data, model, the settings that
differ between the runs, final and best metrics, time to target, status) and a figure of their loss and accuracy
curves. `python -m miniai runs [FOLDER ...] [--plot runs.png]` prints the same table."""
from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..callbacks.metrics import monitor_mode

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ['SETTINGS_FILE', 'find_runs', 'read_run', 'compare', 'plot_runs', 'runs_text']

SETTINGS_FILE = 'settings.json'  # what a run was trained with, beside its metrics.csv
TRACKER_STORES = ('wandb', 'mlruns', 'mlartifacts', 'tb')  # the trackers' copies of runs' files are not more runs
SAME_FOR_ALL = ('name', 'date', 'data', 'model', 'status')  # columns of their own, not among the differing settings
NOT_SETTINGS = ('run_name', 'started', 'callbacks', 'git_commit', 'torch', 'miniai', 'command', 'flops', 'params',
                'trainable_params', 'optimizer', 'loss_func', 'schedule')  # said elsewhere, or the same for a model


def find_runs(*folders: str | os.PathLike) -> list[Path]:
    "The run folders (with a metrics.csv) at or under each of `folders` (default: ./runs), sorted by path."
    found = set()
    for top in folders or ('runs',):
        for here, dirs, files in os.walk(top):
            if 'metrics.csv' in files:  # a run: what is inside it (a tracker's copies of its files) is not another
                found.add(Path(here))
                dirs.clear()
            dirs[:] = [d for d in dirs if d not in TRACKER_STORES]
    return sorted(found)


def _json(path: Path) -> dict:
    try: return json.loads(path.read_text())
    except (OSError, ValueError): return {}


def _num(v):
    try: return float(v)
    except (TypeError, ValueError): return v


def read_run(folder: str | os.PathLike) -> dict:
    """One run folder: its settings, its metrics rows (numbers), its result and its status: 'finished' (it wrote
    result.json), 'interrupted' (stopped and saved, so it can go on) or 'failed' (neither; or still running)."""
    folder = Path(folder)
    settings, result = _json(folder / SETTINGS_FILE), _json(folder / 'result.json')
    with open(folder / 'metrics.csv', newline='') as f:
        rows = [{k: _num(v) for k, v in r.items()} for r in csv.DictReader(f)]
    status = 'finished' if result else 'interrupted' if (folder / 'interrupted.ckpt').is_file() else 'failed'
    return {'folder': folder, 'settings': settings, 'rows': rows, 'result': result, 'status': status}


def _summary(run: dict) -> dict:
    s, rows, res = run['settings'], run['rows'], run['result']
    valid = [r for r in rows if r.get('train') == 'eval']
    out = {'name': s.get('run_name') or run['folder'].name, 'date': s.get('started', ''),
           'data': s.get('data', res.get('data')), 'model': s.get('model', res.get('model')), 'epochs_done':
           len(valid)}
    last = valid[-1] if valid else {}
    for k, v in last.items():
        if k not in ('epoch', 'train', 'time'): out[f'final {k}'] = v
    for k in last:
        if k not in ('epoch', 'train', 'time'):
            pick = min if monitor_mode(k) == 'min' else max
            out[f'best {k}'] = pick(r[k] for r in valid)
    out['time to target (s)'] = res.get('time_to_target')
    out['status'] = run['status']
    return out


def compare(*folders: str | os.PathLike, plot: bool | str | Path = False) -> Any:
    """The runs at or under `folders` (default: ./runs) as a table, one row per run: name, date, data, model, the
    settings that differ between them, final and best validation metrics, time to target and status. With `plot`
    (True, or a file to save it in), also the figure of their curves (`plot_runs`): returns (table, figure)."""
    import pandas as pd
    runs = [read_run(f) for f in find_runs(*folders)]
    table = pd.DataFrame([_summary(r) for r in runs])
    keys = sorted({k for r in runs for k in r['settings']} - set(NOT_SETTINGS) - set(SAME_FOR_ALL))
    differ = [k for k in keys if len({json.dumps(r['settings'].get(k), default=str) for r in runs}) > 1]
    for i, k in enumerate(differ): table.insert(4 + i, k, [r['settings'].get(k) for r in runs])
    if not plot: return table
    return table, plot_runs(runs, None if plot is True else plot)


def plot_runs(runs: Iterable[dict | str | os.PathLike], path: str | os.PathLike | None = None) -> Figure:
    "Every run's training and validation loss, and its validation metrics, against the epoch, on one figure."
    import matplotlib.pyplot as plt
    runs = [r if isinstance(r, dict) else read_run(r) for r in runs]
    metrics = sorted({k for r in runs for row in r['rows'] for k in row} - {'loss', 'epoch', 'train', 'time'})
    fig, axs = plt.subplots(1, 1 + len(metrics), figsize=(5 * (1 + len(metrics)), 3.5), squeeze=False)
    for i, r in enumerate(runs):
        name, colour = r['settings'].get('run_name') or r['folder'].name, f'C{i % 10}'
        for stage, style in (('train', '--'), ('eval', '-')):
            rows = [x for x in r['rows'] if x.get('train') == stage]
            axs[0, 0].plot([x['epoch'] for x in rows], [x['loss'] for x in rows], style, color=colour,
                           label=f'{name} ({"valid" if stage == "eval" else "train"})')
            for ax, m in zip(axs[0, 1:], metrics):
                if stage == 'eval': ax.plot([x['epoch'] for x in rows], [x.get(m) for x in rows], style, color=colour,
                                            label=name, marker='o')
    axs[0, 0].set(title='loss (dashed: training)', xlabel='epoch')
    for ax, m in zip(axs[0, 1:], metrics): ax.set(title=f'validation {m}', xlabel='epoch')
    axs[0, -1].legend(fontsize=8)
    fig.tight_layout()
    if path is not None:
        from ..core.files import atomic_path
        with atomic_path(Path(path)) as tmp: fig.savefig(tmp, dpi=80, bbox_inches='tight', format='png')
    return fig


def runs_text(*folders: str | os.PathLike, plot: str | Path | None = None) -> str:
    "`compare`'s table as text for a terminal (`miniai runs`); with `plot`, the figure is saved there."
    import pandas as pd
    table = compare(*folders, plot=plot or False)
    table = table[0] if isinstance(table, tuple) else table
    with pd.option_context('display.width', 250, 'display.max_columns', None, 'display.float_format', '{:.4g}'.format):
        return table.to_string(index=False)
