"""Run by the wheel's own fresh venv (scripts/wheel_smoke.sh), outside the source tree: every public module imports,
a 1-epoch fit on a Fashion-MNIST subset reaches better than chance, and `load_exported` reproduces what the editable
install's model predicted. Exits non-zero on the first failure."""
import importlib
import pkgutil
import sys
from pathlib import Path

import torch

import miniai

where = Path(miniai.__file__).resolve().parent
assert 'site-packages' in where.parts, f'miniai was imported from {where}, not from the installed wheel'
print(f'miniai {miniai.__version__} from {where}')

# every public module: the rooms' modules and the course's fronts (names without a leading underscore)
names = [m.name for m in pkgutil.walk_packages(miniai.__path__, 'miniai.')
         if not any(p.startswith('_') for p in m.name.split('.')[1:])]
for name in names: importlib.import_module(name)
print(f'imported {len(names)} public modules')

import torch.nn.functional as F  # noqa: E402
from torcheval.metrics import MulticlassAccuracy  # noqa: E402
from miniai.data.fashion import fashion_dls  # noqa: E402
from miniai.learner import TrainLearner, DeviceCB, MetricsCB  # noqa: E402
from miniai.models.layers import conv  # noqa: E402

torch.manual_seed(0)
dls = fashion_dls(bs=64, device='cpu', n_train=4096, n_valid=512)
metrics = MetricsCB(accuracy=MulticlassAccuracy())
bn = torch.nn.BatchNorm2d
model = torch.nn.Sequential(conv(1, 8, norm=bn), conv(8, 16, norm=bn), conv(16, 32, norm=bn),
                            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 10))
learn = TrainLearner(model, dls, F.cross_entropy, lr=1e-2, opt_func=torch.optim.AdamW,
                     cbs=[DeviceCB('cpu'), metrics])
learn.fit(1)
acc = float(metrics.history[-1]['accuracy'])
assert acc > 0.5, f'1 epoch on 4,096 images reached {acc:.3f} accuracy (chance is 0.1)'
print(f'1-epoch fit on 4,096 Fashion-MNIST images: accuracy {acc:.3f} on 512')

folder = Path(sys.argv[1])
m = miniai.load_exported(folder)
saved = torch.load(folder / 'expected.pt', weights_only=True)
got = m(saved['x'])
torch.testing.assert_close(got, saved['y'], rtol=1e-4, atol=1e-4)
print(f'load_exported({folder.name}): the wheel reproduces the editable install\'s outputs on {len(got)} images')
