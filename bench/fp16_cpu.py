"""fp16 autocast on a CPU, against fp32 and bf16: why `MixedPrecision(torch.float16)` warns there (issue 22).

    python -m bench.fp16_cpu [--rounds 2] [--threads 1]

Two epochs (training and validation) of a small CNN (five stride-2 convolutions with BatchNorm, 0.1 M parameters) on
2,048 Fashion-MNIST training and 512 test images, batch 256, AdamW, through a plain `Learner` with `precision_cbs`;
the settings alternated in each round, the fastest round of each reported.
"""
from __future__ import annotations

import argparse
from functools import partial
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn, optim

from miniai.accel import precision_cbs
from miniai.data.fashion import fashion_dls
from miniai.init import conv
from miniai.learner import Learner, TrainCB

RESULTS = Path(__file__).parent / 'results'


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    bn = partial(conv, norm=nn.BatchNorm2d, bias=False)  # as measured in bench/results
    return nn.Sequential(bn(1, 16), bn(16, 32), bn(32, 64), bn(64, 128),
                         conv(128, 10, act=None), nn.Flatten())


def main(argv=None) -> str:
    "Time each precision side by side; print the table and write it to bench/results/fp16_cpu.md."
    p = argparse.ArgumentParser(prog='python -m bench.fp16_cpu')
    p.add_argument('--rounds', type=int, default=2)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--tiny', action='store_true', help='256 training and 128 test images: check that it runs')
    p.add_argument('--results', type=Path, default=RESULTS, help='folder for fp16_cpu.md')
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    n_train, n_valid = (256, 128) if args.tiny else (2048, 512)
    dls = fashion_dls(bs=256, n_train=n_train, n_valid=n_valid, seed=0, device='cpu')
    secs = {}
    for _ in range(args.rounds):
        for prec in ('fp32', 'bf16', 'fp16'):
            learn = Learner(small_cnn(), dls, F.cross_entropy, lr=1e-2, opt_func=optim.AdamW,
                            cbs=precision_cbs(prec) or [TrainCB()])
            with warnings.catch_warnings():
                warnings.simplefilter('ignore')  # the fp16 warning this measures
                start = time.perf_counter()
                learn.fit(2)
            secs.setdefault(prec, []).append(time.perf_counter() - start)
    best = {k: min(v) for k, v in secs.items()}
    md = '\n'.join([f'### fp16 on a CPU ({args.threads} thread(s), best of {args.rounds} rounds)', '',
                    '| precision | s for 2 epochs | time / fp32 |', '|---|---|---|'] +
                   [f'| {k} | {v:.2f} | {v / best["fp32"]:.1f}x |' for k, v in best.items()]) + '\n'
    print(md)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / 'fp16_cpu.md').write_text(md)
    return md


if __name__ == '__main__': main()
