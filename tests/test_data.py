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
from torch import nn
import torch.nn.functional as F

from miniai.data.loader import TensorDataLoader
from miniai.learner import Callback, DeviceCB, Learner, TrainCB
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


def _cuda_machine_that_cannot_pin(monkeypatch):
    "torch sees a CUDA GPU (for the loader's checks), and pinned buffers are plain ones (this machine cannot pin)."
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    real_empty = torch.empty
    monkeypatch.setattr(torch, 'empty', lambda *s, pin_memory=False, **kw: real_empty(*s, **kw))


def test_a_loader_asked_for_cpu_data_yields_cpu_batches_on_a_cuda_machine(monkeypatch):
    """Issue 29, item 1: pinned CPU-held data used to be normalised onto the GPU while its labels stayed on the CPU,
    so any loop without DeviceCB met a batch on two devices. Both halves of a batch are where the data is now."""
    _cuda_machine_that_cannot_pin(monkeypatch)
    x, y = torch.randint(0, 256, (8, 1, 2, 2), dtype=torch.uint8), torch.arange(8)
    dl = TensorDataLoader(x, y, bs=4, pin_memory=True, mean=0.5, std=0.25)
    xb, yb = next(iter(dl))
    assert xb.device.type == yb.device.type == 'cpu' and xb.dtype == torch.float32
    assert torch.allclose(xb, (x[:4] / 255 - 0.5) / 0.25, atol=1e-6) and dl.delivery is None


def test_delivered_batches_cross_as_uint8_and_are_normalised_on_the_gpu(monkeypatch):
    "Delivered to the GPU ('meta' stands for it), the images cross as uint8 (a quarter of the bytes), labels too."
    _cuda_machine_that_cannot_pin(monkeypatch)
    x, y = torch.randint(0, 256, (8, 1, 2, 2), dtype=torch.uint8), torch.arange(8)
    dl = TensorDataLoader(x, y, bs=4, pin_memory=True, mean=0.5, std=0.25)
    dl.deliver_to('meta')
    moves = []
    real_to = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, 'to', lambda t, *a, **k: moves.append((t.dtype, a, k)) or real_to(t, *a, **k))
    xb, yb = next(iter(dl))
    # device moves only (the order's indices go to where the data is; the meta device's own arithmetic converts
    # dtypes with .to)
    crossing = [m for m in moves if isinstance(m[1][0], (str, torch.device)) and torch.device(m[1][0]).type == 'meta']
    assert crossing == [(torch.uint8, (torch.device('meta'),), {'non_blocking': True}),
                        (torch.int64, (torch.device('meta'),), {'non_blocking': True})], moves
    assert xb.device.type == yb.device.type == 'meta' and xb.dtype == torch.float32
    dl.deliver_to(None)
    assert next(iter(dl))[0].device.type == 'cpu'


def test_devicecb_asks_the_loaders_to_deliver_during_its_fit_only(monkeypatch):
    """DeviceCB tells a loader where its batches go for each epoch of its fit (so they arrive there, normalised on the
    device), and puts it back after, even when the fit fails: a loop after the fit gets CPU batches again."""
    _cuda_machine_that_cannot_pin(monkeypatch)
    x, y = torch.randint(0, 256, (8, 1, 2, 2), dtype=torch.uint8), torch.arange(8) % 2
    dls = DataLoaders(*(TensorDataLoader(x, y, bs=4, pin_memory=True, mean=0.5, std=0.25) for _ in range(2)))
    seen = []
    class Look(Callback):
        order = DeviceCB.order - 1  # sees each batch as the loader gave it, before DeviceCB could move it
        def before_batch(self, learn): seen.append({t.device.type for t in learn.batch})
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    learn = Learner(model, dls, F.cross_entropy, lr=0.1, cbs=[TrainCB(), DeviceCB('meta'), Look()])
    learn.fit(1)
    assert seen == [{'meta'}] * 4, 'both splits, each batch whole, delivered by the loader itself'
    assert dls.train.delivery is None and dls.valid.delivery is None
    class Boom(Callback):
        def after_batch(self, learn): raise RuntimeError('boom')
    with pytest.raises(RuntimeError, match='boom'): learn.fit(1, cbs=[Boom()])
    assert dls.train.delivery is None and next(iter(dls.train))[0].device.type == 'cpu'


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
