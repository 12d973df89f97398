"""Side by side with fastai: `vision_learner(dls, resnet18, pretrained=False)` + `fine_tune(1)` on the same folder.

    /tmp/fa/bin/python -m bench.fine_tune_peers          # a few minutes; writes bench/results/fine_tune_peers.md
    python -m bench.fine_tune_peers --tiny               # seconds: the test's smoke run (miniai alone if no fastai)

fastai 2.8 lives in the bench's own environment, never in miniai's dependencies (a venv with fastai beside miniai's
packages: see docs/benchmarks.md); without it the bench says so and, unless --tiny, stops. The data: a Fashion-MNIST
subset written once as PNG class folders (train/ and valid/, 28x28), read by each library's own folder loader
(`DataLoaders.from_folder` / `ImageDataLoaders.from_folder`), batch 64, no resizing, no augmentation, CPU, one torch
thread. Each fit runs in a process of its own, in interleaved rounds (miniai, fastai, miniai, fastai...), and
reports the seconds of each of its two epochs (the frozen one, then the unfrozen one; training and validation) and the
final validation accuracy. fastai runs twice a round: as its users would write it (the PNGs read as RGB; with
`pretrained=False` it adds no Normalize), and on the inputs miniai's model gets ('fastai-same-inputs': one grey
channel, normalised with the training images' statistics), so that the accuracies compare.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / 'results'


def write_folder(root: Path, n_train: int, n_valid: int) -> Path:
    "`n_train` and `n_valid` Fashion-MNIST images (the first of each split) as PNG class folders under `root`, once."
    from miniai.data.fashion import CLASSES, fashion_arrays
    from miniai.data.folders import write_image_folder
    root = root / f'fashion-{n_train}-{n_valid}'
    if not (root / 'done').exists():
        arr = fashion_arrays()
        write_image_folder(root, arr['train'][0][:n_train], arr['train'][1][:n_train], CLASSES, 'train')
        write_image_folder(root, arr['test'][0][:n_valid], arr['test'][1][:n_valid], CLASSES, 'valid')
        (root / 'done').touch()
    return root


def run_miniai(folder: Path, bs: int, opt_func=None) -> dict:
    """miniai's fine-tune of a fresh resnet18 on `folder`: seconds of each epoch, validation accuracy; `opt_func`
    replaces vision_learner's default optimizer (fused AdamW)."""
    from torcheval.metrics import MulticlassAccuracy
    from miniai.core.events import Callback
    from miniai.data.dataloaders import DataLoaders
    from miniai.models.vision import vision_learner

    class EpochTimer(Callback):
        def __init__(self): self.secs = []
        def before_epoch(self, learn):
            if learn.training: self.t = time.perf_counter()
        def after_epoch(self, learn):
            if not learn.training: self.secs.append(time.perf_counter() - self.t)

    t0 = time.perf_counter()
    dls = DataLoaders.from_folder(folder, bs=bs, seed=0)
    timer = EpochTimer()
    kw = {} if opt_func is None else {'opt_func': opt_func}
    learn = vision_learner(dls, 'resnet18', pretrained=False, metrics=MulticlassAccuracy(), cbs=[timer], **kw)
    learn.fine_tune(1)
    acc = [r for r in learn.metrics.history if r['train'] == 'eval'][-1]['accuracy']
    return {'epochs': timer.secs, 'accuracy': float(acc), 'total': time.perf_counter() - t0}


def train_stats(folder: Path) -> tuple[float, float]:
    "The mean and std of the training images' pixels in [0, 1] (grey PNGs), as miniai's loaders work them out."
    import numpy as np
    from PIL import Image
    px = np.concatenate([np.asarray(Image.open(f), dtype=np.float64).ravel() / 255
                         for f in sorted((folder / 'train').rglob('*.png'))])
    return float(px.mean()), float(px.std())


def run_fastai(folder: Path, bs: int, same_inputs: bool = False) -> dict:
    """fastai's fine-tune of a fresh resnet18 on `folder`, written as its users would (RGB, and with
    `pretrained=False` no Normalize): the same measures. `same_inputs`: one grey channel normalised with the training
    images' statistics, as miniai's model gets them, so that accuracies compare."""
    import contextlib
    import io
    from fastai.callback.core import Callback
    from fastai.vision.all import ImageDataLoaders, accuracy, resnet18, vision_learner

    class EpochTimer(Callback):
        def __init__(self): self.secs = []
        def before_epoch(self): self.t = time.perf_counter()
        def after_epoch(self): self.secs.append(time.perf_counter() - self.t)

    t0 = time.perf_counter()
    if same_inputs:  # what miniai's loaders give its model: one grey channel, normalised with the training images' stats
        from fastai.vision.all import Normalize, PILImageBW
        mean, std = train_stats(folder)
        dls = ImageDataLoaders.from_folder(folder, train='train', valid='valid', bs=bs, num_workers=0, device='cpu',
                                           seed=0, img_cls=PILImageBW, batch_tfms=Normalize.from_stats([mean], [std]))
    else:
        dls = ImageDataLoaders.from_folder(folder, train='train', valid='valid', bs=bs, num_workers=0, device='cpu',
                                           seed=0)
    timer = EpochTimer()
    learn = vision_learner(dls, resnet18, pretrained=False, metrics=accuracy, cbs=[timer],
                           **({'n_in': 1} if same_inputs else {}))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), learn.no_bar():
        learn.fine_tune(1)
    return {'epochs': timer.secs, 'accuracy': float(learn.recorder.values[-1][-1]),
            'total': time.perf_counter() - t0}


