"""bench/transfer.py's machinery (its numbers live in bench/results/transfer.md, never in tests)."""
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
