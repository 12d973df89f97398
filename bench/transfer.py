"""Does transfer work? Measured here, without downloads.

    python -m bench.transfer            # a few minutes on 2 quiet CPU cores; writes bench/results/transfer.md
    python -m bench.transfer --tiny     # seconds: a smoke run on a few hundred images (the test uses it)

A small ResNet (`fashion_resnet` at widths 8-64) is trained on Fashion-MNIST classes 0-4 (all their 30,000 training
images, one epoch), its weights saved; then a new head is put on it and it is fine-tuned (`learn.fine_tune`: one frozen epoch, then
all at discriminative rates) on classes 5-9 with 20 and 100 images per class, against the same network from scratch
trained for as many epochs on the same images (`fit_one_cycle`). Accuracy is measured on the 5,000 test images of
classes 5-9; mean and spread over 3 seeds. The same fine-tune on a torchvision `resnet18`, pretrained the same way on a
subset of classes 0-4, goes through torchvision's own `weights=` path (its state_dict placed in a temporary
`$TORCH_HOME/hub/checkpoints` under the file name of the weights' URL). Last, the cost of a training step of resnet18
frozen and unfrozen: time and gradient memory.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import optim

from miniai.core.learner import TrainLearner
from miniai.data.dataloaders import DataLoaders
from miniai.data.fashion import fashion_arrays
from miniai.data.loader import TensorDataLoader
from miniai.models.backbones import create_head
from miniai.models.resnet import fashion_resnet
from miniai.models.vision import vision_learner

RESULTS = Path(__file__).parent / 'results'
NFS = (8, 16, 32, 64)


def _pick(x, y, classes, per_class=None, seed=0):
    "Images of `classes` (labels renumbered from 0), `per_class` of each drawn with `seed` (all without)."
    g, idx = torch.Generator().manual_seed(seed), []
    for c in classes:
        i = (y == c).nonzero().flatten()
        idx.append(i if per_class is None else i[torch.randperm(len(i), generator=g)[:per_class]])
    idx = torch.cat(idx)
    return x[idx].unsqueeze(1), y[idx] - min(classes)


def _dls(train, valid, bs, seed=0):
    mean, std = 0.286, 0.353  # Fashion-MNIST's own, for every run alike
    return DataLoaders(TensorDataLoader(*train, bs, shuffle=True, seed=seed, mean=mean, std=std),
                       TensorDataLoader(*valid, 512, mean=mean, std=std))


def _accuracy(model, dl) -> float:
    model.eval()
    with torch.no_grad(): hits = sum((model(xb).argmax(1) == yb).sum().item() for xb, yb in dl)
    return hits / sum(len(yb) for _, yb in dl)


def _small(n_out, pretrained_body=None):
    m = fashion_resnet(nfs=NFS, n_classes=5)
    body = m[:len(NFS)] if pretrained_body is None else pretrained_body  # the ResBlocks
    return torch.nn.Sequential(body, create_head(NFS[-1], n_out, hidden=64))


def pretrain(x, y, per_class, epochs, bs=128):
    "The small ResNet trained on classes 0-4: its conv body."
    torch.manual_seed(0)
    model = _small(5)
    dls = _dls(_pick(x, y, range(5), per_class), _pick(x, y, range(5), 20), bs)
    TrainLearner(model, dls, F.cross_entropy, lr=1e-2, opt_func=optim.AdamW).fit_one_cycle(epochs, 1e-2)
    return model[0]


def transfer_runs(x, y, xt, yt, body_state, per_class, seeds, epochs):
    "Accuracy on classes 5-9's test images: fine-tuned from the pretrained body, and from scratch, for each seed."
    test, out = _pick(xt, yt, range(5, 10)), {'fine-tune': [], 'scratch': []}
    for seed in seeds:
        train = _pick(x, y, range(5, 10), per_class, seed=seed + 1)
        bs = min(32, len(train[0]) // 4)
        for how in out:
            torch.manual_seed(seed)
            body = _small(5)[0]
            if how == 'fine-tune': body.load_state_dict(body_state)
            model = torch.nn.Sequential(body, create_head(NFS[-1], 5, hidden=64))
            learn = TrainLearner(model, _dls(train, _few(test), bs, seed),
                                 F.cross_entropy, lr=1e-2, opt_func=optim.AdamW)
            if how == 'fine-tune': learn.fine_tune(epochs - 1, base_lr=1e-2, freeze_epochs=1)
            else: learn.fit_one_cycle(epochs, 1e-2)
            out[how].append(_accuracy(learn.model, _test_dl(test)))
    return out


def _few(data, n=50): return data[0][:n], data[1][:n]  # validation during the fits: only to see it run


def _test_dl(test): return TensorDataLoader(*test, 512, mean=0.286, std=0.353)


def resnet18_runs(x, y, xt, yt, per_class, seeds, epochs, pre_per_class, pre_epochs):
    "resnet18: pretrained on classes 0-4 and saved where torchvision's `weights=` looks, then fine-tuned on 5-9."
    import torchvision
    test, out = _pick(xt, yt, range(5, 10), 200), {'fine-tune': [], 'scratch': []}
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=5)
    net.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    dls = _dls(_pick(x, y, range(5), pre_per_class), _pick(x, y, range(5), 20), 64)
    TrainLearner(net, dls, F.cross_entropy, lr=2e-3, opt_func=optim.AdamW).fit_one_cycle(pre_epochs, 2e-3)
    sd = net.state_dict()
    sd['conv1.weight'] = sd['conv1.weight'].repeat(1, 3, 1, 1) / 3  # stored as a 3-channel network, as downloaded
    sd['fc.weight'], sd['fc.bias'] = torch.zeros(1000, 512), torch.zeros(1000)
    with tempfile.TemporaryDirectory() as home:
        url = torchvision.models.ResNet18_Weights.DEFAULT.url
        (Path(home) / 'hub' / 'checkpoints').mkdir(parents=True)
        torch.save(sd, Path(home) / 'hub' / 'checkpoints' / url.rsplit('/', 1)[-1])
        old, os.environ['TORCH_HOME'] = os.environ.get('TORCH_HOME'), home
        try:
            for seed in seeds:
                train = _pick(x, y, range(5, 10), per_class, seed=seed + 1)
                for how in out:
                    torch.manual_seed(seed)
                    dls = _dls(train, _few(test), min(32, len(train[0]) // 4), seed)
                    learn = vision_learner(dls, 'resnet18', pretrained=how == 'fine-tune', normalize=False, n_out=5,
                                           cbs=[], hidden=64)
                    learn.cbs = [c for c in learn.cbs if type(c).__name__ != 'DeviceCB']  # the CPU throughout
                    if how == 'fine-tune': learn.fine_tune(epochs - 1, base_lr=2e-3, freeze_epochs=1)
                    else: learn.fit_one_cycle(epochs, 2e-3)
                    out[how].append(_accuracy(learn.model, _test_dl(test)))
        finally:
            if old is None: os.environ.pop('TORCH_HOME', None)
            else: os.environ['TORCH_HOME'] = old
    return out


def step_cost(bs=64, size=64, steps=5):
    "resnet18 on [bs, 3, size, size]: seconds a training step and bytes of gradients, frozen (head and BN) and not."
    dls = DataLoaders([(torch.zeros(bs, 3, size, size), torch.zeros(bs, dtype=torch.long))] * 2, [])
    dls.classes = list(range(10))
    learn = vision_learner(dls, 'resnet18', pretrained=False)
    model, opt, x, y = learn.model, optim.AdamW(learn.model.parameters()), *dls.train[0]
    rows = {}
    for how in ('unfrozen', 'frozen'):
        if how == 'frozen': learn.freeze()
        times = []
        for _ in range(steps + 1):
            t = time.perf_counter()
            F.cross_entropy(model(x), y).backward()
            grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
            opt.step()
            opt.zero_grad()
            times.append(time.perf_counter() - t)
        rows[how] = (statistics.median(times[1:]), grad_bytes)
    return rows


def _ms(v): return f'{100 * statistics.mean(v):.1f}% ± {100 * (statistics.stdev(v) if len(v) > 1 else 0):.1f}'


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--tiny', action='store_true')
    p.add_argument('--out', default=str(RESULTS / 'transfer.md'))
    a = p.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    arrays = fashion_arrays()
    (x, y), (xt, yt) = arrays['train'], arrays['test']
    if a.tiny: xt, yt = xt[:500], yt[:500]
    seeds, epochs, t0 = ((0,) if a.tiny else (0, 1, 2)), (2 if a.tiny else 6), time.time()
    body = pretrain(x, y, 40 if a.tiny else None, 1)
    print(f'pretrained in {time.time() - t0:.0f} s', flush=True)
    lines = ['# Transfer: fine-tuning a pretrained backbone against training from scratch', '',
             f'`python -m bench.transfer{" --tiny" if a.tiny else ""}` ({os.cpu_count()} CPU cores, '
             f'torch {torch.__version__}). Test accuracy on Fashion-MNIST classes 5-9 (mean ± std over seeds '
             f'{list(seeds)}), {epochs} epochs each: fine-tune = `fine_tune({epochs - 1}, freeze_epochs=1)`, '
             f'scratch = `fit_one_cycle({epochs})`.', '',
             '| network | images per class | fine-tuned | from scratch |', '|---|---|---|---|']
    for per in ((20,) if a.tiny else (20, 100)):
        r = transfer_runs(x, y, xt, yt, body.state_dict(), per, seeds, epochs)
        lines.append(f'| small ResNet (pretrained on classes 0-4, all images) | {per} | {_ms(r["fine-tune"])} | '
                     f'{_ms(r["scratch"])} |')
        print(lines[-1], flush=True)
    r = resnet18_runs(x, y, xt, yt, 20, seeds[:1] if a.tiny else seeds, 2 if a.tiny else 5, 20 if a.tiny else 300,
                      1)
    lines.append(f'| torchvision resnet18 via `weights=` (pretrained on classes 0-4, '
                 f'{20 if a.tiny else 300} a class, 1 epoch) | 20 | {_ms(r["fine-tune"])} | {_ms(r["scratch"])} |')
    print(lines[-1], flush=True)
    cost = step_cost(bs=8 if a.tiny else 64, size=32 if a.tiny else 64, steps=2 if a.tiny else 5)
    lines += ['', f'A training step of resnet18 (batch {8 if a.tiny else 64}, {32 if a.tiny else 64}x'
              f'{32 if a.tiny else 64}, CPU), median:', '', '| | seconds a step | gradient memory |', '|---|---|---|']
    lines += [f'| {k} | {s:.3f} | {b / 2 ** 20:.1f} MiB |' for k, (s, b) in cost.items()]
    lines += ['', f'Total time: {time.time() - t0:.0f} s.']
    Path(a.out).write_text('\n'.join(lines) + '\n')
    print('\n'.join(lines[-6:]))


if __name__ == '__main__':
    main()
