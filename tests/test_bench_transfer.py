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
    assert '| 89.7% ± 1.5 | 86.0% ± 1.0 | +3.7 ± 1.5 (+5.0 / +2.0 / +4.0) |' in row
    assert '`fine_tune(4, base_lr=0.01, freeze_epochs=1)` (90.0%)' in row and '`fit_one_cycle(5, 0.01)` (85.0%)' in row
