"""Folders of images into the fast loader (`DataLoaders.from_folder`), on Fashion-MNIST written out as PNGs: read back
bitwise, colour and JPEG, the cache (kept, rebuilt when a file changes or the cache is damaged, memory-mapped), the
valid_pct split, every bad input with its one message, and the main job on a folder (`--data`)."""
import contextlib
import io
import json
import os
import re
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from miniai.data import imagecache
from miniai.core.events import Callback
from miniai.app.cli import main
from miniai.data.decode import ImageDataError
from miniai.datasets import DataLoaders
from miniai.data.fashion import CLASSES, FILES, fashion_arrays, fashion_dls, find_fashion_mnist
from miniai.data.decode import png_bytes
from miniai.data.folders import folder_images, write_image_folder

needs_data = pytest.mark.skipif(find_fashion_mnist() is None, reason='Fashion-MNIST is not installed (make data)')
N_TRAIN, N_VALID, SEED = 2000, 1000, 42  # 60,000 and 10,000 are whole multiples (see subset_as_idx)
#: class folders named so that sorting them keeps Fashion-MNIST's label numbers ('0 T - shirt _ top', '1 Trouser'...)
FOLDERS = [f'{i} {c}' for i, c in enumerate(CLASSES)]
MODEL = 'seed002_resnet'  # the main job's smallest network: the comparison is about the data, not the model


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    "Every test gets an empty image cache of its own."
    monkeypatch.setenv('MINIAI_CACHE', str(tmp_path / 'cache'))
    return tmp_path / 'cache'


@pytest.fixture(scope='module')
def fashion_folder(tmp_path_factory):
    """The Fashion-MNIST subset that `fashion_dls(n_train=N_TRAIN, n_valid=N_VALID, seed=SEED)` picks, written once as
    PNGs in the ImageFolder layout (train/ and test/); yields the folder and the subset's tensors."""
    if find_fashion_mnist() is None: pytest.skip('Fashion-MNIST is not installed (make data)')
    arr = fashion_arrays()
    gen = torch.Generator().manual_seed(SEED)  # the draws fashion_dls makes for its subsets, in its order
    it, iv = torch.randperm(60000, generator=gen)[:N_TRAIN], torch.randperm(10000, generator=gen)[:N_VALID]
    sub = {'train': (arr['train'][0][it], arr['train'][1][it], it),
           'test': (arr['test'][0][iv], arr['test'][1][iv], iv)}
    root = tmp_path_factory.mktemp('fashion_png')
    for split, (x, y, _) in sub.items(): write_image_folder(root, x, y, FOLDERS, split)
    return root, sub


def folder_order(y: torch.Tensor) -> torch.Tensor:
    "The order the folder is read in: by class folder (`FOLDERS` sort as the labels do), then file name (index)."
    return torch.tensor(sorted(range(len(y)), key=lambda i: (int(y[i]), i)))


@needs_data
def test_fashion_mnist_as_pngs_reads_back_bitwise(fashion_folder):
    root, sub = fashion_folder
    dls = DataLoaders.from_folder(root, bs=256, device='cpu', seed=0)
    assert dls.classes == dls.vocab == [c.replace('/', '_') for c in FOLDERS] == sorted(dls.classes)
    for dl, split in ((dls.train, 'train'), (dls.valid, 'test')):
        x, y, _ = sub[split]
        order = folder_order(y)
        assert dl.x.dtype == torch.uint8 and dl.x.shape == (len(x), 1, 28, 28)
        assert torch.equal(dl.x[:, 0], x[order]), 'pixels'
        assert [dls.classes[i] for i in dl.y] == [FOLDERS[i].replace('/', '_') for i in y[order]], 'labels'
    # statistics of the training split, exact; the loaders hold the pixels once (no float copy)
    raw = sub['train'][0].double() / 255
    assert dls.mean[0] == pytest.approx(raw.mean().item(), abs=1e-7)
    assert dls.std[0] == pytest.approx(raw.std(correction=0).item(), abs=1e-7)
    held = sum(t.nbytes for dl in (dls.train, dls.valid) for t in (dl.x, dl.y))
    assert held <= 1.1 * (N_TRAIN + N_VALID) * 28 * 28
    xb, yb = next(iter(dls.train))
    assert xb.dtype == torch.float32 and xb.shape == (256, 1, 28, 28)
    assert abs(xb.mean().item()) < 0.15 and abs(xb.std().item() - 1) < 0.15


