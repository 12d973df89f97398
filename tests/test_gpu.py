"""On a real CUDA GPU (skipped, with the reason, where torch sees none): no host-device synchronisation in the
per-batch path, exact resume, fp16 with its loss scaler, the seed walk-through, pinned batches, two processes
sharing one GPU, and the error for more processes than GPUs.

    bash .gpu/run.sh python -m pytest -q tests/test_gpu.py
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torcheval.metrics import MulticlassAccuracy

from miniai.core.events import Callback
from miniai.runs.ckptfile import read_checkpoint
from miniai.data.fashion import fashion_dls, find_fashion_mnist
from miniai.learner import DeviceCB, MetricsCB, ProgressCB, TrainLearner
from miniai.app.recipe import build_model, make_learner
from test_distributed import environ, torchrun

HERE = Path(__file__).parent
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(find_fashion_mnist() is None, reason='Fashion-MNIST is not installed')]


class NoSyncCB(Callback):
    """Make every host-device synchronisation an error (`torch.cuda.set_sync_debug_mode('error')`) from an epoch's
    first batch until its end: loading, moving, predicting, the loss, backward, the step and every callback's
    per-batch work, from the second batch on the data fetch too. The epoch's end, where metrics are read, is not."""
    order = -1000  # first in before_batch, and first in after_epoch: off before MetricsCB reads its values
    def before_batch(self, learn): torch.cuda.set_sync_debug_mode('error')
    def after_epoch(self, learn): torch.cuda.set_sync_debug_mode('default')
    def cleanup_epoch(self, learn): torch.cuda.set_sync_debug_mode('default')


def mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))


def test_the_sync_check_catches_a_sync():
    class ReadsTheLoss(Callback):
        def after_batch(self, learn): learn.loss.item()
    learn = TrainLearner(mlp(), fashion_dls(bs=256, n_train=1024, n_valid=256), F.cross_entropy,
                         cbs=[DeviceCB(), NoSyncCB(), ReadsTheLoss()])
    with pytest.raises(RuntimeError, match='called a synchronizing CUDA operation'): learn.fit(1)


@pytest.mark.parametrize('data', ['cuda', 'cpu'])
def test_default_callbacks_never_sync_per_batch(data):
    dls = fashion_dls(bs=256, n_train=40 * 256, n_valid=1024, device=data)  # 40 batches: a flush mid-epoch
    assert dls.train.pin_memory == (data == 'cpu'), 'CPU-held data for a GPU comes in pinned batches'
    metrics = MetricsCB(accuracy=MulticlassAccuracy())
    # the defaults: MetricsCB hands its buffer to torcheval every 32 batches, within the checked part of the epoch
    learn = TrainLearner(mlp(), dls, F.cross_entropy, lr=0.1, cbs=[DeviceCB(), metrics, ProgressCB(), NoSyncCB()])
    learn.fit(2)
    assert metrics.history[-1]['accuracy'] > 0.7


def test_main_job_callbacks_never_sync_per_batch():
    "The main job's Learner: bf16 + channels-last, one-cycle AdamW, recorder, plotting progress, every augmentation."
    dls = fashion_dls(bs=256, n_train=36 * 256, n_valid=512)  # 36 batches: MetricsCB flushes mid-epoch
    learn, _ = make_learner(build_model('fashion_resnet_wide'), dls, epochs=1, lr=1e-2, precision='bf16-cl',
                            augment='full', label_smoothing=0.1)
    learn.fit(1, cbs=[NoSyncCB()])
    assert next(learn.model.parameters()).device.type == 'cuda'


