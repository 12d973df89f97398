"""What agreeing on where to stop costs: the same two-process DDP run (gloo, CPU) with and without `InterruptCB`.

    python -m bench.stop_agreement [--rounds 5] [--threads 1]

Two CPU processes, started as `torchrun --nproc-per-node 2` would start them, train each job once per mode per round:
without `InterruptCB`, and with it, where the ranks compare notes in rounds of an all-reduce on the CPU (gloo) group,
each read when the next starts (`miniai.engines.cluster.StopAgreement`): at its default pace (every batch at first, then
about every 0.5 s) and after every batch (`MINIAI_STOP_CHECK_SECONDS=0`). The three modes take turns round by round
(each going first in turn), so machine noise hits all alike; the table gives the median seconds per fit (training and
validation, until every rank is done), wall and CPU (the CPU seconds of rank 0, all its threads: steadier on a shared machine), and the ratios,
side by side. The jobs: the main job's model (`resnet9_small`, with the precision `fastest_settings()` picks) at
global batch 64, and the 784-128-10 MLP at global batch 64, where a batch is so little work that any per-batch cost
shows most (the worst case). Also one round alone: rounds back to back with nothing else running, the all-reduce's
own latency between the two processes. And the save a stop waits for: the main job's checkpoint (`resnet9_small` with
its AdamW state and EMA of the weights), written as `InterruptCB` writes it, and read back as a resume reads it.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / 'results'
JOBS = {'resnet9_small': dict(n_train=2048, n_valid=256, title="the main job's model, `resnet9_small`"),
        'mlp': dict(n_train=60000, n_valid=2048, title='784-128-10 MLP')}
TINY = 'MINIAI_BENCH_TINY'  # set (by --tiny): a few batches a job, to check that the benchmark runs (the tests do)


def jobs() -> dict:
    "The jobs and their data sizes (tiny ones under --tiny, which the worker processes see through the environment)."
    if not os.environ.get(TINY): return JOBS
    return {k: {**v, 'n_train': 4 * BS, 'n_valid': BS} for k, v in JOBS.items()}
BS = 64  # global
MODES = ('off', 'on', 'every batch')  # without InterruptCB; with it at its default pace; with rounds every batch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _quiet():
    """A callback that takes the metrics rows (`MetricsCB` hands them to `show_metrics`) and shows none: the table is
    what this bench prints."""
    from miniai.learner import Callback
    class Quiet(Callback):
        def show_metrics(self, row: dict) -> None: pass
    return Quiet()


def _learner(job: str, with_interrupt: bool, tmp: Path):
    "A fresh two-process Learner for `job` (same weights and data order every time), with or without InterruptCB."
    import torch.nn.functional as F
    from torch import nn, optim
    from miniai.accel import fastest_settings, precision_cbs
    from miniai.activations import set_seed
    from miniai.engines.ddp import DDPCB
    from miniai.data.fashion import fashion_dls
    from miniai.runs.interrupt import InterruptCB
    from miniai.learner import DeviceCB, MetricsCB, TrainLearner
    from miniai.core.ranks import rank, world_size
    from miniai.app.recipe import build_model
    set_seed(0)
    spec = jobs()[job]
    dls = fashion_dls(bs=BS // world_size(), n_train=spec['n_train'], n_valid=spec['n_valid'], seed=0, device='cpu',
                      rank=rank(), world_size=world_size())
    if job == 'mlp': model, extra = nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10)), []
    else: model, extra = build_model(job), precision_cbs(fastest_settings('cpu')[0])
    cbs = [DeviceCB('cpu'), DDPCB(backend='gloo'), MetricsCB(), _quiet(), *extra]
    if with_interrupt: cbs.append(InterruptCB(tmp / 'interrupted.ckpt'))
    return TrainLearner(model, dls, F.cross_entropy, lr=1e-3, opt_func=optim.AdamW, cbs=cbs)


def worker(rounds: int, out: str) -> None:
    "One of the two processes: time every (job, mode, round); rank 0 writes the times to `out` as JSON."
    import torch
    import torch.distributed as dist
    from miniai.core.events import Callback
    from miniai.engines.cluster import StopAgreement
    dist.init_process_group('gloo')  # made here, once: DDPCB leaves a group it did not make alone

    class Clock(Callback):
        order = 100  # after every other before_fit (DDPCB's wrapping) and after_fit (InterruptCB's last round)
        def before_fit(self, learn): self.t0, self.c0 = time.perf_counter(), time.process_time()
        def after_fit(self, learn):
            # a fit is over when every rank is: InterruptCB's last round waits for the slower rank, so without this
            # barrier the runs without it would end at rank 0's own end and look faster by the ranks' skew
            dist.barrier()
            self.seconds, self.cpu = time.perf_counter() - self.t0, time.process_time() - self.c0
            agree = getattr(getattr(learn, 'interrupt', None), '_agree', None)
            self.rounds = 0 if agree is None else agree.rounds

    times = {job: {m: [] for m in MODES} for job in jobs()}
    cpu = {job: {m: [] for m in MODES} for job in jobs()}
    rounds_per_fit = {job: {} for job in jobs()}
    with tempfile.TemporaryDirectory() as tmp:
        for job in jobs():
            _learner(job, True, Path(tmp)).fit(1)  # warm-up: allocator, oneDNN kernels, the CPU group
            for r in range(rounds):
                for mode in MODES[r % 3:] + MODES[:r % 3]:
                    if mode == 'every batch': os.environ['MINIAI_STOP_CHECK_SECONDS'] = '0'
                    else: os.environ.pop('MINIAI_STOP_CHECK_SECONDS', None)
                    learn, clock = _learner(job, mode != 'off', Path(tmp)), Clock()
                    dist.barrier()
                    learn.fit(1, cbs=[clock])
                    times[job][mode].append(clock.seconds)
                    cpu[job][mode].append(clock.cpu)
                    rounds_per_fit[job][mode] = clock.rounds
    agree, n = StopAgreement(seconds=0), 50 if os.environ.get(TINY) else 2000
    dist.barrier()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n): agree.poll(None)
    agree.settle(None)
    latency, round_cpu = (time.perf_counter() - t0) / n, (time.process_time() - c0) / n
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps({'times': times, 'cpu': cpu, 'rounds': rounds_per_fit, 'latency': latency,
                                         'round_cpu': round_cpu, 'torch': torch.__version__,
                                         'threads': torch.get_num_threads()}))
    dist.destroy_process_group()


def run(rounds: int = 5, threads: int = 1) -> dict:
    "Start the two processes, wait for them, return rank 0's times."
    port, out = _free_port(), Path(tempfile.mkdtemp()) / 'times.json'
    procs = []
    for r in (0, 1):
        env = {**os.environ, 'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': str(port), 'RANK': str(r),
               'LOCAL_RANK': str(r), 'WORLD_SIZE': '2', 'LOCAL_WORLD_SIZE': '2', 'MINIAI_DEVICE': 'cpu',
               'OMP_NUM_THREADS': str(threads)}
        procs.append(subprocess.Popen([sys.executable, '-m', 'bench.stop_agreement', '--worker', '--rounds',
                                       str(rounds), '--out', str(out), '--threads', str(threads)], env=env))
    if any(p.wait() for p in procs): raise SystemExit('a worker failed (see its output above)')
    return json.loads(out.read_text())


def save_time(n: int = 5) -> dict:
    "Seconds to write (and to read back) the main job's checkpoint after a short fit, median of `n`; its size."
    import torch
    from miniai.runs.checkpoint import save_checkpoint
    from miniai.runs.ckptfile import read_checkpoint
    from miniai.data.fashion import fashion_dls
    from miniai.app.recipe import build_model, make_learner
    with tempfile.TemporaryDirectory() as tmp:
        dls = fashion_dls(bs=32, n_train=64, n_valid=32, seed=0, device='cpu')
        learn, _ = make_learner(build_model('resnet9_small'), dls, 1, 1e-2, augment='none', average='ema')
        learn.cbs = [cb for cb in learn.cbs if type(cb).__name__ != 'ProgressCB'] + [_quiet()]
        learn.fit(1)  # AdamW's moments and the EMA exist: the checkpoint is full-size
        path, writes, reads = Path(tmp) / 'interrupted.ckpt', [], []
        for _ in range(n):
            t0 = time.perf_counter()
            save_checkpoint(learn, path, position={'epoch': 0, 'phase': 'train', 'n_batches': 2, 'batch': 1})
            writes.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            read_checkpoint(path)
            reads.append(time.perf_counter() - t0)
        return {'write': statistics.median(writes), 'read': statistics.median(reads), 'bytes': path.stat().st_size,
                'params': sum(p.numel() for p in learn.model.parameters()), 'torch': torch.__version__}


def table(res: dict, rounds: int) -> str:
    "The results as Markdown."
    lines = [f'### Agreeing on where to stop: 2 CPU processes (gloo), global batch {BS}, median of {rounds} alternated '
             f'rounds; torch {res["torch"]}, {res["threads"]} thread(s) per process', '',
             '| job | batches per rank | seconds per fit | without InterruptCB | with it (default pace) | ratio (min) '
             '| rounds | with it, a round every batch | ratio (min) | rounds |', '|' + '---|' * 10]
    for job, spec in jobs().items():
        n, r = spec['n_train'] // BS + -(-spec['n_valid'] // BS), res['rounds'][job]
        for kind, what in (('times', 'wall'), ('cpu', 'CPU (rank 0, all its threads)')):
            t = res[kind][job]
            (off, on, every), mins = (statistics.median(t[m]) for m in MODES), {m: min(t[m]) for m in MODES}
            ratio = lambda m, med: f'{med / off:.3f}x ({mins[m] / mins["off"]:.3f}x)'
            lines.append(f'| {spec["title"]} | {n} (train + valid) | {what} | {off:.3f} | {on:.3f} | '
                         f'{ratio("on", on)} | {r["on"]} | {every:.3f} | {ratio("every batch", every)} | '
                         f'{r["every batch"]} |')
    cost = {job: res['rounds'][job]['on'] * res['round_cpu'] / statistics.median(res['cpu'][job]['off'])
            for job in jobs()}
    lines += ['', 'Ratios: of the medians, and (in brackets) of the fastest runs. Default pace: a round every batch '
                  'at first, then about every 0.5 s (every N batches, N worked out together from the slowest rank\'s '
                  f'pace). One round alone (back to back, nothing else running): {res["latency"] * 1e6:.0f} µs '
                  f'between the two processes, {res["round_cpu"] * 1e6:.0f} µs of CPU; in training it runs in the '
                  'background and is read when the next round starts. Rounds x their CPU cost / the fit\'s CPU seconds '
                  'without them, at the default pace: '
                  + ', '.join(f'{JOBS[j]["title"]} {c:.2%}' for j, c in cost.items()) + '.', '']
    if 'save' in res:
        sv = res['save']
        lines += [f'### The save a stop waits for: the main job\'s checkpoint (`--model resnet9_small`, '
                  f'{sv["params"] / 1e6:.2f} M parameters, AdamW state, EMA), median of 5, local disk', '',
                  '| checkpoint size | write (atomic: temporary file, fsync, rename) | read back (a resume) |',
                  '|---|---|---|', f'| {sv["bytes"] / 2**20:.1f} MiB | {sv["write"]:.3f} s | {sv["read"]:.3f} s |', '']
    return '\n'.join(lines)


def main(argv=None) -> None:
    "Run the benchmark and write bench/results/stop_agreement.md (or be one of its two processes, with --worker)."
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--rounds', type=int, default=5)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
    p.add_argument('--out', default=None, help=argparse.SUPPRESS)
    p.add_argument('--tiny', action='store_true', help='a few batches a job: check that it runs (numbers mean nothing)')
    p.add_argument('--results', type=Path, default=RESULTS, help='folder for stop_agreement.md')
    a = p.parse_args(argv)
    if a.tiny: os.environ[TINY] = '1'
    import torch
    torch.set_num_threads(a.threads)
    if a.worker: return worker(a.rounds, a.out)
    res = run(a.rounds, a.threads)
    res['save'] = save_time(2 if a.tiny else 5)
    md = table(res, a.rounds)
    a.results.mkdir(parents=True, exist_ok=True)
    (a.results / 'stop_agreement.md').write_text(md)
    print(md)


if __name__ == '__main__': main()
