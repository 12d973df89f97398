"""On a cluster: the main job (`python -m miniai train`) as two CPU processes (gloo), under `torchrun` or started the
way torchrun starts them. Ranks stop together wherever a signal lands, one checkpoint holds them all and resuming from
it ends bitwise as an uninterrupted run; a rank killed mid-epoch restarts by itself (`--max-restarts 1`, `--resume
auto`) to the same weights; two torchrun launchers as two nodes give the one-node result.

Signals come at fixed batches from inside (`MINIAI_DRILL`, see `miniai.runs.interrupt.drills_from_env`), so no test waits
on timing. Each run is the tiny seed002 ResNet on 384 images, 6 steps an epoch, one thread per process."""
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from miniai.runs.ckptfile import read_checkpoint
from miniai.data.fashion import find_fashion_mnist

pytestmark = pytest.mark.skipif(find_fashion_mnist() is None or not torch.distributed.is_available(),
                                reason='needs Fashion-MNIST and torch.distributed')

JOB = ['-m', 'miniai', 'train', '--epochs', 2, '--bs', 64, '--n-train', 384, '--n-valid', 64, '--model',
       'seed002_resnet', '--no-summary', '--no-tta', '--threads', 1]
ENV = {**{k: v for k, v in os.environ.items() if not k.startswith(('MINIAI_', 'TORCHELASTIC_'))},
       'MINIAI_DEVICE': 'cpu', 'OMP_NUM_THREADS': '1', 'MPLBACKEND': 'Agg', 'CUDA_VISIBLE_DEVICES': '',
       'TORCH_DISABLE_SHARE_RDZV_TCP_STORE': '1'}  # restarted workers must not read the dead ones' addresses (#135712)
TIMEOUT = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def torchrun(out: Path, *args, launcher=(), drill=None) -> subprocess.CompletedProcess:
    "The main job under torchrun, two processes on this machine (`launcher`: more torchrun options)."
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc-per-node', '2', *launcher]
    if not launcher: cmd += ['--master-addr', '127.0.0.1', '--master-port', str(free_port())]
    env = {**ENV, **({'MINIAI_DRILL': drill} if drill else {})}
    return subprocess.run([*cmd, *map(str, JOB), '--out', str(out), *map(str, args)], capture_output=True, text=True,
                          timeout=TIMEOUT, env=env)


def two_ranks(out: Path, drill: str) -> list[subprocess.CompletedProcess]:
    """The main job as the two processes torchrun would start (the same variables), started here so that each one's
    exit code is seen as it is (torchrun reports only the first failure). The ranks compare notes after every batch
    (`MINIAI_STOP_CHECK_SECONDS=0`), so where they stop follows from where the signals land, whatever the machine's
    speed; the other runs keep the default pace, which the ranks work out together."""
    port, procs = free_port(), []
    for r in (0, 1):
        env = {**ENV, 'MINIAI_DRILL': drill, 'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': str(port), 'RANK': str(r),
               'LOCAL_RANK': str(r), 'WORLD_SIZE': '2', 'LOCAL_WORLD_SIZE': '2', 'MINIAI_STOP_CHECK_SECONDS': '0'}
        procs.append(subprocess.Popen([sys.executable, *map(str, JOB), '--out', str(out)], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=env))
    res = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=TIMEOUT)
        res.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return res


def weights(path: Path) -> dict: return read_checkpoint(path)['model']


def same(a: dict, b: dict) -> bool: return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def csv_rows(out: Path) -> list: return [l.split(',')[2:4] for l in (out / 'metrics.csv').read_text().splitlines()[1:]]


