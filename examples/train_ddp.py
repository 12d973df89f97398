"""Train on Fashion-MNIST with one process or many, with no change to the code.

    python examples/train_ddp.py                                   # one process (CPU or one GPU)
    torchrun --nproc_per_node=2 examples/train_ddp.py              # two GPUs on this machine (NCCL)
    MINIAI_DEVICE=cpu torchrun --nproc_per_node=2 examples/train_ddp.py   # two CPU processes (gloo), GPUs or not
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 \\
             --rdzv_backend=c10d --rdzv_endpoint=host0:29500 --rdzv_id=job1 examples/train_ddp.py   # node 0 of 2

The batch size given is the global one: each of N processes gets bs/N images per step, so results match a single
process at the same global batch. Each process trains on its own device, `default_device()`: cuda:LOCAL_RANK, or
the CPU with MINIAI_DEVICE=cpu; the data lives there too. For runs that are stopped and go on by themselves (Slurm,
Kubernetes, torchrun --max-restarts) see `python -m miniai train --resume auto` and examples/slurm.sbatch.
"""
import argparse

import torch.nn.functional as F
from torch import optim
from torcheval.metrics import MulticlassAccuracy

from miniai.accel import fastest_settings, precision_cbs
from miniai.activations import set_seed
from miniai.runs.checkpoint import SaveModelCB
from miniai.conv import default_device
from miniai.core.ranks import is_main_process, rank, world_size
from miniai.engines.ddp import DDPCB
from miniai.data.fashion import fashion_dls
from miniai.learner import DeviceCB, MetricsCB, ProgressCB, TrainLearner
from miniai.resnet import fashion_resnet
from miniai.sgd import BatchSchedCB

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument('--epochs', type=int, default=2)
p.add_argument('--bs', type=int, default=256, help='global batch size')
p.add_argument('--lr', type=float, default=1e-2)
p.add_argument('--n-train', type=int, default=None)
p.add_argument('--out', default='runs/ddp')
a = p.parse_args()

set_seed(42)
# sharded by global rank here (DDPCB would too): the one-cycle schedule below counts this rank's batches
dls = fashion_dls(bs=a.bs // world_size(), n_train=a.n_train, seed=42, rank=rank(), world_size=world_size())
setting, why = fastest_settings(default_device())
if is_main_process(): print(f'{world_size()} process(es), rank 0 on {default_device()}; precision: {setting} ({why})')
sched = lambda opt: optim.lr_scheduler.OneCycleLR(opt, max_lr=a.lr, total_steps=a.epochs * len(dls.train))
cbs = [DeviceCB(), MetricsCB(accuracy=MulticlassAccuracy()), ProgressCB(), BatchSchedCB(sched), DDPCB(),
       SaveModelCB(a.out, monitor='accuracy'), *precision_cbs(setting)]
learn = TrainLearner(fashion_resnet(), dls, F.cross_entropy, lr=a.lr, opt_func=optim.AdamW, cbs=cbs)
learn.fit(a.epochs)
