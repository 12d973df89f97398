"""Writes tests/data/legacy-*.ckpt with the code as it was before the one-house layout (run from that checkout).
A small BatchNorm model, one-cycle schedule, fp16 loss scaler (CPU stand-in), EMA, SaveModelCB, CSV and time-to-
accuracy states, a mid-epoch checkpoint and an end-of-epoch one, and the weights an uninterrupted run ends on."""
import sys
from pathlib import Path
from functools import partial
import torch, torch.nn.functional as F
from torch import nn, optim
import miniai.accel as accel
from miniai.learner import Learner, MetricsCB, Callback, CancelFitException
from miniai.accel import MixedPrecision
from miniai.sgd import BatchSchedCB
from miniai.checkpoint import SaveModelCB, save_mid_epoch
from miniai.averaging import WeightAverageCB
from miniai.loggers import CSVLoggerCB
from miniai.timetoacc import TimeToAccuracyCB
from miniai.data import TensorDataLoader
from miniai.datasets import DataLoaders
from torcheval.metrics import MulticlassAccuracy
from safetensors.torch import save_file

out = Path(sys.argv[1])
accel._needs_loss_scaling = lambda device_type, dtype: dtype == torch.float16
accel.warn_fp16_on_cpu = lambda: None

def dls():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (96, 1, 8, 8), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 4, (96,), generator=g)
    return DataLoaders(TensorDataLoader(x[:64], y[:64], 16, shuffle=True, seed=1, mean=0.5, std=0.3),
                       TensorDataLoader(x[64:], y[64:], 16, mean=0.5, std=0.3))

def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 4))

def learner(d):
    sched = partial(optim.lr_scheduler.OneCycleLR, max_lr=0.05, total_steps=3 * 4)
    cbs = [MetricsCB(accuracy=MulticlassAccuracy()), BatchSchedCB(sched), MixedPrecision(torch.float16),
           WeightAverageCB('ema', decay=0.9), SaveModelCB(d, monitor='accuracy', every_epoch=True),
           CSVLoggerCB(d / 'metrics.csv'), TimeToAccuracyCB(0.99, verbose=False)]
    return Learner(model(), dls(), F.cross_entropy, lr=0.05, cbs=cbs, opt_func=partial(optim.AdamW, eps=1e-5))

class StopMid(Callback):
    order = 95
    def __init__(self, d): self.d = d
    def after_batch(self, learn):
        if learn.training and learn.epoch == 1 and learn.iter == 1:
            save_mid_epoch(learn, self.d / 'mid.ckpt')
            raise CancelFitException()

torch.manual_seed(0)
full = learner(out / 'full'); full.fit(3)
torch.manual_seed(0)
cut = learner(out / 'cut'); cut.fit(3, cbs=[StopMid(out / 'cut')])
save_file({k: v.contiguous() for k, v in full.model.state_dict().items()}, str(out / 'full.safetensors'))
