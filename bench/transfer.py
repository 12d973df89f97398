"""Does transfer work? Measured here, without downloads.

    python -m bench.transfer            # ~15 min on 2 CPU cores with the bodies cached, ~27 min without
    python -m bench.transfer --tiny     # seconds: a smoke run on a few hundred images (the test uses it)

Pretraining: a small ResNet (four stride-2 `ResBlock`s, widths 16-128) is trained on all 30,000 training images of
Fashion-MNIST classes 0-4 for several epochs with flips and pad-and-crop, and its body saved under the cache folder
(`$MINIAI_CACHE/bench/transfer`, else ~/.cache/miniai/bench/transfer), keyed by its settings, so reruns skip it.
A torchvision `resnet18` (grey first convolution) is pretrained the same way on a subset of classes 0-4.

Transfer: on classes 5-9, with 20 and 100 training images per class drawn per seed, the pretrained body with a new head
is fine-tuned (`learn.fine_tune`) and the same network from scratch trained (`fit_one_cycle`) on the same images.
Each method's settings (fine-tune: total epochs, frozen epochs, base_lr; scratch: epochs, lr; from the same grid of
epochs) are chosen on a validation split, 100 other training images per class of classes 5-9 never used for training,
by mean validation accuracy over the seeds; the test set (5,000 images of classes 5-9) is used only to report the
chosen settings' accuracy, mean ± std over the seeds (`--seeds`, 6 by default). Both methods train on the same
images for a seed, so each seed's difference is a paired gain; the table gives their mean, standard deviation and a
95% interval for the mean (Student's t), and on how many seeds fine-tuning won. resnet18 fine-tunes through
torchvision's own `weights=` path (its state_dict placed in a temporary `$TORCH_HOME/hub/checkpoints` under the file
name of the weights' URL).
Last, the cost of a training step of resnet18 frozen and unfrozen: time and gradient memory.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn, optim

from miniai.callbacks.transform import augment_cb
from miniai.core.files import atomic_path
from miniai.core.learner import TrainLearner
from miniai.data.augment import RandCropPad, RandFlip
from miniai.data.dataloaders import DataLoaders
from miniai.data.fashion import fashion_arrays
from miniai.data.imagecache import cache_root
from miniai.data.loader import TensorDataLoader
from miniai.models.backbones import create_head
from miniai.models.resnet import ResBlock
from miniai.models.vision import vision_learner

RESULTS = Path(__file__).parent / 'results'
NFS = (16, 32, 64, 128)
MEAN, STD = 0.286, 0.353  # Fashion-MNIST's own, for every run alike
N_VALID = 100  # validation images per class of classes 5-9, carved from the training images
# Student's t, two-sided 95%, by degrees of freedom (n seeds - 1)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
       11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093}


def _pick(x, y, classes, per_class=None, seed=0, exclude=None):
    """Images of `classes` (labels renumbered from 0), `per_class` of each drawn with `seed` (all without), leaving out
    the indices in `exclude`; returns (images [N, 1, H, W], labels), or with `exclude` given also the indices taken."""
    g, idx = torch.Generator().manual_seed(seed), []
    for c in classes:
        i = (y == c).nonzero().flatten()
        if exclude is not None: i = i[~torch.isin(i, exclude)]
        idx.append(i if per_class is None else i[torch.randperm(len(i), generator=g)[:per_class]])
    idx = torch.cat(idx)
    return (x[idx].unsqueeze(1), y[idx] - min(classes)) if exclude is None else (x[idx].unsqueeze(1),
                                                                                   y[idx] - min(classes), idx)


def _dls(train, valid, bs, seed=0):
    return DataLoaders(TensorDataLoader(*train, bs, shuffle=True, seed=seed, mean=MEAN, std=STD),
                       TensorDataLoader(*valid, 512, mean=MEAN, std=STD))


def _eval_dl(data): return TensorDataLoader(*data, 512, mean=MEAN, std=STD)


def _few(data, n=50): return data[0][:n], data[1][:n]  # validation during the fits: only to see them run


def _accuracy(model, dl) -> float:
    model.eval()
    with torch.no_grad(): hits = sum((model(xb).argmax(1) == yb).sum().item() for xb, yb in dl)
    return hits / sum(len(yb) for _, yb in dl)


def small_body(nfs=NFS) -> nn.Sequential:
    "Four stride-2 ResBlocks (28 -> 2 pixels): cheap on a CPU, wide enough to learn general features."
    return nn.Sequential(*[ResBlock(ni, nf, stride=2, norm=nn.BatchNorm2d) for ni, nf in zip((1, *nfs), nfs)])


def _small(n_out, body=None):
    return nn.Sequential(small_body() if body is None else body, create_head(NFS[-1], n_out, hidden=64))


def _r18(n_out):
    import torchvision
    net = torchvision.models.resnet18(num_classes=n_out)
    net.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    return net


def pretrained_state(name: str, settings: dict, x, y, cache: Path | None) -> dict:
    """The state_dict of network `name` ('small': its body; 'resnet18': all of it) trained on classes 0-4 with
    `settings` (per_class, epochs, lr, bs), read from `cache` when a file for exactly these settings is there."""
    key = hashlib.sha1(json.dumps({'name': name, **settings}, sort_keys=True).encode()).hexdigest()[:12]
    path = None if cache is None else cache / f'{name}-{key}.pt'
    if path is not None and path.exists():
        print(f'pretrained {name}: read from {path}', flush=True)
        return torch.load(path, weights_only=True)
    t0 = time.time()
    torch.manual_seed(0)
    model = _small(5) if name == 'small' else _r18(5)
    dls = _dls(_pick(x, y, range(5), settings['per_class']), _pick(x, y, range(5), 20), settings['bs'])
    aug = augment_cb(RandFlip(), RandCropPad(2))
    TrainLearner(model, dls, F.cross_entropy, lr=settings['lr'], opt_func=optim.AdamW,
                 cbs=[aug]).fit_one_cycle(settings['epochs'], settings['lr'])
    state = model[0].state_dict() if name == 'small' else model.state_dict()
    print(f'pretrained {name} in {time.time() - t0:.0f} s', flush=True)
    if path is not None:
        with atomic_path(path) as tmp: torch.save(state, tmp)
    return state


def _fit(learn, how: str, cfg: dict) -> None:
    "Train `learn` by `cfg`: fine-tune (`epochs` in all, `freeze` of them frozen) or from scratch."
    if how == 'fine-tune': learn.fine_tune(cfg['epochs'] - cfg['freeze'], base_lr=cfg['lr'], freeze_epochs=cfg['freeze'])
    else: learn.fit_one_cycle(cfg['epochs'], cfg['lr'])


def configs(grid: dict) -> dict:
    "Every setting to try for each method, from `grid`'s lists (epochs and lrs shared, freeze for fine-tune only)."
    out = {'fine-tune': [], 'scratch': []}
    for e in grid['epochs']:
        for lr in grid['lr']:
            out['scratch'].append({'epochs': e, 'lr': lr})
            out['fine-tune'] += [{'epochs': e, 'freeze': f, 'lr': lr} for f in grid['freeze'] if f < e]
    return out


def transfer(make_learner, x, y, xt, yt, per_class, seeds, grid, test_n=None) -> dict:
    """For each method: every setting of `grid` trained on each seed's `per_class` images of classes 5-9, chosen by
    mean accuracy on the validation split, then that choice's test accuracies. `make_learner(how, dls)` builds."""
    valid = _pick(x, y, range(5, 10), N_VALID, seed=12345, exclude=torch.tensor([], dtype=torch.long))
    test = _pick(xt, yt, range(5, 10), test_n)
    out = {}
    for how, cfgs in configs(grid).items():
        best = None  # (validation score, setting, model, its state for each seed)
        for cfg in cfgs:
            accs, states = [], []
            for seed in seeds:
                train = _pick(x, y, range(5, 10), per_class, seed=seed + 1, exclude=valid[2])[:2]
                torch.manual_seed(seed)
                learn = make_learner(how, _dls(train, _few(test), min(32, len(train[0]) // 4), seed))
                _fit(learn, how, cfg)
                accs.append(_accuracy(learn.model, _eval_dl(valid[:2])))
                states.append({k: v.clone() for k, v in learn.model.state_dict().items()})
            score = statistics.mean(accs)
            print(f'  {how} {per_class}/class {cfg}: valid {100 * score:.1f}%', flush=True)
            if best is None or score > best[0]: best = (score, cfg, learn.model, states)
        score, cfg, model, tests = *best[:3], []
        for s in best[3]:
            model.load_state_dict(s)
            tests.append(_accuracy(model, _eval_dl(test)))
        out[how] = {'cfg': cfg, 'valid': score, 'test': tests}
    return out


def small_learner(body_state):
    "`make_learner` for the small ResNet: its pretrained body (fine-tune) or a fresh one (scratch), a new head."
    def make(how, dls):
        body = small_body()
        if how == 'fine-tune': body.load_state_dict(body_state)
        return TrainLearner(_small(5, body), dls, F.cross_entropy, lr=1e-2, opt_func=optim.AdamW)
    return make


def resnet18_learner(how, dls):
    "`make_learner` for resnet18 through `vision_learner` (pretrained by `weights=` under $TORCH_HOME for fine-tune)."
    learn = vision_learner(dls, 'resnet18', pretrained=how == 'fine-tune', normalize=False, n_out=5, cbs=[], hidden=64)
    learn.cbs = [c for c in learn.cbs if type(c).__name__ != 'DeviceCB']  # the CPU throughout
    return learn


def with_torchvision_weights(state: dict, fn):
    "Run `fn()` with resnet18's `state` saved where torchvision's `weights=` finds its download (a temporary TORCH_HOME)."
    import torchvision
    sd = dict(state)
    sd['conv1.weight'] = sd['conv1.weight'].repeat(1, 3, 1, 1) / 3  # stored as a 3-channel network, as downloaded
    sd['fc.weight'], sd['fc.bias'] = torch.zeros(1000, 512), torch.zeros(1000)
    with tempfile.TemporaryDirectory() as home:
        url = torchvision.models.ResNet18_Weights.DEFAULT.url
        (Path(home) / 'hub' / 'checkpoints').mkdir(parents=True)
        torch.save(sd, Path(home) / 'hub' / 'checkpoints' / url.rsplit('/', 1)[-1])
        old, os.environ['TORCH_HOME'] = os.environ.get('TORCH_HOME'), home
        try: return fn()
        finally:
            if old is None: os.environ.pop('TORCH_HOME', None)
            else: os.environ['TORCH_HOME'] = old


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


def _sd(v): return statistics.stdev(v) if len(v) > 1 else 0.0


def _ms(v, pct='%', sign=''): return f'{100 * statistics.mean(v):{sign}.1f}{pct} ± {100 * _sd(v):.1f}'


def _cfg(how, c):
    if how == 'scratch': return f"`fit_one_cycle({c['epochs']}, {c['lr']:g})`"
    return f"`fine_tune({c['epochs'] - c['freeze']}, base_lr={c['lr']:g}, freeze_epochs={c['freeze']})`"


def gain_interval(gains: list[float]) -> tuple[float, float]:
    "The 95% interval (Student's t) for the mean of paired `gains`; the mean twice for a single seed."
    m = statistics.mean(gains)
    if len(gains) < 2: return m, m
    if len(gains) - 1 not in T95: raise ValueError(f'gain_interval: at most {max(T95) + 1} seeds, got {len(gains)}')
    half = T95[len(gains) - 1] * _sd(gains) / len(gains) ** 0.5
    return m - half, m + half


def _row(net, per, r):
    ft, sc = r['fine-tune'], r['scratch']
    gains = [a - b for a, b in zip(ft['test'], sc['test'])]  # each seed's: the same training images for both
    per_seed = ' / '.join(f'{100 * g:+.1f}' for g in gains)
    lo, hi = gain_interval(gains)
    return (f"| {net} | {per} | {_ms(ft['test'])} | {_ms(sc['test'])} | {_ms(gains, pct='', sign='+')} "
            f"[{100 * lo:+.1f}, {100 * hi:+.1f}] | {sum(g > 0 for g in gains)} of {len(gains)} | {per_seed} | "
            f"{_cfg('fine-tune', ft['cfg'])} ({100 * ft['valid']:.1f}%) | {_cfg('scratch', sc['cfg'])} "
            f"({100 * sc['valid']:.1f}%) |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--tiny', action='store_true')
    p.add_argument('--out', default=str(RESULTS / 'transfer.md'))
    p.add_argument('--cache', default=str(cache_root() / 'bench' / 'transfer'),
                   help="folder of the pretrained bodies ('' for none: pretrain every time)")
    p.add_argument('--seeds', type=int, default=6, help='how many draws of training images (paired seeds) a row')
    p.add_argument('--threads', type=int, default=1,
                   help='torch threads (1: on a shared machine, 2 threads spin-wait on each other and run slower)')
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    arrays = fashion_arrays()
    (x, y), (xt, yt) = arrays['train'], arrays['test']
    cache, t0, load0 = Path(a.cache) if a.cache else None, time.time(), os.getloadavg()
    if a.tiny:
        seeds, pers, test_n = (0,), (20,), 20
        small_set = dict(per_class=40, epochs=1, lr=1e-2, bs=64)
        r18_set = dict(per_class=20, epochs=1, lr=2e-3, bs=64)
        grids = {20: dict(epochs=[2], freeze=[1], lr=[1e-2])}
        r18_grid = grids[20]
    else:
        seeds, pers, test_n = tuple(range(a.seeds)), (20, 100), None
        small_set = dict(per_class=None, epochs=5, lr=1e-2, bs=128)
        r18_set = dict(per_class=600, epochs=3, lr=2e-3, bs=128)
        # 100 a class: five times the steps an epoch, so the shorter fits only (the CPU time of a shared machine);
        # 20 a class: fits of up to 20 epochs and 6 frozen (the 3-seed run chose its grid's longest, 10 and 3)
        grids = {20: dict(epochs=[5, 10, 15, 20], freeze=[1, 3, 6], lr=[1e-2, 3e-2, 1e-1]),
                 100: dict(epochs=[5], freeze=[1, 2], lr=[3e-3, 1e-2, 3e-2, 1e-1])}
        r18_grid = dict(epochs=[6], freeze=[1, 3], lr=[2e-3, 1e-2])
    t = time.time()
    body = pretrained_state('small', small_set, x, y, cache)
    pre = time.time() - t
    lines = ['# Transfer: fine-tuning a pretrained backbone against training from scratch', '',
             f'`python -m bench.transfer{" --tiny" if a.tiny else f" --seeds {a.seeds}"} --threads {a.threads}`. Test accuracy on Fashion-MNIST classes 5-9 '
             f'(mean ± std over seeds {list(seeds)}, each seed its own draw of training images). Pretraining on '
             f'classes 0-4 (flips and pad-and-crop): small ResNet {small_set}; resnet18 {r18_set}. Settings chosen '
             f'on a validation split ({N_VALID} other training images a class of classes 5-9), by mean validation '
             f'accuracy over the seeds, from the grids (per images a class) {grids}; resnet18 {r18_grid}. '
             f'Validation accuracy of the chosen settings in brackets.', '',
             '| network | images per class | fine-tuned | from scratch | gain (points, ± std [95% interval]) | '
             'fine-tune won | gain per seed | fine-tune chosen | scratch chosen |', '|---|---|---|---|---|---|---|---|---|']
    for per in pers:
        r = transfer(small_learner(body), x, y, xt, yt, per, seeds, grids[per], test_n)
        lines.append(_row('small ResNet (16-128), body pretrained on all of classes 0-4', per, r))
        print(lines[-1], flush=True)
    t = time.time()
    r18 = pretrained_state('resnet18', r18_set, x, y, cache)
    pre += time.time() - t
    r = with_torchvision_weights(r18, lambda: transfer(resnet18_learner, x, y, xt, yt, 20, seeds, r18_grid, test_n))
    lines.append(_row(f"torchvision resnet18 via `weights=` (pretrained on {r18_set['per_class']} a class of 0-4)",
                      20, r))
    print(lines[-1], flush=True)
    cost = step_cost(bs=8 if a.tiny else 64, size=32 if a.tiny else 64, steps=2 if a.tiny else 5)
    lines += ['', f'A training step of resnet18 (batch {8 if a.tiny else 64}, {32 if a.tiny else 64}x'
              f'{32 if a.tiny else 64}, CPU), median:', '', '| | seconds a step | gradient memory |', '|---|---|---|']
    lines += [f'| {k} | {s:.3f} | {b / 2 ** 20:.1f} MiB |' for k, (s, b) in cost.items()]
    load1 = os.getloadavg()
    lines += ['', f'{os.cpu_count()} CPU cores ({a.threads} thread), torch {torch.__version__}, load average {load0[0]:.1f} at the start '
              f'and {load1[0]:.1f} at the end (shared machine); total time {time.time() - t0:.0f} s '
              f'of which {pre:.0f} s pretraining (near 0: read from the cache).']
    Path(a.out).write_text('\n'.join(lines) + '\n')
    print('\n'.join(lines[-8:]))


if __name__ == '__main__':
    main()
