"""AccelerateCB on Hugging Face Accelerate: the same weights as TrainCB in one process, as one process when two run
under `accelerate launch` (CPU, gloo), only the main process printing and saving, checkpoints that load into the
plain model, the Learner given back as it was, bf16 on CPU, fp16 on GPU (and a warning for fp16 on CPU)."""
import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torcheval.metrics import MulticlassAccuracy

from miniai.core.events import Callback
from miniai.runs.ckptfile import read_checkpoint
from miniai.datasets import DataLoaders
from miniai.data.fashion import fashion_dls, find_fashion_mnist
from miniai.conv import def_device
from miniai.learner import DeviceCB, Learner, MetricsCB, TrainCB, TrainLearner

accelerate = pytest.importorskip('accelerate', reason="needs Hugging Face Accelerate (pip install -e '.[dev]')")
from miniai.accel import AccelerateCB  # noqa: E402

JOB = Path(__file__).parent / 'accelerate_job.py'
pytestmark = pytest.mark.skipif(find_fashion_mnist() is None, reason='needs Fashion-MNIST')
#: on CPUs too: --multi_gpu is Accelerate's torchrun launcher (plain --num_processes 2 starts one process where there
#: is no GPU); AccelerateCB tells Accelerate to join the processes over gloo when no GPU is visible
LAUNCH = ['-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2', '--num_machines', '1',
          '--mixed_precision', 'no', '--dynamo_backend', 'no', '--main_process_port', '0']


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))


def small_dls():
    return fashion_dls(bs=128, n_train=1024, n_valid=256, seed=0)


def weights(model): return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a, b, tol=0.): return a.keys() == b.keys() and all((a[k] - b[k]).abs().max() <= tol for k in a)


# -- two processes under accelerate launch --------------------------------------------------------------------------

@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp('accelerate')
    env = {**os.environ, 'CUDA_VISIBLE_DEVICES': ''}  # CPU processes (gloo) on any machine, GPUs or not
    # both at once: most of each run is starting Python and importing torch
    procs = [subprocess.Popen([sys.executable, *args, str(JOB), out / name], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
             for name, args in (('single', []), ('double', LAUNCH))]
    done = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=180)
            assert proc.returncode == 0, stderr[-3000:]
            done.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    finally:
        for proc in procs:
            if proc.poll() is None: os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its workers
    return out, *done


@pytest.mark.parametrize('loader', ['tensor', 'torch'])
def test_two_processes_match_one(runs, loader):
    out = runs[0]
    w0, w1 = (load_file(out / f'double/rank{r}/{loader}.safetensors') for r in (0, 1))
    ws = load_file(out / f'single/rank0/{loader}.safetensors')
    assert same(w0, w1), 'the two processes disagree'
    diff = max((w0[k] - ws[k]).abs().max().item() for k in ws)
    print(f'\n{loader} loader: max |weight(2 processes) - weight(1 process)| after 16 steps at global batch 128: '
          f'{diff:.2e}')
    assert diff < 1e-6
    assert not same(ws, load_file(out / 'single/rank0/tensor.safetensors' if loader == 'torch' else
                                  out / 'single/rank0/torch.safetensors')), 'the two fits should see other orders'


def test_both_processes_took_part_and_got_the_learner_back(runs):
    out = runs[0]
    single = json.load(open(out / 'single/rank0/state.json'))
    double = [json.load(open(out / f'double/rank{r}/state.json')) for r in (0, 1)]
    assert [s['processes'] for s in single] == [1, 1]
    assert [[s['processes'], s['process_index']] for d in double for s in d] == [[2, 0]] * 2 + [[2, 1]] * 2
    for s in single + double[0] + double[1]:
        assert s['model_is_plain'] and s['opt_is_plain'] and s['dls_are_plain'], s


def test_reported_metrics_are_global(runs):
    out = runs[0]
    v1 = json.load(open(out / 'single/rank0/history.json'))[-1]
    v2 = json.load(open(out / 'double/rank0/history.json'))[-1]
    assert v1['train'] == v2['train'] == 'eval'
    print(f"\nvalid accuracy: 1 process {v1['accuracy']:.4f}, 2 processes {v2['accuracy']:.4f}")
    assert v2['accuracy'] == pytest.approx(v1['accuracy'], abs=1e-6)
    assert v2['loss'] == pytest.approx(v1['loss'], rel=1e-5)


def test_only_the_main_process_prints_and_saves(runs):
    out, single, double = runs
    assert single.stdout.count('accuracy') == 1
    assert double.stdout.count('accuracy') == 1, double.stdout  # one table, from rank 0
    assert (out / 'double/rank0/last.ckpt').exists() and not (out / 'double/rank1/last.ckpt').exists()


def test_checkpoint_written_under_it_loads_into_the_plain_model(runs):
    out = runs[0]
    ck = out / 'double/rank0/last.ckpt'
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))
    assert list(read_checkpoint(ck)['model']) == list(model.state_dict())  # no 'module.' from the DDP wrapper
    Learner(model, small_dls(), F.cross_entropy).load(ck)
    assert same(weights(model), load_file(out / 'double/rank0/tensor.safetensors'))


