"""Which device each process uses, checked on a CPU: torch.cuda's answers are replaced, so a 2-GPU machine running
two torchrun processes, or one GPU with two processes, can be played out here. (tests/test_gpu.py does it for real.)"""
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import miniai.conv as conv
from miniai.conv import default_device, pinned_rows, pins_by_default, resolve_device, to_device
from miniai.datasets import DataLoaders
from miniai.engines.ddp import DDPCB
from miniai.data.fashion import fashion_dls, find_fashion_mnist
from miniai.data.loader import TensorDataLoader
from miniai.learner import DeviceCB

needs_data = pytest.mark.skipif(find_fashion_mnist() is None, reason='Fashion-MNIST is not installed')
TORCHRUN = ('LOCAL_RANK', 'RANK', 'LOCAL_WORLD_SIZE', 'WORLD_SIZE', 'MINIAI_DEVICE', 'TORCHELASTIC_RUN_ID')


@pytest.fixture
def machine(monkeypatch):
    """`machine(n_gpus, local_rank=None, n_procs=1)` makes torch see `n_gpus` CUDA GPUs and, with `local_rank`, sets
    the variables torchrun sets for `n_procs` processes on this machine; returns the devices passed to set_device."""
    for k in TORCHRUN: monkeypatch.delenv(k, raising=False)
    chosen = []
    def setup(n_gpus: int, local_rank: int | None = None, n_procs: int = 1):
        monkeypatch.setattr(torch.cuda, 'is_available', lambda: n_gpus > 0)
        monkeypatch.setattr(torch.cuda, 'device_count', lambda: n_gpus)
        monkeypatch.setattr(torch.cuda, 'set_device', lambda d: chosen.append(torch.device('cuda', d).index
                                                                               if isinstance(d, int) else d.index))
        if local_rank is not None:
            env = dict(LOCAL_RANK=local_rank, RANK=local_rank, LOCAL_WORLD_SIZE=n_procs, WORLD_SIZE=n_procs,
                       TORCHELASTIC_RUN_ID='test')
            for k, v in env.items(): monkeypatch.setenv(k, str(v))
        return chosen
    return setup


class FakeModel:
    "Stands for a model: remembers where `.to` put it, and its one 'parameter' says so."
    def __init__(self, device='cpu'): self.device = torch.device(device)
    def to(self, device, **kw):
        self.device = torch.device(device)
        return self
    def parameters(self): yield SimpleNamespace(device=self.device)


@pytest.fixture
def fake_ddp(monkeypatch):
    "Record instead of joining a process group or wrapping in DDP: {'backend': ..., 'device_ids': ...}."
    import miniai.engines.ddp as d
    seen = {}
    monkeypatch.setattr(d.dist, 'init_process_group', lambda backend, **kw: seen.update(backend=backend))
    monkeypatch.setattr(d, 'DistributedDataParallel', lambda m, device_ids, **kw: seen.update(device_ids=device_ids)
                        or SimpleNamespace(module=m))
    return seen


def tiny_dls():
    x, y = torch.arange(40.).view(20, 2), torch.arange(20)
    return DataLoaders(TensorDataLoader(x, y, bs=4, shuffle=True, seed=0), TensorDataLoader(x, y, bs=4))


def recorded_moves(monkeypatch):
    "Make `Tensor.to` record (device, non_blocking) and return the tensor unmoved, for devices this machine lacks."
    moves = []
    monkeypatch.setattr(torch.Tensor, 'to', lambda t, device, non_blocking=False: moves.append((device, non_blocking))
                        or t)
    return moves


def test_one_gpu_one_process_is_plain_cuda(machine):
    chosen = machine(1)
    assert default_device() == conv.def_device == DeviceCB().device == resolve_device('cuda') == 'cuda'
    assert resolve_device('cpu') == 'cpu' and resolve_device('cuda:0') == 'cuda:0' and chosen == []
    assert 'def_device' in dir(conv), 'offered by tab completion, though looked up only when read'


