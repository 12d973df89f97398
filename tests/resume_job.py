"""A small training run for the resume test: `python resume_job.py OUT EPOCHS [--kill-after K] [--resume CKPT]`.

Saves `OUT/last.ckpt` after every epoch and the final weights in `OUT/final.safetensors`; with --kill-after K it
SIGKILLs itself right after epoch K's checkpoint is written, as a crash or an OOM killer would."""
import argparse
import os
import signal
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn, optim

from miniai.activations import set_seed
from miniai.core.events import Callback
from miniai.runs.checkpoint import SaveModelCB
from miniai.data.fashion import fashion_dls
from miniai.init import conv
from miniai.learner import MetricsCB, TrainLearner
from miniai.sgd import BatchSchedCB

p = argparse.ArgumentParser()
p.add_argument('out')
p.add_argument('epochs', type=int)
p.add_argument('--kill-after', type=int, default=None)
p.add_argument('--resume', default=None)
a = p.parse_args()
torch.set_num_threads(1)
set_seed(0, deterministic=True)


class KillAfter(Callback):
    order = 30  # after SaveModelCB wrote the checkpoint
    def after_epoch(self, learn):
        if not learn.training and learn.epoch == a.kill_after:
            print(f'killing myself after epoch {learn.epoch}', flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


dls = fashion_dls(bs=256, n_train=1536, n_valid=512, seed=0, device='cpu')  # the model stays on the CPU
model = nn.Sequential(conv(1, 8, norm=nn.BatchNorm2d), conv(8, 16, norm=nn.BatchNorm2d), nn.Dropout(0.3),
                      conv(16, 10, act=None), nn.AdaptiveAvgPool2d(1), nn.Flatten())
total = a.epochs * len(dls.train)
sched = lambda opt: optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=total)
cbs = [MetricsCB(), SaveModelCB(a.out, every_epoch=True), BatchSchedCB(sched)]
if a.kill_after is not None: cbs.append(KillAfter())
learn = TrainLearner(model, dls, F.cross_entropy, lr=1e-2, opt_func=optim.AdamW, cbs=cbs)
learn.fit(a.epochs, resume=a.resume)
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(a.out, 'final.safetensors'))
print('history', [round(r['loss'], 6) for r in learn.metrics.history], flush=True)
