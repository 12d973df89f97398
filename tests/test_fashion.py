"""Fashion-MNIST: the real files, their checks, the arrow cache and the fast tensor loader."""
import gzip
import shutil
import struct

import numpy as np
import pytest
import torch

from miniai import fashion
from miniai.fashion import (CLASSES, FILES, FashionMNISTNotFound, TensorDataLoader, fashion_arrays, fashion_dls,
                            find_fashion_mnist, load_fashion_mnist, read_idx)

REAL = find_fashion_mnist()
pytestmark = pytest.mark.skipif(REAL is None, reason='Fashion-MNIST is not installed (make data)')


@pytest.fixture(scope='module')
def dd(tmp_path_factory):
    "The DatasetDict built into a fresh cache, once for this module."
    mp = pytest.MonkeyPatch()
    mp.setenv('MINIAI_CACHE', str(tmp_path_factory.mktemp('cache')))
    yield load_fashion_mnist()
    mp.undo()


def test_dataset_dict_has_the_hub_layout(dd):
    assert {k: len(v) for k, v in dd.items()} == {'train': 60000, 'test': 10000}
    assert dd['train'].features['label'].names == CLASSES
    im = dd['test'][0]['image']
    assert im.size == (28, 28) and im.mode == 'L'
    x, y = fashion_arrays()['test']
    assert torch.equal(torch.from_numpy(np.array(im)), x[0])
    assert dd['test'][0]['label'] == int(y[0])


def test_second_load_comes_from_the_cache(dd, monkeypatch, tmp_path):
    cache = tmp_path / 'c'
    monkeypatch.setenv('MINIAI_CACHE', str(cache))
    load_fashion_mnist()
    built = list(cache.iterdir())
    assert len(built) == 1 and built[0].name.startswith('fashion_mnist-')
    monkeypatch.setattr(fashion, '_build', lambda arrays: pytest.fail('rebuilt instead of loading the cache'))
    again = load_fashion_mnist()
    assert len(again['train']) == 60000


def test_arrays_sizes_dtypes_and_classes():
    arr = fashion_arrays()
    for split, n in (('train', 60000), ('test', 10000)):
        x, y = arr[split]
        assert x.shape == (n, 28, 28) and x.dtype == torch.uint8 and y.dtype == torch.int64
        assert torch.bincount(y).tolist() == [n // 10] * 10


def test_normalisation_uses_training_statistics():
    dls = fashion_dls(bs=60000)
    raw = fashion_arrays()['train'][0].float() / 255
    assert dls.mean == pytest.approx(raw.mean().item()) and 0.28 < dls.mean < 0.29
    assert dls.std == pytest.approx(raw.std().item()) and 0.35 < dls.std < 0.36
    xb, yb = next(iter(fashion_dls(bs=60000, shuffle=False).train))
    assert xb.shape == (60000, 1, 28, 28) and xb.dtype == torch.float32
    assert abs(xb.mean().item()) < 1e-3 and abs(xb.std().item() - 1) < 1e-3


def test_default_batches_match_the_course():
    dls = fashion_dls()
    xb, yb = next(iter(dls.train))
    assert xb.shape == (1024, 1, 28, 28) and yb.shape == (1024,) and yb.dtype == torch.int64
    assert len(dls.train) == 59 and len(dls.valid) == 10 and len(dls.train.dataset) == 60000


def test_shuffling_is_seeded_and_changes_each_epoch():
    a, b = fashion_dls(bs=512, seed=3).train, fashion_dls(bs=512, seed=3).train
    ya1, yb1 = [y for _, y in a], [y for _, y in b]
    assert all(torch.equal(p, q) for p, q in zip(ya1, yb1))
    ya2 = [y for _, y in a]
    assert not torch.equal(torch.cat(ya1), torch.cat(ya2))
    assert torch.equal(torch.cat(ya1).sort().values, torch.cat(ya2).sort().values)  # same items, new order
    c = fashion_dls(bs=512, seed=4).train
    assert not torch.equal(next(iter(c))[1], ya1[0])


def test_set_seed_makes_an_unseeded_loader_reproducible():
    from miniai.activations import set_seed
    set_seed(1)
    a = next(iter(fashion_dls(bs=256).train))[1]
    set_seed(1)
    assert torch.equal(a, next(iter(fashion_dls(bs=256).train))[1])


def test_state_dict_repeats_the_next_epoch():
    dl = fashion_dls(bs=1000, seed=0, n_train=5000).train
    list(dl)
    sd = dl.state_dict()
    first = [y for _, y in dl]
    dl2 = fashion_dls(bs=1000, seed=0, n_train=5000).train  # fresh: would replay epoch 0 without the state
    dl2.load_state_dict(sd)
    second = [y for _, y in dl2]
    assert all(torch.equal(p, q) for p, q in zip(first, second)) and len(second) == 5
    assert not torch.equal(second[0], next(iter(fashion_dls(bs=1000, seed=0, n_train=5000).train))[1])


def test_drop_last_and_subsets():
    dls = fashion_dls(bs=300, n_train=1000, n_valid=500, drop_last=True, seed=1)
    assert len(dls.train) == 3 and [len(y) for _, y in dls.train] == [300] * 3
    assert [len(y) for _, y in dls.valid] == [300, 200]
    y = torch.cat([y for _, y in fashion_dls(bs=1000, n_train=5000, seed=1).train])
    assert (torch.bincount(y, minlength=10) > 350).all(), 'a random subset keeps every class'


def test_shards_are_disjoint_and_cover_the_epoch():
    x, y = torch.arange(103).float().unsqueeze(1), torch.arange(103)
    parts = [TensorDataLoader(x, y, bs=10, shuffle=True, seed=5, rank=r, world_size=2) for r in range(2)]
    seen = [torch.cat([b for _, b in p]) for p in parts]
    assert len(parts[0]) == len(parts[1]) == 6
    assert len(seen[0]) == len(seen[1]) == 51
    assert not set(seen[0].tolist()) & set(seen[1].tolist())
    with pytest.raises(ValueError, match='rank 2'):
        TensorDataLoader(x, y, rank=2, world_size=2)


def test_loader_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match='3 inputs but 2 targets'):
        TensorDataLoader(torch.zeros(3, 1), torch.zeros(2))