def test_rank_1_of_2_on_two_gpus_uses_cuda_1_for_everything(machine, fake_ddp, monkeypatch):
    chosen = machine(2, local_rank=1, n_procs=2)
    assert default_device() == conv.def_device == 'cuda:1'
    assert DeviceCB().device == DeviceCB('cuda').device == DeviceCB(torch.device('cuda')).device == 'cuda:1'
    assert chosen and set(chosen) == {1}, 'cuda:1 is made current, so a bare .cuda() lands there too'
    # the callbacks' before_fit, in their order: DeviceCB places the model, DDPCB wraps it
    learn = SimpleNamespace(model=FakeModel(), dls=tiny_dls(), cbs=None)
    dev_cb, ddp_cb = DeviceCB(), DDPCB()
    learn.cbs = [dev_cb, ddp_cb]
    dev_cb.before_fit(learn)
    ddp_cb.before_fit(learn)
    assert fake_ddp == {'backend': 'nccl', 'device_ids': [1]}
    assert learn.model.module.device == torch.device('cuda:1')
    assert (learn.dls.train.rank, learn.dls.train.world_size) == (1, 2), 'this rank gets its own shard'
    learn.batch = next(iter(learn.dls.train))
    with monkeypatch.context() as m:
        moves = recorded_moves(m)
        dev_cb.before_batch(learn)
    assert moves == [('cuda:1', True), ('cuda:1', True)]
    ddp_cb.cleanup_fit(learn)
    assert isinstance(learn.model, FakeModel) and learn.dls.train.world_size == 1


@pytest.mark.parametrize('local_rank', [0, 1])
def test_more_processes_than_gpus_is_one_clear_error_on_every_rank(machine, local_rank):
    machine(1, local_rank=local_rank, n_procs=2)
    msg = (r'2 processes on this machine .* only 1 CUDA GPU\(s\) visible.* --nproc_per_node=1.* MINIAI_DEVICE=cpu.*'
           r'DeviceCB\("cpu"\), DDPCB\(backend="gloo"\)')
    for ask in (default_device, lambda: conv.def_device, DeviceCB, lambda: DeviceCB('cuda'), lambda: to_device(1),
                fashion_dls):
        with pytest.raises(RuntimeError, match=msg): ask()


def test_the_cpu_ways_out_never_touch_the_gpu(machine, fake_ddp, monkeypatch):
    chosen = machine(1, local_rank=1, n_procs=2)
    learn = SimpleNamespace(model=FakeModel(), dls=tiny_dls(), cbs=[DeviceCB('cpu'), DDPCB(backend='gloo')])
    for cb in learn.cbs: cb.before_fit(learn)
    assert fake_ddp == {'backend': 'gloo', 'device_ids': None} and learn.model.module.device.type == 'cpu'
    monkeypatch.setenv('MINIAI_DEVICE', 'cpu')
    assert default_device() == conv.def_device == DeviceCB().device == 'cpu'
    assert not pins_by_default('cpu'), 'with MINIAI_DEVICE=cpu nothing is pinned for a GPU that is not used'
    assert chosen == []


@needs_data
def test_the_readmes_cpu_way_out_trains_on_cpu_processes_beside_too_few_gpus(machine, monkeypatch):
    """Issue 29, item 1: `DeviceCB('cpu')` with `fashion_dls(device='cpu')` on a rank that has no GPU of its own used to
    resolve 'cuda' to normalise its pinned batches there: the too-few-GPUs error the advice is meant to avoid."""
    import torch.nn.functional as F
    from torch import nn
    from miniai.learner import Learner, TrainCB
    chosen = machine(1, local_rank=1, n_procs=2)
    real_empty = torch.empty  # this machine cannot pin: pinned buffers are plain ones here
    monkeypatch.setattr(torch, 'empty', lambda *s, pin_memory=False, **kw: real_empty(*s, **kw))
    dls = fashion_dls(bs=64, n_train=128, n_valid=64, device='cpu')
    assert dls.train.pin_memory, 'a CUDA machine: CPU-held batches are pinned for a copy that does not wait'
    seen = []
    class Look(TrainCB):
        def predict(self, learn):
            seen.append({t.device.type for t in learn.batch})
            super().predict(learn)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    Learner(model, dls, F.cross_entropy, lr=0.1, cbs=[Look(), DeviceCB('cpu')]).fit(1)
    assert seen == [{'cpu'}] * 3 and chosen == [], 'CPU batches, and no GPU chosen'


