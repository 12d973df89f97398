"""One epoch through `AccelerateCB` for the Accelerate tests; the same script runs alone or under `accelerate launch`.

    python accelerate_job.py OUT [--global-bs 128] [--precision no]
    accelerate launch --multi_gpu --num_processes 2 accelerate_job.py OUT    # on CPUs too (gloo)

Two fits of a plain `Learner` (as the course uses AccelerateCB), each from the same initial weights: one over
miniai's `TensorDataLoader` (`fashion_dls`), one over torch `DataLoader`s of the same images. Writes OUT/rank{R}/:
tensor.safetensors and torch.safetensors (the weights after each fit), history.json (the first fit's metrics),
state.json (what the Learner held after the fit), and, through SaveModelCB on the main process only, last.ckpt."""
import argparse
import json
import os

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torcheval.metrics import MulticlassAccuracy

from miniai.accel import AccelerateCB
from miniai.activations import set_seed
from miniai.runs.checkpoint import SaveModelCB
from miniai.datasets import DataLoaders
from miniai.data.fashion import fashion_dls
from miniai.learner import Learner, MetricsCB, ProgressCB
from miniai.core.ranks import rank, world_size

p = argparse.ArgumentParser()
p.add_argument('out')
p.add_argument('--global-bs', type=int, default=128)
p.add_argument('--precision', default='no')
a = p.parse_args()
torch.set_num_threads(1)
set_seed(0)

out = os.path.join(a.out, f'rank{rank()}')
os.makedirs(out, exist_ok=True)
bs = a.global_bs // world_size()
cb = AccelerateCB(mixed_precision=a.precision)
init = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10)).state_dict()


def fit(dls, cbs):
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))
    model.load_state_dict(init)
    learn = Learner(model, dls, F.cross_entropy, lr=0.1, cbs=[cb, *cbs])
    train, valid = dls.train, dls.valid
    learn.fit(1)
    state = {'model_is_plain': learn.model is model and 'forward' not in vars(model),
             'opt_is_plain': type(learn.opt) is torch.optim.SGD,
             'dls_are_plain': learn.dls.train is train and learn.dls.valid is valid,
             'processes': cb.acc.num_processes, 'process_index': cb.acc.process_index}
    return model, state


# 1. miniai's TensorDataLoader, which shards itself
dls = fashion_dls(bs=bs, n_train=2048, n_valid=1000, seed=0)
metrics = MetricsCB(accuracy=MulticlassAccuracy())
model, state = fit(dls, [metrics, ProgressCB(), SaveModelCB(out, every_epoch=True)])
assert dls.train.world_size == 1 and dls.train.rank == 0, 'the loader was left sharded'
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(out, 'tensor.safetensors'))
json.dump(metrics.history, open(os.path.join(out, 'history.json'), 'w'))

# 2. torch DataLoaders over the same images, which Accelerate shards (one shared shuffle, from a seeded generator)
tds, vds = (TensorDataset(dl.normalise(dl.x), dl.y) for dl in (dls.train, dls.valid))  # held as uint8
tdls = DataLoaders(DataLoader(tds, batch_size=bs, shuffle=True, generator=torch.Generator().manual_seed(0)),
                   DataLoader(vds, batch_size=bs))
model, state2 = fit(tdls, [])
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(out, 'torch.safetensors'))
json.dump([state, state2], open(os.path.join(out, 'state.json'), 'w'))
