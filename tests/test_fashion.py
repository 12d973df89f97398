"""Fashion-MNIST: the real files, their checks, the arrow cache and the fast tensor loader."""
import gzip
import re
import struct

import numpy as np
import pytest
import torch

from miniai.data import fashion
from miniai.data.fashion import (CLASSES, FILES, FashionMNISTNotFound, fashion_arrays, fashion_dls,
                                 find_fashion_mnist, load_fashion_mnist, read_idx)
from miniai.data.loader import TensorDataLoader

REAL = find_fashion_mnist()
needs_data = pytest.mark.skipif(REAL is None, reason='Fashion-MNIST is not installed (make data)')


@pytest.fixture(scope='module')
def built(tmp_path_factory):
    "The DatasetDict built into a fresh cache (via $MINIAI_CACHE), once for this module; yields it and the cache."
    if REAL is None: pytest.skip('Fashion-MNIST is not installed (make data)')
    cache = tmp_path_factory.mktemp('cache')
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv('MINIAI_CACHE', str(cache))
        yield load_fashion_mnist(), cache


# --- the real data -------------------------------------------------------------------------------------------

def test_dataset_dict_has_the_hub_layout(built):
    import datasets as hf
    dd, _ = built
    assert {k: len(v) for k, v in dd.items()} == {'train': 60000, 'test': 10000}
    for ds in dd.values():
        assert isinstance(ds.features['image'], hf.Image)
        assert isinstance(ds.features['label'], hf.ClassLabel) and ds.features['label'].names == CLASSES
    im = dd['test'][0]['image']
    assert im.size == (28, 28) and im.mode == 'L'
    x, y = fashion_arrays()['test']
    assert torch.equal(torch.from_numpy(np.array(im)), x[0])
    assert dd['test'][:50]['label'] == y[:50].tolist()
    assert np.array_equal(np.array(dd['train'][59999]['image']), fashion_arrays()['train'][0][59999].numpy())


def test_second_load_comes_from_the_cache(built, monkeypatch):
    _, cache = built
    entries = [p.name for p in cache.iterdir()]
    assert len(entries) == 1 and entries[0].startswith('fashion_mnist-'), 'one cache, no leftover temp folder'
    monkeypatch.setattr(fashion, '_build', lambda arrays: pytest.fail('rebuilt instead of loading the cache'))
    monkeypatch.setattr(fashion, '_read_split', lambda *a: pytest.fail('read the IDX files again'))
    fashion._arrays.cache_clear()
    again = load_fashion_mnist()
    assert len(again['train']) == 60000 and again['train'].cache_files[0]['filename'].startswith(str(cache))


def test_cache_is_keyed_on_content(tmp_path):
    if REAL is None: pytest.skip('needs the real files')
    copy = tmp_path / 'copy'
    copy.mkdir()
    for n in fashion._NAMES: (copy / fashion._file(REAL, n).name).symlink_to(fashion._file(REAL, n))
    key = lambda p: fashion._content_key(fashion._source(p))
    assert key(copy) == key(REAL), 'the same bytes elsewhere share the cache'
    other = fake_folder(tmp_path / 'other')
    assert key(other) != key(REAL), 'other data never reuses it'


def test_a_failed_build_leaves_no_cache(monkeypatch, tmp_path):
    fake_folder(tmp_path / 'data')
    def boom(arrays): raise RuntimeError('crash while building')
    monkeypatch.setattr(fashion, '_build', boom)
    with pytest.raises(RuntimeError, match='crash'):
        load_fashion_mnist(tmp_path / 'data', cache_dir=tmp_path / 'cache')
    assert list((tmp_path / 'cache').iterdir()) == []


