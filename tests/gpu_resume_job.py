"""A shuffled, dropout, GPU-augmented run for the CUDA resume test (deterministic kernels on):

    python gpu_resume_job.py OUT EPOCHS [--stop-after K] [--resume CKPT] [--fp16]

Writes OUT/last.ckpt after every epoch and the final weights to OUT/final.safetensors; --stop-after K ends the run
after epoch K's checkpoint is written; --fp16 trains in fp16 with a loss scaler."""
import argparse
import os

os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')  # deterministic cuBLAS; read when CUDA starts

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch import nn, optim  # noqa: E402

from miniai.accel import MixedPrecision  # noqa: E402
from miniai.activations import set_seed  # noqa: E402
from miniai.augment import RandCropPad, RandErase, RandFlip, augment_cb  # noqa: E402
from miniai.core.events import Callback, CancelFitException  # noqa: E402
from miniai.runs.checkpoint import SaveModelCB  # noqa: E402
from miniai.data.fashion import fashion_dls  # noqa: E402
from miniai.init import conv  # noqa: E402
from miniai.learner import DeviceCB, Learner, MetricsCB, TrainCB  # noqa: E402
from miniai.resnet import GlobalAvgPool  # noqa: E402
from miniai.sgd import BatchSchedCB  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument('out')
p.add_argument('epochs', type=int)
p.add_argument('--stop-after', type=int, default=None)
p.add_argument('--resume', default=None)
p.add_argument('--fp16', action='store_true')
a = p.parse_args()
set_seed(0, deterministic=True)
# strict, not set_seed's warn_only: a kernel without a deterministic version fails here, naming itself, instead of
# showing up later as an unexplained bitwise mismatch between the resumed and the uninterrupted run
torch.use_deterministic_algorithms(True)


class StopAfter(Callback):
    order = 30  # after SaveModelCB wrote the checkpoint
    def after_epoch(self, learn):
        if not learn.training and learn.epoch == a.stop_after: raise CancelFitException()


dls = fashion_dls(bs=256, n_train=1536, n_valid=512, seed=0)  # on the GPU, shuffled by the loader's generator
# GlobalAvgPool (a mean) rather than AdaptiveAvgPool2d, whose CUDA backward has no deterministic kernel
model = nn.Sequential(conv(1, 8, norm=nn.BatchNorm2d), conv(8, 16, norm=nn.BatchNorm2d), nn.Dropout(0.3),
                      conv(16, 10, act=None), GlobalAvgPool())
total = a.epochs * len(dls.train)
sched = lambda opt: optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=total)
cbs = [DeviceCB(), MetricsCB(), SaveModelCB(a.out, every_epoch=True), BatchSchedCB(sched),
       augment_cb(RandCropPad(2), RandFlip(), RandErase(pct=0.2, max_num=2)),
       MixedPrecision(torch.float16) if a.fp16 else TrainCB()]
if a.stop_after is not None: cbs.append(StopAfter())
learn = Learner(model, dls, F.cross_entropy, lr=1e-2, opt_func=optim.AdamW, cbs=cbs)
learn.fit(a.epochs, resume=a.resume)
if a.stop_after is None:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(a.out, 'final.safetensors'))
