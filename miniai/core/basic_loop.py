"""The plain training loop that the `Learner` replaces: a `fit` and its report (the course's first loop)."""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

__all__ = ['accuracy', 'report', 'fit']


def accuracy(out: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
    "Fraction of rows of `out` whose arg-max equals the target in `yb`."
    return (out.argmax(dim=1) == yb).float().mean()


def report(loss: torch.Tensor | float, preds: torch.Tensor, yb: torch.Tensor) -> None:
    "Print a batch's loss and accuracy to two decimals."
    print(f'{float(loss):.2f}, {float(accuracy(preds, yb)):.2f}')


def fit(epochs: int, model: nn.Module, loss_func: Callable, opt: torch.optim.Optimizer, train_dl: Iterable,
        valid_dl: Iterable) -> tuple[float, float]:
    "Train `model` for `epochs`, printing validation loss and accuracy after each; returns the last pair."
    for epoch in range(epochs):
        model.train()
        for xb, yb in train_dl:
            loss = loss_func(model(xb), yb)
            loss.backward()
            opt.step()
            opt.zero_grad()
        model.eval()
        with torch.no_grad():
            tot_loss, tot_acc, count = 0., 0., 0
            for xb, yb in valid_dl:
                pred = model(xb)
                n = len(xb)
                count += n
                tot_loss += loss_func(pred, yb).item() * n
                tot_acc += accuracy(pred, yb).item() * n
        print(epoch, tot_loss / count, tot_acc / count)
    return tot_loss / count, tot_acc / count  # pyright: ignore[reportPossiblyUnboundVariable, reportOperatorIssue]  (the course loop: epochs >= 1)