@needs_data
def test_arrays_sizes_dtypes_and_classes():
    arr = fashion_arrays()
    for split, n in (('train', 60000), ('test', 10000)):
        x, y = arr[split]
        assert x.shape == (n, 28, 28) and x.dtype == torch.uint8 and y.dtype == torch.int64
        assert torch.bincount(y).tolist() == [n // 10] * 10
    assert fashion_arrays()['train'][0] is arr['train'][0], 'decoded once per process'


@needs_data
def test_normalisation_uses_training_statistics():
    dls = fashion_dls(bs=60000, shuffle=False, device='cpu')
    raw = fashion_arrays()['train'][0].double() / 255
    assert dls.mean == pytest.approx(raw.mean().item(), rel=1e-4) and 0.28 < dls.mean < 0.29
    assert dls.std == pytest.approx(raw.std().item(), rel=1e-4) and 0.35 < dls.std < 0.36
    xb, yb = next(iter(dls.train))
    assert xb.shape == (60000, 1, 28, 28) and xb.dtype == torch.float32
    assert abs(xb.mean().item()) < 1e-3 and abs(xb.std().item() - 1) < 1e-3
    xv, _ = next(iter(dls.valid))
    assert torch.allclose(xv[:5, 0] * dls.std + dls.mean, fashion_arrays()['test'][0][:5].float() / 255, atol=1e-5)


@needs_data
def test_default_batches_match_the_course():
    dls = fashion_dls()
    xb, yb = next(iter(dls.train))
    assert xb.shape == (1024, 1, 28, 28) and yb.shape == (1024,) and yb.dtype == torch.int64
    assert len(dls.train) == 59 and len(dls.valid) == 10 and len(dls.train.dataset) == 60000
    assert dls.train.batch_size == dls.train.bs == 1024 and dls.classes == CLASSES


@needs_data
def test_shuffling_is_seeded_and_changes_each_epoch():
    a, b = fashion_dls(bs=512, seed=3).train, fashion_dls(bs=512, seed=3).train
    ya1, yb1 = [y for _, y in a], [y for _, y in b]
    assert all(torch.equal(p, q) for p, q in zip(ya1, yb1))
    ya2 = [y for _, y in a]
    assert not torch.equal(torch.cat(ya1), torch.cat(ya2))
    assert torch.equal(torch.cat(ya1).sort().values, torch.cat(ya2).sort().values)  # same items, new order
    assert not torch.equal(next(iter(fashion_dls(bs=512, seed=4).train))[1], ya1[0])
    v = fashion_dls(bs=512, seed=3, device='cpu').valid
    assert torch.equal(torch.cat([y for _, y in v]), fashion_arrays()['test'][1]), 'validation is not shuffled'


@needs_data
def test_set_seed_makes_an_unseeded_loader_reproducible():
    from miniai.activations import set_seed
    set_seed(1)
    a = next(iter(fashion_dls(bs=256).train))[1]
    set_seed(1)
    assert torch.equal(a, next(iter(fashion_dls(bs=256).train))[1])


@needs_data
def test_state_dict_repeats_the_next_epoch():
    dl = fashion_dls(bs=1000, seed=0, n_train=5000).train
    list(dl)
    sd = dl.state_dict()
    first = [y for _, y in dl]
    dl2 = fashion_dls(bs=1000, seed=0, n_train=5000).train  # fresh: would replay epoch 0 without the state
    dl2.load_state_dict(sd)
    second = [y for _, y in dl2]
    assert all(torch.equal(p, q) for p, q in zip(first, second)) and len(second) == 5
    assert dl2.epochs_drawn == 2
    assert not torch.equal(second[0], next(iter(fashion_dls(bs=1000, seed=0, n_train=5000).train))[1])


@needs_data
def test_drop_last_and_subsets():
    dls = fashion_dls(bs=300, n_train=1000, n_valid=500, drop_last=True, seed=1)
    assert len(dls.train) == 3 and [len(y) for _, y in dls.train] == [300] * 3
    assert [len(y) for _, y in dls.valid] == [300, 200]
    assert [len(y) for _, y in fashion_dls(bs=300, n_train=1000, seed=1).train] == [300, 300, 300, 100]
    y = torch.cat([y for _, y in fashion_dls(bs=1000, n_train=5000, seed=1).train])
    assert (torch.bincount(y, minlength=10) > 350).all(), 'a random subset keeps every class'
    with pytest.raises(ValueError, match='n_train must be >= 1'):
        fashion_dls(n_train=0)


# --- the loader on small synthetic data ----------------------------------------------------------------------

def test_shards_are_disjoint_and_cover_the_epoch():
    x, y = torch.arange(103).float().unsqueeze(1), torch.arange(103)
    parts = [TensorDataLoader(x, y, bs=10, shuffle=True, seed=5, rank=r, world_size=2) for r in range(2)]
    for epoch in range(2):
        seen = [torch.cat([b for _, b in p]) for p in parts]
        assert len(parts[0]) == len(parts[1]) == 6 and len(seen[0]) == len(seen[1]) == 51
        assert not set(seen[0].tolist()) & set(seen[1].tolist())
        assert len(set(seen[0].tolist()) | set(seen[1].tolist())) == 102, 'all but n % world_size items'
    x4, y4 = torch.arange(100).float().unsqueeze(1), torch.arange(100)
    four = [torch.cat([b for _, b in TensorDataLoader(x4, y4, bs=8, shuffle=True, seed=1, rank=r, world_size=4)])
            for r in range(4)]
    assert sorted(torch.cat(four).tolist()) == list(range(100))
    with pytest.raises(ValueError, match='rank 2'):
        TensorDataLoader(x, y, rank=2, world_size=2)


def test_batches_are_fresh_tensors():
    x, y = torch.arange(10.).unsqueeze(1), torch.arange(10)
    dl = TensorDataLoader(x, y, bs=4)
    for xb, _ in dl: xb.zero_()
    assert torch.equal(x, torch.arange(10.).unsqueeze(1)), 'changing a batch in place leaves the data alone'


def test_device_keeps_the_data_there():
    dev = 'cuda' if torch.cuda.is_available() else 'cpu'
    dl = TensorDataLoader(torch.zeros(10, 2), torch.arange(10), bs=4, shuffle=True, seed=0, device=dev)
    xb, yb = next(iter(dl))
    assert xb.device.type == yb.device.type == dl.device.type == dev


def test_loader_rejects_bad_arguments():
    with pytest.raises(ValueError, match='3 inputs but 2 targets'):
        TensorDataLoader(torch.zeros(3, 1), torch.zeros(2))
    with pytest.raises(ValueError, match='bs must be >= 1'):
        TensorDataLoader(torch.zeros(3, 1), torch.zeros(3), bs=0)


# --- every error path, on fabricated files ------------------------------------------------------------------

def write_idx(path, arr: torch.Tensor, magic=None, gz=True):
    magic = magic if magic is not None else 0x800 + arr.dim()
    data = struct.pack('>I', magic) + struct.pack(f'>{arr.dim()}I', *arr.shape) + arr.to(torch.uint8).numpy().tobytes()
    if gz:
        with gzip.open(f'{path}.gz', 'wb', compresslevel=1) as f: f.write(data)
    else: path.write_bytes(data)


def fake_folder(folder, n_test=10000):
    "A valid-looking set of IDX files: blank images, labels 0..9 in turn."
    folder.mkdir(exist_ok=True)
    for split, (imgs, labels, n) in FILES.items():
        n = n_test if split == 'test' else n
        write_idx(folder / imgs, torch.zeros(n, 28, 28, dtype=torch.uint8), gz=False)
        write_idx(folder / labels, torch.arange(n) % 10, gz=False)
    return folder


@pytest.fixture
def nowhere(monkeypatch, tmp_path):
    "No local source, and a hub that fails as it does offline."
    import datasets
    monkeypatch.delenv('MINIAI_DATA', raising=False)
    monkeypatch.setattr(fashion, 'DEBIAN_DIR', tmp_path / 'nothing')
    def offline(*a, **k): raise ConnectionError("Couldn't reach 'fashion_mnist' on the Hub")
    monkeypatch.setattr(datasets, 'load_dataset', offline)


def test_missing_everywhere_names_package_variable_and_files(nowhere):
    for load in (load_fashion_mnist, fashion_arrays):
        with pytest.raises(FashionMNISTNotFound) as e:
            load()
        msg = str(e.value)
        assert 'apt-get install dataset-fashion-mnist' in msg and 'MINIAI_DATA' in msg and 'hub' in msg
        assert all(n in msg for n in fashion._NAMES)
        assert isinstance(e.value, FileNotFoundError)


def test_hub_is_the_last_resort(nowhere, monkeypatch, built):
    import datasets
    dd = built[0]
    small = datasets.DatasetDict(train=dd['train'].select(range(600)), test=dd['test'].select(range(100)))
    monkeypatch.setattr(datasets, 'load_dataset', lambda name: small if name == 'fashion_mnist' else None)
    # the hub's counts are checked like the files': expect this subset's, to keep the test quick
    monkeypatch.setattr(fashion, 'FILES', {s: (*v[:2], len(small[s])) for s, v in FILES.items()})
    assert find_fashion_mnist() is None
    assert load_fashion_mnist() is small
    fashion._arrays.cache_clear()
    try:
        x, y = fashion_arrays()['test']
        assert x.shape == (100, 28, 28) and x.dtype == torch.uint8 and y.dtype == torch.int64
        assert torch.equal(x, read_idx(fashion._file(REAL, 't10k-images-idx3-ubyte'), 3)[:100])
        assert y.tolist() == small['test']['label']
    finally: fashion._arrays.cache_clear()


def test_explicit_bad_path_is_an_error_naming_it(tmp_path):
    with pytest.raises(FashionMNISTNotFound, match=re.escape(str(tmp_path)) + '.*lacks train-images-idx3-ubyte'):
        fashion_arrays(tmp_path)
    (tmp_path / 'f').write_text('')
    with pytest.raises(FashionMNISTNotFound, match='not a folder'):
        load_fashion_mnist(tmp_path / 'f')


def test_env_variable_is_a_source_and_never_skipped(monkeypatch, tmp_path):
    fake_folder(tmp_path / 'data')
    monkeypatch.setenv('MINIAI_DATA', str(tmp_path / 'data'))
    assert find_fashion_mnist() == (tmp_path / 'data').resolve()
    x, y = fashion_arrays()['train']
    assert x.sum() == 0 and len(y) == 60000
    monkeypatch.setenv('MINIAI_DATA', str(tmp_path / 'wrong'))
    with pytest.raises(FashionMNISTNotFound, match='MINIAI_DATA.*wrong'):
        fashion_arrays()


def test_gzip_and_plain_files_read_alike(tmp_path):
    arr = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8)
    write_idx(tmp_path / 'a', arr, gz=False)
    write_idx(tmp_path / 'a', arr, gz=True)
    assert torch.equal(read_idx(tmp_path / 'a', 3), arr) and torch.equal(read_idx(tmp_path / 'a.gz', 3), arr)


