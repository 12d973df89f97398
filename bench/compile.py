"""torch.compile and the optimizer's implementation: training steps of the main job's models, eager and compiled.

    python -m bench.compile [--models fashion_resnet fashion_resnet_wide] [--modes default] [--steps 6]
                            [--rounds 2] [--bs 256] [--threads N] [--device cpu|cuda] [--hand]

Each contender is a TrainLearner on real Fashion-MNIST batches at batch 256, with the precision `fastest_settings`
picks (bf16 autocast + channels-last on this CPU and on GPUs with bf16) and AdamW, the data on the device: eager with
AdamW's foreach implementation (the main job as shipped), eager with fused AdamW, and `CompileCB(mode)` with fused
AdamW for each mode. A contender's first fit compiles (its compile time is reported: a fresh inductor cache is used
unless --warm-cache) and is not timed; then rounds alternate between the contenders, each fit timing `--steps` steps
after one untimed step (one device synchronisation at each end of the timed stretch). s/epoch is s/step times the
235 batches of an epoch of the 60,000 training images. On a CPU the speed-up is of CPU seconds (with --threads 1
they hardly change with the machine's load, where wall seconds do); on a GPU, of wall seconds. With --hand (default on CUDA), a hand-written loop, eager
and `torch.compile`d, runs the same steps, for the Learner's overhead against the best hand loop. A second table
times AdamW's step alone: for-loop, foreach and fused. On CUDA the default modes are 'default' and 'reduce-overhead'.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import optim

from miniai.accel import fastest_settings, precision_cbs
from miniai.core.events import Callback
from miniai.engines.compile import CompileCB
from miniai.data.fashion import fashion_dls
from miniai.learner import DeviceCB, TrainLearner
from miniai.app.recipe import build_model

RESULTS = Path(__file__).parent / 'results'
N_TRAIN = 60_000


def _sync(device):
    if torch.device(device).type == 'cuda': torch.cuda.synchronize()


def adamw(impl: str):
    "The main job's AdamW (eps 1e-5, weight decay 0.05) with implementation 'for-loop', 'foreach' or 'fused'."
    kw = {'for-loop': dict(foreach=False), 'foreach': dict(foreach=True), 'fused': dict(fused=True)}[impl]
    return partial(optim.AdamW, eps=1e-5, weight_decay=0.05, **kw)


class Clock:
    """Wall-clock and CPU seconds (this process's, all threads) of a stretch, with a device synchronisation at each
    end. On a shared CPU, CPU seconds of a 1-thread run hardly change with the load; wall seconds grow with it."""
    def __init__(self, device): self.device = device
    def start(self):
        _sync(self.device)
        self._t = time.perf_counter(), time.process_time()
    def stop(self, n: int = 1) -> tuple[float, float]:
        "(wall, cpu) seconds per unit of `n`."
        _sync(self.device)
        return (time.perf_counter() - self._t[0]) / n, (time.process_time() - self._t[1]) / n


def optimizer_steps(model_name: str, device, n: int = 20) -> dict:
    "Median (wall, CPU) seconds of one AdamW step over the model's parameters (random gradients), per implementation."
    res, clock = {}, Clock(device)
    for impl in ('for-loop', 'foreach', 'fused'):
        ps = list(build_model(model_name).to(device).parameters())
        for p in ps: p.grad = torch.randn_like(p)
        opt = adamw(impl)(ps, lr=1e-3)
        opt.step()  # builds the state
        times = []
        for _ in range(n):
            clock.start()
            opt.step()
            times.append(clock.stop())
        res[impl] = tuple(statistics.median(t) for t in zip(*times))
    return res


class _Window(Callback):
    "Times the training steps after the first `skip` of a fit."
    order = 100
    def __init__(self, device, skip: int = 1): self.clock, self.skip, self.per_step = Clock(device), skip, None
    def before_batch(self, learn):
        if learn.training and learn.iter == self.skip: self.clock.start()
    def after_epoch(self, learn):
        if learn.training: self.per_step = self.clock.stop(learn.iter + 1 - self.skip)


class LearnerRun:
    "A Learner contender: fits once to compile and warm up, then `timed()` fits again: (wall, CPU) s/step."
    def __init__(self, model, dls, precision: str, opt: str, mode: str | None, backend: str = 'inductor'):
        self.device = next(model.parameters()).device
        self.compile_cb = CompileCB(mode=mode, backend=backend) if mode else None
        cbs = [DeviceCB(self.device), *precision_cbs(precision)] + ([self.compile_cb] if mode else [])
        self.learn = TrainLearner(model, dls, F.cross_entropy, lr=1e-3, cbs=cbs, opt_func=adamw(opt))
        t = time.perf_counter()
        self.learn.fit(1, valid=False)
        _sync(self.device)
        self.first_fit = time.perf_counter() - t
        self.compile_secs = self.compile_cb.compile_secs if mode else 0.

    def timed(self) -> tuple[float, float]:
        w = _Window(self.device)
        self.learn.fit(1, valid=False, cbs=[w])
        return w.per_step


class HandRun:
    "The hand-written loop: bf16 autocast (where `precision` says), channels-last, fused AdamW, maybe compiled."
    def __init__(self, model, dls, precision: str, opt: str, mode: str | None, backend: str = 'inductor'):
        self.device = next(model.parameters()).device
        self.dls, self.bf16, self.cl = dls, precision.startswith('bf16'), precision.endswith('cl')
        if self.cl: model = model.to(memory_format=torch.channels_last)
        kw = dict(mode=mode) if backend == 'inductor' else {}
        self.model = torch.compile(model, backend=backend, dynamic=False, **kw) if mode else model
        self.opt = adamw(opt)(model.parameters(), lr=1e-3)
        t = time.perf_counter()
        self._run()
        self.first_fit = self.compile_secs = time.perf_counter() - t
        if not mode: self.compile_secs = 0.

    def _run(self, skip: int = 1):
        self.model.train()
        clock, n = Clock(self.device), 0
        for i, (xb, yb) in enumerate(self.dls.train):
            if i == skip: clock.start()
            if self.cl: xb = xb.contiguous(memory_format=torch.channels_last)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                loss = F.cross_entropy(self.model(xb), yb)
            loss.backward()
            self.opt.step()
            self.opt.zero_grad()
            n += i >= skip
        return clock.stop(n)

    def timed(self) -> tuple[float, float]: return self._run()


def contenders(device, modes, hand: bool) -> dict:
    "Name -> (runner class, optimizer implementation, compile mode or None)."
    fused = 'fused'
    res = {'eager, foreach AdamW (the main job as shipped)': (LearnerRun, 'foreach', None),
           'eager, fused AdamW': (LearnerRun, fused, None)}
    res.update({f'CompileCB({m!r}), fused AdamW': (LearnerRun, fused, m) for m in modes})
    if hand:
        res['hand loop, eager, fused AdamW'] = (HandRun, fused, None)
        res.update({f'hand loop, torch.compile({m!r}), fused AdamW': (HandRun, fused, m) for m in modes})
    return res


def run(model_name: str, device, modes, steps: int, rounds: int, bs: int, hand: bool,
        backend: str = 'inductor', cold: bool = True) -> list[dict]:
    "One row per contender: median s/step over `rounds` timed fits of `steps` steps, and the first fit's cost."
    precision, _ = fastest_settings(device)
    dls = fashion_dls(bs=bs, n_train=bs * (steps + 1), n_valid=bs, seed=0, device=device)
    runs = {}
    for name, (cls, opt, mode) in contenders(device, modes, hand).items():
        torch.manual_seed(0)
        print(f'  {model_name}: first fit of {name}', flush=True)
        if cold: os.environ['TORCHINDUCTOR_CACHE_DIR'] = tempfile.mkdtemp(prefix='inductor-')  # compiles from scratch
        runs[name] = cls(build_model(model_name).to(device), dls, precision, opt, mode, backend)
    times = {k: [] for k in runs}
    for _ in range(rounds):
        for k, r in runs.items(): times[k].append(r.timed())
    med = {k: tuple(statistics.median(t) for t in zip(*v)) for k, v in times.items()}
    # the speed-up is of CPU seconds on a CPU (steadier than wall time on a shared machine), of wall time on a GPU
    by = 0 if torch.device(device).type == 'cuda' else 1
    base = med[next(iter(med))][by]
    return [{'contender': k, 's/step': w, 'cpu s/step': c, 's/epoch': w * math.ceil(N_TRAIN / bs),
             'speed-up': base / (w, c)[by], 'compile': runs[k].compile_secs, 'first fit': runs[k].first_fit,
             'precision': precision} for k, (w, c) in med.items()]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--models', nargs='+', default=['fashion_resnet', 'fashion_resnet_wide'])
    p.add_argument('--modes', nargs='+', default=None, help="compile modes (default: 'default'; on CUDA also "
                                                             "'reduce-overhead')")
    p.add_argument('--steps', type=int, default=6, help='timed steps per fit')
    p.add_argument('--rounds', type=int, default=2, help='timed fits per contender, alternated')
    p.add_argument('--bs', type=int, default=256)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--threads', type=int, default=None, help="torch threads (default: torch's own); 1 on a busy "
                                                            'machine, where OpenMP threads wait for each other')
    p.add_argument('--hand', action=argparse.BooleanOptionalAction, default=None,
                   help='also time a hand-written loop, eager and compiled (default: on CUDA only)')
    p.add_argument('--warm-cache', action='store_true', help="keep inductor's on-disk cache (compile times then "
                                                             'show a second run, not a first)')
    p.add_argument('--backend', default='inductor', help="torch.compile's backend ('eager' checks the script quickly)")
    p.add_argument('--out', type=Path, default=RESULTS / 'compile.md')
    a = p.parse_args(argv)
    if a.threads: torch.set_num_threads(a.threads)
    cuda = torch.device(a.device).type == 'cuda'
    modes = a.modes or (['default', 'reduce-overhead'] if cuda else ['default'])
    hand = cuda if a.hand is None else a.hand
    where = torch.cuda.get_device_name() if cuda else f'CPU, {torch.get_num_threads()} threads'
    by = 'wall' if cuda else 'CPU'
    out = [f'## torch.compile, batch {a.bs}, {where}, torch {torch.__version__}', '',
           f'Command: `python -m bench.compile {" ".join(argv if argv is not None else sys.argv[1:])}`', '']
    for m in a.models:
        opt = optimizer_steps(m, a.device)
        out += [f'### {m}: one AdamW step alone (random gradients, median of 20)', '',
                '| implementation | ms/step | CPU ms/step | speed-up vs for-loop |', '|---|---|---|---|']
        i = 0 if cuda else 1
        out += [f"| {k} | {w * 1e3:.1f} | {c * 1e3:.1f} | {opt['for-loop'][i] / (w, c)[i]:.2f}x |"
                for k, (w, c) in opt.items()]
        print('\n'.join(out[-6:]), flush=True)
        rows = run(m, a.device, modes, a.steps, a.rounds, a.bs, hand, a.backend, cold=not a.warm_cache)
        out += ['', f"### {m}: training steps ({rows[0]['precision']}), {a.rounds} rounds of {a.steps} steps, "
                    f'median; speed-up of {by} time', '',
                '| contender | s/step | CPU s/step | s/epoch (est.) | speed-up | compile s | first fit s |',
                '|---|---|---|---|---|---|---|']
        out += [f"| {r['contender']} | {r['s/step']:.3f} | {r['cpu s/step']:.3f} | {r['s/epoch']:.1f} | "
                f"{r['speed-up']:.2f}x | {r['compile']:.0f} | {r['first fit']:.0f} |" for r in rows]
        out += [''] if cuda else ['', f'Load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores', '']
        print('\n'.join(out[-len(rows) - 6:]), flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text('\n'.join(out).rstrip() + '\n')
    print(f'wrote {a.out}')


if __name__ == '__main__': main()
