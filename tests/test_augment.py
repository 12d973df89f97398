"""Per-image batch augmentation, capture_preds, show_image_batch and TTA."""
import copy

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt
import pytest
import torch
import torch.nn.functional as F
from torch import nn, optim
from torchvision.transforms import v2

from miniai.augment import (CapturePreds, RandCopy, RandCropPad, RandErase, RandFlip, augment_cb, rand_copy,
                            rand_erase, tta)
from miniai.data.fashion import fashion_dls, find_fashion_mnist
from miniai.init import BatchTransformCB
from miniai.datasets import DataLoaders
from miniai.learner import DeviceCB, MetricsCB, SingleBatchCB, TrainLearner
from miniai.resnet import fashion_resnet

needs_data = pytest.mark.skipif(find_fashion_mnist() is None, reason='Fashion-MNIST is not installed')


def batch(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 28, 28, generator=g)


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16])
def test_flip_flips_whole_images_only(dtype):
    torch.manual_seed(0)
    x = batch().to(dtype) * 1e4  # large values too: each image is itself or its mirror, bit for bit
    y = RandFlip()(x)
    flipped = [torch.equal(a, b.flip(-1)) for a, b in zip(y, x)]
    same = [torch.equal(a, b) for a, b in zip(y, x)]
    assert all(f or s for f, s in zip(flipped, same)) and 10 < sum(flipped) < 54
    assert y.shape == x.shape and y.dtype == x.dtype


def test_crop_pad_shifts_by_at_most_pad():
    torch.manual_seed(0)
    x = batch(32)
    y = RandCropPad(pad=2)(x)
    assert y.shape == x.shape
    for a, b in zip(y, x):
        ok = False
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                pad = F.pad(b, (2, 2, 2, 2))[:, 2 + dy:30 + dy, 2 + dx:30 + dx]
                ok |= torch.equal(a, pad)
        assert ok


@pytest.mark.parametrize('fn', [rand_erase, rand_copy])
def test_boxes_change_only_bounded_areas(fn):
    torch.manual_seed(1)
    x = batch(256)
    y = fn(x, pct=0.2, max_num=4)
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    changed = (y != x).flatten(1).sum(1)
    box = int(0.2 * 28) ** 2
    assert (changed <= 4 * box).all(), 'never more than max_num boxes of pct x pct'
    assert (changed == 0).any() and (changed > box).any(), 'counts vary per image, from none to several boxes'
    if fn is rand_erase: assert y.min() >= x.min() and y.max() <= x.max()


def test_copy_moves_pixels_from_the_same_image():
    torch.manual_seed(2)
    x = torch.arange(28 * 28, dtype=torch.float32).view(1, 1, 28, 28).repeat(16, 1, 1, 1)
    x = x + torch.arange(16).view(16, 1, 1, 1) * 1e4  # each image's values are its own
    y = rand_copy(x, pct=0.25, max_num=2)
    for i in range(16): assert set(y[i].unique().tolist()) <= set(x[i].unique().tolist())


@pytest.mark.parametrize('call, msg', [
    (lambda: rand_erase(torch.zeros(28, 28)), r'rand_erase takes a batch of images \[N, C, H, W\]; got shape \(28, 28\)'),
    (lambda: rand_copy(batch(), pct=0), r'rand_copy: pct is a fraction .*got 0'),
    (lambda: RandErase(max_num=-1)(batch()), r'rand_erase: max_num .*got -1'),
    (lambda: RandCropPad()(torch.zeros(1, 28, 28)), r'RandCropPad takes a batch .*got shape \(1, 28, 28\)')])
def test_bad_input_is_named(call, msg):
    with pytest.raises(ValueError, match=msg): call()


def test_seeded_augmentation_repeats():
    torch.manual_seed(5)
    a = RandErase()(batch())
    torch.manual_seed(5)
    assert torch.equal(a, RandErase()(batch()))


def test_torchvision_v2_runs_on_whole_batches():
    tfm = v2.Compose([v2.RandomCrop(28, padding=1), v2.RandomHorizontalFlip()])
    cb = BatchTransformCB(lambda b: (tfm(b[0]), b[1]), on_val=False)
    x, y = batch(32), torch.zeros(32, dtype=torch.long)
    learn = TrainLearner(nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), type('D', (), {
        'train': [(x, y)], 'valid': [(x, y)]})(), F.cross_entropy, cbs=[cb])
    learn.fit(1)
    assert learn.batch[0].shape == (32, 1, 28, 28)