def test_truncated_file(tmp_path):
    fake_folder(tmp_path)
    p = tmp_path / 'train-images-idx3-ubyte'
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(ValueError, match='train-images-idx3-ubyte.*truncated'):
        fashion_arrays(tmp_path)
    p.write_bytes(b'\0\0\x08')
    with pytest.raises(ValueError, match='truncated.*too short'):
        fashion_arrays(tmp_path)


def test_truncated_gzip(tmp_path):
    write_idx(tmp_path / 'x', torch.zeros(100, 28, 28))
    gz = tmp_path / 'x.gz'
    gz.write_bytes(gz.read_bytes()[:40])
    with pytest.raises(ValueError, match='x.gz.*truncated'):
        read_idx(gz, 3)


def test_wrong_magic_number_and_dimension_count(tmp_path):
    fake_folder(tmp_path)
    write_idx(tmp_path / 'train-labels-idx1-ubyte', torch.arange(60000) % 10, magic=0x12345678, gz=False)
    with pytest.raises(ValueError, match='train-labels-idx1-ubyte: magic number 0x12345678'):
        fashion_arrays(tmp_path)
    fake_folder(tmp_path)
    write_idx(tmp_path / 't10k-images-idx3-ubyte', torch.zeros(10000, 784), gz=False)  # 2 dimensions
    with pytest.raises(ValueError, match=r't10k-images-idx3-ubyte: magic number 0x00000802.*3 dimension'):
        fashion_arrays(tmp_path)


