"""Mixed precision and channels-last: active inside the model, composable, and as accurate as fp32."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn, optim
from torcheval.metrics import MulticlassAccuracy

from miniai.accel import ChannelsLastCB, MixedPrecision, cpu_has_bf16, cuda_has_bf16, fastest_settings, precision_cbs
from miniai.core.events import Callback
from miniai.conv import def_device
from miniai.datasets import DataLoaders
from miniai.data.fashion import fashion_dls, find_fashion_mnist
from miniai.init import conv
from miniai.learner import DeviceCB, Learner, MetricsCB, TrainCB, TrainLearner
from miniai.sgd import BatchSchedCB

needs_data = pytest.mark.skipif(find_fashion_mnist() is None, reason='Fashion-MNIST is not installed')


def cnn():
    return nn.Sequential(conv(1, 8, norm=nn.BatchNorm2d), conv(8, 16, norm=nn.BatchNorm2d),
                         conv(16, 32, norm=nn.BatchNorm2d), conv(32, 10, act=None),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())  # 2x2 pixels left: without the pool, 40 outputs


def tiny_dls(n=64):
    x, y = torch.randn(n, 1, 28, 28), torch.randint(0, 10, (n,))
    dl = [(x[i:i + 16], y[i:i + 16]) for i in range(0, n, 16)]
    return DataLoaders(dl, dl)


def test_autocast_is_on_inside_the_model_and_off_after_the_batch():
    model = cnn()
    seen, after = [], []
    model[0][0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    class Spy(Callback):
        def after_batch(self, learn): after.append(torch.is_autocast_enabled('cpu'))
    learn = TrainLearner(model, tiny_dls(), F.cross_entropy, cbs=[MixedPrecision(torch.bfloat16), Spy()])
    learn.fit(1)
    assert seen and set(seen) == {torch.bfloat16}
    assert after and not any(after)
    assert all(p.dtype == torch.float32 for p in model.parameters()), 'weights stay fp32'


def test_autocast_is_left_when_a_batch_raises():
    class Boom(Exception): pass
    class Raiser(Callback):
        order = 20
        def after_predict(self, learn): raise Boom()
    learn = TrainLearner(cnn(), tiny_dls(), F.cross_entropy, cbs=[MixedPrecision(torch.bfloat16), Raiser()])
    with pytest.raises(Boom): learn.fit(1)
    assert not torch.is_autocast_enabled('cpu')


def test_channels_last_reaches_the_convolutions():
    model = cnn()
    fmt = []
    model[1][0].register_forward_pre_hook(lambda m, a: fmt.append(a[0].is_contiguous(memory_format=torch.channels_last)))
    first = []
    model[0][0].register_forward_pre_hook(lambda m, a: first.append(a[0].is_contiguous(memory_format=torch.channels_last)))
    learn = TrainLearner(model, tiny_dls(), F.cross_entropy, cbs=[ChannelsLastCB(), MixedPrecision()])
    learn.fit(1)
    assert all(first) and all(fmt) and len(fmt) == 8
    assert model[0][0].weight.is_contiguous(memory_format=torch.channels_last)


def test_plain_learner_takes_its_steps_from_mixed_precision():
    model = cnn()
    before = [p.clone() for p in model.parameters()]
    Learner(model, tiny_dls(), F.cross_entropy, lr=0.1, cbs=[MixedPrecision(torch.bfloat16)]).fit(1)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_two_callbacks_doing_the_same_step_are_warned():
    learn = Learner(cnn(), tiny_dls(), F.cross_entropy, cbs=[TrainCB(), MixedPrecision(torch.bfloat16)])
    with pytest.warns(UserWarning, match="several callbacks do the 'predict' step"):
        with pytest.raises(RuntimeError, match='backward through the graph a second time'):
            learn.fit(1)  # which is what the warning says will go wrong


@needs_data
def test_bf16_trains_as_well_as_fp32_on_fashion_mnist():
    accs = {}
    for name in ('fp32', 'bf16-cl'):
        torch.manual_seed(0)
        dls = fashion_dls(bs=256, n_train=8192, n_valid=2048, seed=0)
        metrics = MetricsCB(accuracy=MulticlassAccuracy())
        sched = lambda opt: optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=len(dls.train))
        learn = TrainLearner(cnn(), dls, F.cross_entropy, lr=1e-2, opt_func=optim.AdamW,
                             cbs=[DeviceCB(), metrics, BatchSchedCB(sched)] + precision_cbs(name))
        learn.fit(1)
        accs[name] = metrics.history[-1]['accuracy']
    assert accs['fp32'] > 0.7 and abs(accs['fp32'] - accs['bf16-cl']) < 0.03, accs


def test_settings_choice_and_bad_names():
    setting, why = fastest_settings('cpu')
    assert setting == ('bf16-cl' if cpu_has_bf16() else 'fp32') and why
    assert [type(c) for c in precision_cbs('bf16-cl')] == [MixedPrecision, ChannelsLastCB]
    assert precision_cbs('fp32') == []
    with pytest.raises(ValueError, match="precision must be one of .*'fp64'"):
        precision_cbs('fp64')


def test_cuda_choice_follows_bf16_support(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda d=None: (8, 0))
    assert fastest_settings('cuda')[0] == 'bf16-cl'
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda d=None: (7, 5))
    setting, why = fastest_settings('cuda')
    assert setting == 'fp16' and 'scaling' in why


def test_default_dtype_follows_the_models_device():
    mp = MixedPrecision()
    learn = TrainLearner(cnn(), tiny_dls(), F.cross_entropy, cbs=[DeviceCB(def_device), mp])
    learn.fit(1, valid=False)
    want = torch.bfloat16 if torch.device(def_device).type != 'cuda' or cuda_has_bf16(def_device) else torch.float16
    assert mp.dtype == want and mp.device_type == torch.device(def_device).type
    assert (mp.scaler is not None) == (want == torch.float16)
    with pytest.raises(ValueError, match='MixedPrecision: dtype must be .*float32'):
        MixedPrecision(torch.float32)


@pytest.mark.cuda
def test_fp16_uses_a_grad_scaler_and_refuses_train_learner():
    model = cnn().cuda()
    mp = MixedPrecision(torch.float16)
    Learner(model, tiny_dls(), F.cross_entropy, cbs=[DeviceCB('cuda'), mp]).fit(1)
    assert mp.scaler is not None
    with pytest.raises(TypeError, match='defines those itself'):
        TrainLearner(cnn(), tiny_dls(), F.cross_entropy, cbs=[DeviceCB('cuda'), MixedPrecision(torch.float16)]).fit(1)
