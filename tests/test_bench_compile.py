"""bench.compile's machinery (not its timings: those belong in bench/results, never in tests)."""
import pytest
import torch
from torch import nn

from miniai.app import recipe
from miniai.data.fashion import find_fashion_mnist

pytestmark = pytest.mark.skipif(find_fashion_mnist() is None, reason='Fashion-MNIST is not installed')


def test_compile_bench_times_every_contender_and_writes_its_tables(monkeypatch, tmp_path):
    from bench import compile as bc
    torch._dynamo.reset()
    tiny = lambda: nn.Sequential(nn.Conv2d(1, 4, 3, stride=4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 7 * 7, 10))
    monkeypatch.setitem(recipe.MODELS, 'tiny', tiny)
    out = tmp_path / 'compile.md'
    bc.main(['--models', 'tiny', '--steps', '2', '--rounds', '1', '--bs', '32', '--backend', 'eager', '--hand',
             '--warm-cache', '--out', str(out)])  # no --threads, no fresh cache dir: both would outlive the test
    md = out.read_text()
    assert '--backend eager' in md and '### tiny: one AdamW step alone' in md
    for impl in ('for-loop', 'foreach', 'fused'): assert f'| {impl} | ' in md
    rows = [l for l in md.splitlines() if l.startswith(('| eager', '| CompileCB', '| hand'))]
    assert [r.split(' | ')[0] for r in rows] == [
        '| eager, foreach AdamW (the main job as shipped)', '| eager, fused AdamW', "| CompileCB('default'), fused AdamW",
        '| hand loop, eager, fused AdamW', "| hand loop, torch.compile('default'), fused AdamW"]
    assert rows[0].split(' | ')[4] == '1.00x', 'the speed-up column is against the first row'
    assert all(float(r.split(' | ')[1]) > 0 and float(r.split(' | ')[2]) > 0 for r in rows), 'wall and CPU seconds'
    torch._dynamo.reset()
