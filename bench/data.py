"""Data loading: the fast tensor loader against the course's per-item pipeline, and folders of images (your own data)
against torchvision's ImageFolder + DataLoader, each side by side in one run.

    python -m bench.data [--rounds 3] [--folder-rounds 2] [--workdir DIR] [--only tensor|folders] [--threads N]

1. The course's pipeline: `load_fashion_mnist()['train'].with_transform(...)` turning each PIL image into a
   normalised tensor, batched by a `torch.utils.data.DataLoader` with `collate_dict` (what `DataLoaders.from_dd`
   builds for a transformed dataset). The fast path: `fashion_dls()`, uint8 batched by tensor indexing and normalised
   per batch. Batch 1024, shuffled, every batch of the epoch touched; runs alternated, median reported. Target: 50x.
2. Folders of PNGs written by this script: a CIFAR-shaped set (50,000 + 10,000 32x32 colour images, each made of
   three Fashion-MNIST images as its red, green and blue, padded to 32) and Fashion-MNIST itself (60,000 + 10,000
   28x28 grey). miniai: `DataLoaders.from_folder` (first load: decode + cache; cached start: the cache read back),
   then one epoch of batches through `RandCropPad` and `RandFlip`. torchvision: `ImageFolder` with RandomCrop
   (same padding), RandomHorizontalFlip, ToTensor, Normalize, in a `DataLoader(num_workers=2, pin_memory=True)`.
   Batch 512, shuffled, CPU; epochs alternated, medians reported. Targets: an epoch >= 20x torchvision's; the first
   load <= 2x one torchvision epoch; memory held <= 1.1x the pixels' bytes (measured in a fresh process).
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torch import nn
from torch.utils.data import DataLoader

from miniai.augment import RandCropPad, RandFlip
from miniai.datasets import DataLoaders, collate_dict, inplace
from miniai.data.fashion import CLASSES, fashion_arrays, fashion_dls, load_fashion_mnist
from miniai.data.folders import write_image_folder

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


# --- folders of images -------------------------------------------------------------------------------------

FOLDER_TITLE = '### Your own images'


def cifar_shaped(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    "32x32 colour images from 28x28 grey ones: image i's red, green and blue are images i, i+1, i+2, padded by 2."
    rgb = torch.stack([x, x.roll(-1, 0), x.roll(-2, 0)], 1)
    return F.pad(rgb, (2, 2, 2, 2)), y


def write_sets(workdir: Path) -> dict:
    "Write the two folders of PNGs (once: kept in `workdir`); name -> (folder, pixel bytes, image size, padding)."
    arr = fashion_arrays()
    sets = {'CIFAR-shaped: 50,000 + 10,000 32x32 colour PNGs':
            ('cifar', {'train': cifar_shaped(arr['train'][0][:50000], arr['train'][1][:50000]),
                       'test': cifar_shaped(*arr['test'])}, 4),
            'Fashion-MNIST as 60,000 + 10,000 28x28 grey PNGs': ('fashion', arr, 2)}
    out = {}
    for name, (sub, splits, pad) in sets.items():
        root = workdir / sub
        if not (root / 'done').exists():
            start = time.perf_counter()
            for split, (x, y) in splits.items(): write_image_folder(root, x, y, CLASSES, split)
            (root / 'done').touch()
            print(f'wrote {root} in {time.perf_counter() - start:.0f} s', flush=True)
        x0 = splits['train'][0]
        out[name] = (root, sum(v[0].numel() for v in splits.values()), x0.shape[-1], pad)
    return out


def torchvision_loader(root: Path, bs: int, size: int, pad: int, mean, std):
    from torchvision import datasets as tvd, transforms as T
    tfm = T.Compose([T.RandomCrop(size, padding=pad), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])
    ds = tvd.ImageFolder(str(root / 'train'), transform=tfm, loader=_pil_loader)
    return DataLoader(ds, batch_size=bs, shuffle=True, num_workers=2, pin_memory=torch.cuda.is_available())


def _pil_loader(path):
    from PIL import Image
    with open(path, 'rb') as f:
        im = Image.open(f)
        return im.convert('RGB' if im.mode not in ('L', 'I;16') else 'L')  # keep grey images grey, as miniai does


def folder_epoch(dl, tfms, n: int) -> float:
    "Seconds for one epoch of `dl`, each batch through `tfms` (miniai's batch augmentations; none for torchvision)."
    start, seen = time.perf_counter(), 0
    for xb, yb in dl:
        xb = tfms(xb)
        assert xb.dtype == torch.float32 and yb.dtype == torch.int64 and xb.dim() == 4
        seen += len(xb)
    assert seen == n, (seen, n)
    return time.perf_counter() - start


def memory_probe(root: Path, cache: Path, bs: int, pad: int) -> dict:
    "In a fresh process: what loading from the cache and one epoch add to resident memory (anonymous and file pages)."
    code = f"""