def test_count_mismatch(tmp_path):
    fake_folder(tmp_path)
    write_idx(tmp_path / 't10k-labels-idx1-ubyte', torch.arange(9999) % 10, gz=False)
    with pytest.raises(ValueError, match='10000 images but .*t10k-labels.* 9999 labels'):
        fashion_arrays(tmp_path)


def test_wrong_total_count(tmp_path):
    fake_folder(tmp_path, n_test=500)
    with pytest.raises(ValueError, match='500 images, expected 10000 for the test split'):
        fashion_arrays(tmp_path)


def test_label_out_of_range(tmp_path):
    fake_folder(tmp_path)
    labels = torch.arange(60000) % 10
    labels[123] = 12
    write_idx(tmp_path / 'train-labels-idx1-ubyte', labels, gz=False)
    with pytest.raises(ValueError, match='train-labels-idx1-ubyte: label 12 is outside 0..9'):
        fashion_arrays(tmp_path)


def test_wrong_image_size(tmp_path):
    fake_folder(tmp_path)
    write_idx(tmp_path / 'train-images-idx3-ubyte', torch.zeros(60000, 14, 56), gz=False)  # same bytes, other shape
    with pytest.raises(ValueError, match=r'train-images-idx3-ubyte: images are \(14, 56\), expected 28x28'):
        fashion_arrays(tmp_path)


def test_constant_images_cannot_be_normalised(tmp_path):
    fake_folder(tmp_path)
    with pytest.raises(ValueError, match='cannot be normalised'):
        fashion_dls(path=tmp_path)
