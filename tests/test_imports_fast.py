"""Start-up: importing the library does not drag in torcheval (whose package import loads torchvision's models for
its FID metric), torch.compile's machinery, nor matplotlib's pyplot (0.4 s: imported when a plot is drawn); each check
runs in a fresh interpreter, so earlier tests cannot hide an import."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ('torchvision', 'torchvision.models', 'torcheval', 'torcheval.metrics.image.fid', 'torch._dynamo',
         'torch._inductor', 'matplotlib.pyplot')


def imported_after(stmt: str) -> list[str]:
    "The HEAVY modules present in `sys.modules` after `stmt` runs in a new Python process."
    code = f"import sys, json\n{stmt}\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    # run from the checkout's root: `-c` puts the working directory first on sys.path, so this checkout's miniai is
    # the one imported, not an editable install's
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize('stmt', ['import miniai.learner', 'import miniai.accel'])  # accel imports compile
def test_importing_the_library_loads_no_heavy_module(stmt):
    assert imported_after(stmt) == []


def test_the_loss_metric_is_still_torchevals_mean_once_a_metrics_cb_is_made():
    # the check above would pass if MetricsCB had lost its metric; this one sees the import happen when it is needed
    stmt = ("from miniai.learner import MetricsCB\nfrom torcheval.metrics import Mean\n"
            "assert type(MetricsCB().loss) is Mean")
    assert 'torcheval' in imported_after(stmt)
