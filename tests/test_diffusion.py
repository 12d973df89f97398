"""miniai.diffusion (miniai.models.diffusion and miniai.models.unet): the schedule, noisy batches, the U-Net and its
parts, DDIM sampling, and a DDPM Learner on Fashion-MNIST."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn, optim
from torch.utils.data import TensorDataset

from miniai.datasets import DataLoaders
from miniai.diffusion import (DownBlock, EmbResBlock, EmbUNetModel, SelfAttention, SelfAttention2D, UpBlock, abar,
                              collate_ddpm, cond_sample, ddim_step, dl_ddpm, inv_abar, lin, noisify, pre_conv,
                              sample, saved, timestep_embedding, upsample)
from miniai.data.fashion import find_fashion_mnist
from miniai.learner import Callback, TrainLearner


def test_schedule_and_its_inverse():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    torch.testing.assert_close(abar(t), torch.cos(t * math.pi / 2) ** 2)
    assert abar(t)[0] == 1 and abar(t)[-1] < 1e-30
    torch.testing.assert_close(inv_abar(abar(t)), t)


def test_noisify_makes_the_training_pair():
    torch.manual_seed(0)
    x0 = torch.rand(256, 1, 4, 4, dtype=torch.float64) * 2 - 1
    (xt, t), eps = noisify(x0)
    assert xt.shape == eps.shape == x0.shape and t.shape == (256,) and xt.dtype == t.dtype == torch.float64
    assert 0 <= t.min() and t.max() < 0.999 and t.std() > 0.25  # uniform on [0, 0.999)
    a = abar(t)[:, None, None, None]
    torch.testing.assert_close(xt, a.sqrt() * x0 + (1 - a).sqrt() * eps)
    assert abs(eps.mean()) < 0.05 and abs(eps.std() - 1) < 0.05
    with pytest.raises(TypeError, match='float images'): noisify(torch.zeros(2, 1, 4, 4, dtype=torch.uint8))


def test_collate_ddpm_and_dl_ddpm_take_the_key_and_the_batch_size():
    items = [{'image': torch.full((1, 4, 4), float(i)), 'label': i} for i in range(10)]
    (xt, t), eps = collate_ddpm(items[:3])  # the course's default key
    assert xt.shape == (3, 1, 4, 4) and t.shape == (3,) and eps.shape == xt.shape
    torch.manual_seed(0)
    (xt, t), eps = collate_ddpm(items[:3], xl='image')
    torch.manual_seed(0)
    (xt2, _), _ = noisify(torch.stack([o['image'] for o in items[:3]]))
    torch.testing.assert_close(xt, xt2)  # noisify of the collated images
    dl = dl_ddpm(items, bs=4)
    assert [len(b[1]) for b in dl] == [4, 4, 2]
    tuples = TensorDataset(torch.randn(6, 1, 4, 4), torch.arange(6))
    assert [b[0][0].shape for b in dl_ddpm(tuples, bs=3, xl=0)] == [(3, 1, 4, 4)] * 2


def test_timestep_embedding():
    t = torch.tensor([0., 0.3, 0.9])
    e = timestep_embedding(t, 8)
    assert e.shape == (3, 8)
    freqs = torch.exp(-math.log(10000) * torch.linspace(0, 1, 4))  # 1 down to 1/max_period
    torch.testing.assert_close(e, torch.cat([(t[:, None] * freqs).sin(), (t[:, None] * freqs).cos()], 1))
    odd = timestep_embedding(t, 9, max_period=100)
    assert odd.shape == (3, 9) and (odd[:, -1] == 0).all()
    torch.testing.assert_close(odd[:, 3], (t * 0.01).sin())


def test_pre_conv_lin_upsample():
    layers = lambda m: [type(l) for l in m]
    assert layers(pre_conv(3, 8, norm=nn.BatchNorm2d)) == [nn.BatchNorm2d, nn.SiLU, nn.Conv2d]
    c = pre_conv(3, 8, ks=5, stride=2, act=None, bias=False)
    assert layers(c) == [nn.Conv2d] and c[0].padding == (2, 2) and c[0].stride == (2, 2) and c[0].bias is None
    assert layers(lin(4, 6, norm=nn.LayerNorm)) == [nn.LayerNorm, nn.SiLU, nn.Linear]
    assert upsample(5)(torch.randn(2, 5, 4, 4)).shape == (2, 5, 8, 8)


def plain_attention(m: SelfAttention, x: torch.Tensor) -> torch.Tensor:
    "softmax(QKᵀ/√d)V written out, from `m`'s own weights, heads taken from qkv's output as the course lays them out."
    if m.t: x = x.transpose(1, 2)
    n, s, c = x.shape
    qkv = m.qkv(m.norm(x)).view(n, s, m.nheads, 3, c // m.nheads)
    q, k, v = (qkv[:, :, :, i].transpose(1, 2) for i in range(3))
    w = (q @ k.transpose(-2, -1) / math.sqrt(c // m.nheads)).softmax(-1)
    out = m.proj((w @ v).transpose(1, 2).reshape(n, s, c))
    return out.transpose(1, 2) if m.t else out


@pytest.mark.parametrize('transpose', [True, False])
def test_attention_equals_plain_softmax_attention(transpose):
    torch.manual_seed(0)
    m = SelfAttention(16, 4, transpose=transpose)
    x = torch.randn(3, 16, 10) if transpose else torch.randn(3, 10, 16)
    out = m(x)
    assert out.shape == x.shape and m.nheads == 4
    torch.testing.assert_close(out, plain_attention(m, x), atol=1e-5, rtol=1e-5)
    m2 = SelfAttention2D(16, 8)
    x2 = torch.randn(2, 16, 3, 5)
    torch.testing.assert_close(m2(x2), plain_attention(m2, x2.reshape(2, 16, 15)).reshape(2, 16, 3, 5),
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match='12 channels do not split into heads of attn_chans=5'): SelfAttention(12, 5)


def test_emb_res_block():
    torch.manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8), torch.randn(2, 16)
    same = EmbResBlock(16, 4).eval()
    assert isinstance(same.idconv, nn.Identity) and same.attn is None
    wide = EmbResBlock(16, 4, 8, attn_chans=4).eval()
    assert isinstance(wide.idconv, nn.Conv2d) and isinstance(wide.attn, SelfAttention2D)
    assert wide(x, t).shape == (2, 8, 8, 8)
    # the embedding scales and shifts the channels: another time, another output
    assert not torch.allclose(same(x, t), same(x, t + 1))
    nn.init.zeros_(same.emb_proj.weight), nn.init.zeros_(same.emb_proj.bias)
    with torch.no_grad(): direct = same.conv2(same.conv1(x)) + x
    torch.testing.assert_close(same(x, t), direct)  # scale 0, shift 0: two convs plus the identity


def test_saved_and_the_blocks_and_deep_copies():
    torch.manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8), torch.randn(2, 16)
    blk = nn.Module()
    lin_out = saved(nn.Linear(8, 3), blk)
    y = lin_out(x)
    assert len(blk.saved) == 1 and blk.saved[0] is y
    down = DownBlock(16, 4, 6, num_layers=2).eval()
    out = down(x, t)
    assert out.shape == (2, 6, 4, 4) and [tuple(s.shape) for s in down.saved] == [(2, 6, 8, 8)] * 2 + [(2, 6, 4, 4)]
    assert down.saved[-1] is out
    down.saved = []  # (activations still tied to their graph cannot be deep-copied; the U-Net lets go of them)
    twin = copy.deepcopy(down)  # an EMA of the model, say: the copy must save into itself, not into the original
    twin(x, t)
    assert down.saved == [] and len(twin.saved) == 3
    up = UpBlock(16, 4, 6, 5, num_layers=2).eval()
    skips = [torch.randn(2, 4, 4, 4), torch.randn(2, 5, 4, 4)]
    assert up(torch.randn(2, 6, 4, 4), t, skips).shape == (2, 5, 8, 8) and skips == []


def small_unet(**kw):
    torch.manual_seed(0)
    return EmbUNetModel(1, 1, nfs=(8, 16, 16), attn_chans=8, attn_start=2, **kw)


def test_unet_on_32x32_with_attention():
    model = small_unet()
    # attention at the last level (8x8): its down block's res block, and the first up block's two
    assert sum(isinstance(m, SelfAttention2D) for m in model.modules()) == 3
    x, t = torch.randn(4, 1, 32, 32), torch.rand(4)
    out = model((x, t))
    assert out.shape == (4, 1, 32, 32)
    assert all(b.saved == [] for b in model.downs), 'the skips are not kept after the forward'
    twin = copy.deepcopy(model).eval()  # right after a training forward: nothing tied to the graph is left to copy
    model.eval()
    torch.testing.assert_close(model((x, t)), model(x, t))
    torch.testing.assert_close(twin(x, t), model(x, t))
    with pytest.raises(ValueError, match=r"divisible by 4; got \(2, 1, 30, 30\)"): model(torch.randn(2, 1, 30, 30), t[:2])


def test_ddim_step():
    torch.manual_seed(0)
    x0, noise = torch.rand(3, 1, 4, 4) * 2 - 1, torch.randn(3, 1, 4, 4)
    a_t, a_t1 = torch.tensor(0.3), torch.tensor(0.6)
    x_t = a_t.sqrt() * x0 + (1 - a_t).sqrt() * noise
    x0_hat, x_t1 = ddim_step(x_t, noise, a_t, a_t1, 1 - a_t, 1 - a_t1, 0., None)
    torch.testing.assert_close(x0_hat, x0)  # the true noise gives back the image
    torch.testing.assert_close(x_t1, a_t1.sqrt() * x0 + (1 - a_t1).sqrt() * noise)  # eta 0: deterministic
    # eta 1: the DDIM sigma's worth of fresh noise
    sig = ((1 - a_t1) / (1 - a_t)).sqrt() * (1 - a_t / a_t1).sqrt()
    torch.manual_seed(1)
    _, x_t1 = ddim_step(x_t, noise, a_t, a_t1, 1 - a_t, 1 - a_t1, 1., None)
    torch.manual_seed(1)
    z = torch.randn_like(x_t)
    torch.testing.assert_close(x_t1, a_t1.sqrt() * x0 + (1 - a_t1 - sig ** 2).sqrt() * noise + sig * z)
    # near the end (1 - abar_t1 <= sigma² + 0.01) no noise is added; clamp keeps estimates in [-1, 1]
    x0_hat, x_last = ddim_step(x_t * 5, noise, a_t, 1., 1 - a_t, 0., 1., None)
    assert x0_hat.abs().max() <= 1 and torch.equal(x_last, x0_hat)
    unclamped, _ = ddim_step(x_t * 5, noise, a_t, 1., 1 - a_t, 0., 1., None, clamp=False)
    assert unclamped.abs().max() > 1


class Oracle(nn.Module):
    "Predicts the exact noise that would take `target` to x at time t, so every DDIM estimate is `target`."
    def __init__(self, target):
        super().__init__()
        self.target, self.w = target, nn.Parameter(torch.ones((), dtype=target.dtype))
        self.seen = []

    def forward(self, inp):
        x, t, *c = inp
        self.seen.append((x.dtype, t.shape, *(o.clone() for o in c)))
        a = abar(t).reshape(-1, 1, 1, 1)
        target = self.target if not c else self.target * c[0].reshape(-1, 1, 1, 1)
        return self.w * (x - a.sqrt() * target) / (1 - a).sqrt().clamp(min=1e-6)  # at t = 0 the noise is moot


@pytest.mark.parametrize('eta', [0., 1.])
def test_sample_walks_the_schedule_down_to_the_image(eta):
    torch.manual_seed(0)
    target = torch.rand(3, 1, 4, 4) * 1.6 - 0.8
    oracle = Oracle(target).train()
    preds = sample(ddim_step, oracle, (3, 1, 4, 4), steps=6, eta=eta)
    assert len(preds) == 6 and all(p.device.type == 'cpu' and p.dtype == torch.float32 for p in preds)
    for p in preds: torch.testing.assert_close(p, target, atol=1e-4, rtol=1e-4)
    assert oracle.training, 'the model is put back in training mode'
    assert [s[1] for s in oracle.seen] == [(3,)] * 6


def test_sample_follows_the_model_dtype_and_device(monkeypatch):
    """float64 stands in for another device; on 'meta' nothing can reach the host, so no step waits for the device.
    Issue 29, item 7: each step's estimate is handed to the CPU as it comes (meta: a stand-in copy of its shape), so
    the device holds one step's tensors, not every step's."""
    import gc
    import weakref
    target = torch.zeros(2, 1, 4, 4, dtype=torch.float64)
    oracle = Oracle(target)
    preds = sample(ddim_step, oracle, (2, 1, 4, 4), steps=3)
    assert all(p.dtype == torch.float64 for p in preds) and {s[0] for s in oracle.seen} == {torch.float64}
    from miniai.core.devices import HostCopies
    from miniai.models.diffusion import _ddim_loop
    handed = []
    def copy(self, t):  # a meta tensor has no values to copy: a CPU tensor of its shape stands in for the copy
        handed.append(weakref.ref(t))
        return torch.zeros(t.shape, dtype=t.dtype)
    monkeypatch.setattr(HostCopies, 'copy', copy)
    with torch.device('meta'): unet = EmbUNetModel(1, 1, nfs=(8, 16), attn_chans=4)
    out = _ddim_loop(ddim_step, unet, lambda x, t: unet((x, t)), (2, 1, 8, 8), 3, 1., False, HostCopies(), clamp=True)
    gc.collect()
    assert len(out) == 3 and {p.device.type for p in out} == {'cpu'} and len(handed) == 3
    assert [r() is None for r in handed] == [True] * 3, 'no step\'s estimate is kept on the device'


@pytest.mark.cuda
def test_sampling_on_a_gpu_never_waits_for_it():
    "On CUDA: the whole loop runs without a host-device synchronisation, its results copied to the CPU as they come."
    from miniai.models.diffusion import _ddim_loop
    unet = EmbUNetModel(1, 1, nfs=(8, 16), attn_chans=4).cuda()
    sample(ddim_step, unet, (2, 1, 8, 8), steps=2)  # warm-up: CUDA's and cuDNN's lazy set-up is not the loop's
    from miniai.core.devices import HostCopies
    host = HostCopies()
    torch.cuda.set_sync_debug_mode('error')
    try: out = _ddim_loop(ddim_step, unet, lambda x, t: unet((x, t)), (2, 1, 8, 8), 4, 1., False, host, clamp=True)
    finally: torch.cuda.set_sync_debug_mode(0)
    host.wait()  # the one wait, after the loop: each step was copied to pinned CPU memory as it came
    assert len(out) == 4 and out[-1].device.type == 'cpu' and out[-1].is_pinned() and torch.isfinite(out[-1]).all()


def test_cond_sample_passes_the_class():
    target = torch.full((2, 1, 4, 4), 0.25)
    oracle = Oracle(target)
    preds = cond_sample(3, ddim_step, oracle, (2, 1, 4, 4), steps=4, eta=0.)
    assert len(preds) == 4
    c = oracle.seen[0][2]
    assert c.dtype == torch.int64 and c.tolist() == [3, 3]
    torch.testing.assert_close(preds[-1], torch.full((2, 1, 4, 4), 0.75))  # clamped into [-1, 1]
    cond_sample(torch.tensor([1, 2]), ddim_step, oracle, (2, 1, 4, 4), steps=1)
    assert oracle.seen[-1][2].tolist() == [1, 2]
    with pytest.raises(ValueError, match=r'one per image \(2\); got shape \(3,\)'):
        cond_sample(torch.tensor([1, 2, 3]), ddim_step, oracle, (2, 1, 4, 4), steps=1)


class Losses(Callback):
    def before_fit(self, learn): self.losses = []
    def after_loss(self, learn):
        if learn.training: self.losses.append(learn.loss.item())


@pytest.mark.skipif(find_fashion_mnist() is None, reason='Fashion-MNIST is not installed')
def test_ddpm_learner_on_fashion_mnist_learns():
    "A U-Net with attention, fed noisified 32x32 Fashion-MNIST by dl_ddpm, through a TrainLearner: the loss falls."
    from miniai.accel import MixedPrecision
    from miniai.data.fashion import fashion_arrays
    x = fashion_arrays()['train'][0][:256]
    x = F.pad(x.float().div(255).unsqueeze(1), (2, 2, 2, 2)) * 2 - 1
    torch.manual_seed(0)
    dls = DataLoaders(dl_ddpm(TensorDataset(x), bs=32, xl=0, shuffle=True), dl_ddpm(TensorDataset(x[:32]), bs=32, xl=0))
    model, rec = small_unet(), Losses()
    learn = TrainLearner(model, dls, F.mse_loss, lr=3e-3, cbs=[rec], opt_func=optim.AdamW)
    learn.fit(3, cbs=[MixedPrecision(torch.bfloat16)])
    assert len(rec.losses) == 24 and all(math.isfinite(v) for v in rec.losses)
    first, last = sum(rec.losses[:4]) / 4, sum(rec.losses[-4:]) / 4
    assert last < 0.6 * first, (first, last)
    preds = sample(ddim_step, model, (2, 1, 32, 32), steps=3)
    assert preds[-1].shape == (2, 1, 32, 32) and preds[-1].abs().max() <= 1
