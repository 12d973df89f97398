"""Data loading: the fast tensor loader against the course's per-item pipeline, one epoch each.

    python -m bench.data [--rounds 3]

The course's pipeline: `load_fashion_mnist()['train'].with_transform(...)` turning each PIL image into a
normalised tensor, batched by a `torch.utils.data.DataLoader` with `collate_dict` (what `DataLoaders.from_dd`
builds). The fast path: `fashion_dls()`, normalised once and batched by tensor indexing. Batch 1024, shuffled,
every batch of the epoch touched; runs alternated, median reported. Target: at least 50x.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torchvision.transforms.functional as TF
from torch.utils.data import DataLoader

from miniai.datasets import collate_dict, inplace
from miniai.fashion import fashion_dls, load_fashion_mnist

RESULTS = Path(__file__).parent / 'results'


def course_loader(bs: int, mean: float, std: float):
    ds = load_fashion_mnist()['train']
    @inplace
    def to_tensor(b): b['image'] = [(TF.to_tensor(o) - mean) / std for o in b['image']]
    tds = ds.with_transform(to_tensor)
    return DataLoader(tds, batch_size=bs, shuffle=True, collate_fn=collate_dict(tds))


def epoch_seconds(dl) -> float:
    "Seconds to draw every batch of one epoch, checking that each is what a model would be fed."
    start, n = time.perf_counter(), 0
    for xb, yb in dl:
        assert xb.shape[1:] == (1, 28, 28) and xb.dtype == torch.float32 and yb.dtype == torch.int64
        n += len(xb)
    assert n == 60000, n
    return time.perf_counter() - start


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--rounds', type=int, default=3)
    p.add_argument('--bs', type=int, default=1024)
    a = p.parse_args(argv)
    dls = fashion_dls(bs=a.bs, device='cpu')  # both loaders serve CPU memory
    fast = dls.train
    slow = course_loader(a.bs, dls.mean, dls.std)
    epoch_seconds(fast)  # warm-up: the first epoch of each pays for page faults and allocator growth
    epoch_seconds(slow)
    times = {'per-item DataLoader over datasets (course)': [], 'miniai TensorDataLoader': []}
    for _ in range(a.rounds):
        times['per-item DataLoader over datasets (course)'].append(epoch_seconds(slow))
        times['miniai TensorDataLoader'].append(epoch_seconds(fast))
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med['per-item DataLoader over datasets (course)']
    lines = [f'### One epoch of Fashion-MNIST training data (60000 images), batch {a.bs}, shuffled, median of '
             f'{a.rounds} alternated runs; torch {torch.__version__}, {torch.get_num_threads()} threads, '
             f'num_workers=0', '',
             '| loader | s/epoch | images/s | speed-up |', '|---|---|---|---|']
    lines += [f'| {k} | {v:.3f} | {60000 / v:,.0f} | {base / v:.0f}x |' for k, v in med.items()]
    md = '\n'.join(lines)
    print(md)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / 'data.md').write_text(md + '\n')


if __name__ == '__main__': main()
