"""bench/transfer.py's machinery (its numbers live in bench/results/transfer.md, never in tests)."""
import pytest
import torch


def test_frozen_steps_keep_no_gradients_for_the_body():
    from bench.transfer import step_cost
    cost = step_cost(bs=2, size=32, steps=1)
    (_, unfrozen), (_, frozen) = cost['unfrozen'], cost['frozen']
    assert frozen < unfrozen / 10  # the head and BatchNorm only: resnet18's convolutions get no gradient


def test_pick_takes_per_class_images_renumbered_from_zero():
    from bench.transfer import _pick
    x, y = torch.zeros(100, 28, 28, dtype=torch.uint8), torch.arange(100) % 10
    xs, ys = _pick(x, y, range(5, 10), 3)
    assert xs.shape == (15, 1, 28, 28) and sorted(ys.tolist()) == [c for c in range(5) for _ in range(3)]


def test_the_pretrained_body_is_cached_by_its_settings(tmp_path, monkeypatch):
    "A second run with the same settings reads the saved body (no training); other settings train their own."
    from bench import transfer
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 256, (60, 28, 28), dtype=torch.uint8, generator=g), torch.arange(60) % 10
    settings = dict(per_class=4, epochs=1, lr=1e-2, bs=8)
    first = transfer.pretrained_state('small', settings, x, y, tmp_path)
    assert len(list(tmp_path.glob('small-*.pt'))) == 1

    def no_training(*a, **k): raise AssertionError('pretrained again although the cache holds these settings')
    monkeypatch.setattr(transfer, 'TrainLearner', no_training)
    again = transfer.pretrained_state('small', settings, x, y, tmp_path)
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)
    with pytest.raises(AssertionError, match='pretrained again'):
        transfer.pretrained_state('small', {**settings, 'epochs': 2}, x, y, tmp_path)


def test_the_grid_gives_fine_tune_its_frozen_epochs_and_both_methods_the_same_epochs_and_rates():
    from bench.transfer import configs
    c = configs(dict(epochs=[2, 5], freeze=[1, 3], lr=[1e-3, 1e-2]))
    assert c['scratch'] == [{'epochs': e, 'lr': lr} for e in (2, 5) for lr in (1e-3, 1e-2)]
    assert {(d['epochs'], d['lr']) for d in c['fine-tune']} == {(d['epochs'], d['lr']) for d in c['scratch']}
    assert {'epochs': 2, 'freeze': 3, 'lr': 1e-3} not in c['fine-tune'] and len(c['fine-tune']) == 6  # 3 of 2: none


def test_a_row_gives_each_seeds_gain_on_the_same_images():
    from bench.transfer import _row
    r = {'fine-tune': {'test': [0.90, 0.88, 0.91], 'cfg': {'epochs': 5, 'freeze': 1, 'lr': 0.01}, 'valid': 0.9},
         'scratch': {'test': [0.85, 0.86, 0.87], 'cfg': {'epochs': 5, 'lr': 0.01}, 'valid': 0.85}}
    row = _row('net', 20, r)
    # mean gain 3.667, std 1.528: the 95% interval is 3.667 -+ 4.303 * 1.528 / sqrt(3)
    assert '| 89.7% ± 1.5 | 86.0% ± 1.0 | +3.7 ± 1.5 [-0.1, +7.5] | 3 of 3 | +5.0 / +2.0 / +4.0 |' in row
    assert '`fine_tune(4, base_lr=0.01, freeze_epochs=1)` (90.0%)' in row and '`fit_one_cycle(5, 0.01)` (85.0%)' in row


def test_the_gain_interval_is_students_t_for_the_seeds_and_counts_losing_seeds():
    from bench.transfer import _row, gain_interval
    lo, hi = gain_interval([0.02, 0.04, 0.03, 0.05, 0.01, 0.03])  # mean 0.03, std 0.01414, t(5) = 2.571
    assert lo == pytest.approx(0.03 - 2.571 * 0.014142 / 6 ** 0.5, abs=1e-5) and hi == pytest.approx(0.06 - lo)
    assert gain_interval([0.02]) == (0.02, 0.02)
    with pytest.raises(ValueError, match='at most 20 seeds, got 21'):
        gain_interval([0.01] * 21)
    r = {'fine-tune': {'test': [0.90, 0.85], 'cfg': {'epochs': 5, 'freeze': 1, 'lr': 0.01}, 'valid': 0.9},
         'scratch': {'test': [0.88, 0.87], 'cfg': {'epochs': 5, 'lr': 0.01}, 'valid': 0.85}}
    assert '| 1 of 2 | +2.0 / -2.0 |' in _row('net', 20, r)


def test_the_tiny_run_writes_both_rows_and_the_step_costs(tmp_path):
    "The whole command on a few hundred real images: pretraining, both networks' rows, the frozen/unfrozen table."
    from bench.transfer import main
    out = tmp_path / 'transfer.md'
    main(['--tiny', '--out', str(out), '--cache', str(tmp_path / 'cache')])
    text = out.read_text()
    rows = [line for line in text.splitlines() if line.startswith(('| small ResNet', '| torchvision resnet18'))]
    assert len(rows) == 2 and all('| 20 |' in r and 'of 1 |' in r and '`fine_tune(' in r for r in rows), rows
    assert '| frozen |' in text and '| unfrozen |' in text and '--tiny' in text
    assert len(list((tmp_path / 'cache').glob('*.pt'))) == 2  # both pretrained networks were saved for reruns
