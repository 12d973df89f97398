"""The GPU benchmark's machinery, run tiny on whatever device there is (its numbers belong in bench/results/gpu.md,
written on a GPU, never in tests)."""
import pytest
import torch

from miniai.data.fashion import find_fashion_mnist
from miniai.resnet import fashion_resnet

pytestmark = pytest.mark.skipif(find_fashion_mnist() is None, reason='Fashion-MNIST is not installed')


def test_gpu_benchmark_runs_every_contender_and_writes_its_table(monkeypatch, tmp_path):
    from bench import gpu
    # a small convolutional model on the main job's path (bf16 + channels-last): on a CPU the wide one takes minutes
    small = lambda: torch.manual_seed(0) and fashion_resnet(nfs=(8, 16))
    monkeypatch.setitem(gpu.JOBS, 'resnet', {**gpu.JOBS['resnet'], 'model': small})
    gpu.main(['--tiny', '--out', str(tmp_path / 'gpu.md')])
    md = (tmp_path / 'gpu.md').read_text()
    on_gpu = torch.cuda.is_available()
    assert md.startswith('## Learner vs hand loop on ' + (torch.cuda.get_device_name() if on_gpu else 'no GPU: cpu'))
    assert f'torch {torch.__version__}' in md and md.count('### ') == 2
    for job in md.split('### ')[1:]:
        rows = [l for l in job.splitlines() if l.startswith(('| hand', '| miniai'))]
        assert len(rows) == 4 and [r.split('|')[5].strip() for r in rows].count('1.000x') == 2, job
        accs = {r.split('|')[6].strip() for r in rows}
        assert len(accs) == 1 or on_gpu, f'on a CPU every contender does exactly the same sums: {accs}'


def test_gpu_benchmark_writes_no_gpu_table_without_a_gpu(monkeypatch):
    from bench import gpu
    monkeypatch.setattr(gpu, 'default_device', lambda: 'cpu')
    with pytest.raises(SystemExit, match='no CUDA GPU here .* holds GPU results only'):
        gpu.main(['--tiny'])