import json, torch
from torch import nn
from miniai.datasets import DataLoaders
from miniai.augment import RandCropPad, RandFlip
def rss():
    st = dict(l.split(':') for l in open('/proc/self/status') if l.startswith(('RssAnon', 'RssFile')))
    return {{k: int(v.split()[0]) * 1024 for k, v in st.items()}}
before = rss()
dls = DataLoaders.from_folder({str(root)!r}, bs={bs}, device='cpu', seed=0, cache_dir={str(cache)!r})
tfm = nn.Sequential(RandCropPad({pad}), RandFlip())
for xb, yb in dls.train: tfm(xb)
after = rss()
held = sum(t.nbytes for dl in (dls.train, dls.valid) for t in (dl.x, dl.y))
print(json.dumps({{'anon': after['RssAnon'] - before['RssAnon'], 'file': after['RssFile'] - before['RssFile'],
                  'held': held}}))
"""
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def folder_rows(name: str, root: Path, n_pixels: int, size: int, pad: int, bs: int, rounds: int) -> list[str]:
    "Time the first load, a cached start and epochs of both pipelines on one folder; its rows of the table."
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        dls = DataLoaders.from_folder(root, bs=bs, device='cpu', seed=0, cache_dir=cache)
        first = time.perf_counter() - start
        start = time.perf_counter()
        dls = DataLoaders.from_folder(root, bs=bs, device='cpu', seed=0, cache_dir=cache)
        cached = time.perf_counter() - start
        start = time.perf_counter()
        tv = torchvision_loader(root, bs, size, pad, dls.mean, dls.std)
        scan = time.perf_counter() - start
        ours = nn.Sequential(RandCropPad(pad), RandFlip())
        n, threads = len(dls.train.x), torch.get_num_threads()
        times = {'tv': [], threads: [], 1: []}
        folder_epoch(dls.train, ours, n)  # warm-up of ours only: a torchvision epoch starts its workers afresh anyway
        for _ in range(rounds):
            times['tv'].append(folder_epoch(tv, lambda x: x, n))
            for t in (threads, 1):
                torch.set_num_threads(t)
                times[t].append(folder_epoch(dls.train, ours, n))
            torch.set_num_threads(threads)
        mem = memory_probe(root, Path(cache), bs, pad)
    tv_epoch = statistics.median(times['tv'])
    met = lambda ok: 'yes' if ok else '**no**'
    mb = lambda b: f'{b / 1e6:,.1f} MB'
    epochs = [f'| | one epoch, crop + flip ({n:,} images), miniai on {t} thread{"s" if t > 1 else ""} | '
              f'{tv_epoch:.1f} s ({n / tv_epoch:,.0f}/s) | {e:.2f} s ({n / e:,.0f}/s) | {tv_epoch / e:.0f}x faster | '
              f'>= 20x | {met(tv_epoch >= 20 * e)} |' for t in dict.fromkeys((threads, 1))
              for e in [statistics.median(times[t])]]
    return [f'| {name} | first load (decode + cache) | ImageFolder scan {scan:.2f} s | {first:.1f} s | '
            f'{first / tv_epoch:.2f}x one torchvision epoch | <= 2x | {met(first <= 2 * tv_epoch)} |',
            f'| | cached start | ImageFolder scan {scan:.2f} s | {cached:.2f} s | | | |', *epochs,
            f'| | memory held (fresh process) | | {mb(mem["held"])} for {mb(n_pixels)} of pixels; resident: '
            f'+{mb(mem["anon"])} anonymous, +{mb(mem["file"])} mapped file | {mem["held"] / n_pixels:.3f}x | <= 1.1x | '
            f'{met(mem["held"] <= 1.1 * n_pixels)} |']


def folder_table(rounds: int, bs: int, workdir: Path | None) -> str:
    "The folder benchmark on both sets, as one Markdown table."
    import torchvision  # noqa: F401  (imported before any timing: both sides use it, and it takes seconds)
    tmp = None
    if workdir is None: workdir = Path(tmp := tempfile.mkdtemp(prefix='miniai-bench-'))
    try:
        rows = [r for name, (root, n_pix, size, pad) in write_sets(workdir).items()
                for r in folder_rows(name, root, n_pix, size, pad, bs, rounds)]
    finally:
        if tmp is not None: shutil.rmtree(tmp, ignore_errors=True)
    return '\n'.join([f'{FOLDER_TITLE}: folders of PNGs, miniai `DataLoaders.from_folder` against torchvision '
                      f'`ImageFolder` + `DataLoader(num_workers=2, pin_memory=True)` (pinned only where there is a '
                      f'GPU: on a CPU it does nothing but warn; its workers run one thread each), batch {bs}, CPU, median of {rounds} alternated '
                      f'epochs; torch {torch.__version__}, {torch.get_num_threads()} threads; times in seconds', '',
                      '| data set | step | torchvision | miniai | miniai against torchvision | target | met |',
                      '|---|---|---|---|---|---|---|', *rows])


def tensor_table(rounds: int, bs: int) -> str:
    "The course's per-item pipeline against `fashion_dls`, one epoch each, as a Markdown table."
    dls = fashion_dls(bs=bs, device='cpu')  # both loaders serve CPU memory
    fast = dls.train
    slow = course_loader(bs, dls.mean, dls.std)
    epoch_seconds(fast)  # warm-up: the first epoch of each pays for page faults and allocator growth
    epoch_seconds(slow)
    times = {'per-item DataLoader over datasets (course)': [], 'miniai TensorDataLoader': []}
    for _ in range(rounds):
        times['per-item DataLoader over datasets (course)'].append(epoch_seconds(slow))
        times['miniai TensorDataLoader'].append(epoch_seconds(fast))
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med['per-item DataLoader over datasets (course)']
    lines = [f'### One epoch of Fashion-MNIST training data (60000 images), batch {bs}, shuffled, median of '
             f'{rounds} alternated runs; torch {torch.__version__}, {torch.get_num_threads()} threads, '
             f'num_workers=0', '',
             '| loader | s/epoch | images/s | speed-up |', '|---|---|---|---|']
    lines += [f'| {k} | {v:.3f} | {60000 / v:,.0f} | {base / v:.0f}x |' for k, v in med.items()]
    return '\n'.join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--rounds', type=int, default=3)
    p.add_argument('--bs', type=int, default=1024)
    p.add_argument('--folder-rounds', type=int, default=2, help='alternated epochs of each folder pipeline')
    p.add_argument('--folder-bs', type=int, default=512)
    p.add_argument('--workdir', type=Path, default=None, help='where to write the PNG folders (default: a temp dir)')
    p.add_argument('--only', choices=('tensor', 'folders'), default=None)
    p.add_argument('--threads', type=int, default=None,
                   help="torch's CPU threads for miniai's side (default: torch's choice; on a busy machine 1 is "
                        "often faster, since two threads wait for each other in every parallel region)")
    a = p.parse_args(argv)
    if a.threads is not None: torch.set_num_threads(a.threads)
    parts = []
    if a.only != 'folders': parts.append(tensor_table(a.rounds, a.bs))
    if a.only != 'tensor': parts.append(folder_table(a.folder_rounds, a.folder_bs, a.workdir))
    RESULTS.mkdir(exist_ok=True)
    old = (RESULTS / 'data.md').read_text() if (RESULTS / 'data.md').exists() else ''
    md = merge_tables(old, '\n\n'.join(parts))
    print(md)
    (RESULTS / 'data.md').write_text(md + '\n')


def merge_tables(old: str, new: str) -> str:
    "`old`'s tables with those of the same kind (tensor loader, folders) that `new` has replaced; tensor loader first."
    sections = lambda md: [t.strip() for t in re.split(r'^(?=### )', md, flags=re.M) if t.strip()]
    kind = lambda t: 'folders' if t.startswith(FOLDER_TITLE) else 'tensor'
    fresh = {kind(t) for t in sections(new)}
    keep = [t for t in sections(old) if kind(t) not in fresh] + sections(new)
    return '\n\n'.join(sorted(keep, key=lambda t: kind(t) == 'folders'))


if __name__ == '__main__': main()