# --- every error path, on fabricated files ------------------------------------------------------------------

def write_idx(path, arr: torch.Tensor, magic=None, gz=True):
    ndim = arr.dim()
    magic = magic if magic is not None else (0x803 if ndim == 3 else 0x801)
    data = struct.pack('>I', magic) + struct.pack(f'>{ndim}I', *arr.shape) + arr.to(torch.uint8).numpy().tobytes()
    if gz:
        with gzip.open(f'{path}.gz', 'wb') as f: f.write(data)
    else: path.write_bytes(data)


def fake_folder(tmp_path, n_train=60000, n_test=10000, **bad):
    for split, (imgs, labels, _) in FILES.items():
        n = n_train if split == 'train' else n_test
        write_idx(tmp_path / imgs, torch.zeros(n, 28, 28, dtype=torch.uint8), gz=False)
        write_idx(tmp_path / labels, torch.arange(n) % 10, gz=False)
    return tmp_path


def test_missing_everywhere_names_package_variable_and_files(monkeypatch, tmp_path):
    monkeypatch.delenv('MINIAI_DATA', raising=False)
    monkeypatch.setattr(fashion, 'DEBIAN_DIR', tmp_path / 'nothing')
    monkeypatch.setattr(fashion, '_from_hub', lambda: (_ for _ in ()).throw(FashionMNISTNotFound(fashion._help())))
    with pytest.raises(FashionMNISTNotFound) as e:
        load_fashion_mnist()
    msg = str(e.value)
    assert 'dataset-fashion-mnist' in msg and 'MINIAI_DATA' in msg and 't10k-labels-idx1-ubyte' in msg


def test_explicit_bad_path_is_an_error_naming_it(tmp_path):
    with pytest.raises(FashionMNISTNotFound, match=str(tmp_path)):
        fashion_arrays(tmp_path)


def test_env_variable_is_a_source(monkeypatch, tmp_path):
    fake_folder(tmp_path)
    monkeypatch.setenv('MINIAI_DATA', str(tmp_path))
    assert find_fashion_mnist() == tmp_path
    x, y = fashion_arrays()['train']
    assert x.sum() == 0 and len(y) == 60000


def test_truncated_file(tmp_path):
    fake_folder(tmp_path)
    p = tmp_path / 'train-images-idx3-ubyte'
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(ValueError, match='train-images-idx3-ubyte.*truncated'):
        fashion_arrays(tmp_path)


def test_truncated_gzip(tmp_path):
    write_idx(tmp_path / 'x', torch.zeros(100, 28, 28))
    gz = tmp_path / 'x.gz'
    gz.write_bytes(gz.read_bytes()[:40])
    with pytest.raises(ValueError, match='x.gz'):
        read_idx(gz, 3)


def test_wrong_magic_number(tmp_path):
    fake_folder(tmp_path)
    write_idx(tmp_path / 'train-labels-idx1-ubyte', torch.arange(60000) % 10, magic=0x803, gz=False)
    with pytest.raises(ValueError, match='train-labels-idx1-ubyte: magic number'):
        fashion_arrays(tmp_path)


def test_count_mismatch(tmp_path):
    fake_folder(tmp_path)
    write_idx(tmp_path / 't10k-labels-idx1-ubyte', torch.arange(9999) % 10, gz=False)
    with pytest.raises(ValueError, match='10000 images but .* 9999 labels'):
        fashion_arrays(tmp_path)


def test_wrong_total_count(tmp_path):
    fake_folder(tmp_path, n_test=500)
    with pytest.raises(ValueError, match='500 images, expected 10000'):
        fashion_arrays(tmp_path)


def test_label_out_of_range(tmp_path):
    fake_folder(tmp_path)
    write_idx(tmp_path / 'train-labels-idx1-ubyte', torch.full((60000,), 12), gz=False)
    with pytest.raises(ValueError, match='label 12 is outside 0..9'):
        fashion_arrays(tmp_path)


def test_wrong_image_size(tmp_path):
    fake_folder(tmp_path)
    write_idx(tmp_path / 'train-images-idx3-ubyte', torch.zeros(60000, 32, 32), gz=False)
    with pytest.raises(ValueError, match=r'\(32, 32\), expected 28x28'):
        fashion_arrays(tmp_path)