@needs_data
def test_the_cache_is_kept_memory_mapped_and_rebuilt_when_a_file_changes(fashion_folder, monkeypatch):
    root, sub = fashion_folder
    first = folder_images(root)
    files = list((Path(os.environ['MINIAI_CACHE']) / 'images').glob('*.u8'))
    assert len(files) == 1
    maps = Path('/proc/self/maps')
    if maps.exists():  # the pixels are the file's pages, mapped, not a copy read into memory
        ptr = first.x.data_ptr()
        spans = [[int(a, 16) for a in l.split()[0].split('-')] for l in maps.read_text().splitlines()
                 if l.endswith(str(files[0]))]
        assert any(lo <= ptr < hi for lo, hi in spans), 'the images are not mapped from the cache file'
    with monkeypatch.context() as m:
        m.setattr(imagecache, '_fill', lambda *a: pytest.fail('decoded again instead of reading the cache'))
        again = folder_images(root)
        assert torch.equal(again.x, first.x) and torch.equal(again.y, first.y)
    # a file changes (same name, new pixels): the cache is stale and rebuilt, never trusted
    changed = sorted((root / 'train' / '8 Bag').iterdir())[0]
    old = changed.read_bytes()
    try:
        changed.write_bytes(png_bytes(torch.full((1, 28, 28), 7, dtype=torch.uint8))[0])
        after = folder_images(root)
        i = sorted((root / 'train').rglob('*.png')).index(changed)
        assert (after.x[i] == 7).all() and not torch.equal(first.x[i], after.x[i])
        assert len(list(files[0].parent.glob('*.u8'))) == 1, 'rebuilt in place, not beside the stale one'
    finally: changed.write_bytes(old)


@needs_data
def test_a_damaged_cache_is_rebuilt_with_a_warning(fashion_folder):
    root, _ = fashion_folder
    good = folder_images(root)
    x0 = good.x.clone()
    file = next((Path(os.environ['MINIAI_CACHE']) / 'images').glob('*.u8'))
    del good
    data = bytearray(file.read_bytes())
    data[12345] ^= 0xFF  # one flipped pixel byte
    file.write_bytes(data)
    with pytest.warns(UserWarning, match='rebuilding the damaged image cache .*pixels checksum mismatch'):
        assert torch.equal(folder_images(root).x, x0)
    file.write_bytes(file.read_bytes()[:-100])  # cut short
    with pytest.warns(UserWarning, match='rebuilding the damaged image cache .*(truncated|bytes)'):
        assert torch.equal(folder_images(root).x, x0)


def test_colour_grey_palette_alpha_and_jpeg(tmp_path):
    g = torch.Generator().manual_seed(0)
    rgb = torch.randint(0, 256, (6, 3, 12, 10), generator=g, dtype=torch.uint8)
    root = tmp_path / 'colour'
    files = write_image_folder(root, rgb, torch.tensor([0, 1, 0, 1, 0, 1]), ['cat', 'dog'])
    write_image_folder(root, rgb[:4], torch.tensor([0, 1, 0, 1]), ['cat', 'dog'], 'valid')
    dls = DataLoaders.from_folder(root, bs=4, device='cpu')
    order = torch.tensor([0, 2, 4, 1, 3, 5])  # cat's files, then dog's
    assert dls.train.x.shape == (6, 3, 12, 10) and torch.equal(dls.train.x, rgb[order])
    assert len(dls.mean) == len(dls.std) == 3 and dls.mean[0] != dls.mean[1]
    # a grey PNG, a palette PNG and an RGBA PNG among colour ones: all become RGB
    Image.fromarray(rgb[2, 0].numpy()).save(files[2])                           # grey
    Image.fromarray(rgb[4].permute(1, 2, 0).numpy()).convert('P').save(files[4])  # palette
    rgba = np.concatenate([rgb[0].permute(1, 2, 0).numpy(), np.full((12, 10, 1), 9, np.uint8)], -1)
    Image.fromarray(rgba).save(files[0])
    x = folder_images(root).x
    assert torch.equal(x[1], rgb[2, :1].expand(3, -1, -1)), 'grey becomes three equal channels'
    pal = np.array(Image.open(files[4]).convert('RGB'))
    assert torch.equal(x[2], torch.from_numpy(pal).permute(2, 0, 1)), 'a palette image is its colours, not indices'
    assert torch.equal(x[0], rgb[0]), 'alpha is dropped'
    # JPEGs: decoded as PIL decodes them (both use libjpeg; the IDCT may differ by a level)
    jroot = tmp_path / 'jpeg'
    for split in ('train', 'valid'):
        for i in range(4):
            d = jroot / split / ('ab'[i % 2])
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rgb[i].permute(1, 2, 0).numpy()).save(d / f'{i}.jpg', quality=95)
    jx = folder_images(jroot).x
    ref = np.array(Image.open(jroot / 'train' / 'a' / '0.jpg'))
    assert jx.shape == (8, 3, 12, 10) and (jx[0].permute(1, 2, 0).int() - torch.from_numpy(ref).int()).abs().max() <= 1