@pytest.mark.parametrize('fp16', [False, True], ids=['fp32', 'fp16'])
def test_resumed_gpu_run_ends_bitwise_identical(tmp_path, fp16):
    "Shuffled data, dropout and augmentation on the GPU, deterministic kernels; fp16 adds the loss scaler's state."
    def job(out, *args):
        cmd = [sys.executable, str(HERE / 'gpu_resume_job.py'), str(out), '3', *map(str, args)]
        r = subprocess.run(cmd + (['--fp16'] if fp16 else []), capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
    job(tmp_path / 'full')
    job(tmp_path / 'cut', '--stop-after', 0)
    ck = read_checkpoint(tmp_path / 'cut' / 'last.ckpt')
    assert ck['epoch'] == 0 and len(ck['rng']['cuda']) == torch.cuda.device_count()
    if fp16: assert ck['callbacks']['MixedPrecision']['scaler']['scale'] > 0
    job(tmp_path / 'cut', '--resume', tmp_path / 'cut' / 'last.ckpt')
    a, b = load_file(tmp_path / 'full' / 'final.safetensors'), load_file(tmp_path / 'cut' / 'final.safetensors')
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_seed_walkthrough_runs_on_the_gpu():
    code = ("import runpy, sys; g = runpy.run_path(sys.argv[1]); "
            "print('MODEL', next(g['model'].parameters()).device, 'DATA', g['dls'].train.device)")
    r = subprocess.run([sys.executable, '-c', code, str(HERE / 'seeds' / 'seed002.py')], capture_output=True,
                       text=True, timeout=600, env=environ({'MPLBACKEND': 'Agg'}))
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'MODEL cuda:0 DATA cuda:0' in r.stdout
    assert 'Total number of flops: 4.67582' in r.stdout


def test_two_processes_share_one_gpu_with_gloo(tmp_path):
    single = subprocess.run([sys.executable, str(HERE / 'ddp_job.py'), tmp_path / 'single'], capture_output=True,
                            text=True, timeout=300, env=environ())
    assert single.returncode == 0, single.stderr[-3000:]
    # no --backend: DDPCB finds that both ranks are on one GPU (their UUIDs) and keeps gloo by itself
    r = torchrun(tmp_path / 'double', env={'MINIAI_DEVICE': 'cuda:0'}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for rank in (0, 1):
        where = json.load(open(tmp_path / f'double/rank{rank}/where.json'))
        assert (where['model'], where['data'], where['backend']) == ('cuda:0', 'cuda:0', 'gloo')
        assert where['group_ended'], 'the job ended its process group'
    w0, w1 = (load_file(tmp_path / f'double/rank{r}/weights.safetensors') for r in (0, 1))
    ws = load_file(tmp_path / 'single/rank0/weights.safetensors')
    assert all(torch.equal(w0[k], w1[k]) for k in w0), 'the ranks disagree'
    assert max((w0[k] - ws[k]).abs().max().item() for k in ws) < 1e-5


def test_more_processes_than_gpus_is_one_clear_error(tmp_path):
    n_gpus = torch.cuda.device_count()
    if n_gpus > 3: pytest.skip(f'{n_gpus} GPUs: starting {n_gpus + 1} processes to run out of them is too many here')
    r = torchrun(tmp_path, n=n_gpus + 1, timeout=300)
    assert r.returncode != 0
    assert f'{n_gpus + 1} processes on this machine' in r.stderr and f'only {n_gpus} CUDA GPU(s)' in r.stderr
    assert 'MINIAI_DEVICE=cpu' in r.stderr


def test_fp16_scaler_and_pinned_batches_reach_the_gpu():
    from miniai.accel import MixedPrecision
    from miniai.learner import Learner
    dls = fashion_dls(bs=256, n_train=1024, n_valid=256, device='cpu')
    xb, yb = next(iter(dls.train))
    assert xb.device.type == yb.device.type == 'cpu' and xb.is_pinned() and yb.is_pinned(), 'CPU data: CPU batches'
    seen = []
    class Where(Callback):
        order = DeviceCB.order - 1  # before DeviceCB: the loader itself delivers to the GPU during the fit
        def before_batch(self, learn): seen.append(tuple(t.device.type for t in learn.batch))
    mp = MixedPrecision(torch.float16)
    Learner(mlp(), dls, F.cross_entropy, cbs=[DeviceCB(), mp, Where()]).fit(1)
    assert set(seen) == {('cuda', 'cuda')} and mp.scaler is not None and mp.state_dict()['scaler']['scale'] > 0
    assert next(iter(dls.train))[0].device.type == 'cpu', 'after the fit, CPU batches again'


def test_get_preds_on_the_gpu_copies_each_batch_to_the_cpu_without_a_sync():
    "Issue 29, item 7: predictions leave the GPU batch by batch, into pinned memory, with no wait until the end."
    dls = fashion_dls(bs=256, n_train=1024, n_valid=1024)
    learn = TrainLearner(mlp(), dls, F.cross_entropy, lr=0.1, cbs=[DeviceCB()])
    learn.get_preds()  # warm-up: CUDA's lazy set-up is not the loop's
    preds, targs = learn.get_preds(cbs=[NoSyncCB()])
    assert preds.device.type == targs.device.type == 'cpu' and preds.shape == (1024, 10)
    xs = torch.cat([xb for xb, _ in dls.valid])
    with torch.no_grad(): want = learn.model(xs).cpu()
    assert torch.allclose(preds, want, atol=1e-5) and torch.equal(targs, dls.valid.y.cpu())