def run_miniai_plain_adamw(folder: Path, bs: int) -> dict:
    "miniai as before `fused_adamw`: torch's AdamW with its default (per-parameter loop) implementation on a CPU."
    import torch
    return run_miniai(folder, bs, opt_func=torch.optim.AdamW)


def run_fastai_same_inputs(folder: Path, bs: int) -> dict:
    "fastai on the inputs miniai's model gets (see `run_fastai`)."
    return run_fastai(folder, bs, same_inputs=True)


WORKERS = {'miniai': run_miniai, 'fastai': run_fastai, 'miniai-plain-adamw': run_miniai_plain_adamw,
           'fastai-same-inputs': run_fastai_same_inputs}


def fastai_available() -> bool:
    return importlib.util.find_spec('fastai') is not None


def one_run(who: str, folder: Path, bs: int, threads: int) -> dict:
    "`who`'s fit in a process of its own (this same Python), its result read from the last line it prints."
    r = subprocess.run([sys.executable, '-m', 'bench.fine_tune_peers', '--worker', who, '--folder', str(folder),
                        '--bs', str(bs), '--threads', str(threads)], capture_output=True, text=True,
                       cwd=Path(__file__).parent.parent, env={**os.environ, 'PYTHONWARNINGS': 'ignore'})
    if r.returncode: raise RuntimeError(f'{who} run failed:\n{r.stderr[-3000:]}')
    return json.loads(r.stdout.strip().splitlines()[-1])


def _mean(v): return statistics.mean(v) if v else float('nan')


def _sd(v): return statistics.stdev(v) if len(v) > 1 else 0.


def table(runs: dict, cmd: str, load: tuple, n: tuple) -> str:
    "The Markdown table of `runs` (who -> list of results), with the command and the machine's load."
    lines = ['# Fine-tuning side by side with fastai', '',
             f'`{cmd}`: resnet18 from scratch (`pretrained=False`) + `fine_tune(1)` on {n[0]} training and {n[1]} '
             f'validation 28x28 Fashion-MNIST PNGs in class folders, batch 64, CPU, 1 torch thread, each fit in its own '
             f'process, rounds interleaved. Seconds a epoch (training + validation), mean ± std over the rounds.', '',
             '| library | rounds | frozen epoch (s) | unfrozen epoch (s) | both epochs (s) | time / fastai | '
             'valid accuracy |', '|---|---|---|---|---|---|---|']
    both = {w: [sum(r['epochs']) for r in rs] for w, rs in runs.items()}
    ref = _mean(both['fastai']) if runs.get('fastai') else None
    for who, rs in runs.items():
        fz, uf, acc = ([r['epochs'][0] for r in rs], [r['epochs'][-1] for r in rs], [r['accuracy'] for r in rs])
        ratio = f'{_mean(both[who]) / ref:.2f}x' if ref else 'n/a'
        lines.append(f'| {who} | {len(rs)} | {_mean(fz):.2f} ± {_sd(fz):.2f} | {_mean(uf):.2f} ± {_sd(uf):.2f} | '
                     f'{_mean(both[who]):.2f} ± {_sd(both[who]):.2f} | {ratio} | '
                     f'{100 * _mean(acc):.1f}% ± {100 * _sd(acc):.1f} |')
    lines += ['', f'{os.cpu_count()} CPU cores, load average {load[0]:.1f} at the start and {load[1]:.1f} at the end '
              f'(a shared machine: the seconds are inflated and noisy, the ratio from interleaved rounds less so).']
    return '\n'.join(lines) + '\n'


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--tiny', action='store_true', help='a smoke run: few images, one round')
    p.add_argument('--rounds', type=int, default=3)
    p.add_argument('--n-train', type=int, default=3000)
    p.add_argument('--n-valid', type=int, default=1000)
    p.add_argument('--bs', type=int, default=64)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--plain-adamw', action='store_true', help="also miniai with torch's plain AdamW (the default "
                   "before fused_adamw), to see what the fused optimizer gives")
    p.add_argument('--workdir', default=None, help='where the PNG folder is written (default: a temporary folder)')
    p.add_argument('--out', default=str(RESULTS / 'fine_tune_peers.md'))
    p.add_argument('--worker', choices=list(WORKERS), help=argparse.SUPPRESS)
    p.add_argument('--folder', help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:  # one fit, in this process: print its result as the last line
        import torch
        torch.set_num_threads(a.threads)
        print(json.dumps(WORKERS[a.worker](Path(a.folder), a.bs)))
        return
    who = ['miniai', 'fastai', 'fastai-same-inputs'] if fastai_available() else ['miniai']
    if a.plain_adamw: who.append('miniai-plain-adamw')
    if 'fastai' not in who:
        msg = (f'fastai is not importable from {sys.executable}: skipping it (install it in the bench\'s own '
               f'environment, see the docstring)')
        if not a.tiny: raise SystemExit(msg)
        print(msg, flush=True)
    n_train, n_valid, rounds = (100, 50, 1) if a.tiny else (a.n_train, a.n_valid, a.rounds)
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_folder(Path(a.workdir or tmp), n_train, n_valid)
        runs = {w: [] for w in who}
        for i in range(rounds):
            for w in who:
                runs[w].append(one_run(w, folder, a.bs, a.threads))
                print(f'round {i}: {w} {runs[w][-1]}', flush=True)
    cmd = (f'python -m bench.fine_tune_peers{" --tiny" if a.tiny else f" --rounds {rounds}"} --n-train {n_train} '
           f'--n-valid {n_valid}{" --plain-adamw" if a.plain_adamw else ""}')
    md = table(runs, cmd, (load0[0], os.getloadavg()[0]), (n_train, n_valid))
    Path(a.out).write_text(md)
    print(md)


if __name__ == '__main__':
    main()
