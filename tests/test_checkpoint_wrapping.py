"""Checkpoints that do not care how the model is wrapped (plain, torch.compile, DDP, nested), and that carry the
CUDA generators and the fp16 loss scaler. All on a CPU: torch.compile with the eager backend and a one-process gloo
group need no GPU; the CUDA generators and the scaler are played by stand-ins. (tests/test_gpu.py does it for real.)"""
import itertools
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn, optim
from torch.nn.parallel import DistributedDataParallel as DDP

import miniai.engines.precision as precision
from miniai.accel import MixedPrecision
from miniai.runs.checkpoint import SaveModelCB, save_checkpoint
from miniai.runs.ckptfile import read_checkpoint
from miniai.datasets import DataLoaders
from miniai.engines.ddp import DDPCB
from miniai.data.loader import TensorDataLoader
from miniai.learner import Learner, MetricsCB, TrainLearner
from miniai.core.state import plain_keys, rng_state, set_rng_state


@pytest.fixture(scope='module')
def one_process_group():
    "A gloo process group of world size 1, so DDP can wrap a model in this process."
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=0, world_size=1)
    yield
    dist.destroy_process_group()


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.bn = nn.Linear(6, 6), nn.BatchNorm1d(6)
    def forward(self, x): return self.bn(self.lin(x)).relu()


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), Block(), nn.Linear(6, 3))


def compiled(m): return torch.compile(m, backend='eager')


def inner_compiled(m):
    "A model with one block compiled inside it: the `_orig_mod.` part sits in the middle of the names."
    m[1] = compiled(m[1])
    return m


WRAPS = {'plain': lambda m: m, 'compiled': compiled, 'ddp': lambda m: DDP(m),
         'ddp(compiled)': lambda m: DDP(compiled(m)), 'compiled(ddp)': lambda m: compiled(DDP(m)),
         'inner compiled': inner_compiled}
PLAIN = set(make_model().state_dict())


def learner(model):
    return Learner(model, DataLoaders([], []), F.cross_entropy)


@pytest.mark.usefixtures('one_process_group')
def test_weights_load_across_every_wrapping_in_every_direction(tmp_path):
    for (src, wrap_src), (dst, wrap_dst) in itertools.product(WRAPS.items(), repeat=2):
        saved = wrap_src(make_model(seed=1))
        path = save_checkpoint(learner(saved), tmp_path / 'a.ckpt')
        assert set(read_checkpoint(path)['model']) == PLAIN, f'{src}: wrapper names leaked into the file'
        target = wrap_dst(make_model(seed=2))
        learner(target).load(path)
        want = {plain_keys(saved)[k]: v for k, v in saved.state_dict().items()}
        got = {plain_keys(target)[k]: v for k, v in target.state_dict().items()}
        assert all(torch.equal(want[k], got[k]) for k in PLAIN), f'saved {src}, loaded into {dst}'


def test_old_files_with_wrapper_names_still_load(tmp_path, monkeypatch):
    import miniai.runs.checkpoint as ck
    for prefix in ('module.', '_orig_mod.', 'module._orig_mod.'):  # DDP's, torch.compile's, both
        model = make_model(seed=1)
        monkeypatch.setattr(ck, 'plain_state_dict', lambda m: {prefix + k: v for k, v in m.state_dict().items()})
        path = save_checkpoint(learner(model), tmp_path / 'old.ckpt')  # as files were written before
        monkeypatch.undo()
        assert all(k.startswith(prefix) for k in read_checkpoint(path)['model'])
        target = make_model(seed=2)
        learner(target).load(path)
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), target.state_dict().values()))


def data():
    torch.manual_seed(0)
    x, y = torch.randn(96, 4), torch.randint(0, 3, (96,))
    return DataLoaders(TensorDataLoader(x, y, bs=16, shuffle=True, seed=0), TensorDataLoader(x[:32], y[:32], bs=16))


def train_learner(cbs=()):
    torch.manual_seed(3)
    return TrainLearner(make_model(seed=1), data(), F.cross_entropy, lr=0.05, opt_func=optim.AdamW,
                        cbs=[MetricsCB(), *cbs])