def test_miniai_device_names_the_device(machine, monkeypatch):
    chosen = machine(1, local_rank=1, n_procs=2)
    monkeypatch.setenv('MINIAI_DEVICE', 'cuda:0')  # two processes sharing one GPU (with gloo)
    assert default_device() == resolve_device('cuda') == DeviceCB('cuda').device == 'cuda:0' and set(chosen) == {0}
    monkeypatch.setenv('MINIAI_DEVICE', 'gpu')
    with pytest.raises(ValueError, match="MINIAI_DEVICE='gpu' is not a device torch knows"): default_device()
    machine(0)
    monkeypatch.setenv('MINIAI_DEVICE', 'cuda')
    with pytest.raises(RuntimeError, match="MINIAI_DEVICE='cuda' asks for a CUDA GPU, but torch sees none"):
        default_device()


def test_ranks_sharing_one_gpu_through_miniai_device_get_gloo_not_nccl(machine, fake_ddp, monkeypatch):
    "Issue 19 item 8: MINIAI_DEVICE=cuda:0 with two processes picked NCCL, which refuses two ranks on one device."
    import miniai.engines.ddp as d
    machine(1, local_rank=1, n_procs=2)
    monkeypatch.setenv('MINIAI_DEVICE', 'cuda:0')
    monkeypatch.setattr(d, 'gradient_group', lambda device, backend: None)  # they do share it (see the test below)
    learn = SimpleNamespace(model=FakeModel(), dls=tiny_dls(), cbs=[DeviceCB(), DDPCB()])
    for cb in learn.cbs: cb.before_fit(learn)
    assert learn.model.module.device == torch.device('cuda:0')
    assert fake_ddp == {'backend': 'gloo', 'device_ids': [0]}
    assert d.default_backend('cuda:0') == 'gloo'
    d.init_distributed()  # the default when no callback chose: the same rule
    assert fake_ddp['backend'] == 'gloo'
    monkeypatch.setenv('MINIAI_DEVICE', 'cuda')  # each process its own GPU: NCCL
    assert d.default_backend('cuda:1') == 'nccl'
    machine(1, local_rank=0, n_procs=1)
    monkeypatch.setenv('MINIAI_DEVICE', 'cuda:0')  # one process on a named GPU: NCCL is fine
    assert d.default_backend('cuda:0') == 'nccl'


@pytest.mark.parametrize('shared', [True, False], ids=['one-gpu-shared', 'a-gpu-each'])
def test_processes_named_to_cuda_0_all_reduce_gradients_with_nccl_when_their_gpus_differ(machine, fake_ddp,
                                                                                          monkeypatch, shared):
    """Issue 29, item 5: the too-few-GPUs error advises MINIAI_DEVICE=cuda:0 when each process is shown a GPU of its
    own, and that made DDP all-reduce gradients with gloo, through host memory. The ranks now compare their GPUs'
    UUIDs once joined: different GPUs get an NCCL group for the gradients; one shared GPU keeps gloo."""
    import miniai.engines.ddp as d
    machine(1, local_rank=1, n_procs=2)
    monkeypatch.setenv('MINIAI_DEVICE', 'cuda:0')
    monkeypatch.setattr(d, 'gpu_id', lambda device: 'GPU-b')  # this rank's; rank 0's is GPU-a unless they share
    other = ('node', 'GPU-b' if shared else 'GPU-a')
    monkeypatch.setattr(d.socket, 'gethostname', lambda: 'node')
    def all_gather_object(out, obj, group=None): out[:] = [other, obj]
    monkeypatch.setattr(d.dist, 'all_gather_object', all_gather_object)
    monkeypatch.setattr(d.dist, 'new_group', lambda backend, **kw: f'{backend} group')
    monkeypatch.setattr(d, 'DistributedDataParallel', lambda m, device_ids, process_group=None, **kw:
                        fake_ddp.update(device_ids=device_ids, group=process_group) or SimpleNamespace(module=m))
    learn = SimpleNamespace(model=FakeModel(), dls=tiny_dls(), cbs=[DeviceCB(), DDPCB()])
    for cb in learn.cbs: cb.before_fit(learn)
    assert fake_ddp == {'backend': 'gloo', 'device_ids': [0], 'group': None if shared else 'nccl group'}
    fake_ddp.clear()
    learn = SimpleNamespace(model=FakeModel(), dls=tiny_dls(), cbs=[DeviceCB(), DDPCB(backend='gloo')])
    for cb in learn.cbs: cb.before_fit(learn)
    assert fake_ddp['group'] is None, 'a backend the user gave is used as given'


