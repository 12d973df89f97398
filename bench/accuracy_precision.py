"""Precision and accuracy: the course ResNet trained on all of Fashion-MNIST the same way in fp32 and with the fast
settings; test accuracy after the same epochs, and each run's wall time.

    python -m bench.accuracy_precision [--epochs 2] [--bs 256] [--settings fp32 bf16-cl] [--threads N]

Each run starts from the same seed (same initial weights, same data order), trains with one-cycle AdamW and no
augmentation (so the only difference is the arithmetic), and is evaluated on the 10,000 test images. Writes
bench/results/precision_accuracy.md. On two cores this takes several minutes per fp32 epoch: run it once.
"""
from __future__ import annotations

import argparse
import os
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import optim
from torcheval.metrics import MulticlassAccuracy

from miniai.accel import cpu_has_bf16, precision_cbs
from miniai.activations import set_seed
from miniai.data.fashion import fashion_dls
from miniai.learner import Callback, DeviceCB, MetricsCB, TrainLearner
from miniai.resnet import fashion_resnet
from miniai.sgd import BatchSchedCB

RESULTS = Path(__file__).parent / 'results'


class Tagged(Callback):
    "Shows each metrics row with the setting it belongs to (`MetricsCB` hands its rows to `show_metrics`)."
    def __init__(self, tag: str): self.tag = tag
    def show_metrics(self, row: dict): print(self.tag, row, flush=True)


def train_once(setting: str, epochs: int, bs: int, lr: float, seed: int, n_train=None, n_valid=None) -> dict:
    "Train a fresh course ResNet with the callbacks of `setting`; its final test accuracy and loss, and seconds taken."
    set_seed(seed)
    dls = fashion_dls(bs=bs, seed=seed, n_train=n_train, n_valid=n_valid)
    metrics = MetricsCB(accuracy=MulticlassAccuracy())
    sched = partial(optim.lr_scheduler.OneCycleLR, max_lr=lr, total_steps=epochs * len(dls.train))
    learn = TrainLearner(fashion_resnet(bias=False), dls, F.cross_entropy, lr=lr, opt_func=partial(optim.AdamW, eps=1e-5),
                         cbs=[DeviceCB(), metrics, Tagged(setting), BatchSchedCB(sched)] + precision_cbs(setting))
    t = time.perf_counter()
    learn.fit(epochs)
    secs = time.perf_counter() - t
    last = [r for r in metrics.history if r['train'] == 'eval'][-1]
    return {'accuracy': float(last['accuracy']), 'loss': float(last['loss']), 'seconds': secs}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--epochs', type=int, default=2)
    p.add_argument('--bs', type=int, default=256)
    p.add_argument('--lr', type=float, default=1e-2)
    p.add_argument('--seed', type=int, default=1)
    p.add_argument('--settings', nargs='+', default=['fp32', 'bf16-cl'])
    p.add_argument('--n-train', type=int, default=None, help='a subset, for a quick check of the script')
    p.add_argument('--n-valid', type=int, default=None)
    p.add_argument('--threads', type=int, default=None, help="torch threads (default: torch's own)")
    a = p.parse_args(argv)
    if a.threads: torch.set_num_threads(a.threads)
    if a.settings[0] != 'fp32': raise SystemExit('--settings must start with fp32, the baseline of the comparison')
    res = {s: train_once(s, a.epochs, a.bs, a.lr, a.seed, a.n_train, a.n_valid) for s in a.settings}
    base = res['fp32']
    n_tr, n_va = a.n_train or 60000, a.n_valid or 10000
    lines = [f'### Course ResNet on Fashion-MNIST ({n_tr:,} train / {n_va:,} test), {a.epochs} epochs, batch {a.bs}, '
             f'one-cycle AdamW lr {a.lr}, seed {a.seed}, {torch.get_num_threads()} threads, CPU bf16: {cpu_has_bf16()}; '
             f'load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores',
             '', '| setting | test accuracy | vs fp32 (points) | test loss | wall time | speed-up vs fp32 |',
             '|---|---|---|---|---|---|']
    for s, r in res.items():
        lines.append(f"| {s} | {100 * r['accuracy']:.2f}% | {100 * (r['accuracy'] - base['accuracy']):+.2f} | "
                     f"{r['loss']:.4f} | {r['seconds']:.0f} s | {base['seconds'] / r['seconds']:.2f}x |")
    md = '\n'.join(lines)
    print(md)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / 'precision_accuracy.md').write_text(md + '\n')


if __name__ == '__main__': main()
