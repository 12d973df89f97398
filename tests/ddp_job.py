"""One training epoch for the distributed tests; the same script runs alone or under torchrun.

    python ddp_job.py OUT [--global-bs 128] [--raise-at-batch N] [--device D] [--backend gloo|nccl]

Without --device the model and data go where the library puts them by default (`$MINIAI_DEVICE`, else this
process's GPU, else the CPU). Writes OUT/rank{R}/: weights.safetensors, history.json, where.json (the model's and
data's devices, the backend) and (through SaveModelCB, rank 0 only) last.ckpt."""
import argparse
import json
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from torcheval.metrics import MulticlassAccuracy

from miniai.activations import set_seed
from miniai.callback import Callback
from miniai.checkpoint import SaveModelCB
from miniai.distributed import DDPCB, rank, world_size
from miniai.fashion import fashion_dls
from miniai.learner import DeviceCB, MetricsCB, ProgressCB, TrainLearner

p = argparse.ArgumentParser()
p.add_argument('out')
p.add_argument('--global-bs', type=int, default=128)
p.add_argument('--raise-at-batch', type=int, default=None)
p.add_argument('--device', default=None)
p.add_argument('--backend', default=None)
a = p.parse_args()
torch.set_num_threads(1)
set_seed(0)


class FailOnRank1(Callback):
    def before_batch(self, learn):
        if rank() == 1 and learn.iter == a.raise_at_batch: raise RuntimeError(f'rank 1 fails at batch {learn.iter}')


out = os.path.join(a.out, f'rank{rank()}')
os.makedirs(out, exist_ok=True)
dls = fashion_dls(bs=a.global_bs // world_size(), n_train=2048, n_valid=1000, seed=0, device=a.device)
model = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))
metrics = MetricsCB(accuracy=MulticlassAccuracy())
cbs = [DeviceCB(a.device), metrics, ProgressCB(), DDPCB(timeout=60, backend=a.backend),
       SaveModelCB(out, every_epoch=True)]
if a.raise_at_batch is not None: cbs.append(FailOnRank1())
learn = TrainLearner(model, dls, F.cross_entropy, lr=0.1, cbs=cbs)
learn.fit(1)
save_file({k: v.contiguous() for k, v in learn.model.state_dict().items()}, os.path.join(out, 'weights.safetensors'))
json.dump(metrics.history, open(os.path.join(out, 'history.json'), 'w'))
where = {'model': str(next(learn.model.parameters()).device), 'data': str(dls.train.device),
         'backend': dist.get_backend() if dist.is_initialized() else None}
json.dump(where, open(os.path.join(out, 'where.json'), 'w'))
