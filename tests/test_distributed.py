"""DDP on CPU (gloo), two processes under torchrun: same weights as one process, global metrics, rank 0 writes.

The runs use the CPU way out the README gives (`MINIAI_DEVICE=cpu`, or DeviceCB('cpu') with DDPCB(backend='gloo')),
so they run the same on a machine with fewer GPUs than processes."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from miniai.runs.ckptfile import read_checkpoint
from miniai.data.fashion import find_fashion_mnist

JOB = Path(__file__).parent / 'ddp_job.py'
pytestmark = pytest.mark.skipif(find_fashion_mnist() is None or not torch.distributed.is_available(),
                                reason='needs Fashion-MNIST and torch.distributed')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def torchrun(*args, n=2, timeout=120, env=None):
    "Run the job under torchrun with `n` processes on this machine, `env` added to the environment."
    cmd = [sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={n}', '--master_addr=127.0.0.1',
           f'--master_port={free_port()}', str(JOB), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=environ(env))


def environ(extra=None) -> dict:
    "This environment without MINIAI_DEVICE, plus `extra`."
    env = {k: v for k, v in os.environ.items() if k != 'MINIAI_DEVICE'}
    env.update(extra or {})
    return env


CPU = {'MINIAI_DEVICE': 'cpu'}


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp('ddp')
    single = subprocess.run([sys.executable, str(JOB), out / 'single'], capture_output=True, text=True, timeout=120,
                            env=environ(CPU))
    assert single.returncode == 0, single.stderr[-3000:]
    double = torchrun(out / 'double', '--slow-save', 1, env=CPU)  # rank 0 takes a second more to write a checkpoint
    assert double.returncode == 0, double.stderr[-3000:]
    return out, single, double


def test_two_processes_match_one(runs):
    out, _, _ = runs
    w0, w1 = load_file(out / 'double/rank0/weights.safetensors'), load_file(out / 'double/rank1/weights.safetensors')
    ws = load_file(out / 'single/rank0/weights.safetensors')
    assert all(torch.equal(w0[k], w1[k]) for k in w0), 'the ranks disagree'
    diff = max((w0[k] - ws[k]).abs().max().item() for k in ws)
    print(f'\nmax |weight(2 procs) - weight(1 proc)| after one epoch of 16 steps: {diff:.2e}')
    assert diff < 1e-6


def test_reported_metrics_are_global(runs):
    out, _, _ = runs
    h1 = json.load(open(out / 'single/rank0/history.json'))
    h2 = json.load(open(out / 'double/rank0/history.json'))
    v1, v2 = h1[-1], h2[-1]
    assert v1['train'] == v2['train'] == 'eval'
    print(f"valid accuracy: 1 process {v1['accuracy']:.4f}, 2 processes {v2['accuracy']:.4f}")
    assert v2['accuracy'] == pytest.approx(v1['accuracy'], abs=1e-6)
    assert v2['loss'] == pytest.approx(v1['loss'], rel=1e-5)
    assert json.load(open(out / 'double/rank1/history.json'))[-1]['accuracy'] == pytest.approx(v2['accuracy'])


def test_only_rank0_prints_and_writes(runs):
    out, single, double = runs
    assert double.stdout.count('accuracy') == 1, double.stdout
    assert len([l for l in double.stdout.splitlines() if l.split()[2:4] in (['0', 'train'], ['0', 'eval'])]) == 2
    assert (out / 'double/rank0/last.ckpt').exists() and not (out / 'double/rank1/last.ckpt').exists()


def test_the_cpu_way_out_runs_gloo_on_the_cpu(runs):
    out, _, _ = runs
    for r in (0, 1):
        where = json.load(open(out / f'double/rank{r}/where.json'))
        assert (where['model'], where['data'], where['backend']) == ('cpu', 'cpu', 'gloo')


def test_every_rank_waits_until_rank_0_has_written_the_checkpoint(runs):
    "Rank 0 writes a second slower than usual: rank 1 looks for the file as soon as its SaveModelCB returns."
    out, _, _ = runs
    assert json.load(open(out / 'double/rank1/where.json'))['saw_checkpoint'] is True


def test_the_process_group_ddpcb_joined_ends_with_the_fit(runs):
    "Issue 19 item 8: it was never destroyed (a leak, and a warning at exit)."
    out, _, _ = runs
    assert all(json.load(open(out / f'double/rank{r}/where.json'))['group_ended'] for r in (0, 1))


def test_a_checkpoint_written_inside_ddp_loads_into_a_plain_model(runs):
    out, _, _ = runs
    ck = read_checkpoint(out / 'double/rank0/last.ckpt')
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))
    assert set(ck['model']) == set(model.state_dict()), 'DDP\'s module. prefix leaked into the checkpoint'
    model.load_state_dict(ck['model'])
    w = load_file(out / 'double/rank0/weights.safetensors')
    assert all(torch.equal(w[k], v) for k, v in model.state_dict().items())


def test_a_failing_rank_stops_the_run(tmp_path):
    # the other CPU way out: explicit CPU devices and gloo, with no environment variable
    r = torchrun(tmp_path, '--raise-at-batch', 3, '--device', 'cpu', '--backend', 'gloo', timeout=150)
    assert r.returncode != 0
    assert 'rank 1 fails at batch 3' in r.stderr + r.stdout


def test_a_rank_that_measured_no_batch_does_not_hang_the_others(tmp_path):
    """Issue 19 item 8: MetricsCB returned early on a rank that saw no batch while the others waited for it in the
    merging collective (until the timeout). Every rank must take part: here rank 1 runs none of its validation."""
    r = torchrun(tmp_path, '--no-valid-on-rank1', '--timeout', 20, env=CPU, timeout=150)
    assert r.returncode == 0, r.stderr[-3000:]
    h0, h1 = (json.load(open(tmp_path / f'rank{i}/history.json')) for i in (0, 1))
    assert [row['train'] for row in h0] == ['train', 'eval'] and h0 == [{**row, 'time': h0[i]['time']} for i, row in
                                                                        enumerate(h1)], 'both ranks report the same'


def test_a_batch_cancelled_on_one_rank_only_keeps_the_stop_agreement_in_step(tmp_path):
    """Issue 29, item 6: the ranks compare stop requests in rounds counted per batch. Rank 1 cancels its training batch
    3 after the step (its `after_batch` is skipped there), rank 0 is sent SIGTERM after batch 8, and rounds run every
    batch (MINIAI_STOP_CHECK_SECONDS=0): every rank must still stop after the same batch and write one checkpoint."""
    r = torchrun(tmp_path, '--cancel-on-rank1', 3, '--stop-at-batch', 8, '--timeout', 20,
                 env={**CPU, 'MINIAI_STOP_CHECK_SECONDS': '0'}, timeout=150)
    assert r.returncode != 0 and 'Timed out' not in r.stderr, r.stderr[-3000:]  # was: gloo timed out on both ranks
    stops = [json.load(open(tmp_path / f'rank{i}/stopped.json')) for i in (0, 1)]  # written on `Interrupted` only
    assert stops[0] == stops[1] and stops[0]['epoch'] == 0 and stops[0]['batch'] > 8, stops
    assert read_checkpoint(tmp_path / 'interrupted.ckpt')['position']['batch'] == stops[0]['batch'] + 1


@pytest.fixture
def one_process_torchrun(monkeypatch):
    "This process as rank 0 of a torchrun job as DDPCB sees it before joining: WORLD_SIZE 2 until the group exists."
    import miniai.engines.ddp as d
    import torch.distributed as dist
    for k, v in dict(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(free_port()), RANK='0', LOCAL_RANK='0',
                     WORLD_SIZE='1').items(): monkeypatch.setenv(k, v)
    monkeypatch.setattr(d, 'world_size', lambda: dist.get_world_size() if dist.is_initialized() else 2)
    yield dist
    if dist.is_initialized(): dist.destroy_process_group()


def tiny_learner(cbs):
    from miniai.datasets import DataLoaders
    from miniai.data.loader import TensorDataLoader
    from miniai.learner import MetricsCB, TrainLearner
    import torch.nn.functional as F
    x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
    dls = DataLoaders(TensorDataLoader(x, y, bs=8), TensorDataLoader(x, y, bs=8))
    return TrainLearner(nn.Linear(4, 2), dls, F.cross_entropy, lr=0.1, cbs=[MetricsCB(), *cbs])


def test_ddpcb_ends_the_group_it_joined_even_after_an_error(one_process_torchrun):
    "Issue 19 item 8: DDPCB joined the process group and never left it, after a fit or after an error."
    from miniai.core.events import Callback
    from miniai.engines.ddp import DDPCB
    dist = one_process_torchrun
    seen = []
    class Spy(Callback):
        def before_epoch(self, learn): seen.append(dist.is_initialized())
    learn = tiny_learner([DDPCB(backend='gloo'), Spy()])
    learn.fit(1)
    assert seen == [True, True] and not dist.is_initialized(), 'joined during the fit, left after it'
    class Boom(Callback):
        def after_batch(self, learn): raise RuntimeError('boom')
    with pytest.raises(RuntimeError, match='boom'): learn.fit(1, cbs=[Boom()])
    assert not dist.is_initialized(), 'left after an error too'


def test_ddpcb_leaves_a_group_the_user_made(one_process_torchrun):
    from miniai.engines.ddp import DDPCB
    dist = one_process_torchrun
    dist.init_process_group('gloo')
    tiny_learner([DDPCB()]).fit(1)
    assert dist.is_initialized(), "the user's group is the user's to end"


def test_a_job_that_leaves_sharding_to_ddpcb_resumes_mid_epoch_exactly(runs):
    """The job gives DDPCB whole loaders to shard. Its checkpoint counts the batches of a rank's shard (16), and
    ResumeCB (order -10) used to compare that with the whole loader (32) before DDPCB (order 10) had sharded it:
    'saved with 16 training batches an epoch, this fit has 32'. Now the data is checked and placed once sharded."""
    out, _, _ = runs
    stopped = torchrun(out / 'stopped', '--stop-at-batch', 5, env={**CPU, 'MINIAI_STOP_CHECK_SECONDS': '0'})
    assert stopped.returncode != 0 and (out / 'stopped/interrupted.ckpt').exists(), stopped.stderr[-3000:]
    pos = read_checkpoint(out / 'stopped/interrupted.ckpt')['position']
    assert pos['n_batches'] == 16 and 5 < pos['batch'] < 16, pos  # the ranks agree a round after the signal
    resumed = torchrun(out / 'resumed', '--resume', out / 'stopped/interrupted.ckpt', env=CPU)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ref, got = (load_file(out / f'{d}/rank0/weights.safetensors') for d in ('double', 'resumed'))
    assert all(torch.equal(ref[k], got[k]) for k in ref), 'the resumed job ends on the uninterrupted weights'
