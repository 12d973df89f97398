"""miniai.fid: FID and KID against independent float64 references, on real Fashion-MNIST features; what bad input gets."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from miniai.data.fashion import find_fashion_mnist
from miniai.fid import ImageEval, _calc_fid, _calc_kid, _calc_stats, _sqrtm_newton_schulz, _squared_mmd
from miniai.resnet import GlobalAvgPool

needs_data = pytest.mark.skipif(find_fashion_mnist() is None, reason='Fashion-MNIST is not installed')


def reference_fid(x: torch.Tensor, y: torch.Tensor) -> float:
    """FID straight from the features, sharing nothing with miniai.fid: with A, B the centred features over √(n-1),
    tr((c1 c2)^½) is the sum of the singular values of A Bᵀ (here of R_A R_Bᵀ, from QR), tr(c1) is |A|²."""
    x, y = x.double(), y.double()
    a = torch.linalg.qr(x - x.mean(0), mode='r')[1] / math.sqrt(len(x) - 1)
    b = torch.linalg.qr(y - y.mean(0), mode='r')[1] / math.sqrt(len(y) - 1)
    return ((x.mean(0) - y.mean(0)).square().sum() + a.square().sum() + b.square().sum()
            - 2 * torch.linalg.svdvals(a @ b.T).sum()).item()


def naive_mmd(x, y) -> float:
    "The unbiased squared MMD with the kernel (a·b/d + 1)³, pair by pair in Python floats."
    x, y = x.double().tolist(), y.double().tolist()
    d = len(x[0])
    k = lambda a, b: (sum(p * q for p, q in zip(a, b)) / d + 1) ** 3
    within = lambda s: sum(k(s[i], s[j]) for i in range(len(s)) for j in range(len(s)) if i != j) / (len(s) * (len(s) - 1))
    across = sum(k(a, b) for a in x for b in y) / (len(x) * len(y))
    return within(x) + within(y) - 2 * across


def feature_model():
    "A fixed random CNN: real images give it features with a real covariance structure (32 wide)."
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 16, 3, stride=2), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2), nn.ReLU(),
                         GlobalAvgPool())


@pytest.fixture(scope='module')
def fashion():
    "ImageEval over 1,000 test images, and 600 training images as the sample."
    from miniai.data.fashion import fashion_dls
    dls = fashion_dls(bs=256, n_train=600, n_valid=1000, device='cpu', seed=0)
    model = feature_model()
    ie = ImageEval(model, dls)
    train = torch.cat([xb for xb, _ in dls.train])
    valid = torch.cat([xb for xb, _ in dls.valid])
    return ie, model, train, valid


@needs_data
def test_fid_on_fashion_features_agrees_with_an_independent_reference(fashion):
    ie, model, train, valid = fashion
    assert ie.feats.shape == (1000, 32) and ie.feats.dtype == torch.float32
    with torch.no_grad(): direct = model.eval()(valid)
    torch.testing.assert_close(ie.feats, direct)  # the features are the model's, in the loader's order
    samp_feats = ie.get_feats(train)
    fid = ie.fid(train)
    assert isinstance(fid, float) and fid > 0
    assert fid == pytest.approx(reference_fid(ie.feats, samp_feats), rel=1e-6)
    assert fid == pytest.approx(_calc_fid(*_calc_stats(ie.feats), *_calc_stats(samp_feats)), rel=1e-12)
    # the same images against themselves: 0, up to round-off of the traces (about 1e-2 here)
    assert abs(ie.fid(valid)) < 1e-9 * ie.stats[1].trace().item()


@needs_data
def test_kid_tells_real_images_from_noised_ones_and_so_does_fid(fashion):
    ie, _, train, _ = fashion
    torch.manual_seed(1)
    noised = train + 0.7 * torch.randn_like(train)
    kid_real, kid_noised = ie.kid(train), ie.kid(noised)
    assert abs(kid_real) < kid_noised / 20, (kid_real, kid_noised)
    assert ie.fid(train) < ie.fid(noised) / 5


@needs_data
def test_imageeval_checks_its_samples_and_changes_nothing(fashion):
    ie, model, train, _ = fashion
    with pytest.raises(ValueError, match='sample of 1 image.*FID needs at least 2'): ie.fid(train[:1])
    with pytest.raises(ValueError, match='sample of 5 image.*KID needs at least 8'): ie.kid(train[:5])
    padded = nn.functional.pad(train[:16], (2, 2, 2, 2))
    with pytest.raises(ValueError, match=r"sample's images are 1x32x32 .* reference images \(dls.valid\) are 1x28x28"):
        ie.fid(padded)
    with pytest.raises(ValueError, match=r'batch of images \[N, C, H, W\]'): ie.get_feats(train[0])
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ie.kid(train[:64])
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_calc_stats_is_numpys_mean_and_covariance():
    torch.manual_seed(0)
    x = torch.randn(50, 7) * torch.arange(1, 8)
    m, c = _calc_stats(x)
    assert m.dtype == c.dtype == torch.float64
    np.testing.assert_allclose(m.numpy(), x.double().numpy().mean(0), rtol=1e-12)
    np.testing.assert_allclose(c.numpy(), np.cov(x.double().numpy(), rowvar=False), rtol=1e-12)
    assert _calc_stats(x[:, :, None, None])[1].shape == (7, 7), 'features [N, C, 1, 1] are flattened'
    with pytest.raises(ValueError, match='at least 2 images; got 1'): _calc_stats(x[:1])
    with pytest.raises(ValueError, match='NaN or infinite'): _calc_stats(torch.full((3, 2), float('nan')))


def test_fid_is_real_finite_and_right_with_fewer_images_than_features():
    "Rank-deficient covariances (30 and 40 images of 64 features): no complex part, no NaN, the right value."
    torch.manual_seed(0)
    x, y = torch.randn(30, 64) * torch.linspace(2, .01, 64), torch.randn(40, 64) + 0.1
    fid = _calc_fid(*_calc_stats(x), *_calc_stats(y))
    assert isinstance(fid, float) and math.isfinite(fid)
    assert fid == pytest.approx(reference_fid(x, y), rel=1e-6)
    assert _calc_fid(*_calc_stats(x), *_calc_stats(x)) < 1e-10


def test_fid_refuses_features_of_other_widths():
    x, y = torch.randn(20, 8), torch.randn(20, 6)
    with pytest.raises(ValueError, match='different widths, 8 and 6'): _calc_fid(*_calc_stats(x), *_calc_stats(y))
    with pytest.raises(ValueError, match='different widths, 8 and 6'): _calc_kid(x, y)
    with pytest.raises(ValueError, match=r'covariance 2 \[D, D\]'): _calc_fid(*_calc_stats(x), torch.zeros(8), torch.zeros(8))


def test_squared_mmd_and_kid_match_a_pair_by_pair_computation():
    torch.manual_seed(0)
    x, y = torch.randn(5, 3), torch.randn(6, 3) + 0.5
    assert _squared_mmd(x, y).item() == pytest.approx(naive_mmd(x, y), rel=1e-10)
    # KID: max(4, ceil(min(N, M) / maxs)) blocks, cut where the course cuts them (at round(i * N / blocks))
    x, y = torch.randn(30, 3), torch.randn(22, 3) * 1.5
    for maxs, n in ((50, 4), (4, 6)):
        cut = lambda s, i: s[round(i * len(s) / n):round((i + 1) * len(s) / n)]
        want = sum(naive_mmd(cut(x, i), cut(y, i)) for i in range(n)) / n
        assert _calc_kid(x, y, maxs=maxs) == pytest.approx(want, rel=1e-9)
    with pytest.raises(ValueError, match='at least 8 images; got 30 and 7'): _calc_kid(x, y[:7])


def test_newton_schulz_square_root():
    torch.manual_seed(0)
    a = torch.randn(20, 20, dtype=torch.float64)
    spd = a @ a.T + torch.eye(20, dtype=torch.float64)
    root = _sqrtm_newton_schulz(spd)
    assert root.dtype == torch.float64
    assert ((root @ root - spd).norm() / spd.norm()).item() <= 1e-6
    few = _sqrtm_newton_schulz(spd, num_iters=2)
    assert ((few @ few - spd).norm() / spd.norm()).item() > 1e-3, 'num_iters bounds the iterations'
    assert torch.equal(_sqrtm_newton_schulz(torch.zeros(3, 3)), torch.zeros(3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match='square matrix'): _sqrtm_newton_schulz(torch.ones(2, 3))