# -- one process --------------------------------------------------------------------------------------------------

def fit_with(cb, learner=Learner, dls=None, precision_cbs=()):
    model = mlp()
    learn = learner(model, dls or small_dls(), F.cross_entropy, lr=0.1, cbs=[cb, *precision_cbs])
    learn.fit(1)
    return learn, model


def test_no_mixed_precision_matches_train_cb():
    _, plain = fit_with(TrainCB(), precision_cbs=[DeviceCB(def_device)])  # where Accelerate puts the model
    _, acc = fit_with(AccelerateCB(mixed_precision='no'))
    _, own = fit_with(AccelerateCB(mixed_precision='no'), learner=TrainLearner)  # TrainLearner's own steps
    assert not same(weights(plain), weights(mlp().to(def_device))), 'nothing was trained'
    assert same(weights(acc), weights(plain)) and same(weights(own), weights(plain))


class Spy(Callback):
    "Records what the Learner holds during the fit."
    order = 50
    def before_epoch(self, learn): self.seen = (learn.model, learn.opt, learn.dls.train)


def test_the_learner_is_given_back_and_reusable(tmp_path):
    dls = small_dls()
    tds = TensorDataset(dls.train.normalise(dls.train.x), dls.train.y)  # the loader holds uint8
    tdls = DataLoaders(DataLoader(tds, batch_size=128, shuffle=True, generator=torch.Generator().manual_seed(0)),
                       dls.valid)
    train, spy, cb = tdls.train, Spy(), AccelerateCB(mixed_precision='bf16')
    learn, model = fit_with(cb, dls=tdls, precision_cbs=[spy])
    opt = learn.opt
    assert type(spy.seen[1]).__name__ == 'AcceleratedOptimizer' and spy.seen[2] is not train  # prepared meanwhile
    assert learn.model is model and learn.dls.train is train and learn.dls.valid is dls.valid
    assert isinstance(opt, torch.optim.SGD) and spy.seen[1].optimizer is opt
    assert not {'forward', '_original_forward', '_is_accelerate_prepared'} & set(vars(model))
    assert not {'save', '_is_accelerate_prepared'} & (set(vars(learn)) | set(vars(opt)))
    assert train.sampler.generator is not None and 'step' not in vars(opt)
    learn.summary()  # a plain model again: looks, saves and a later fit work
    learn.save(tmp_path / 'a.ckpt')
    assert list(read_checkpoint(tmp_path / 'a.ckpt')['model']) == list(model.state_dict())
    learn.fit(1)
    assert learn.model is model


def test_an_error_in_the_fit_reaches_the_caller_and_the_learner_is_given_back():
    class Boom(Callback):
        def after_batch(self, learn):
            if learn.iter == 2: raise RuntimeError('boom at batch 2')
    dls = small_dls()
    model = mlp()
    learn = Learner(model, dls, F.cross_entropy, cbs=[AccelerateCB(mixed_precision='no'), Boom()])
    with pytest.raises(RuntimeError, match='boom at batch 2'): learn.fit(1)
    assert learn.model is model and isinstance(learn.opt, torch.optim.SGD) and 'forward' not in vars(model)


def test_bf16_runs_the_model_in_bf16_and_leaves_it_fp32():
    dtypes = []
    model = mlp()
    model[1].register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    preds = []
    class Preds(Callback):
        def after_predict(self, learn): preds.append(learn.preds.dtype)
    learn = Learner(model, small_dls(), F.cross_entropy, lr=0.1,
                    cbs=[AccelerateCB(mixed_precision='bf16'), Preds()])
    learn.fit(1)
    assert set(dtypes) == {torch.bfloat16} and set(preds) == {torch.float32}  # outputs come back as fp32
    dtypes.clear()
    assert model(torch.randn(2, 1, 28, 28)).dtype == torch.float32 and dtypes == [torch.float32]


@pytest.mark.skipif(torch.cuda.is_available(), reason='fp16 on a GPU is the real thing (see the cuda test)')
def test_fp16_on_cpu_warns_and_trains_in_fp32():
    with pytest.warns(UserWarning, match="fp16 needs a GPU; on the CPU Accelerate trains in fp32"):
        cb = AccelerateCB()  # the course's default, fp16
    _, model = fit_with(cb)
    _, plain = fit_with(TrainCB())
    assert same(weights(model), weights(plain))  # fp32


class HandSGD:
    def __init__(self, params, lr): self.params, self.lr = list(params), lr
    def step(self):
        with torch.no_grad():
            for p in self.params: p -= self.lr * p.grad
    def zero_grad(self):
        for p in self.params: p.grad = None