def test_ddpcb_refuses_a_model_off_this_ranks_gpu(machine, fake_ddp):
    machine(2, local_rank=1, n_procs=2)
    def before_fit(model, cbs):
        learn = SimpleNamespace(model=model, dls=tiny_dls(), cbs=cbs)
        cbs[-1].before_fit(learn)
    with pytest.raises(RuntimeError, match=r'the model is on cuda:0 but this process \(rank 1, LOCAL_RANK 1\) '
                                           r'trains on cuda:1'):
        before_fit(FakeModel('cuda:0'), [DDPCB()])
    with pytest.raises(RuntimeError, match=r'DDPCB\(backend="nccl"\) needs the model on a GPU.* it is on cpu'):
        before_fit(FakeModel('cpu'), [DDPCB(backend='nccl')])
    late = DeviceCB()
    late.order = DDPCB.order + 1
    with pytest.raises(RuntimeError, match='would wrap the model before DeviceCB moves it'):
        before_fit(FakeModel('cpu'), [late, DDPCB()])
    assert fake_ddp == {}, 'nothing was wrapped'
    with pytest.raises(ValueError, match="backend must be 'nccl', 'gloo' or None"): DDPCB(backend='mpi')


def test_copies_are_async_to_an_accelerator_and_blocking_to_the_cpu(monkeypatch):
    moves = recorded_moves(monkeypatch)
    t = torch.zeros(2)
    to_device({'a': t, 'b': [t, (t,)], 'c': 3}, 'cuda:1')
    assert moves == [('cuda:1', True)] * 3
    moves.clear()
    to_device([t], 'cpu')  # from a GPU, a non-blocking copy could be read before it has arrived
    assert moves == [('cpu', False)]


def test_cpu_batches_for_a_gpu_are_gathered_into_pinned_memory(machine, monkeypatch):
    made = []
    real_empty = torch.empty
    def empty(*shape, pin_memory=False, **kw):  # this machine cannot pin: record the request, give plain memory
        made.append((pin_memory, real_empty(*shape, **kw)))
        return made[-1][1]
    monkeypatch.setattr(torch, 'empty', empty)
    x, idx = torch.arange(30.).view(10, 3), torch.tensor([7, 2, 5])
    out = pinned_rows(x, idx)
    assert torch.equal(out, x[idx]) and made[0][0] and out.data_ptr() == made[0][1].data_ptr(), \
        'gathered in one pass straight into the pinned buffer'
    with pytest.raises(ValueError, match='pin_memory=True is for CPU-held data trained on a CUDA GPU'):
        TensorDataLoader(x, torch.arange(10), pin_memory=True)  # no GPU (for real) here
    machine(1)
    dl = TensorDataLoader(x, torch.arange(10), bs=4, shuffle=True, seed=0, pin_memory=True)
    made.clear()
    batches = list(dl)
    assert len(made) == 2 * len(batches) and all(pin for pin, _ in made), 'inputs and targets both pinned'
    assert torch.equal(torch.cat([xb for xb, _ in batches]).sort(0).values, x)
    assert pins_by_default('cpu') and not pins_by_default('cuda')