@pytest.mark.usefixtures('one_process_group')
def test_best_checkpoint_from_a_ddp_fit_loads_plain_and_resumes_in_one_process(tmp_path):
    whole = train_learner()
    whole.fit(3)
    in_ddp = train_learner([DDPCB(), SaveModelCB(tmp_path, every_epoch=True)])
    seen = []
    in_ddp.fit(2, cbs=[SimpleNamespace(order=30, after_epoch=lambda learn: seen.append(type(learn.model)))])
    assert DDP in seen, 'the checkpoints were written while the model was wrapped'
    for name in ('best.ckpt', 'last.ckpt'): assert set(read_checkpoint(tmp_path / name)['model']) == PLAIN
    plain = make_model(seed=5)
    learner(plain).load(tmp_path / 'best.ckpt')  # for inference
    resumed = train_learner()
    resumed.fit(3, resume=tmp_path / 'last.ckpt')
    assert all(torch.equal(a, b) for a, b in zip(whole.model.state_dict().values(),
                                                 resumed.model.state_dict().values()))


class FakeCuda:
    "Two CUDA devices' generator states, kept where torch.cuda's functions would look them up."
    def __init__(self, monkeypatch, n=2, current=0):
        self.states, self.current = [torch.randint(0, 255, (16,), dtype=torch.uint8) for _ in range(n)], current
        for name, fn in dict(is_available=lambda: True, is_initialized=lambda: True, device_count=lambda: n,
                             current_device=lambda: self.current, set_rng_state=self.set,
                             get_rng_state_all=lambda: [s.clone() for s in self.states]).items():
            monkeypatch.setattr(torch.cuda, name, fn)
    def set(self, state, device): self.states[device] = state.clone()
    def scramble(self): self.states = [torch.randint(0, 255, (16,), dtype=torch.uint8) for _ in self.states]


def test_every_cuda_generator_is_saved_and_restored(monkeypatch, tmp_path):
    learn = train_learner()
    learn.fit(1)  # before CUDA is faked: the optimizer asks torch's accelerator about graph capture
    cuda = FakeCuda(monkeypatch)
    saved = [s.clone() for s in cuda.states]
    path = learn.save(tmp_path / 'a.ckpt')
    rng = read_checkpoint(path)['rng']
    assert [torch.equal(a, b) for a, b in zip(rng['cuda'], saved)] == [True, True] and rng['cuda_device'] == 0
    cuda.scramble()
    train_learner().fit(2, resume=path, train=False)  # restores them; validating epoch 1 on the CPU draws none
    assert all(torch.equal(a, b) for a, b in zip(cuda.states, saved))


def test_cuda_generators_follow_the_process_to_its_own_device(monkeypatch):
    "Saved by rank 0 (cuda:0), resumed as rank 1 (cuda:1), or on a machine with fewer GPUs."
    cuda = FakeCuda(monkeypatch)
    state = rng_state()
    cuda.scramble()
    cuda.current = 1
    set_rng_state(state)
    assert torch.equal(cuda.states[0], state['cuda'][0]) and torch.equal(cuda.states[1], state['cuda'][0])
    few = FakeCuda(monkeypatch, n=1)
    set_rng_state(state)  # two saved states, one device: no error
    assert torch.equal(few.states[0], state['cuda'][0])


def test_fp16_loss_scaler_state_is_saved_and_restored(monkeypatch, tmp_path):
    # the scaler is made only for fp16 on CUDA: the model is said to be there, and a CPU GradScaler stands in
    real = torch.amp.GradScaler
    monkeypatch.setattr(precision, 'model_device', lambda model: torch.device('cuda'))
    monkeypatch.setattr(torch.amp, 'GradScaler', lambda device, **kw: real('cpu', **kw))
    mp = MixedPrecision(torch.float16)
    learn = Learner(make_model(), data(), F.cross_entropy, cbs=[mp])
    learn.fit(0)
    mp.scaler.scale(torch.ones(()))
    mp.scaler.update(new_scale=1234.)
    path = learn.save(tmp_path / 'a.ckpt')
    assert read_checkpoint(path)['callbacks']['MixedPrecision']['scaler']['scale'] == 1234.
    mp2 = MixedPrecision(torch.float16)
    Learner(make_model(), data(), F.cross_entropy, cbs=[mp2]).fit(0, resume=path)
    assert mp2.scaler.get_scale() == 1234. and mp2.scaler.state_dict() == mp.scaler.state_dict()
    assert MixedPrecision(torch.bfloat16).state_dict() == {}
    with pytest.warns(UserWarning, match='holds the state of a MixedPrecision, which this fit does not have'):
        Learner(make_model(), data(), F.cross_entropy, cbs=[]).fit(0, resume=path)
