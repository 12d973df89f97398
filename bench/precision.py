"""Precision and memory format: training steps per second of the course ResNet at batch 1024, side by side.

    python -m bench.precision [--steps 3] [--bs 1024] [--threads N]

fp32, bf16 autocast, channels-last, and both, each through a TrainLearner with the miniai callbacks that switch
them on, on the same real Fashion-MNIST batches; rounds alternate between the settings so noise hits all alike;
the median step time after an untimed warm-up round (and each fit's first step) is reported with the speed-up
over fp32.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import optim

from miniai.accel import cpu_has_bf16, precision_cbs
from miniai.core.events import Callback
from miniai.data.fashion import fashion_dls
from miniai.learner import TrainLearner
from miniai.resnet import fashion_resnet

#: the models measured: the course's 5-stage ResNet (the one the issue's 2.5x target names) and the main job's
# bias=False: the layout bench/results were measured with (no conv bias before a BatchNorm)
MODELS = {'course5': dict(nfs=(16, 32, 64, 128, 256), ks=3, bias=False), 'fashion_resnet': dict(bias=False)}

RESULTS = Path(__file__).parent / 'results'
SETTINGS = {'fp32': 'fp32', 'bf16 autocast': 'bf16', 'channels-last': 'channels-last', 'bf16 + channels-last': 'bf16-cl'}


class StepTimer(Callback):
    "Seconds of each training batch (forward, backward, step), measured between before_batch and after_batch."
    order = 100
    def __init__(self): self.times = []
    def before_batch(self, learn): self._t = time.perf_counter()
    def after_batch(self, learn):
        if learn.training: self.times.append(time.perf_counter() - self._t)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--steps', type=int, default=3, help='timed steps per setting and round')
    p.add_argument('--rounds', type=int, default=2)
    p.add_argument('--bs', type=int, default=1024)
    p.add_argument('--model', choices=list(MODELS), default='course5')
    p.add_argument('--threads', type=int, default=None,
                   help="torch threads (default: torch's own); on a shared, busy machine 1 avoids the stalls of "
                        'OpenMP threads waiting for each other')
    a = p.parse_args(argv)
    if a.threads: torch.set_num_threads(a.threads)
    dls = fashion_dls(bs=a.bs, n_train=a.bs * (a.steps + 1), n_valid=a.bs, seed=0, device='cpu')  # a CPU benchmark
    times = {k: [] for k in SETTINGS}
    # round 0 is not timed: oneDNN builds its bf16 kernels during the first one to four backward passes of a process,
    # which can take over ten seconds each, so one skipped step per fit is not enough
    for rnd in range(a.rounds + 1):
        for name, setting in SETTINGS.items():
            torch.manual_seed(0)
            timer = StepTimer()
            learn = TrainLearner(fashion_resnet(**MODELS[a.model]), dls, F.cross_entropy, lr=1e-3, opt_func=optim.AdamW,
                                 cbs=precision_cbs(setting) + [timer])
            learn.fit(1, valid=False)
            if rnd: times[name] += timer.times[1:]  # a fit's first step warms up the allocator
    base = statistics.median(times['fp32'])
    lines = [f'### {a.model} ResNet ({sum(p.numel() for p in fashion_resnet(**MODELS[a.model]).parameters()):,} params), '
             f'batch {a.bs}, {torch.get_num_threads()} threads, CPU bf16: {cpu_has_bf16()}; '
             f'load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores', '',
             '| setting | s/step (median) | steps/s | speed-up vs fp32 |', '|---|---|---|---|']
    for k, v in times.items():
        m = statistics.median(v)
        lines.append(f'| {k} | {m:.3f} | {1 / m:.2f} | {base / m:.2f}x |')
    md = '\n'.join(lines)
    print(md)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / ('precision.md' if a.model == 'course5' else f'precision-{a.model}.md')).write_text(md + '\n')


if __name__ == '__main__': main()
