"""bench/augment.py runs end to end on tiny images and writes its table (its numbers live in
bench/results/augment.md, never in tests)."""
import torch

from bench import augment


def test_tiny_run_times_both_pipelines_and_writes_the_table(tmp_path):
    md = augment.main(['--tiny', '--results', str(tmp_path)])
    assert (tmp_path / 'augment.md').read_text() == md + '\n'
    rows = [l for l in md.splitlines() if l.startswith('| ') and 'images/s' not in l]
    assert [r.split('|')[1].strip().split(' ')[0] for r in rows] == ['miniai', 'miniai', 'torchvision.transforms.v2']
    assert rows[2].rstrip().endswith('| 1.0x | 1.0x |'), 'torchvision is the baseline, in all and per core'
    assert 'load average' in md


def test_both_sides_give_uint8_images_of_the_size_asked():
    x = torch.randint(0, 256, (4, 3, 40, 48), dtype=torch.uint8)
    out = augment.torchvision_pipeline(32)(x[0])
    assert out.dtype == torch.uint8 and out.shape == (3, 32, 32)
    assert augment.miniai_epoch(torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8), 4,
                                augment.aug_transforms(32, min_scale=0.35)) > 0
