"""Logger overhead: a 1-epoch fit of the main job's Learner (`make_learner`: resnet9_small, one-cycle AdamW, the
fastest precision here, EMA) with each logger against the same fit with none, measured side by side in one run.

    python -m bench.trackers                         # Fashion-MNIST's 60,000 training images (long on a CPU)
    python -m bench.trackers --n-train 4096 --repeats 3
    python -m bench.trackers --tiny                  # a seconds-long smoke run (the test uses it)

Each logger runs in the same process, in turn (none, csv, tensorboard, wandb, mlflow, then again `repeats` times), so
the machine's state is shared; the fastest of the repeats is kept. W&B runs offline and MLflow to a local folder, both
under a temporary folder. The fit's time includes opening and closing the tracker's run (it is part of a run). The
table (ratio to no logger) goes to bench/results/trackers.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import matplotlib
import torch

matplotlib.use('Agg')

RESULTS = Path(__file__).parent / 'results'
LOGGERS = ('none', 'csv', 'tensorboard', 'wandb', 'mlflow')


def one_fit(logger: str, dls, tmp: Path, i: int) -> float:
    "Seconds for one epoch of the main job's Learner with `logger`."
    from miniai.app.recipe import build_model, logger_cbs, make_learner
    from miniai.callbacks.loggers import CSVLoggerCB
    torch.manual_seed(0)
    model = build_model('resnet9_small')
    learn, _ = make_learner(model, dls, 1, 1e-2, augment='flip', average='ema', target=None)
    out = tmp / f'{logger}-{i}'
    out.mkdir(parents=True)
    cbs = {'none': [], 'csv': [CSVLoggerCB(out / 'metrics.csv')]}.get(logger)
    if cbs is None: cbs = logger_cbs([logger], out, run_name=f'bench-{logger}-{i}')
    for cb in cbs:
        if hasattr(cb, 'finish_at_end'): cb.finish_at_end = True
    start = time.perf_counter()
    learn.fit(1, cbs=cbs)
    return time.perf_counter() - start


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--n-train', type=int, default=None, help='training images (default: all 60,000)')
    p.add_argument('--bs', type=int, default=256)
    p.add_argument('--repeats', type=int, default=2)
    p.add_argument('--loggers', nargs='+', default=list(LOGGERS), choices=LOGGERS)
    p.add_argument('--tiny', action='store_true', help='512 images, batch 128, one repeat')
    p.add_argument('--out', type=Path, default=RESULTS / 'trackers.md')
    a = p.parse_args(argv)
    if a.tiny: a.n_train, a.bs, a.repeats = 512, 128, 1
    from miniai.app.recipe import recipe_dls
    os.environ.setdefault('WANDB_MODE', 'offline')
    os.environ.setdefault('WANDB_SILENT', 'true')
    os.environ['MLFLOW_ALLOW_FILE_STORE'] = 'true'
    warnings.filterwarnings('ignore')
    dls = recipe_dls('fashion', a.bs, a.n_train, 1000 if a.n_train else None)
    times = {k: [] for k in a.loggers}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ['MLFLOW_TRACKING_URI'] = f'file://{tmp}/mlruns'
        for i in range(a.repeats + 1):  # the first round warms up (imports, allocator, threads) and is not kept
            for k in a.loggers:
                t = one_fit(k, dls, Path(tmp), i)
                if i: times[k].append(t)
                print(f'{k:12s} round {i}: {t:.2f} s', file=sys.stderr, flush=True)
    base = min(times['none']) if 'none' in times else None
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f'CPU ({torch.get_num_threads()} threads)'
    lines = [f'# Logger overhead: one epoch of the main job\'s Learner (resnet9_small, {len(dls.train.x):,} images, '
             f'batch {a.bs}) on {dev}', '', f'`python -m bench.trackers {" ".join(argv or sys.argv[1:])}`'.replace(' `', '`'),
             '', f'fastest of {a.repeats} after a warm-up round, each logger in turn in one process', '',
             '| logger | seconds | vs none |', '|---|---|---|']
    for k, ts in times.items():
        lines.append(f'| {k} | {min(ts):.2f} | ' + (f'{min(ts) / base:.3f}x |' if base else '- |'))
    md = '\n'.join(lines) + '\n'
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(md)
    print(md)
    return md


if __name__ == '__main__': main()
