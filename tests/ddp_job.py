"""One training epoch for the distributed tests; the same script runs alone or under torchrun.

    python ddp_job.py OUT [--global-bs 128] [--raise-at-batch N] [--device D] [--backend gloo|nccl] [--slow-save S]
                      [--no-valid-on-rank1] [--timeout T] [--stop-at-batch N] [--resume CKPT]
                      [--cancel-on-rank1 N]

Without --device the model and data go where the library puts them by default (`$MINIAI_DEVICE`, else this
process's GPU, else the CPU). Writes OUT/rank{R}/: weights.safetensors, history.json, where.json (the model's and
data's devices, the backend) and (through SaveModelCB, rank 0 only) last.ckpt. With --slow-save, rank 0 takes S seconds
more to write each checkpoint and where.json also says whether rank 1 found it complete once its save returned; with
--no-valid-on-rank1, rank 1 runs none of its validation batches (as if its shard were empty). With --stop-at-batch,
rank 0 sends itself SIGTERM after that training batch: every rank stops there, OUT/interrupted.ckpt is written and the
job exits 143 (OUT/rank{R}/stopped.json then says after which batch each rank stopped); --resume goes on from such a
checkpoint. With --cancel-on-rank1 N, rank 1 cancels its training batch N after the optimizer step (so the gradients
still agree), which skips the rest of that batch's `after_batch` there only."""
import argparse
import json
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from torcheval.metrics import MulticlassAccuracy

import miniai.runs.checkpoint as ck
from miniai.activations import set_seed
from miniai.core.events import Callback, CancelBatchException
from miniai.runs.checkpoint import SaveModelCB
from miniai.core.ranks import rank, world_size
from miniai.engines.ddp import DDPCB
from miniai.data.fashion import fashion_dls
from miniai.runs.interrupt import DrillCB, InterruptCB, Interrupted
from miniai.learner import DeviceCB, MetricsCB, ProgressCB, TrainLearner

p = argparse.ArgumentParser()
p.add_argument('out')
p.add_argument('--global-bs', type=int, default=128)
p.add_argument('--raise-at-batch', type=int, default=None)
p.add_argument('--device', default=None)
p.add_argument('--backend', default=None)
p.add_argument('--slow-save', type=float, default=0.)
p.add_argument('--no-valid-on-rank1', action='store_true')
p.add_argument('--timeout', type=float, default=60.)
p.add_argument('--stop-at-batch', type=int, default=None)
p.add_argument('--resume', default=None)
p.add_argument('--cancel-on-rank1', type=int, default=None)
a = p.parse_args()
torch.set_num_threads(1)
set_seed(0)


class FailOnRank1(Callback):
    def before_batch(self, learn):
        if rank() == 1 and learn.iter == a.raise_at_batch: raise RuntimeError(f'rank 1 fails at batch {learn.iter}')


class NoValidOnRank1(Callback):
    def before_batch(self, learn):
        if rank() == 1 and not learn.training: raise CancelBatchException()


class CancelOnRank1(Callback):
    def after_step(self, learn):
        if rank() == 1 and learn.training and learn.iter == a.cancel_on_rank1: raise CancelBatchException()


class LooksForTheCheckpoint(Callback):
    "On rank 1, right after SaveModelCB's save returned: is rank 0's last.ckpt there, complete? And the backend."
    order = SaveModelCB.order + 1
    def before_epoch(self, learn): self.backend = dist.get_backend() if dist.is_initialized() else None
    def after_epoch(self, learn):
        if learn.training or rank() != 1: return
        try: self.saw = ck.read_checkpoint(os.path.join(a.out, 'rank0', 'last.ckpt'))['epoch'] == learn.epoch
        except ck.CheckpointError: self.saw = False


if a.slow_save and rank() == 0:
    real_save = ck.write_checkpoint
    def slow_save(*args, **kwargs):
        time.sleep(a.slow_save)
        return real_save(*args, **kwargs)
    ck.write_checkpoint = slow_save

out = os.path.join(a.out, f'rank{rank()}')
os.makedirs(out, exist_ok=True)
dls = fashion_dls(bs=a.global_bs // world_size(), n_train=2048, n_valid=1000, seed=0, device=a.device)
model = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))
metrics = MetricsCB(accuracy=MulticlassAccuracy())
looks = LooksForTheCheckpoint()
cbs = [DeviceCB(a.device), metrics, ProgressCB(), DDPCB(timeout=a.timeout, backend=a.backend),
       SaveModelCB(out, every_epoch=True), looks]
if a.raise_at_batch is not None: cbs.append(FailOnRank1())
if a.no_valid_on_rank1: cbs.append(NoValidOnRank1())
if a.cancel_on_rank1 is not None: cbs.append(CancelOnRank1())
if a.stop_at_batch is not None or a.resume: cbs.append(InterruptCB(os.path.join(a.out, 'interrupted.ckpt')))
if a.stop_at_batch is not None: cbs.append(DrillCB(signal.SIGTERM, rank=0, epoch=0, batch=a.stop_at_batch))
learn = TrainLearner(model, dls, F.cross_entropy, lr=0.1, cbs=cbs)
try: learn.fit(1, resume=a.resume)
except Interrupted as e:
    json.dump({'batch': learn.iter, 'epoch': learn.epoch}, open(os.path.join(out, 'stopped.json'), 'w'))
    sys.exit(143)
save_file({k: v.contiguous() for k, v in learn.model.state_dict().items()}, os.path.join(out, 'weights.safetensors'))
json.dump(metrics.history, open(os.path.join(out, 'history.json'), 'w'))
where = {'model': str(next(learn.model.parameters()).device), 'data': str(dls.train.device),
         'backend': looks.backend, 'group_ended': not dist.is_initialized(),
         'saw_checkpoint': getattr(looks, 'saw', None)}
json.dump(where, open(os.path.join(out, 'where.json'), 'w'))