def test_valid_pct_is_a_seeded_split_of_a_folder_of_classes(tmp_path):
    x = torch.arange(40, dtype=torch.uint8).view(40, 1, 1, 1).expand(40, 1, 4, 4).contiguous()
    y = torch.arange(40) % 4
    write_image_folder(tmp_path / 'src', x, y, ['a', 'b', 'c', 'd'])
    root = tmp_path / 'src' / 'train'  # class folders directly, no train/ or valid/
    dls = DataLoaders.from_folder(root, valid_pct=0.25, bs=8, device='cpu', seed=1)
    tr, va = dls.train.x[:, 0, 0, 0].tolist(), dls.valid.x[:, 0, 0, 0].tolist()
    assert len(tr) == 30 and len(va) == 10 and sorted(tr + va) == list(range(40)), 'disjoint, together everything'
    assert all(dls.classes[c] == 'abcd'[v % 4] for v, c in zip(va, dls.valid.y.tolist())), 'labels follow the images'
    again = DataLoaders.from_folder(root, valid_pct=0.25, bs=8, device='cpu', seed=1)
    other = DataLoaders.from_folder(root, valid_pct=0.25, bs=8, device='cpu', seed=2)
    assert again.valid.x[:, 0, 0, 0].tolist() == va and other.valid.x[:, 0, 0, 0].tolist() != va
    # different sizes need size=: each image is scaled to cover it and its centre cropped
    Image.fromarray(np.full((8, 6), 200, np.uint8)).save(root / 'a' / 'big.png')
    with pytest.raises(ImageDataError, match=r'big.png is 6x8 \(WxH\) but .* is 4x4: images of different sizes '
                                             r'need size='):
        folder_images(root, valid_pct=0.25)
    sized = folder_images(root, valid_pct=0.25, size=2)
    assert sized.x.shape == (41, 1, 2, 2) and 200 in sized.x.unique().tolist()


def bad(tmp_path, build) -> str:
    "The message of the one error `from_folder` gives on the folder `build(root)` makes."
    root = tmp_path / 'bad'
    x, y = torch.zeros(4, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 1, 0, 1])
    write_image_folder(root, x, y, ['a', 'b'])
    write_image_folder(root, x, y, ['a', 'b'], 'valid')
    build(root)
    with pytest.raises(ImageDataError) as e: DataLoaders.from_folder(root, device='cpu')
    return str(e.value)