ONE_ROW_EACH = [['0', 'train'], ['0', 'eval'], ['1', 'train'], ['1', 'eval']]


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
    "The final weights of an uninterrupted two-process run on one node."
    out = tmp_path_factory.mktemp('uninterrupted')
    r = torchrun(out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'batch 64 (global: 32 per process on 2 processes)' in r.stdout, 'says how the batch size is meant'
    assert csv_rows(out) == ONE_ROW_EACH
    return weights(out / 'final.ckpt')


def test_sigterm_at_different_batches_stops_every_rank_after_the_same_one_and_resumes_bitwise(uninterrupted, tmp_path):
    """A scheduler's SIGTERM reaches rank 0 after batch 1 of epoch 1 and rank 1 after batch 2: both stop after batch 2
    (a round of the agreement every batch here, each read a batch after it starts), write one checkpoint and exit 143;
    going on from it under torchrun with --resume auto ends on the uninterrupted run's weights, bitwise."""
    out = tmp_path / 'run'
    ranks = two_ranks(out, 'SIGTERM@0:1:1,SIGTERM@1:1:2')
    assert [r.returncode for r in ranks] == [143, 143], [r.stderr[-2000:] for r in ranks]
    for i, r in enumerate(ranks):
        assert f'miniai: rank {i}: SIGTERM received' in r.stderr and 'Traceback' not in r.stderr, r.stderr
    ck = read_checkpoint(out / 'interrupted.ckpt')
    assert ck['position'] == {'epoch': 1, 'phase': 'train', 'n_batches': 6, 'batch': 3}
    assert 'all 2 processes stopped after that batch' in ranks[0].stderr and 'stopped by' not in ranks[1].stderr
    # the model and optimizer once; each rank's own random streams and data order
    assert ck['world_size'] == 2 and [s['rank'] for s in ck['ranks']] == [0, 1]
    assert not torch.equal(ck['ranks'][0]['rng']['torch'], ck['ranks'][1]['rng']['torch'])
    assert all(s['data']['epochs_drawn'] == 2 for s in ck['ranks'])
    assert sorted(p.name for p in out.iterdir()) == ['best.ckpt', 'interrupted.ckpt', 'last.ckpt', 'metrics.csv',
                                                        'model.json', 'settings.json']
    # model.json: load_run rebuilds the model; settings.json: what the run was trained with (miniai runs)
    go_on = torchrun(out, '--resume', 'auto')
    assert go_on.returncode == 0, go_on.stderr[-3000:]
    assert f'miniai: resuming from {out / "interrupted.ckpt"}' in go_on.stdout
    assert same(weights(out / 'final.ckpt'), uninterrupted), 'resumed weights differ from the uninterrupted run'
    assert csv_rows(out) == ONE_ROW_EACH


def test_ctrl_c_on_one_rank_only_stops_every_rank_with_130(tmp_path):
    "SIGINT reaches rank 1 alone, after batch 1 of epoch 1: rank 0, which never got it, stops after batch 2 with it."
    out = tmp_path / 'run'
    ranks = two_ranks(out, 'SIGINT@1:1:1')
    assert [r.returncode for r in ranks] == [130, 130], [r.stderr[-2000:] for r in ranks]
    assert 'SIGINT received' not in ranks[0].stderr and 'miniai: rank 1: SIGINT received' in ranks[1].stderr
    assert 'stopped by SIGINT in epoch 1, after 3 of its 6 training batches' in ranks[0].stderr
    ck = read_checkpoint(out / 'interrupted.ckpt')
    assert ck['position']['batch'] == 3 and len(ck['ranks']) == 2


def test_a_rank_killed_mid_epoch_restarts_by_itself_and_ends_bitwise_as_uninterrupted(uninterrupted, tmp_path):
    """torchrun --max-restarts 1: rank 1 is SIGKILLed after batch 1 of epoch 1 (first attempt only); the job restarts,
    --resume auto takes last.ckpt (epoch 0) and the run ends on the uninterrupted weights. One metrics.csv row per epoch
    and stage, and the time-to-target clock goes on from the checkpoint's reading."""
    out = tmp_path / 'run'
    launcher = ['--nnodes', '1', '--max-restarts', '1', '--rdzv-backend', 'c10d', '--rdzv-endpoint',
                f'127.0.0.1:{free_port()}']
    r = torchrun(out, '--resume', 'auto', drill='SIGKILL@1:1:1', launcher=launcher)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count('miniai: no checkpoint to resume from') == 1, 'the first attempt starts fresh'
    assert r.stdout.count(f'miniai: resuming from {out / "last.ckpt"}') == 1, 'the restart goes on from last.ckpt'
    assert 'exitcode: -9' in r.stderr or 'Signals.SIGKILL' in r.stderr, 'rank 1 was killed'
    assert same(weights(out / 'final.ckpt'), uninterrupted), 'the restarted run ends elsewhere'
    assert csv_rows(out) == ONE_ROW_EACH
    curve = json.loads((out / 'result.json').read_text())['curve']
    epoch1 = float((out / 'metrics.csv').read_text().splitlines()[3].split(',')[4])  # epoch 1's training seconds
    assert [c['epoch'] for c in curve] == [0, 1] and curve[1]['seconds'] >= curve[0]['seconds'] + epoch1


def test_two_nodes_shard_by_global_rank_write_once_and_match_one_node(uninterrupted, tmp_path):
    """Two torchrun launchers, one process each, meet at a c10d rendezvous on 127.0.0.1 as two nodes: both processes
    are LOCAL_RANK 0, one of them global rank 1. The data is sharded by global rank (by LOCAL_RANK both would train on
    the same half), only global rank 0 prints and writes, into the one shared folder, and the weights are the
    one-node run's, bitwise."""
    out, port = tmp_path / 'run', free_port()
    cmd = lambda node: [sys.executable, '-m', 'torch.distributed.run', '--nnodes', '2', '--node-rank', str(node),
                        '--nproc-per-node', '1', '--rdzv-backend', 'c10d', '--rdzv-endpoint', f'127.0.0.1:{port}',
                        '--rdzv-id', 'two-nodes', *map(str, JOB), '--out', str(out)]
    nodes = [subprocess.Popen(cmd(n), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
             for n in (0, 1)]
    done = [p.communicate(timeout=TIMEOUT) for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], [err[-2000:] for _, err in done]
    printed = ['Test accuracy' in stdout for stdout, _ in done]
    assert sorted(printed) == [False, True], 'exactly one node, the one with global rank 0, prints'
    quiet = done[printed.index(False)][0]
    assert 'accuracy' not in quiet and 'Model:' not in quiet, quiet
    ck = read_checkpoint(out / 'last.ckpt')
    assert [(s['rank'], s['local_rank']) for s in ck['ranks']] == [(0, 0), (1, 0)], 'global rank 1 is LOCAL_RANK 0'
    assert csv_rows(out) == ONE_ROW_EACH, 'metrics.csv written once'
    assert same(weights(out / 'final.ckpt'), uninterrupted)
