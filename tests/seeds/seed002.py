# The code of seed document 002 (the ResNet walk-through), as its author ran it, with only the Colab/pip lines
# removed and `from miniai.xtras import *` / `get_dls()` replaced by `fashion_dls`. It must run unchanged.
import torch

from miniai.datasets import *
from miniai.conv import *
from miniai.learner import *
from miniai.activations import *
from miniai.init import *
from miniai.sgd import *
# from miniai.resnet import *
import pickle,gzip,math,os,time,shutil,torch,matplotlib as mpl,numpy as np,matplotlib.pyplot as plt
import fastcore.all as fc
from collections.abc import Mapping
from pathlib import Path
from operator import attrgetter,itemgetter
from functools import partial
from copy import copy
from contextlib import contextmanager

import torchvision.transforms.functional as TF,torch.nn.functional as F
from torch import tensor,nn,optim
from torch.utils.data import DataLoader,default_collate
from torch.nn import init
from torch.optim import lr_scheduler
from torcheval.metrics import MulticlassAccuracy
from datasets import load_dataset,load_dataset_builder

from miniai.datasets import *
from miniai.conv import *
from miniai.learner import *
from miniai.activations import *
from miniai.init import *
from miniai.data.fashion import fashion_dls
from fastcore.test import test_close

torch.set_printoptions(precision=2, linewidth=140, sci_mode=False)
torch.manual_seed(1)

import logging
logging.disable(logging.WARNING)

set_seed(42)
dls = fashion_dls()
dt = dls.train
xb,yb = next(iter(dt))
print(xb.shape,yb[:10])

metrics = MetricsCB(accuracy=MulticlassAccuracy())
astats = ActivationStats(fc.risinstance(GeneralRelu))
cbs = [DeviceCB(), metrics, ProgressCB(plot=False), astats]
iw = partial(init_weights, leaky=0.1)
act_gr = partial(GeneralRelu, leak=0.1, sub=0.4)

def _conv_block(ni, nf, ks=3, stride=2, act=nn.ReLU, norm=None, bias=None):
    return nn.Sequential(conv(ni, nf, ks, 1, act, norm, bias),
                         conv(nf, nf, ks, stride, False, norm, bias))

class ResBlock(nn.Module):
    def __init__(self, ni, nf, ks=3, stride=2, act=nn.ReLU, norm=None, bias=None):
        super().__init__()
        self.conv = _conv_block(ni, nf, ks, stride, act, norm, bias)
        self.pool = fc.noop if stride==1 else nn.AvgPool2d(2, ceil_mode=True)
        self.eye = fc.noop if ni==nf else conv(ni, nf, ks=1, stride=1, act=False)
        self.act = act()

    def forward(self, x):
        return self.act(self.conv(x) + self.eye(self.pool(x)))
def get_model(act=nn.ReLU, nfs=[8,16,32,64,128,256], norm=None):
    layers = [ResBlock(1, 8, stride=1, act=act, norm=norm)]
    layers += [ResBlock(nfs[i], nfs[i+1], act=act, norm=norm) for i in range(len(nfs)-1)]
    return nn.Sequential(*layers, conv(nfs[-1],10, act=None, norm=False, bias=True),
                         nn.Flatten()).to(def_device)

def print_shapes(hook, m, inp, outp):
    print(m.__class__.__name__, inp[0].shape, outp.shape)
model = get_model()
learn = TrainLearner(model, dls, F.cross_entropy, cbs=[SingleBatchCB(), DeviceCB()])
with Hooks(model, print_shapes) as h: learn.fit(1)

@fc.patch
def summary(self:Learner):
    res = '|Module|Input|Output|Num params|\n|--|--|--|--|\n'
    num = 0
    def _f(hook, m, inp, outp):
        nonlocal res, num
        num_params = sum(o.numel() for o in m.parameters())
        res += f'|{m.__class__.__name__}|{tuple(inp[0].shape)}|{tuple(outp.shape)}|{num_params}|\n'
        num += num_params
    with Hooks(self.model, _f) as hook: self.fit(1, train=False, cbs=[SingleBatchCB()])
    print('Total number of params:', num)
    if fc.IN_NOTEBOOK:
        from IPython.display import Markdown
        return Markdown(res)
    else:
        print(res)
learn.summary()

class GlobalAvgPool(nn.Module):
    def forward(self, x): return x.mean((-1, -2))
def get_model(act=nn.ReLU, nfs=[8,16,32,64,128,256], norm=None):
    layers = [ResBlock(1, 8, stride=1, act=act, norm=norm)]
    layers += [ResBlock(nfs[i], nfs[i+1], act=act, norm=norm) for i in range(len(nfs)-1)]
    return nn.Sequential(*layers, GlobalAvgPool(), nn.Flatten(), nn.Linear(nfs[-1], 10)).to(def_device)
TrainLearner(get_model(), dls, F.cross_entropy, lr=1).summary()

def _flops(x, h, w):
    if x.dim()<3: return x.numel()
    if x.dim()==4: return x.numel()*h*w

print([(o.shape, o.numel()) for o in conv(2, 8).parameters()])
print([(o.shape, o.numel()) for o in nn.Linear(2, 8).parameters()])
@fc.patch
def summary(self:Learner):
    res = '|Module|Input|Output|Num params|Flops|\n|--|--|--|--|--|\n'
    n_params, n_flops = 0, 0
    def _f(hook, m, inp, outp):
        nonlocal res, n_params, n_flops
        num_params = sum(o.numel() for o in m.parameters())
        *_, h, w = outp.shape
        num_flops = sum(_flops(o, h, w) for o in m.parameters())/1e6
        n_params += num_params
        n_flops += num_flops
        res += f'|{m.__class__.__name__}|{tuple(inp[0].shape)}|{tuple(outp.shape)}|{num_params}|{num_flops:.2f}|\n'
    with Hooks(self.model, _f) as hook: self.fit(1, train=False, cbs=[SingleBatchCB()])
    print('Total number of params:', n_params)
    print('Total number of flops:', n_flops)
    if fc.IN_NOTEBOOK:
        from IPython.display import Markdown
        return Markdown(res)
    else:
        print(res)
TrainLearner(get_model(), dls, F.cross_entropy, lr=1).summary()
