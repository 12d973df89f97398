"""fastest_plan: each choice (precision, memory format, optimizer, compile, data) with its reason, on CPU and GPU."""
import pytest
import torch
from torch import nn, optim

import miniai.engines.plan as plan_mod
import miniai.engines.precision as precision
from miniai.accel import ChannelsLastCB, MixedPrecision, fastest_plan, fastest_settings
from miniai.engines.compile import CompileCB


@pytest.fixture
def fake_gpu(monkeypatch):
    "torch believes a CUDA GPU is here; `bf16` says whether it does bf16 (an A100's compute capability, or a T4's)."
    def set_gpu(bf16=True):
        monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
        monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda d=None: (8, 0) if bf16 else (7, 5))
    return set_gpu


@pytest.mark.parametrize('bf16', [True, False])
def test_cpu_plan_follows_bf16_support_and_uses_fused_adamw_eagerly(monkeypatch, bf16):
    monkeypatch.setattr(plan_mod, 'cpu_has_bf16', lambda: bf16)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    plan = fastest_plan(epochs=50)
    assert plan.device == 'cpu' and plan.precision == ('bf16-cl' if bf16 else 'fp32')
    assert plan.channels_last == bf16 and plan.optimizer == 'fused' and plan.compile is None
    assert set(plan.why) == {'precision', 'memory format', 'optimizer', 'compile', 'data'}
    assert all(plan.why.values()) and 'oneDNN' in plan.why['compile']
    assert (plan.precision, plan.why['precision']) == fastest_settings('cpu'), 'one source for the precision'
    assert [type(c) for c in plan.cbs()] == ([MixedPrecision, ChannelsLastCB] if bf16 else [])
    text = str(plan)
    assert 'optimizer: fused AdamW' in text and 'compile: no' in text and text.count('\n') == 4


def test_the_plans_optimizer_arguments_build_a_working_adamw():
    model = nn.Linear(4, 2)
    model(torch.randn(3, 4)).sum().backward()
    before = model.weight.detach().clone()
    opt = optim.AdamW(model.parameters(), lr=0.1, **fastest_plan('cpu').opt_kwargs())
    assert opt.defaults['fused'] is True
    opt.step()
    assert not torch.equal(before, model.weight)


def test_gpu_plan_compiles_with_cuda_graphs_only_when_the_epochs_repay_it(fake_gpu):
    fake_gpu(bf16=True)
    short, long, unknown = fastest_plan(epochs=5), fastest_plan(epochs=plan_mod.CUDA_COMPILE_EPOCHS), fastest_plan()
    assert short.device == 'cuda' and short.precision == 'bf16-cl' and short.optimizer == 'fused'
    assert short.compile is None and 'eager for 5 epochs' in short.why['compile']
    assert unknown.compile is None and 'pass epochs=' in unknown.why['compile']
    assert long.compile == 'reduce-overhead' and '14 s' in long.why['compile']
    cbs = long.cbs()
    assert [type(c) for c in cbs] == [MixedPrecision, ChannelsLastCB, CompileCB] and cbs[-1].mode == 'reduce-overhead'
    assert 'fashion_dls(device=' in long.why['data']


def test_gpu_without_bf16_gets_fp16_and_no_channels_last(fake_gpu):
    fake_gpu(bf16=False)
    plan = fastest_plan('cuda')
    assert plan.precision == 'fp16' and not plan.channels_last and 'scaling' in plan.why['precision']
    assert fastest_settings() == ('fp16', plan.why['precision']), 'the old tuple still unpacks'


def test_other_devices_get_foreach_adamw():
    plan = fastest_plan('meta')
    assert plan.optimizer == 'foreach' and plan.opt_kwargs() == {'foreach': True} and plan.precision == 'fp32'


def test_miniai_device_cpu_on_a_gpu_machine_plans_for_the_cpu(fake_gpu, monkeypatch):
    fake_gpu(bf16=False)
    monkeypatch.setattr(plan_mod, 'cpu_has_bf16', lambda: True)
    monkeypatch.setenv('MINIAI_DEVICE', 'cpu')
    assert fastest_settings()[0] == 'bf16-cl' and fastest_plan().device == 'cpu'
    monkeypatch.delenv('MINIAI_DEVICE')
    assert fastest_settings()[0] == 'fp16' and fastest_plan().device == 'cuda'


def test_the_main_job_trains_in_fp16_on_a_gpu_without_bf16(monkeypatch, recwarn):
    "A T4 (Colab's GPU) has no bf16: the main job's Learner must let MixedPrecision scale the loss, not refuse."
    from miniai.datasets import DataLoaders
    from miniai.data.loader import TensorDataLoader
    from miniai.learner import TrainCB
    from miniai.app.recipe import make_learner
    monkeypatch.setattr(precision, 'model_device', lambda m: torch.device('cuda'))  # MixedPrecision believes it is on CUDA
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    dls = DataLoaders(TensorDataLoader(x, y, 16), TensorDataLoader(x, y, 16))
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    learn, chosen = make_learner(model, dls, epochs=1, lr=1e-2, precision='fp16', augment='none')
    learn.cbs = [cb for cb in learn.cbs if type(cb).__name__ != 'DeviceCB']  # the data stays where it is
    assert chosen.startswith('fp16') and [type(cb) for cb in learn.cbs if isinstance(cb, TrainCB)] == [MixedPrecision]
    before = model[1].weight.detach().clone()
    learn.fit(1)  # a TrainLearner here raised "MixedPrecision(fp16) scales the loss in its own backward and step"
    mp = next(cb for cb in learn.cbs if isinstance(cb, MixedPrecision))
    assert mp.scaler is not None and not torch.equal(before, model[1].weight)


def test_the_main_job_uses_the_plans_adamw(monkeypatch):
    from miniai.datasets import DataLoaders
    from miniai.data.loader import TensorDataLoader
    from miniai.app.recipe import make_learner
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    dls = DataLoaders(TensorDataLoader(x, y, 4), TensorDataLoader(x, y, 4))
    monkeypatch.setenv('MINIAI_DEVICE', 'cpu')
    learn, _ = make_learner(nn.Linear(4, 2), dls, epochs=1, lr=1e-2, precision='fp32', augment='none')
    assert learn.opt_func(nn.Linear(4, 2).parameters(), 1e-2).defaults['fused'] is True
    monkeypatch.setenv('MINIAI_DEVICE', 'meta')  # a device without a fused AdamW
    learn, _ = make_learner(nn.Linear(4, 2), dls, epochs=1, lr=1e-2, precision='fp32', augment='none')
    assert learn.opt_func(nn.Linear(4, 2).parameters(), 1e-2).defaults['foreach'] is True