def test_each_bad_input_is_one_error_naming_the_file_or_folder(tmp_path, capsys):
    def truncated(r): (r / 'train/a/0.png').write_bytes((r / 'train/a/0.png').read_bytes()[:40])
    assert re.fullmatch(r'.*/train/a/0\.png: cannot be decoded \(.+\); the file is truncated, damaged or not the '
                        r'image its name says', bad(tmp_path / '1', truncated))
    def not_an_image(r): (r / 'train/b/1.png').write_text('hello')
    assert re.fullmatch(r'.*/train/b/1\.png: cannot be decoded \(.*Unsupported image file.*\); .*',
                        bad(tmp_path / '2', not_an_image))
    def empty_class(r): [f.unlink() for f in (r / 'valid/b').iterdir()]
    assert re.fullmatch(r'class folder .*/valid/b has no images \(\.png, \.jpg, \.jpeg, \.gif, \.webp\)',
                        bad(tmp_path / '3', empty_class))
    def one_class(r): __import__('shutil').rmtree(r / 'train/b')
    assert re.fullmatch(r'.*/train has one class folder \(a\): a classifier needs at least two',
                        bad(tmp_path / '4', one_class))
    def no_classes(r): [__import__('shutil').rmtree(d) for d in (r / 'train').iterdir()]
    assert re.fullmatch(r".*/train has no class folders: put each class's images in a folder named after it "
                        r'\(.*/train/<class>/<image>\.png\)', bad(tmp_path / '5', no_classes))
    def other_classes(r): (r / 'valid/b').rename(r / 'valid/c')
    assert re.fullmatch(r'.*/valid has other classes than .*/train: only in valid: c; only in train: b',
                        bad(tmp_path / '6', other_classes))
    def different_sizes(r): Image.fromarray(np.zeros((5, 4), np.uint8)).save(r / 'train/b/3.png')
    assert re.fullmatch(r'.*/train/b/3\.png is 4x5 \(WxH\) but .*/train/a/0\.png is 4x4: images of different sizes '
                        r'need size= \(--size on the command line\) to be resized to one size',
                        bad(tmp_path / '7', different_sizes))
    def no_valid(r): __import__('shutil').rmtree(r / 'valid')
    assert re.fullmatch(r".*/bad has no 'valid' or 'test' folder: add one with the same class folders as .*/train, "
                        r'or hold out part of the training images with valid_pct=0\.2 \(--valid-pct 0\.2\)',
                        bad(tmp_path / '8', no_valid))
    with pytest.raises(ImageDataError, match=r'^.*/nowhere: no such folder$'):
        DataLoaders.from_folder(tmp_path / 'nowhere')
    (tmp_path / 'a_file').write_text('x')  # a cache folder that cannot be made (running as root, modes do not stop it)
    with pytest.MonkeyPatch.context() as m, pytest.raises(ImageDataError, match=r"cannot write in the image cache's "
                                                                                r'folder .*/a_file/images .*MINIAI_CACHE'):
        m.setenv('MINIAI_CACHE', str(tmp_path / 'a_file'))
        DataLoaders.from_folder(tmp_path / '1' / 'bad' / 'train', valid_pct=0.5)
    # files that are not images are skipped and counted, in one line
    root = tmp_path / 'extras'
    x = torch.arange(64, dtype=torch.uint8).view(4, 1, 4, 4)
    write_image_folder(root, x, torch.tensor([0, 1, 0, 1]), ['a', 'b'])
    (root / 'train/a/notes.txt').write_text('x')
    (root / 'train/README.md').write_text('x')
    capsys.readouterr()
    assert len(DataLoaders.from_folder(root, valid_pct=0.5, device='cpu').train.x) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(r'miniai: skipped 2 file\(s\) that are not images \(by their names\) in .*/extras: '
                        r'train/README\.md, train/a/notes\.txt\n', err), err


def test_the_command_line_reports_bad_folders_in_one_line(tmp_path, capsys):
    x, y = torch.zeros(4, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 1, 0, 1])
    write_image_folder(tmp_path / 'd', x, y, ['a', 'b'])
    assert main(['train', '--data', tmp_path / 'd', '--out', tmp_path / 'run']) == 2
    err = capsys.readouterr().err
    assert err.startswith('miniai: error: ') and err.count('\n') == 1 and "has no 'valid' or 'test' folder" in err
    assert main(['train', '--data', tmp_path / 'nothing', '--out', tmp_path / 'run']) == 2
    assert re.fullmatch(r'miniai: error: .*/nothing: no such folder\n', capsys.readouterr().err)