def test_capture_preds_keeps_what_a_cancelled_fit_saw():
    x, y = batch(48), torch.arange(48) % 10
    dls = DataLoaders([(x[:16], y[:16])], [(x[i:i + 16], y[i:i + 16]) for i in range(0, 48, 16)])
    learn = TrainLearner(nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), dls, F.cross_entropy)
    preds, targs = learn.capture_preds()
    assert preds.shape == (48, 10) and torch.equal(targs, y) and preds.device.type == 'cpu'
    assert torch.allclose(preds, learn.model(x), atol=1e-6)
    preds, targs = learn.capture_preds(cbs=[SingleBatchCB()])
    assert preds.shape == (16, 10) and torch.equal(targs, y[:16])


@needs_data
def test_capture_preds_and_tta_on_fashion_mnist():
    torch.manual_seed(0)
    dls = fashion_dls(bs=128, n_train=4096, n_valid=1024, seed=0)
    model = fashion_resnet(nfs=(8, 16, 32))  # small: the test is about the look, not the model
    learn = TrainLearner(model, dls, F.cross_entropy, lr=3e-3, opt_func=optim.AdamW,
                         cbs=[DeviceCB(), MetricsCB(), augment_cb(RandCropPad(1), RandFlip())])
    learn.fit(2)
    state = copy.deepcopy(model.state_dict())
    opt_state = copy.deepcopy(learn.opt.state_dict())
    mode, rng, order = model.training, torch.get_rng_state(), dls.train.state_dict()['gen'].clone()
    preds, targs, inps = learn.capture_preds(inps=True)
    assert preds.shape == (1024, 10) and targs.shape == (1024,) and inps.shape == (1024, 1, 28, 28)
    assert torch.equal(targs, torch.cat([y for _, y in dls.valid]))
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert model.training == mode and torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(a['exp_avg'], b['exp_avg']) for a, b in
               zip(opt_state['state'].values(), learn.opt.state_dict()['state'].values()))
    res = tta(learn)
    # TTA averages the probabilities of the plain and the flipped images
    flipped, _ = learn.capture_preds(cbs=[BatchTransformCB(lambda b: (b[0].flip(-1), b[1]), on_train=False)])
    assert torch.allclose(res['probs'], (preds.softmax(-1) + flipped.softmax(-1)) / 2)
    assert res['accuracy'] == pytest.approx((preds.argmax(1) == targs).float().mean().item())
    assert res['accuracy'] > 0.6 and res['tta_accuracy'] > 0.6


@needs_data
def test_show_image_batch_shows_augmented_training_inputs():
    dls = fashion_dls(bs=64, n_train=256, n_valid=64, seed=0, device='cpu')  # the model stays on the CPU
    learn = TrainLearner(fashion_resnet(nfs=(8, 16)), dls, F.cross_entropy)
    before = copy.deepcopy(learn.model.state_dict())
    assert learn.show_image_batch(max_n=6, cbs=[augment_cb(RandErase(pct=0.3, max_num=2))]) is None
    fig = plt.gcf()
    assert len([ax for ax in fig.axes if ax.images]) == 6
    assert all(torch.equal(before[k], v) for k, v in learn.model.state_dict().items())
    plt.close('all')


@pytest.mark.parametrize('tfm', [RandFlip(), RandCropPad(2), RandErase(), RandCopy()],
                         ids=['flip', 'crop', 'erase', 'copy'])
def test_augmentations_take_uint8_batches_of_any_channel_count_and_size(tfm):
    "One choice per image, the same for each of its channels; uint8 in, uint8 out, and the same choices as for float."
    x = torch.randint(0, 256, (32, 3, 12, 9), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    torch.manual_seed(0)
    y = tfm(x)
    torch.manual_seed(0)
    yf = tfm(x.float())
    assert y.dtype == torch.uint8 and y.shape == x.shape and not torch.equal(y, x)
    if isinstance(tfm, RandErase):  # the same boxes; the noise rounded to whole levels (a few land on the old value)
        boxes, changed = yf != x.float(), y != x
        assert not (changed & ~boxes).any() and changed.sum() > 0.9 * boxes.sum()
    else: assert torch.equal(y.float(), yf)
    if isinstance(tfm, RandCropPad):  # every channel moved by the image's one offset
        moved = [torch.equal(y[i], x[i]) for i in range(32)]
        assert not all(moved) and torch.equal(RandCropPad(0)(x), x)
