"""Photo augmentation on the CPU: miniai's `aug_transforms` on whole batches against torchvision.transforms.v2 applied
per item in DataLoader workers, side by side in one run.

    nice -n 5 python -m bench.augment [--rounds 5] [--n 1024] [--bs 64] [--size 224] [--workers 2] [--threads N]
                                      [--tiny]

The same pipeline on both sides, on 224x224 colour uint8 images (random pixels: the cost does not depend on them):
a random resized crop (scale 0.35..1, ratio 3/4..4/3) back to 224x224, a left-right flip (p 1/2), rotation up to 10
degrees and zoom up to 1.1 (p 0.75), a perspective warp of 0.2 (p 0.75), brightness and contrast up to 0.2 (p 0.75).
miniai: batches of 64 taken by indexing a shuffled order, augmented whole by `aug_transforms(size, min_scale=0.35)`
(one sampling; on the CPU one image at a time, on one thread, in the cache), uint8 in and out, in this process with
torch's threads as they are, and again with torch set to one thread (as each worker has): on the CPU the augmentation
works on one thread either way, so the two rows differ by noise and both count one core. torchvision: a `Dataset`
whose items go through `v2.Compose([...])` (RandomResizedCrop, RandomHorizontalFlip, RandomAffine, RandomPerspective,
ColorJitter), batched by `DataLoader(num_workers=2, persistent_workers=True)`: its workers started and warmed by
one epoch first. Epochs of `--n` images alternated for `--rounds` rounds; the median images per second is reported,
and per core (miniai's one thread against torchvision's worker processes), with the load average around the run (on
a shared machine each process gets its share of the cores, so the per-core figure is the steadier comparison).
Target: miniai >= 5x torchvision. Writes bench/results/augment.md (or `--results DIR`).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from miniai.data.warp import aug_transforms

RESULTS = Path(__file__).parent / 'results'


class PerItem(Dataset):
    "uint8 images [N, 3, H, W], each through torchvision's pipeline `tfm` when it is read (in a worker)."
    def __init__(self, x: torch.Tensor, tfm): self.x, self.tfm = x, tfm
    def __len__(self) -> int: return len(self.x)
    def __getitem__(self, i: int): return self.tfm(self.x[i]), 0


def torchvision_pipeline(size: int) -> v2.Compose:
    "fastai's default augmentations, with a random resized crop, as torchvision.transforms.v2 applies them per item."
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=(0.35, 1.), ratio=(3 / 4, 4 / 3), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.RandomAffine(degrees=10, scale=(1., 1.1))], p=0.75),
        v2.RandomPerspective(distortion_scale=0.2, p=0.75),
        v2.RandomApply([v2.ColorJitter(brightness=0.2, contrast=0.2)], p=0.75)])


def miniai_epoch(x: torch.Tensor, bs: int, aug) -> float:
    "Images per second through one shuffled epoch of whole-batch augmentation."
    start, n = time.perf_counter(), 0
    for idx in torch.randperm(len(x)).split(bs):
        out = aug(torch.index_select(x, 0, idx))
        assert out.dtype == torch.uint8 and out.shape[1:] == x.shape[1:]
        n += len(out)
    return n / (time.perf_counter() - start)


def torchvision_epoch(dl) -> float:
    "Images per second through one epoch of the per-item pipeline in DataLoader workers."
    start, n = time.perf_counter(), 0
    for xb, _ in dl:
        assert xb.dtype == torch.uint8
        n += len(xb)
    return n / (time.perf_counter() - start)


def measure(n: int, bs: int, size: int, workers: int, rounds: int) -> dict[str, list[float]]:
    "Images per second of each side, `rounds` alternated epochs each (torchvision's workers warmed first)."
    x = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    aug = aug_transforms(size, min_scale=0.35)
    dl = DataLoader(PerItem(x, torchvision_pipeline(size)), batch_size=bs, shuffle=True, num_workers=workers,
                    persistent_workers=workers > 0)
    torchvision_epoch(dl)
    miniai_epoch(x[:bs], bs, aug)
    threads = torch.get_num_threads()
    res = {'miniai': [], 'miniai, 1 thread': [], 'torchvision': []}
    for _ in range(rounds):
        res['miniai'].append(miniai_epoch(x, bs, aug))
        torch.set_num_threads(1)  # as each torchvision worker has
        try: res['miniai, 1 thread'].append(miniai_epoch(x, bs, aug))
        finally: torch.set_num_threads(threads)
        res['torchvision'].append(torchvision_epoch(dl))
    return res


def table(res: dict[str, list[float]], n: int, bs: int, size: int, workers: int, load: tuple) -> str:
    """The Markdown table of `measure`'s results: median images per second, spread, the ratio to torchvision, and the
    ratio per core (images/s over the threads or worker processes that made them); `load`: the 1-minute load
    averages before and after."""
    threads, base = torch.get_num_threads(), statistics.median(res['torchvision'])
    cores = {'miniai': 1, 'miniai, 1 thread': 1, 'torchvision': max(1, workers)}  # miniai works on one thread
    rows = [f'### Photo augmentation on the CPU: {size}x{size} colour uint8, batch {bs}, epochs of {n} images, '
            f'{len(res["miniai"])} alternated rounds, median',
            '', f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average '
            f'{load[0]:.1f} before and {load[1]:.1f} after; {threads} torch threads in the main process; torchvision '
            f'in {workers} DataLoader workers (one thread each)', '',
            '| pipeline | cores | images/s | range | vs torchvision | per core vs torchvision |',
            '|---|---|---|---|---|---|']
    names = {'miniai': f'miniai `aug_transforms` (whole batch), torch at {threads} threads',
             'miniai, 1 thread': 'miniai `aug_transforms`, torch at 1 thread',
             'torchvision': f'torchvision.transforms.v2 per item, {workers} workers'}
    for k, v in res.items():
        med = statistics.median(v)
        per_core = med / cores[k] / (base / cores['torchvision'])
        rows.append(f'| {names[k]} | {cores[k]} | {med:.0f} | {min(v):.0f}-{max(v):.0f} | {med / base:.1f}x | '
                    f'{per_core:.1f}x |')
    return '\n'.join(rows)


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--rounds', type=int, default=5)
    p.add_argument('--n', type=int, default=1024, help='images per epoch')
    p.add_argument('--bs', type=int, default=64)
    p.add_argument('--size', type=int, default=224)
    p.add_argument('--workers', type=int, default=2)
    p.add_argument('--threads', type=int, default=None,
                   help="torch's CPU threads for miniai's side (default: torch's choice); each worker has one")
    p.add_argument('--tiny', action='store_true', help='a few small images, one round: for the test that runs it')
    p.add_argument('--results', type=Path, default=RESULTS)
    a = p.parse_args(argv)
    if a.tiny: a.n, a.bs, a.size, a.rounds, a.workers = 32, 16, 32, 1, 0
    if a.threads is not None: torch.set_num_threads(a.threads)
    before = os.getloadavg()[0]
    res = measure(a.n, a.bs, a.size, a.workers, a.rounds)
    md = table(res, a.n, a.bs, a.size, a.workers, (before, os.getloadavg()[0]))
    print(md)
    a.results.mkdir(parents=True, exist_ok=True)
    (a.results / 'augment.md').write_text(md + '\n')
    return md


if __name__ == '__main__': main()
