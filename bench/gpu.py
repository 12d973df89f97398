"""GPU overhead and throughput: the Learner against a hand-written loop, with the data on the GPU and in CPU memory.

    python -m bench.gpu [--rounds 3] [--only mlp|resnet] [--tiny] [--out PATH]

Two jobs on Fashion-MNIST, each one epoch of training and validation:
- mlp: the 784-128-10 MLP at batch 64, SGD, fp32 (where the framework's per-batch work shows most);
- resnet: the wide ResNet (`build_model('fashion_resnet_wide')`, the main job's model before issue 15) at batch 256,
  AdamW, bf16 autocast and
  channels-last (what `make train` runs on a GPU with bf16).
Four contenders per job, alternated round by round in one process so noise hits all alike: the hand loop and the
Learner (`DeviceCB`, `MetricsCB`, `ProgressCB`), each with the data kept on the GPU (`fashion_dls()`, the default)
and with the data in CPU memory (`fashion_dls(device='cpu')`: pinned batches, copied asynchronously). A table per job
gives the median seconds per epoch, images per second and the ratio to the hand loop with the same data placement;
bench/results/gpu.md gets both, with the GPU's name and torch's version.

--tiny runs a few small batches of each, on whatever device there is (the test suite runs it on a CPU). Without a
GPU the table says so and is written only where --out says: bench/results/gpu.md holds GPU numbers only.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn, optim

from miniai.accel import precision_cbs
from miniai.conv import default_device
from miniai.data.fashion import fashion_dls
from miniai.learner import DeviceCB, MetricsCB, ProgressCB, TrainLearner
from miniai.app.recipe import build_model

with contextlib.redirect_stderr(io.StringIO()):
    from torcheval.metrics import MulticlassAccuracy

RESULTS = Path(__file__).parent / 'results'


def make_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))


def make_resnet() -> nn.Module:
    torch.manual_seed(0)
    return build_model('fashion_resnet_wide')


JOBS = {'mlp': dict(model=make_mlp, bs=64, opt=optim.SGD, lr=0.1, fast=False,
                    title='784-128-10 MLP, batch 64, SGD, fp32'),
        'resnet': dict(model=make_resnet, bs=256, opt=optim.AdamW, lr=1e-3, fast=True,
                       title="the wide ResNet `fashion_resnet_wide`, batch 256, AdamW, bf16 + channels-last")}


def hand_loop(model, dls, spec, device) -> float:
    """What a careful PyTorch user writes for the same work as the Learner: asynchronous copies of the batches,
    loss and accuracy summed on the device and read once per epoch; returns the validation accuracy."""
    fast, dev = spec['fast'], torch.device(device)
    model.to(dev, memory_format=torch.channels_last if fast else torch.preserve_format)
    opt = spec['opt'](model.parameters(), lr=spec['lr'])

    def one_batch(xb, yb, training: bool) -> torch.Tensor:
        "The batch's summed loss and number right, as a tensor on the device (nothing is read back here)."
        xb, yb = xb.to(dev, non_blocking=True), yb.to(dev, non_blocking=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=fast):
            preds = model(xb.contiguous(memory_format=torch.channels_last) if fast else xb)
            loss = F.cross_entropy(preds, yb)
        if training:
            loss.backward()
            opt.step()
            opt.zero_grad()
        return torch.stack([loss.detach().float() * len(yb), (preds.argmax(1) == yb).sum().float()])

    for training, dl in ((True, dls.train), (False, dls.valid)):
        model.train(training)
        with torch.set_grad_enabled(training):
            sums = [one_batch(xb, yb, training) for xb, yb in dl]
        loss_sum, correct = torch.stack(sums).sum(0).tolist()  # the one read of the epoch
    return correct / len(dls.valid.x)


def learner_loop(model, dls, spec, device) -> float:
    "The Learner with the callbacks a user would add; returns the validation accuracy."
    metrics = MetricsCB(accuracy=MulticlassAccuracy())
    cbs = [DeviceCB(device), metrics, ProgressCB(), *(precision_cbs('bf16-cl') if spec['fast'] else [])]
    learn = TrainLearner(model, dls, F.cross_entropy, lr=spec['lr'], opt_func=spec['opt'], cbs=cbs)
    with contextlib.redirect_stdout(io.StringIO()): learn.fit(1)
    return metrics.history[-1]['accuracy']


def _sync(device):
    if torch.device(device).type == 'cuda': torch.cuda.synchronize()


def run(job: str, rounds: int = 3, tiny: bool = False, device: str | None = None) -> list[dict]:
    "Alternate the four contenders of `job` for `rounds` counted rounds (after one warm-up round); a row each."
    spec, device = dict(JOBS[job]), device or default_device()
    if tiny: spec['bs'] = min(spec['bs'], 32)
    sizes = dict(n_train=2 * spec['bs'], n_valid=spec['bs']) if tiny else {}
    on_device, in_cpu = (fashion_dls(bs=spec['bs'], seed=0, device=d, **sizes) for d in (device, 'cpu'))
    data = {'on the GPU' if torch.device(device).type == 'cuda' else f'on the default device ({device})': on_device,
            'in CPU memory' + (', pinned' if in_cpu.train.pin_memory else ''): in_cpu}
    contenders = {(loop, where): (fn, dls) for where, dls in data.items()
                  for loop, fn in (('hand-written loop', hand_loop), ('miniai TrainLearner', learner_loop))}
    order = next(iter(data.values())).train.state_dict()
    times, accs = {k: [] for k in contenders}, {}
    for r in range(rounds + 1):  # round 0 warms up kernels, allocators and cuDNN's choices, and is not counted
        for key, (fn, dls) in contenders.items():
            model = spec['model']()
            dls.train.load_state_dict(order)  # every run sees the same shuffled order
            _sync(device)
            start = time.perf_counter()
            accs[key] = fn(model, dls, spec, device)
            _sync(device)
            if r: times[key].append(time.perf_counter() - start)
    n_images = len(in_cpu.train.x) + len(in_cpu.valid.x)
    rows = []
    for (loop, where), ts in times.items():
        secs = statistics.median(ts)
        base = statistics.median(times[('hand-written loop', where)])
        rows.append({'contender': loop, 'data': where, 'seconds': secs, 'images/s': n_images / secs,
                     'ratio': secs / base, 'valid accuracy': accs[(loop, where)]})
    return rows


def device_name(device: str) -> str:
    "The GPU's name, or a plain statement that this was not a GPU."
    if torch.device(device).type == 'cuda': return torch.cuda.get_device_name(torch.device(device))
    return f'no GPU: {device} (a check that the benchmark runs, not a GPU result)'


def table(rows, title) -> str:
    lines = [f'### {title}', '', '| contender | data | s/epoch (median) | images/s | ratio to hand loop, same data | '
             'valid accuracy |', '|---|---|---|---|---|---|']
    lines += [f"| {r['contender']} | {r['data']} | {r['seconds']:.3f} | {r['images/s']:,.0f} | {r['ratio']:.3f}x | "
              f"{r['valid accuracy']:.4f} |" for r in rows]
    return '\n'.join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--rounds', type=int, default=3)
    p.add_argument('--only', choices=tuple(JOBS), help='run one job (default: both)')
    p.add_argument('--tiny', action='store_true', help='a few small batches: checks that it runs, measures nothing')
    p.add_argument('--out', type=Path, default=None, help='where to write the tables (default: bench/results/gpu.md '
                                                          'on a GPU)')
    a = p.parse_args(argv)
    device = default_device()
    out = a.out
    if out is None:
        if torch.device(device).type != 'cuda':
            raise SystemExit(f'bench.gpu: no CUDA GPU here (default device {device}); bench/results/gpu.md holds GPU '
                             f'results only. Pass --out PATH (with --tiny) to check that the benchmark runs.')
        out = RESULTS / 'gpu.md'
    rounds = 1 if a.tiny else a.rounds
    head = (f'## Learner vs hand loop on {device_name(device)}\n\ntorch {torch.__version__} (built for CUDA '
            f'{torch.version.cuda}), {rounds} round(s) after a warm-up, one epoch of training and validation per run'
            + (', TINY: a few small batches' if a.tiny else ', the full 60,000 + 10,000 images'))
    mds = [head]
    for job in ([a.only] if a.only else JOBS):
        md = table(run(job, rounds, a.tiny, device), JOBS[job]['title'] + (' (tiny)' if a.tiny else ''))
        print(md, flush=True)
        mds.append(md)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text('\n\n'.join(mds) + '\n')
    print(f'wrote {out}')


if __name__ == '__main__': main()
