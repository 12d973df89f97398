"""Framework overhead: the same model, data, optimizer and seed through a hand-written loop and through miniai.

    python -m bench.overhead [--rounds 5] [--peers] [--only mlp|resnet]

Two jobs on in-memory Fashion-MNIST, SGD, fp32:
- mlp: one epoch of training and validation of a 784-128-10 MLP at batch 64 (where per-batch overhead shows most);
- resnet: the course's 5-stage ResNet (`fashion_resnet(nfs=(16, 32, 64, 128, 256), ks=3)`) at batch 1024 for a
  fixed number of batches (8 training, 2 validation), where the framework should cost nothing next to the convs.
The contenders are alternated round by round in one process so machine noise hits all alike; the table gives the
median seconds per run and the ratio to the hand-written loop. Every contender must end with the same validation
accuracy: the accuracy column is part of the check. With --peers, fastai and Lightning run the same job when
installed (`pip install -e '.[bench]'`).
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

from miniai.data.fashion import fashion_dls
from miniai.learner import DeviceCB, MetricsCB, ProgressCB, TrainLearner
from miniai.resnet import fashion_resnet

with contextlib.redirect_stderr(io.StringIO()):
    from torcheval.metrics import MulticlassAccuracy

RESULTS = Path(__file__).parent / 'results'


def make_model(seed: int = 0) -> nn.Module:
    "The MLP job's model."
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))


def make_resnet(seed: int = 0) -> nn.Module:
    "The ResNet job's model: the course's 5-stage ResNet."
    torch.manual_seed(seed)
    return fashion_resnet(nfs=(16, 32, 64, 128, 256), ks=3, bias=False)  # as measured in bench/results


JOBS = {'mlp': dict(model=make_model, bs=64, lr=0.1, n_train=None, n_valid=None,
                    title='784-128-10 MLP, batch 64, one epoch train + valid'),
        'resnet': dict(model=make_resnet, bs=1024, lr=0.1, n_train=8 * 1024, n_valid=2 * 1024,
                       title="course ResNet `fashion_resnet(nfs=(16,32,64,128,256), ks=3)`, batch 1024, "
                             "8 train + 2 valid batches")}


def hand_loop(model, dls, lr):
    "What a careful PyTorch user writes: the same work the Learner reports (loss and accuracy, train and valid)."
    opt = optim.SGD(model.parameters(), lr=lr)
    res = {}
    for training, dl in ((True, dls.train), (False, dls.valid)):
        model.train(training)
        loss_sum, correct, n = torch.zeros(()), torch.zeros((), dtype=torch.long), 0
        with torch.set_grad_enabled(training):
            for xb, yb in dl:
                preds = model(xb)
                loss = F.cross_entropy(preds, yb)
                if training:
                    loss.backward()
                    opt.step()
                    opt.zero_grad()
                loss_sum += loss.detach() * len(yb)
                correct += (preds.argmax(1) == yb).sum()
                n += len(yb)
        res['train' if training else 'valid'] = (correct.item() / n, loss_sum.item() / n)
    return res['valid'][0]


def miniai_loop(model, dls, lr):
    metrics = MetricsCB(accuracy=MulticlassAccuracy())
    learn = TrainLearner(model, dls, F.cross_entropy, lr=lr, cbs=[DeviceCB('cpu'), metrics, ProgressCB()])
    with contextlib.redirect_stdout(io.StringIO()): learn.fit(1)
    return metrics.history[-1]['accuracy']


def peers() -> dict:
    "fastai and Lightning doing the same job, for those installed."
    res = {}
    try: from bench.peers import fastai_loop, lightning_loop
    except ImportError: return res
    if fastai_loop is not None: res['fastai'] = fastai_loop
    if lightning_loop is not None: res['Lightning'] = lightning_loop
    return res


def run(rounds: int = 5, job: str = 'mlp', with_peers: bool = False) -> list[dict]:
    "Alternate the contenders on `job` (a key of `JOBS`) for `rounds` counted rounds; one row per contender."
    spec = JOBS[job]
    lr = spec['lr']
    dls = fashion_dls(bs=spec['bs'], seed=0, n_train=spec['n_train'], n_valid=spec['n_valid'], device='cpu')
    contenders = {'hand-written loop': hand_loop, 'miniai TrainLearner': miniai_loop}
    if with_peers: contenders.update(peers())
    times = {k: [] for k in contenders}
    accs = {}
    order = dls.train.state_dict()  # every run sees the same shuffled order
    for r in range(rounds + 1):  # round 0 warms up caches and allocators and is not counted
        for name, fn in contenders.items():
            model = spec['model']()
            dls.train.load_state_dict(order)
            start = time.perf_counter()
            accs[name] = fn(model, dls, lr)
            if r: times[name].append(time.perf_counter() - start)
    base = statistics.median(times['hand-written loop'])
    return [{'contender': k, 'seconds': statistics.median(v), 'ratio': statistics.median(v) / base,
             'valid accuracy': accs[k]} for k, v in times.items()]


def table(rows, title) -> str:
    lines = [f'### {title}', '', '| contender | s/run (median) | ratio to hand loop | valid accuracy |',
             '|---|---|---|---|']
    lines += [f"| {r['contender']} | {r['seconds']:.3f} | {r['ratio']:.3f}x | {r['valid accuracy']:.4f} |"
              for r in rows]
    return '\n'.join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--rounds', type=int, default=5)
    p.add_argument('--peers', action='store_true', help='also run fastai and Lightning when installed')
    p.add_argument('--only', choices=tuple(JOBS), help='run one job (default: both)')
    a = p.parse_args(argv)
    mds = []
    for job in ([a.only] if a.only else JOBS):
        rows = run(a.rounds, job, with_peers=a.peers)
        md = table(rows, f"{JOBS[job]['title']}, Fashion-MNIST, fp32, {a.rounds} rounds, torch {torch.__version__}, "
                         f"{torch.get_num_threads()} threads")
        print(md, flush=True)
        accs = {round(r['valid accuracy'], 4) for r in rows}
        if len(accs) != 1: md += f'\n\nContenders disagree on accuracy: {sorted(accs)}'
        mds.append(md)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / 'overhead.md').write_text('\n\n'.join(mds) + '\n')


if __name__ == '__main__': main()