def subset_as_idx(folder: Path, sub: dict) -> None:
    """Fashion-MNIST IDX files in `folder` made of the subset alone, repeated to the full counts, with one copy at the
    positions `fashion_dls` draws its subset from, in the order the folder of PNGs reads them: the Fashion-MNIST path
    then picks the same images in the same order, and (all else being copies) measures the same statistics."""
    for split, (imgs, labels, count) in FILES.items():
        sx, sy, idx = sub[split]
        order = folder_order(sy)
        rest = torch.ones(count, dtype=torch.bool)
        rest[idx] = False
        x, y = torch.empty(count, 28, 28, dtype=torch.uint8), torch.empty(count, dtype=torch.int64)
        x[idx], y[idx] = sx[order], sy[order]
        x[rest], y[rest] = sx.repeat(count // len(sx) - 1, 1, 1), sy.repeat(count // len(sy) - 1)
        for name, t in ((imgs, x), (labels, y)):
            t = t.to(torch.uint8)
            head = (0x800 + t.dim()).to_bytes(4, 'big') + b''.join(d.to_bytes(4, 'big') for d in t.shape)
            (folder / name).write_bytes(head + t.numpy().tobytes())


@needs_data
def test_one_epoch_on_the_folder_matches_the_fashion_mnist_path(fashion_folder, tmp_path, monkeypatch):
    "The main job on the folder against the main job on Fashion-MNIST's files holding the same images (see above)."
    root, sub = fashion_folder
    subset_as_idx(tmp_path, sub)
    monkeypatch.setenv('MINIAI_DATA', str(tmp_path))
    # one thread: two stall in every parallel region when other jobs share the two cores (seconds become a minute)
    common = ['--epochs', 1, '--bs', 64, '--seed', SEED, '--average', 'none', '--no-tta', '--no-summary',
              '--model', MODEL, '--threads', 1]
    fash = fashion_dls(bs=64, n_train=N_TRAIN, n_valid=N_VALID, seed=SEED, device='cpu')
    fold = DataLoaders.from_folder(root, bs=64, device='cpu', seed=SEED)
    assert torch.equal(fash.train.x, fold.train.x), 'the same images in the same order'
    assert torch.equal(fash.train.y, fold.train.y), 'the same labels: the folders sort in label order'
    assert (fash.mean, fash.std) == (fold.mean[0], fold.std[0]), 'the same statistics: so the same batches'
    res, threads = {}, torch.get_num_threads()
    try:
        for name, data in (('fashion', ['--data', 'fashion', '--n-train', N_TRAIN, '--n-valid', N_VALID]),
                           ('folder', ['--data', root])):
            with contextlib.redirect_stdout(io.StringIO()) as out:
                assert main(['train', *data, *common, '--out', tmp_path / name]) == 0
            res[name] = json.loads((tmp_path / name / 'result.json').read_text())
            assert res[name]['data'] == str(data[1]) and f'Data: {data[1]} ({N_TRAIN} training and' in out.getvalue()
    finally: torch.set_num_threads(threads)
    assert res['fashion']['accuracy'] > 0.6, 'one epoch learned something'
    assert abs(res['folder']['accuracy'] - res['fashion']['accuracy']) <= 0.01, res


class StopAt(Callback):
    "Sends SIGTERM to this process after training batch `it` of epoch `epoch`."
    def __init__(self, epoch, it): self.at = (epoch, it)
    def after_batch(self, learn):
        if learn.training and (learn.epoch, learn.iter) == self.at: os.kill(os.getpid(), signal.SIGTERM)


@needs_data
def test_a_resumed_fit_on_folder_data_ends_bitwise_equal(fashion_folder, tmp_path):
    "The main job's Learner (augmentation, EMA, one-cycle) on memory-mapped folder data, stopped mid-epoch."
    from miniai.activations import set_seed
    from miniai.runs.interrupt import Interrupted
    from miniai.app.recipe import make_learner
    root, _ = fashion_folder
    def learner(out):
        set_seed(0)
        dls = DataLoaders.from_folder(root, bs=256, device='cpu', seed=0)
        model = nn.Sequential(nn.Conv2d(1, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                              nn.Linear(8 * 14 * 14, 10))
        learn, _ = make_learner(model, dls, 2, 1e-2, 'fp32', 'crop-flip', out, average='ema')
        return learn
    weights = lambda l: {k: v.clone() for k, v in l.model.state_dict().items()}
    ref = learner(tmp_path / 'ref')
    with contextlib.redirect_stdout(io.StringIO()): ref.fit(2)
    stopped = learner(tmp_path / 'run')
    with pytest.raises(Interrupted) as e, contextlib.redirect_stdout(io.StringIO()): stopped.fit(2, cbs=[StopAt(1, 1)])
    assert e.value.position['epoch'] == 1 and e.value.position['batch'] == 2
    resumed = learner(tmp_path / 'run')
    with contextlib.redirect_stdout(io.StringIO()): resumed.fit(2, resume=e.value.checkpoint)
    a, b = weights(ref), weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.cuda
@needs_data
def test_folder_data_is_normalised_and_augmented_on_the_gpu(fashion_folder):
    """On the GPU (data there) and from CPU memory (pinned uint8 batches delivered to the GPU and normalised there):
    the CPU's numbers."""
    from miniai.augment import RandCropPad, RandFlip
    root, _ = fashion_folder
    cpu = DataLoaders.from_folder(root, bs=256, device='cpu', shuffle=False)
    want = next(iter(cpu.train))[0]
    assert want.device.type == 'cpu', 'a loader asked for CPU data yields CPU batches, pinned or not'
    for device in ('cuda', 'cpu'):
        dls = DataLoaders.from_folder(root, bs=256, device=device, shuffle=False, pin_memory=device == 'cpu')
        xb, yb = next(iter(dls.train))
        assert xb.device.type == yb.device.type == device, 'both halves of a batch where the data is'
        dls.train.deliver_to('cuda')  # as DeviceCB does for each epoch of its fit
        xb, yb = next(iter(dls.train))
        assert xb.device.type == yb.device.type == 'cuda' and xb.dtype == torch.float32, device
        assert torch.equal(xb.cpu(), want), device
        out = nn.Sequential(RandCropPad(2), RandFlip())(xb)
        assert out.device.type == 'cuda' and out.shape == xb.shape
        assert dls.train.x.dtype == torch.uint8 and dls.train.x.device.type == ('cuda' if device == 'cuda' else 'cpu')
