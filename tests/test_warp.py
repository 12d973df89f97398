"""Photo augmentation (miniai.data.warp): one sampling per batch whose geometry is what was drawn, uint8 and normalised
floats in their own units, masks and target images moved with their images, seeded draws, TTA with it, and errors
that name what was wrong. The resumes of fits that use it are in tests/test_mix.py, beside MixUp's and CutMix's."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn, optim

from miniai.callbacks.transform import BatchTransformCB, augment_cb
from miniai.data.augment import RandFlip
from miniai.data.fashion import fashion_dls, find_fashion_mnist
from miniai.data.warp import Augment, aug_transforms
from miniai.learner import MetricsCB, TrainLearner
from miniai.tools.inference import tta

needs_data = pytest.mark.skipif(find_fashion_mnist() is None, reason='Fashion-MNIST is not installed')
pytestmark = pytest.mark.usefixtures('one_thread')


def garments(n=32):
    "Fashion-MNIST training images as uint8 [N, 1, 28, 28], and as colour [N, 3, 28, 28] (tinted per channel)."
    dls = fashion_dls(bs=n, n_train=n, n_valid=n, seed=0, device='cpu')
    x = dls.train.x[:n]
    return x, (x.float() * torch.tensor([1., .7, .4]).view(1, 3, 1, 1)).round().to(torch.uint8)


@needs_data
def test_nothing_drawn_gives_the_images_back_exactly_and_flips_are_whole_images():
    x, rgb = garments()
    assert torch.equal(Augment(do_flip=False)(x), x), 'uint8: sampled at the pixel centres, rounded back exactly'
    xf = (rgb.float() / 255 - 0.5) / 0.25
    out = Augment(do_flip=False, max_lighting=0.2, p_lighting=0., stats=(0.5, 0.25))(xf)
    assert torch.allclose(out, xf, atol=1e-5), 'floats: sampled at the pixel centres, to float rounding'
    torch.manual_seed(0)
    out = Augment()(rgb)
    flipped = [torch.equal(o, i.flip(-1)) for o, i in zip(out, rgb)]
    assert all(f or torch.equal(o, i) for f, o, i in zip(flipped, out, rgb)) and 6 < sum(flipped) < 26


@needs_data
def test_a_whole_image_crop_to_a_size_is_a_bilinear_resize():
    "min_scale 1 and ratio 1 crop the whole (square) image: the sampling then is F.interpolate's, to rounding."
    x, _ = garments()
    out = Augment(size=(14, 20), min_scale=1., ratio=(1., 1.), do_flip=False)(x.float())
    ref = F.interpolate(x.float(), size=(14, 20), mode='bilinear', align_corners=False)
    assert out.shape == (32, 1, 14, 20) and torch.allclose(out, ref, atol=1e-3)


def test_rotations_zooms_and_flips_are_drawn_per_image_within_their_bounds():
    torch.manual_seed(0)
    aug = Augment(do_flip=False, max_rotate=10, min_zoom=1., max_zoom=1.1, p_affine=0.75)
    m = aug.matrices(400, 'cpu', (32, 32), (32, 32))
    lin = m[:, :2, :2]
    zoom = 1 / lin.det().sqrt()  # a rotation times 1/zoom: det = 1/zoom^2
    rot = lin * zoom[:, None, None]
    assert torch.allclose(rot @ rot.transpose(1, 2), torch.eye(2).expand(400, 2, 2), atol=1e-5), 'a rotation'
    deg = torch.atan2(rot[:, 1, 0], rot[:, 0, 0]).rad2deg()
    assert deg.abs().max() <= 10 + 1e-4 and 0.65 < (deg != 0).float().mean() < 0.85, 'p_affine 0.75, up to 10 deg'
    assert zoom.min() >= 1 - 1e-5 and zoom.max() <= 1.1 + 1e-5 and 0.65 < (zoom > 1 + 1e-6).float().mean() < 0.85
    shift = m[:, :2, 2].abs()
    assert (shift <= (1 - 1 / zoom)[:, None] + 1e-6).all(), 'a zoom looks inside the image, never past its edge'



def test_on_the_cpu_one_image_at_a_time_and_the_padding_shortcut_are_the_whole_batch_sampling():
    """The CPU samples one image at a time, with padding 'zeros' where every sample lies inside the image: the same
    pixels as one reflection-padded grid_sample of the whole batch through the same matrices, to rounding."""
    x = torch.randint(0, 256, (12, 3, 40, 30), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    aug = aug_transforms(size=(24, 20), min_scale=0.35, max_lighting=0.)
    torch.manual_seed(0)
    m = aug.matrices(12, 'cpu', (40, 30), (24, 20))
    ys, xs = ((torch.arange(k) * 2 + 1) / k - 1 for k in (24, 20))
    pts = torch.stack([xs.expand(24, 20), ys[:, None].expand(24, 20), torch.ones(24, 20)], -1).view(-1, 3)
    p = pts @ m.transpose(1, 2)                                                      # every pixel's (x, y, z) read
    grid = (p[..., :2] / p[..., 2:]).view(12, 24, 20, 2)
    inside = ((grid[..., 0].abs() <= 1 - 1 / 30) & (grid[..., 1].abs() <= 1 - 1 / 40)).flatten(1).all(1)
    assert 0 < inside.sum() < 12, 'both paths taken'
    ref = F.grid_sample(x.float(), grid, padding_mode='reflection', align_corners=False)
    for threads in (1, 3):
        torch.set_num_threads(threads)
        try:
            torch.manual_seed(0)
            out = aug(x)
            torch.manual_seed(0)
            outf = aug(x.float())
            assert torch.get_num_threads() == threads, 'the CPU path works on one thread, then gives them back'
        finally: torch.set_num_threads(1)
        assert out.dtype == torch.uint8 and (out.float() - ref).abs().max() <= 0.5 + 1e-3, f'{threads} threads'
        assert torch.allclose(outf, ref, atol=1e-2), f'floats, {threads} threads'

@needs_data
def test_masks_and_target_images_move_with_their_images():
    x, _ = garments()
    g = torch.Generator().manual_seed(0)
    mask = torch.randint(0, 3, (32, 4, 4), generator=g).repeat_interleave(8, 1).repeat_interleave(8, 2)  # 8x8 blocks
    img = (mask * 100).to(torch.uint8)[:, None]                              # the same regions as an image
    aug = aug_transforms(max_lighting=0.)                                    # flips, rotation, zoom, warp
    torch.manual_seed(1)
    out, m2 = aug(img, mask)
    assert m2.shape == mask.shape and m2.dtype == mask.dtype and set(m2.unique().tolist()) <= {0, 1, 2}
    agree = lambda m: (out[:, 0] == (m * 100).to(torch.uint8)).float().mean()
    assert agree(m2) > 0.85, f'nearest-sampled masks are the bilinear images away from region edges ({agree(m2):.3f})'
    assert agree(aug(img, mask)[1]) < 0.75, 'masks drawn apart from their images would not agree'
    torch.manual_seed(1)
    _, m4 = aug(img, mask[:, None], target='mask')
    assert torch.equal(m4[:, 0], m2), 'masks [N, 1, H, W] sampled as [N, H, W]'
    big = F.interpolate(x.float(), scale_factor=2, mode='nearest')            # super-resolution's target, 2x
    torch.manual_seed(2)
    lo, hi = Augment(max_rotate=10, max_warp=0.2, max_lighting=0.2, stats=(0, 1))(x.float() / 255, big / 255)
    assert lo.shape == x.shape and hi.shape == (32, 1, 56, 56)
    back = F.avg_pool2d(hi, 2)
    assert (back - lo).abs().mean() < 0.02, 'the larger target got the same geometry and lighting as its input'


def test_draws_are_seeded_and_uint8_and_floats_agree():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (8, 3, 40, 30), dtype=torch.uint8, generator=g)
    aug = aug_transforms(size=(24, 24), min_scale=0.5, max_saturation=0.3, stats=(0., 1.))
    torch.manual_seed(5)
    a = aug(x)
    torch.manual_seed(5)
    b = aug(x.float() / 255)
    assert a.dtype == torch.uint8 and a.shape == (8, 3, 24, 24) and b.dtype == torch.float32
    assert (a.float() - b * 255).abs().max() <= 0.5 + 1e-3, 'the same draws in both units, uint8 rounded'
    torch.manual_seed(5)
    assert torch.equal(aug(x), a)
    assert not torch.equal(aug(x), a), 'the next batch draws anew'


def test_bad_arguments_are_named():
    x = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    for kw, msg in [({'min_scale': 0}, 'min_scale'), ({'min_scale': 1.5}, 'min_scale'), ({'max_warp': 1}, 'max_warp'),
                    ({'min_zoom': 1.2, 'max_zoom': 1.1}, 'zoom'), ({'ratio': (2, 1)}, 'ratio'),
                    ({'p_affine': 2}, 'p_affine'), ({'pad_mode': 'wrap'}, 'pad_mode'), ({'size': 0}, 'size')]:
        with pytest.raises(ValueError, match=msg): Augment(**kw)
    with pytest.raises(ValueError, match=r'masks are \(4, 4\) but their images \(8, 8\)'):
        Augment()(x, torch.zeros(2, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="target='mask' or target='image'"):
        Augment()(x, torch.zeros(2, 1, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r'\[N, C, H, W\]'): Augment()(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match='uint8 or float images; got torch.int64'): Augment()(x.long())
    with pytest.raises(ValueError, match='stats for the images: mean has 2 values for 3 channels'):
        aug_transforms(stats=((0.5, 0.5), (0.2, 0.2)))(x.float())
    with pytest.raises(ValueError, match='stats=dls'): aug_transforms()(x.float())
    with pytest.raises(ValueError, match='RandFlip'): augment_cb(RandFlip(), targets='mask')


def test_augment_moves_as_a_module_does():
    "An `Augment` in a model moves with it (`.to`, `.float`): nn.Module's own `_apply` is not shadowed by its helpers."
    model = nn.Sequential(aug_transforms(max_lighting=0.), nn.Identity())
    assert model.to('cpu').float() is model
    x = torch.zeros(2, 1, 8, 8, dtype=torch.uint8)
    assert model(x).shape == x.shape


@needs_data
def test_augment_cb_with_masks_moves_both_and_tta_takes_the_augmentation():
    dls = fashion_dls(bs=64, n_train=256, n_valid=128, seed=0, device='cpu')
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, 2, 1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 14 * 14, 10))
    learn = TrainLearner(model, dls, F.cross_entropy, 0.1, opt_func=optim.SGD,
                         cbs=[MetricsCB(), augment_cb(aug_transforms(stats=dls))])
    learn.fit(1)
    rng = torch.get_rng_state()
    plain = tta(learn)
    flip = BatchTransformCB(lambda b: (b[0].flip(-1), b[1]), on_train=False)
    preds = learn.capture_preds()[0].softmax(-1)
    assert torch.allclose(plain['probs'], (preds + learn.capture_preds(cbs=[flip])[0].softmax(-1)) / 2), \
        'the default is as before: the plain and the flipped pass, halved'
    aug = aug_transforms(stats=dls)
    one, four = tta(learn, aug, n=1, beta=0.25), tta(learn, aug, n=4, beta=0.25)
    assert torch.equal(tta(learn, aug, n=4, beta=0.25)['probs'], four['probs']), 'the same call, the same result'
    assert torch.equal(torch.get_rng_state(), rng), 'TTA is a look: the generator is as it was'
    assert not torch.allclose(one['probs'], four['probs']), 'each pass drew its own augmentation'
    assert abs(four['tta_accuracy'] - four['accuracy']) < 0.15
    assert torch.allclose(four['probs'].sum(-1), torch.ones(128))
    mask = torch.randint(0, 3, (16, 8, 8))
    cb = augment_cb(Augment(), targets='mask')  # flips: exact for the images (bilinear) and the masks (nearest)
    class L: training = True
    L.batch = (mask[:, None].float(), mask)
    torch.manual_seed(0)
    cb.before_batch(L)
    assert torch.equal(L.batch[0][:, 0].round().long(), L.batch[1]), 'the images and their masks went the same way'
    assert not torch.equal(L.batch[1], mask), 'and some of them were flipped'


@pytest.mark.cuda
def test_on_the_gpu_the_batch_and_its_mask_stay_there():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, device='cuda')
    mask = torch.randint(0, 4, (8, 32, 32), device='cuda')
    out, m2 = aug_transforms(size=24, min_scale=0.5, max_saturation=0.2)(x, mask)
    assert out.device.type == m2.device.type == 'cuda' and out.dtype == torch.uint8 and m2.shape == (8, 24, 24)
    xf = (x.float() / 255 - 0.5) / 0.2
    assert aug_transforms(stats=(0.5, 0.2))(xf).device.type == 'cuda'