def test_data_asked_for_cuda_lands_on_this_ranks_gpu_under_torchrun(machine, monkeypatch):
    """Issue 19, item 4: `TensorDataLoader(device='cuda')` and `fashion_dls(device='cuda')` resolve the device as
    DeviceCB does, so under torchrun rank 1's copy of the data goes to cuda:1, not to cuda:0 before set_device."""
    machine(2, local_rank=1, n_procs=2)
    moves = recorded_moves(monkeypatch)  # no GPU here: record where the data would go
    x, y = torch.zeros(6, 1, 2, 2, dtype=torch.uint8), torch.arange(6)
    TensorDataLoader(x, y, bs=2, device='cuda', mean=0.5, std=0.25)
    TensorDataLoader(x.float(), y, bs=2, device=torch.device('cuda'))
    assert moves == [('cuda:1', False)] * 4
    if find_fashion_mnist() is None: return
    moves.clear()
    fashion_dls(bs=64, n_train=128, n_valid=64, device='cuda')
    assert moves == [('cuda:1', False)] * 4, 'both splits, images and labels'


@needs_data
def test_fashion_data_lives_on_the_default_device(monkeypatch):
    monkeypatch.setenv('MINIAI_DEVICE', 'meta')  # a device that is not the CPU, available everywhere
    dls = fashion_dls(bs=64, n_train=256, n_valid=128)
    xb, yb = next(iter(dls.train))
    assert dls.train.device.type == dls.valid.device.type == xb.device.type == yb.device.type == 'meta'
    assert not dls.train.pin_memory
    assert fashion_dls(bs=64, n_train=256, n_valid=128, device='cpu').train.device.type == 'cpu'


@needs_data
def test_seed_walkthrough_places_only_the_model_and_still_runs_off_the_cpu():
    """Seed 002 puts its models on `def_device` and fits one learner without DeviceCB: its data must be there too.
    The meta device stands in for a GPU (a model there cannot take CPU inputs, as on CUDA)."""
    seed = Path(__file__).parent / 'seeds' / 'seed002.py'
    r = subprocess.run([sys.executable, str(seed)], capture_output=True, text=True, timeout=600,
                       env={**os.environ, 'MINIAI_DEVICE': 'meta', 'MPLBACKEND': 'Agg'})
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'ResBlock torch.Size([1024, 1, 28, 28]) torch.Size([1024, 8, 28, 28])' in r.stdout
    assert '|Linear|(1024, 256)|(1024, 10)|2570|0.00|' in r.stdout


def test_importing_miniai_never_resolves_the_device():
    """With more processes than GPUs, every module imports (so the CPU way out can be taken); reading `def_device`
    raises the one clear error, and MINIAI_DEVICE=cpu makes it the CPU, `import *` included."""
    code = '''
import importlib, pkgutil, torch
torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: 1
import miniai
for m in pkgutil.iter_modules(miniai.__path__): importlib.import_module(f'miniai.{m.name}')
print('imported all')
import miniai.conv
try: miniai.conv.def_device
except RuntimeError as e: print('error:', e)
'''
    env = {**{k: v for k, v in os.environ.items() if k not in TORCHRUN}, 'LOCAL_RANK': '1', 'LOCAL_WORLD_SIZE': '2',
           'TORCHELASTIC_RUN_ID': 'test'}  # as torchrun sets them
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'imported all' in r.stdout and 'error: miniai: 2 processes on this machine' in r.stdout
    star = 'from miniai.conv import *\nprint(def_device)'
    r = subprocess.run([sys.executable, '-c', code + star], capture_output=True, text=True, timeout=120,
                       env={**env, 'MINIAI_DEVICE': 'cpu'})
    assert r.returncode == 0 and r.stdout.splitlines()[-1] == 'cpu', r.stderr[-3000:]