def test_fp16_loss_scaling_refuses_what_it_cannot_scale(monkeypatch):
    "With a loss scaler, a Learner's own backward or an optimizer that is not torch's would go wrong silently."
    cb = AccelerateCB(mixed_precision='no')
    monkeypatch.setattr(cb.acc, 'scaler', object())  # what fp16 on a GPU has; the checks are the same on CPU
    model = mlp()
    learn = TrainLearner(model, small_dls(), F.cross_entropy, cbs=[cb])
    with pytest.raises(TypeError, match='TrainLearner defines backward itself'): learn.fit(1)
    assert learn.model is model
    learn = Learner(model, small_dls(), F.cross_entropy, cbs=[cb], opt_func=HandSGD)
    with pytest.raises(TypeError, match='HandSGD is not one'): learn.fit(1)


def test_hand_written_optimizer_passes_through():
    _, model = fit_with(AccelerateCB(mixed_precision='no'), dls=None)
    learn = Learner(mlp(), small_dls(), F.cross_entropy, lr=0.1, cbs=[AccelerateCB(mixed_precision='no')],
                    opt_func=HandSGD)
    learn.fit(1)
    assert isinstance(learn.opt, HandSGD) and same(weights(learn.model), weights(model), tol=1e-6)


def test_a_loader_that_cannot_be_shared_among_processes_is_refused(monkeypatch):
    cb = AccelerateCB(mixed_precision='no')
    monkeypatch.setattr(type(cb.acc), 'num_processes', property(lambda self: 2))
    dls = small_dls()
    learn = Learner(mlp(), DataLoaders(list(dls.train), dls.valid), F.cross_entropy, cbs=[cb])
    with pytest.raises(TypeError, match=r'cannot share dls.train \(a list\) among 2 processes'): learn.fit(1)


def test_bad_arguments_and_a_missing_accelerate(monkeypatch):
    with pytest.raises(ValueError, match="mixed_precision must be one of 'no', 'fp16', 'bf16'"):
        AccelerateCB(mixed_precision='fp32')
    monkeypatch.setitem(sys.modules, 'accelerate', None)
    with pytest.raises(ImportError, match='pip install accelerate'): AccelerateCB(mixed_precision='no')


@pytest.mark.cuda
@pytest.mark.parametrize('precision,dtype', [('fp16', torch.float16), ('bf16', torch.bfloat16)])
def test_mixed_precision_on_the_gpu(precision, dtype):
    dtypes = []
    model = mlp()
    model[1].register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    metrics = MetricsCB(accuracy=MulticlassAccuracy())
    cb = AccelerateCB(mixed_precision=precision)
    learn = Learner(model, fashion_dls(bs=128, n_train=4096, n_valid=1024, seed=0), F.cross_entropy, lr=0.1,
                    cbs=[cb, metrics])
    learn.fit(2)
    assert (cb.acc.scaler is not None) == (precision == 'fp16')
    assert set(dtypes) == {dtype} and next(model.parameters()).device.type == 'cuda'
    assert learn.model is model and 'forward' not in vars(model)
    assert metrics.history[-1]['accuracy'] > 0.7
    refused = pytest.raises(TypeError, match='defines backward itself')
    with refused if precision == 'fp16' else warnings.catch_warnings():  # bf16 takes a TrainLearner's own steps
        TrainLearner(mlp(), small_dls(), F.cross_entropy, cbs=[cb]).fit(1)


@pytest.mark.parametrize('own_generator', [False, True], ids=['global-rng', 'own-generator'])
def test_a_run_over_torch_dataloaders_saves_and_resumes_exactly(tmp_path, own_generator):
    """Accelerate's prepared loader has state_dict() whatever it wraps, and over a torch DataLoader it raises
    AttributeError ('dl_state_dict'): SaveModelCB's first save failed. Its order comes from the global RNG, or from a
    generator of its own, and the checkpoint holds either, so the resume is exact."""
    from miniai.runs.checkpoint import SaveModelCB
    from miniai.core.events import CancelFitException
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(64, 4, generator=g), torch.randint(0, 2, (64,), generator=g))
    class StopAfterEpoch0(Callback):
        order = 100
        def after_epoch(self, learn):
            if not learn.training and learn.epoch == 0: raise CancelFitException()
    def make(out):
        torch.manual_seed(0)
        gen = torch.Generator().manual_seed(1) if own_generator else None
        dls = DataLoaders(DataLoader(ds, batch_size=8, shuffle=True, generator=gen), DataLoader(ds, batch_size=8))
        model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.3), nn.Linear(8, 2))
        return TrainLearner(model, dls, F.cross_entropy, lr=0.1, cbs=[MetricsCB(), AccelerateCB(mixed_precision='no'),
                                                                                   SaveModelCB(out, every_epoch=True)])
    ref = make(tmp_path / 'ref')
    ref.fit(3)
    make(tmp_path / 'run').fit(3, cbs=[StopAfterEpoch0()])
    assert read_checkpoint(tmp_path / 'run/last.ckpt')['epoch'] == 0
    resumed = make(tmp_path / 'run')
    resumed.fit(3, resume=tmp_path / 'run/last.ckpt')
    assert same(weights(resumed.model), weights(ref.model))
