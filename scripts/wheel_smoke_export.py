"""Run by the editable install (scripts/wheel_smoke.sh): train a small model on a Fashion-MNIST subset, export it to
sys.argv[1], and write the predictions the wheel's `load_exported` must reproduce there (expected.pt)."""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from miniai.data.fashion import fashion_dls
from miniai.learner import TrainLearner, DeviceCB

torch.manual_seed(0)
out = Path(sys.argv[1])
dls = fashion_dls(bs=256, device='cpu', n_train=1024, n_valid=256)
model = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                      nn.Linear(8, 10))
learn = TrainLearner(model, dls, F.cross_entropy, lr=0.1, cbs=[DeviceCB('cpu')])
learn.fit(1)
learn.export(out)
xb, _ = next(iter(dls.valid))
with torch.no_grad(): expected = learn.model.eval()(xb[:16])
torch.save({'x': xb[:16].cpu(), 'y': expected.cpu()}, out / 'expected.pt')
print(f'exported to {out} by miniai from {Path(sys.modules["miniai"].__file__).parent}')
