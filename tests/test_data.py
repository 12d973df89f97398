"""The uint8 tensor loader (normalised per batch, per channel), exact channel statistics, and Hugging Face datasets of
images into it (`DataLoaders.from_dd`'s fast path), with the course's per-item route kept for transformed ones."""
import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF

from miniai.data import fashion, hf, imagecache
from miniai.data.decode import ImageDataError
from miniai.data.loader import TensorDataLoader
from miniai.data.normalise import channel_stats
from miniai.datasets import DataLoaders, inplace
from miniai.data.fashion import CLASSES, fashion_arrays, find_fashion_mnist

needs_data = pytest.mark.skipif(find_fashion_mnist() is None, reason='Fashion-MNIST is not installed (make data)')


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv('MINIAI_CACHE', str(tmp_path / 'cache'))


def test_uint8_batches_are_normalised_per_channel_as_float():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 256, (50, 3, 4, 5), generator=g, dtype=torch.uint8), torch.arange(50)
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.3, 0.4)
    dl = TensorDataLoader(x, y, bs=16, shuffle=True, seed=1, mean=mean, std=std)
    xs, ys = zip(*dl)
    got, order = torch.cat(xs), torch.cat(ys)
    ref = (x[order].double() / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    assert got.dtype == torch.float32 and (got.double() - ref).abs().max() < 1e-5
    assert dl.x.dtype == torch.uint8 and dl.x is x, 'the loader holds the pixels, not a float copy'
    assert torch.equal(dl.normalise(x[order[:3]]), got[:3]), 'normalise() is what the batches get'
    # one value for every channel; plain float data is left as it is
    assert torch.equal(next(iter(TensorDataLoader(x, y, bs=4, mean=0.5, std=0.25)))[0],
                       next(iter(TensorDataLoader(x, y, bs=4, mean=[0.5] * 3, std=[0.25] * 3)))[0])
    assert torch.equal(next(iter(TensorDataLoader(x.float(), y, bs=4)))[0], x[:4].float())
    with pytest.raises(ValueError, match='mean/std normalise uint8 images .* x is torch.float32'):
        TensorDataLoader(x.float(), y, mean=0.5, std=0.2)
    with pytest.raises(ValueError, match='mean has 2 values for 3 channels'):
        TensorDataLoader(x, y, mean=(0.5, 0.5), std=0.2)
    with pytest.raises(ValueError, match='std must be > 0'):
        TensorDataLoader(x, y, mean=0.5, std=(0.2, 0, 0.2))
    with pytest.raises(ValueError, match='give both mean and std'):
        TensorDataLoader(x, y, mean=0.5)


def test_pinned_batches_are_copied_as_uint8_and_normalised_on_the_gpu(monkeypatch):
    "CPU-held data for a CUDA model: the batch crosses as uint8 (a quarter of the bytes), then becomes float there."
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    monkeypatch.setattr(torch, 'empty', lambda *s, pin_memory=False, **kw: torch.zeros(*s, **kw))  # cannot pin here
    import miniai.data.loader as data
    monkeypatch.setattr(data, 'resolve_device', lambda d: 'cpu' if d is None else 'meta')  # 'meta' stands for the GPU
    x, y = torch.randint(0, 256, (8, 1, 2, 2), dtype=torch.uint8), torch.arange(8)
    dl = TensorDataLoader(x, y, bs=4, pin_memory=True, mean=0.5, std=0.25)
    moves = []
    real_to = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, 'to', lambda t, *a, **k: moves.append((t.dtype, a, k)) or real_to(t, *a, **k))
    xb, yb = next(iter(dl))
    # device moves of the images only (the order's indices go to where the data is; the meta device's own
    # arithmetic converts dtypes with .to)
    images = [m for m in moves if m[0] != torch.int64 and isinstance(m[1][0], (str, torch.device))]
    assert images == [(torch.uint8, (torch.device('meta'),), {'non_blocking': True})], moves
    assert xb.device.type == 'meta' and xb.dtype == torch.float32 and yb.device.type == 'cpu'


def test_channel_stats_are_exact_and_refuse_constant_channels():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (300, 2, 7, 9), generator=g, dtype=torch.uint8)
    mean, std = channel_stats(x, chunk=64)  # several chunks
    ref = x.double().div(255).transpose(0, 1).reshape(2, -1)
    assert mean == tuple(float(np.float32(v)) for v in ref.mean(1).tolist())
    assert std == tuple(float(np.float32(v)) for v in ref.std(1, correction=0).tolist())
    x[:, 1] = 17
    with pytest.raises(ImageDataError, match='my images: every training pixel of channel 1 is the same'):
        channel_stats(x, 'my images')


