"""bench.data's folder benchmark and bench.fp16_cpu run end to end on tiny data and give their tables."""
import pytest
import torch

from bench import data as bd
from miniai.data.fashion import CLASSES, fashion_arrays, find_fashion_mnist
from miniai.data.folders import write_image_folder

pytestmark = pytest.mark.skipif(find_fashion_mnist() is None, reason='Fashion-MNIST is not installed')


def test_folder_rows_time_both_pipelines_and_the_memory_held(tmp_path):
    xs, ys = fashion_arrays()['train']
    per_class = [(ys == c).nonzero()[:8, 0] for c in range(10)]  # 6 training and 2 test images of every class
    train, test = torch.cat([i[:6] for i in per_class]), torch.cat([i[6:] for i in per_class])
    x, y = bd.cifar_shaped(xs, ys)
    write_image_folder(tmp_path, x[train], y[train], CLASSES, 'train')
    write_image_folder(tmp_path, x[test], y[test], CLASSES, 'test')
    torch.set_num_threads(2)
    n_pixels = (len(train) + len(test)) * 3 * 32 * 32
    rows = bd.folder_rows('tiny', tmp_path, n_pixels, 32, 4, bs=16, rounds=1)
    assert [r.split('|')[2].strip().split(',')[0] for r in rows] == [
        'first load (decode + cache)', 'cached start', 'one epoch', 'one epoch', 'memory held (fresh process)']
    assert all(r.count('|') == 8 for r in rows), rows
    held = float(rows[-1].split('|')[5].strip()[:-1])
    assert 1.0 < held < 1.1, 'the images held once, as uint8, with their labels beside them'


def test_merge_keeps_the_other_table():
    tensor, folders = '### One epoch\n\n| a |', f'{bd.FOLDER_TITLE}: x\n\n| b |'
    assert bd.merge_tables(f'{tensor}\n\n{folders}', '### One epoch\n\n| new |') == f'### One epoch\n\n| new |\n\n{folders}'
    assert bd.merge_tables(folders, tensor) == f'{tensor}\n\n{folders}', 'the tensor loader first'


def test_fp16_on_cpu_bench_times_every_precision(tmp_path):
    from bench import fp16_cpu
    md = fp16_cpu.main(['--tiny', '--rounds', '1', '--results', str(tmp_path)])
    assert (tmp_path / 'fp16_cpu.md').read_text() == md
    rows = [l.split('|')[1].strip() for l in md.splitlines() if l.startswith('| ') and 'precision' not in l]
    assert rows == ['fp32', 'bf16', 'fp16'] and '| fp32 |' in md and '| 1.0x |' in md