@needs_data
def test_fashion_loaders_hold_the_pixels_once():
    dls = fashion.fashion_dls(bs=512, device='cpu')
    x = fashion_arrays()['train'][0]
    assert dls.train.x.dtype == torch.uint8 and dls.train.x.data_ptr() == x.data_ptr(), 'a view, no copy'
    held = sum(t.nbytes for dl in (dls.train, dls.valid) for t in (dl.x, dl.y))
    assert held <= 1.1 * 70000 * 784, held


@pytest.fixture(scope='module')
def small_dd():
    if find_fashion_mnist() is None: pytest.skip('Fashion-MNIST is not installed (make data)')
    arr = fashion_arrays()
    return fashion._build({'train': (arr['train'][0][:600], arr['train'][1][:600]),
                           'test': (arr['test'][0][:200], arr['test'][1][:200])})


@needs_data
def test_from_dd_turns_a_dataset_of_images_into_uint8_tensors_once(small_dd, monkeypatch):
    arr = fashion_arrays()
    dls = DataLoaders.from_dd(small_dd, 64, num_workers=4, device='cpu')  # a worker count means nothing here
    assert isinstance(dls.train, TensorDataLoader) and dls.classes == CLASSES
    assert torch.equal(dls.train.x[:, 0], arr['train'][0][:600]) and torch.equal(dls.train.y, arr['train'][1][:600])
    assert torch.equal(dls.valid.x[:, 0], arr['test'][0][:200]) and torch.equal(dls.valid.y, arr['test'][1][:200])
    xb, _ = next(iter(dls.valid))
    assert xb.dtype == torch.float32 and xb.shape == (64, 1, 28, 28)
    # cached by the splits' fingerprints: the same data is not decoded again; other data is
    monkeypatch.setattr(imagecache, '_build', lambda *a: pytest.fail('decoded again'))
    assert torch.equal(DataLoaders.from_dd(small_dd, 64, device='cpu').train.x, dls.train.x)
    from datasets import DatasetDict
    other = DatasetDict(train=small_dd['train'].select(range(100, 300)), test=small_dd['test'])
    with pytest.raises(pytest.fail.Exception, match='decoded again'): DataLoaders.from_dd(other, 64)


@needs_data
def test_from_dd_keeps_the_per_item_route_for_transformed_datasets(small_dd):
    @inplace
    def to_tensor(b): b['image'] = [TF.to_tensor(o) for o in b['image']]
    dls = DataLoaders.from_dd(small_dd.with_transform(to_tensor), 32)
    assert isinstance(dls.train, torch.utils.data.DataLoader) and next(iter(dls.train))[0].shape == (32, 1, 28, 28)
    assert not hf.is_image_dd(small_dd.with_format('torch'))


def test_from_dd_reads_uint8_array_columns_in_batches(tmp_path):
    import datasets as hf
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (40, 6, 5, 3), generator=g, dtype=torch.uint8)  # HWC, as arrays usually are
    feats = hf.Features({'img': hf.Array3D((6, 5, 3), 'uint8'), 'label': hf.Value('int64')})
    split = lambda i: hf.Dataset.from_dict({'img': x[i:i + 20].numpy(), 'label': list(range(i // 20, 20 + i // 20))},
                                           features=feats)
    dd = hf.DatasetDict(train=split(0), valid=split(20))
    dd.save_to_disk(str(tmp_path / 'dd'))
    dls = DataLoaders.from_dd(hf.load_from_disk(str(tmp_path / 'dd')), 8, device='cpu')
    assert torch.equal(dls.train.x, x[:20].permute(0, 3, 1, 2)) and dls.classes == [str(i) for i in range(21)]
    assert torch.equal(dls.valid.y, torch.arange(1, 21))
    # the main job's --data takes the saved DatasetDict's folder; one that holds no images is one clear error
    from miniai.app.recipe import recipe_dls
    assert torch.equal(recipe_dls(str(tmp_path / 'dd'), bs=8).train.x, dls.train.x)
    dd.remove_columns('img').save_to_disk(str(tmp_path / 'labels'))
    with pytest.raises(ImageDataError, match=r'labels: a saved Hugging Face DatasetDict, but not of images'):
        recipe_dls(str(tmp_path / 'labels'))


@needs_data
def test_show_batch_draws_images_with_their_class_names():
    dls = fashion.fashion_dls(bs=16, n_train=64, n_valid=16, device='cpu', shuffle=False)
    assert dls.show_batch(max_n=6) is None, 'nothing returned: a Figure would show twice in Jupyter'
    fig = plt.gcf()
    drawn = [ax for ax in fig.axes if ax.images]
    x, y = next(iter(dls.train))
    assert len(drawn) == 6 and [ax.get_title() for ax in drawn] == [CLASSES[i] for i in y[:6]]
    shown = drawn[0].images[0].get_array()
    assert np.allclose(shown, (x[0, 0] * dls.std + dls.mean).numpy(), atol=1e-6), 'pixels as stored, in [0, 1]'
    plt.close('all')
